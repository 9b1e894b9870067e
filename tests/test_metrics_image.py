"""Image metrics against an independent numpy/scipy implementation written here."""
import math

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from ldmfast.metrics import lesion_mae, mae, ms_ssim, psnr, ssim
from ldmfast.metrics.image import MS_SSIM_WEIGHTS

# --- the independent implementation: 2D (not separable) Gaussian kernel, scipy convolution,
# block means by reshaping; float64 throughout. --------------------------------------------


def np_gaussian_2d(size=11, sigma=1.5):
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-x**2 / (2 * sigma**2))
    k = np.outer(g, g)
    return k / k.sum()


def np_ssim_terms(x, y, data_range, mask=None):
    """(mean SSIM, mean contrast-structure) of 2D images over window centres (inside mask)."""
    k = np_gaussian_2d()
    f = lambda a: convolve2d(a, k, mode="valid")  # noqa: E731 (symmetric kernel: convolution = correlation)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    s = (2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs
    if mask is None:
        return s.mean(), cs.mean()
    inner = mask[5:-5, 5:-5]
    if not inner.any():
        return math.nan, math.nan
    return s[inner].mean(), cs[inner].mean()


def np_halve(a, reduce):
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    blocks = a[:h, :w].reshape(h // 2, 2, w // 2, 2)
    return reduce(blocks, axis=(1, 3))


def np_ms_ssim(x, y, data_range, weights=MS_SSIM_WEIGHTS, mask=None):
    value = 1.0
    for level, w in enumerate(weights):
        if level:
            x, y = np_halve(x, np.mean), np_halve(y, np.mean)
            mask = None if mask is None else np_halve(mask, np.any)
        s, cs = np_ssim_terms(x, y, data_range, mask)
        term = s if level == len(weights) - 1 else cs
        value *= max(term, 0.0) ** w
    return value


def pair(n=2, c=2, h=48, w=40, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    # Smooth structure plus noise, so SSIM is neither ~0 nor ~1.
    base = torch.nn.functional.avg_pool2d(torch.rand(n, c, h + 4, w + 4, generator=g), 5, stride=1)
    ref = base * scale + offset
    pred = ref + 0.1 * scale * torch.randn(n, c, h, w, generator=g)
    return pred.double(), ref.double()


def test_psnr_and_mae_match_numpy():
    pred, ref = pair(seed=1)
    p, r = pred.numpy(), ref.numpy()
    want_psnr = 10 * np.log10(1.5**2 / ((p - r) ** 2).mean(axis=(2, 3)))
    np.testing.assert_allclose(psnr(pred, ref, data_range=1.5).numpy(), want_psnr, rtol=1e-12)
    np.testing.assert_allclose(mae(pred, ref).numpy(), np.abs(p - r).mean(axis=(2, 3)), rtol=1e-12)
    assert psnr(ref, ref, data_range=1.0)[0, 0] == math.inf


def test_masked_metrics_use_only_the_mask():
    pred, ref = pair(seed=2)
    mask = torch.zeros(2, 48, 40, dtype=torch.bool)
    mask[:, 10:30, 5:25] = True
    p, r, m = pred.numpy(), ref.numpy(), mask.numpy()
    for i in range(2):
        for c in range(2):
            d = p[i, c][m[i]] - r[i, c][m[i]]
            assert mae(pred, ref, mask)[i, c].item() == pytest.approx(np.abs(d).mean(), rel=1e-12)
            assert psnr(pred, ref, mask, data_range=2.0)[i, c].item() == pytest.approx(
                10 * np.log10(4.0 / (d**2).mean()), rel=1e-12)


def test_lesion_mae_is_the_direct_masked_mean_and_undefined_without_lesion():
    pred, ref = pair(n=3, seed=3)
    lesion = torch.zeros(3, 1, 48, 40)
    lesion[0, 0, 5:9, 7:20] = 1
    lesion[2, 0, 30, 30] = 1
    got = lesion_mae(pred, ref, lesion)
    for i in (0, 2):
        m = lesion[i, 0].bool()
        want = (pred[i][:, m] - ref[i][:, m]).abs().mean(dim=1)
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=0)
    assert torch.isnan(got[1]).all()  # no lesion: undefined, not 0
    assert lesion_mae(pred, ref, lesion, reduction="mean").item() == pytest.approx(got[[0, 2]].mean().item())
    assert torch.isnan(lesion_mae(pred, ref, torch.zeros(3, 48, 40), reduction="mean"))


@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (2000.0, 300.0)])
def test_ssim_and_ms_ssim_match_numpy(scale, offset):
    """Also in an intensity unit (ADC-like values) with float32 input: the range scaling keeps digits."""
    pred, ref = pair(n=2, c=2, h=180, w=184, seed=4, scale=scale, offset=offset)
    rng = torch.tensor([[2.0 * scale, 1.5 * scale]])
    got_ms = ms_ssim(pred.float(), ref.float(), data_range=rng)
    got_s = ssim(pred.float(), ref.float(), data_range=rng)
    for i in range(2):
        for c in range(2):
            x, y, L = pred[i, c].numpy(), ref[i, c].numpy(), rng[0, c].item()
            assert got_ms[i, c].item() == pytest.approx(np_ms_ssim(x, y, L), abs=2e-5)
            assert got_s[i, c].item() == pytest.approx(np_ssim_terms(x, y, L)[0], abs=2e-5)
    assert 0.2 < got_ms.min() and got_ms.max() < 0.999


def test_masked_ms_ssim_matches_numpy_and_is_nan_for_a_tiny_mask():
    pred, ref = pair(n=2, c=1, h=64, w=70, seed=5)
    mask = torch.zeros(2, 64, 70, dtype=torch.bool)
    mask[0, 8:50, 12:60] = True
    mask[1, 0, 0] = True  # on the border: no window centre inside
    weights = MS_SSIM_WEIGHTS[:3]
    got = ms_ssim(pred, ref, mask, data_range=1.0, weights=weights)
    want = np_ms_ssim(pred[0, 0].numpy(), ref[0, 0].numpy(), 1.0, weights, mask[0].numpy())
    assert got[0, 0].item() == pytest.approx(want, rel=1e-10)
    assert torch.isnan(got[1, 0])


def test_ms_ssim_too_small_is_a_clear_error():
    pred, ref = pair(h=64, w=64)
    with pytest.raises(ValueError, match=r"64 x 64 are too small for 5-scale SSIM.*at least 176"):
        ms_ssim(pred, ref, data_range=1.0)


def test_argument_errors():
    pred, ref = pair()
    with pytest.raises(ValueError, match="data_range: required"):
        psnr(pred, ref, data_range=None)
    with pytest.raises(ValueError, match="shapes differ"):
        mae(pred, ref[:1])
    with pytest.raises(ValueError, match="mask: expected shape"):
        mae(pred, ref, torch.ones(2, 10, 10))
    with pytest.raises(ValueError, match="reduction"):
        mae(pred, ref, reduction="sum")
    with pytest.raises(ValueError, match="does not broadcast"):
        psnr(pred, ref, data_range=torch.ones(3))
    # A NaN or inf pixel would make its slice's value NaN, which the mean drops as "empty mask".
    bad = pred.clone()
    bad[0, 0, 3, 4] = float("nan")
    for fn, kwargs in ((mae, {}), (psnr, {"data_range": 2.0}), (ssim, {"data_range": 2.0})):
        with pytest.raises(ValueError, match="pred: holds NaN or inf"):
            fn(bad, ref, reduction="mean", **kwargs)
    with pytest.raises(ValueError, match="ref: holds NaN or inf"):
        mae(pred, ref.clone().fill_(float("inf")))


def test_identical_images_score_perfectly_and_mean_reduces():
    _, ref = pair(h=180, w=180)
    assert torch.allclose(ms_ssim(ref, ref, data_range=1.0), torch.ones(2, 2, dtype=torch.float64))
    assert mae(ref, ref, reduction="mean").item() == 0.0


@pytest.mark.cuda
def test_ssim_on_a_gpu_equals_the_cpu_in_float32():
    # cuDNN's default TF32 for float32 convolutions would move SSIM by ~1e-3 to 1e-2.
    g = torch.Generator().manual_seed(5)
    ref = torch.rand(4, 2, 96, 112, generator=g) * 2 - 1
    pred = (ref + 0.2 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    cpu = ms_ssim(pred, ref, data_range=2.0, weights=MS_SSIM_WEIGHTS[:3])
    gpu = ms_ssim(pred.cuda(), ref.cuda(), data_range=2.0, weights=MS_SSIM_WEIGHTS[:3]).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ssim(pred.cuda(), ref.cuda(), data_range=2.0).cpu(), ssim(pred, ref, data_range=2.0),
                               rtol=1e-5, atol=1e-6)
