"""Image metrics on batches of slices: MAE, MSE, PSNR, SSIM, MS-SSIM and lesion MAE.

Every function takes `pred` and `ref` of shape (N, C, H, W) (a batch of slices, C channels
such as DWI and ADC) on any device, and returns one value per slice and channel, shape
(N, C), with `reduction="none"`, or their mean with `reduction="mean"`.

Masks restrict a metric to a region (the brain, the lesion): shape (N, H, W), (N, 1, H, W)
or (N, C, H, W), boolean or 0/1. Where a slice's region is empty the metric is undefined and
is NaN; "mean" averages the defined values only (NaN when none is). Without a mask the whole
slice counts.

`data_range` is explicit for PSNR, SSIM and MS-SSIM (the width of the intensity scale,
e.g. 2.0 for images in [-1, 1]): guessing it from the data makes numbers incomparable
between slices and papers. It is a number or anything broadcastable to (N, C), so DWI and
ADC, or volumes with different intensity scales, can each have their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

REDUCTIONS = ("none", "mean")
#: Wang, Simoncelli and Bovik (2003): weights of the 5 scales, finest first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WINDOW_SIZE = 11
WINDOW_SIGMA = 1.5
K1, K2 = 0.01, 0.03


def _check_pair(pred: torch.Tensor, ref: torch.Tensor) -> None:
    if pred.ndim != 4:
        raise ValueError(f"pred: expected a batch of slices (N, C, H, W), got shape {tuple(pred.shape)}")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref: shapes differ, {tuple(pred.shape)} vs {tuple(ref.shape)}")
    if pred.device != ref.device:
        raise ValueError(f"pred and ref: on different devices, {pred.device} vs {ref.device}")
    # NaN in a result means "no pixel to measure" (an empty mask), which the mean leaves out: a
    # NaN or inf in the images themselves must not pass for that and drop its slice unseen.
    for name, t in (("pred", pred), ("ref", ref)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: holds NaN or inf values")


def _work_dtype(pred: torch.Tensor) -> torch.dtype:
    # Sums over 40k pixels lose digits in half precision; float64 stays float64.
    return torch.float64 if pred.dtype == torch.float64 else torch.float32


def _mask_like(mask: torch.Tensor | None, pred: torch.Tensor, name: str = "mask") -> torch.Tensor | None:
    """The mask as a 0/1 tensor broadcastable to pred's (N, C, H, W), or None."""
    if mask is None:
        return None
    n, c, h, w = pred.shape
    mask = torch.as_tensor(mask, device=pred.device)
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[0] != n or mask.shape[1] not in (1, c) or mask.shape[2:] != (h, w):
        raise ValueError(
            f"{name}: expected shape ({n}, {h}, {w}), ({n}, 1, {h}, {w}) or ({n}, {c}, {h}, {w}), got {tuple(mask.shape)}"
        )
    return (mask != 0).to(_work_dtype(pred))


def _range_like(data_range, pred: torch.Tensor) -> torch.Tensor:
    """data_range as a positive (N, C) tensor."""
    if data_range is None:
        raise ValueError("data_range: required (e.g. 2.0 for images in [-1, 1]); it is never guessed from the data")
    rng = torch.as_tensor(data_range, dtype=_work_dtype(pred), device=pred.device)
    try:
        rng = torch.broadcast_to(rng, pred.shape[:2])
    except RuntimeError:
        raise ValueError(f"data_range: shape {tuple(rng.shape)} does not broadcast to (N, C) = {tuple(pred.shape[:2])}") from None
    if not bool((rng > 0).all()):
        raise ValueError("data_range: must be positive")
    return rng


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.nanmean()
    raise ValueError(f"reduction: {reduction!r} is not one of {REDUCTIONS}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over H, W per (N, C); with a mask, over the mask's pixels (NaN where it is empty)."""
    if mask is None:
        return values.mean(dim=(-2, -1))
    mask = mask.expand_as(values)
    count = mask.sum(dim=(-2, -1))
    total = (values * mask).sum(dim=(-2, -1))
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def mae(pred, ref, mask=None, *, reduction: str = "none") -> torch.Tensor:
    """Mean absolute error per slice and channel, over `mask` or the whole slice."""
    _check_pair(pred, ref)
    dt = _work_dtype(pred)
    return _reduce(_masked_mean((pred.to(dt) - ref.to(dt)).abs(), _mask_like(mask, pred)), reduction)


def mse(pred, ref, mask=None, *, reduction: str = "none") -> torch.Tensor:
    """Mean squared error per slice and channel, over `mask` or the whole slice."""
    _check_pair(pred, ref)
    dt = _work_dtype(pred)
    return _reduce(_masked_mean((pred.to(dt) - ref.to(dt)).square(), _mask_like(mask, pred)), reduction)


def psnr_from_mse(mse_values: torch.Tensor, data_range) -> torch.Tensor:
    """10 log10(data_range^2 / MSE): +inf for identical images, NaN where MSE is undefined."""
    rng = torch.as_tensor(data_range, dtype=mse_values.dtype, device=mse_values.device)
    return 10.0 * torch.log10(rng.square() / mse_values)


def psnr(pred, ref, mask=None, *, data_range, reduction: str = "none") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per slice and channel, over `mask` or the whole slice."""
    _check_pair(pred, ref)
    return _reduce(psnr_from_mse(mse(pred, ref, mask), _range_like(data_range, pred)), reduction)


def lesion_mae(pred, ref, lesion, *, reduction: str = "none") -> torch.Tensor:
    """MAE inside the lesion mask: NaN (undefined) for a slice without lesion pixels, which
    "mean" leaves out rather than counting as a perfect 0."""
    if lesion is None:
        raise ValueError("lesion: a lesion mask is required for lesion MAE")
    _check_pair(pred, ref)
    dt = _work_dtype(pred)
    return _reduce(_masked_mean((pred.to(dt) - ref.to(dt)).abs(), _mask_like(lesion, pred, "lesion")), reduction)


# --- structural similarity --------------------------------------------------------------------


def gaussian_window(size: int = WINDOW_SIZE, sigma: float = WINDOW_SIGMA, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The normalized 1D Gaussian of `size` taps; SSIM filters rows then columns with it."""
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype)


def _filter_valid(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of every channel of (B, K, H, W), 'valid' borders (no padding),
    as the reference SSIM implementation: the result is (H - size + 1) x (W - size + 1)."""
    size = window.numel()
    if x.device.type == "cuda":
        # In float64: cuDNN may run float32 convolutions in TF32 (10-bit mantissas, its default),
        # which moved SSIM by up to 0.01 in a simulation; TF32 never applies to float64.
        k, dtype = x.shape[1], x.dtype
        x, window = x.double(), window.double()
        x = F.conv2d(x, window.view(1, 1, 1, size).expand(k, 1, 1, size), groups=k)
        return F.conv2d(x, window.view(1, 1, size, 1).expand(k, 1, size, 1), groups=k).to(dtype)
    # On the CPU, depthwise convolution is slow; summing shifted views (11 multiply-adds per
    # axis) is about twice as fast for 192 x 224 slices, with the same result.
    taps = window.tolist()
    w = x.shape[-1] - size + 1
    rows = x[..., :w] * taps[0]
    for i in range(1, size):
        rows.add_(x[..., i : i + w], alpha=taps[i])
    h = x.shape[-2] - size + 1
    out = rows[..., :h, :] * taps[0]
    for i in range(1, size):
        out.add_(rows[..., i : i + h, :], alpha=taps[i])
    return out


def _ssim_maps(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM and contrast-structure maps of (B, 1, H, W) images already divided by their data
    range (so C1 = K1^2, C2 = K2^2, and float32 keeps its digits whatever the intensity unit)."""
    stats = _filter_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), window)
    mu_x, mu_y, xx, yy, xy = stats.unbind(dim=1)
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1, c2 = K1**2, K2**2
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1) * cs
    return ssim[:, None], cs[:, None]


def _crop_valid(mask: torch.Tensor, size: int) -> torch.Tensor:
    """The mask at the pixels where a 'valid' filter of `size` taps has its centre."""
    r = (size - 1) // 2
    return mask[..., r : mask.shape[-2] - r, r : mask.shape[-1] - r]


def _min_size(scales: int, size: int = WINDOW_SIZE) -> int:
    # Each scale halves (flooring); the coarsest must still hold one window.
    return size * 2 ** (scales - 1)


def _check_size(pred: torch.Tensor, scales: int) -> None:
    h, w = pred.shape[-2:]
    need = _min_size(scales)
    if min(h, w) < need:
        raise ValueError(
            f"pred: slices of {h} x {w} are too small for {scales}-scale SSIM with an {WINDOW_SIZE}-pixel window: "
            f"both sides must be at least {need}" + (" (use fewer scales, i.e. fewer weights)" if scales > 1 else "")
        )


def _prepare(pred, ref, mask, data_range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(N*C, 1, H, W) images divided by their data range, and the mask likewise (or None)."""
    n, c, h, w = pred.shape
    dt = _work_dtype(pred)
    rng = _range_like(data_range, pred)[..., None, None]
    x = (pred.to(dt) / rng).reshape(n * c, 1, h, w)
    y = (ref.to(dt) / rng).reshape(n * c, 1, h, w)
    m = _mask_like(mask, pred)
    if m is not None:
        m = m.expand(n, c, h, w).reshape(n * c, 1, h, w)
    return x, y, m


def ssim(pred, ref, mask=None, *, data_range, reduction: str = "none") -> torch.Tensor:
    """Structural similarity (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, valid borders)
    per slice and channel: the mean of the SSIM map over the window centres inside `mask`
    (or all of them)."""
    _check_pair(pred, ref)
    _check_size(pred, 1)
    n, c = pred.shape[:2]
    x, y, m = _prepare(pred, ref, mask, data_range)
    ssim_map, _ = _ssim_maps(x, y, gaussian_window(dtype=x.dtype, device=x.device))
    inside = None if m is None else _crop_valid(m, WINDOW_SIZE)
    return _reduce(_masked_mean(ssim_map, inside).reshape(n, c), reduction)


def ms_ssim(
    pred, ref, mask=None, *, data_range, weights: Sequence[float] = MS_SSIM_WEIGHTS, reduction: str = "none"
) -> torch.Tensor:
    """Multi-scale SSIM (Wang et al. 2003) per slice and channel.

    One scale per weight (5 by default, with the standard weights): at each scale but the
    last the mean contrast-structure term, at the last the mean SSIM, raised to the scale's
    weight and multiplied. Between scales images are averaged over 2 x 2 blocks (odd edges
    dropped). Negative terms are set to 0 first, as common implementations do, so that a
    fractional power is defined. With a mask, each scale averages over the window centres
    inside the mask, the mask being downsampled with the images (a block counts if any of
    its pixels does); a scale with no such centre makes the value NaN (undefined).
    Raises ValueError when the slice is too small for the number of scales.
    """
    _check_pair(pred, ref)
    weights = [float(v) for v in weights]
    if not weights:
        raise ValueError("weights: at least one scale is needed")
    _check_size(pred, len(weights))
    n, c = pred.shape[:2]
    x, y, m = _prepare(pred, ref, mask, data_range)
    window = gaussian_window(dtype=x.dtype, device=x.device)
    result = torch.ones(n * c, dtype=x.dtype, device=x.device)
    for level, weight in enumerate(weights):
        if level > 0:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            if m is not None:
                m = (F.avg_pool2d(m, 2) > 0).to(x.dtype)
        ssim_map, cs_map = _ssim_maps(x, y, window)
        term = ssim_map if level == len(weights) - 1 else cs_map
        inside = None if m is None else _crop_valid(m, WINDOW_SIZE)
        mean = _masked_mean(term, inside).reshape(-1)
        result = result * mean.clamp_min(0) ** weight
    return _reduce(result.reshape(n, c), reduction)
