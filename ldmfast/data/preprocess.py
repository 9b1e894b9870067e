"""Intensity preprocessing and slice selection as the reference release does it (PAPER.md).

Volumes are mapped to [0, 1] first ("unit" scale), where "non-zero" is the slice-selection
test, then to [-1, 1] for the models. DWI and ADC keep their per-volume clip bounds
(`VolumeStats`) so synthesized slices map back to the original intensity scale.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from .errors import DataError
from .loading import CaseVolumes

FRAME_POLICIES = ("resample", "refuse")


@dataclass(frozen=True)
class PreprocessOptions:
    """How volumes become model inputs. Part of the slice cache's key: change one, rebuild.

    n_frames: CTP frames the model expects (15 in the release).
    frame_policy: what to do with another number of frames: "resample" (linear interpolation
        in time over the same acquisition window) or "refuse" (raise `DataError`).
    ctp_window: HU range CTP is clipped to before scaling to [0, 1].
    percentiles: DWI/ADC clip bounds, as percentiles of the values inside the brain mask.
    """

    n_frames: int = 15
    frame_policy: str = "resample"
    ctp_window: tuple[float, float] = (0.0, 200.0)
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self):
        if self.n_frames < 1:
            raise ValueError(f"n_frames: must be >= 1, got {self.n_frames}")
        if self.frame_policy not in FRAME_POLICIES:
            raise ValueError(f"frame_policy: {self.frame_policy!r} is not one of {FRAME_POLICIES}")
        if not self.ctp_window[0] < self.ctp_window[1]:
            raise ValueError(f"ctp_window: low must be below high, got {self.ctp_window}")
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles: need 0 <= low < high <= 100, got {self.percentiles}")


@dataclass(frozen=True)
class VolumeStats:
    """Per-volume clip bounds: `low` maps to 0 (then -1) and `high` to 1 (then +1)."""

    low: float
    high: float


@dataclass
class PreprocessedCase:
    """The usable slices of a case, slice axis first, ready for the models.

    ctp: S x frames x X x Y, target: S x 2 (DWI, ADC) x X x Y, both float32 in [-1, 1];
    mask, lesion: S x X x Y bool (lesion all False when the case has no lesion file);
    slice_index: the S axial indices (last spatial axis) these slices come from.
    target and the stats are None when the case has no DWI/ADC (synthesis only).
    """

    case_id: str
    slice_index: np.ndarray
    ctp: np.ndarray
    target: np.ndarray | None
    mask: np.ndarray
    lesion: np.ndarray
    dwi_stats: VolumeStats | None
    adc_stats: VolumeStats | None
    spatial_shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header
    has_lesion: bool
    source_frames: int  # the CTP's time frames before resampling to the model's


def resample_frames(ctp: np.ndarray, n_frames: int) -> np.ndarray:
    """Linearly interpolate the last (time) axis to `n_frames` frames spanning the same
    window: the first and last frames are kept, the ones between are interpolated."""
    t = ctp.shape[-1]
    if t == n_frames:
        return ctp
    if t < 2:
        raise ValueError(f"ctp: cannot interpolate in time from {t} frame")
    pos = np.linspace(0.0, t - 1, n_frames)
    lo = np.minimum(np.floor(pos).astype(int), t - 2)
    w = (pos - lo).astype(ctp.dtype)
    return ctp[..., lo] * (1 - w) + ctp[..., lo + 1] * w


def ctp_to_unit(ctp: np.ndarray, mask: np.ndarray, window: tuple[float, float] = (0.0, 200.0)) -> np.ndarray:
    """CTP (X x Y x Z x frames, HU) clipped to `window`, scaled to [0, 1], zero outside `mask`."""
    low, high = window
    unit = (np.clip(ctp, low, high) - np.float32(low)) / np.float32(high - low)
    unit *= mask[..., None]
    return unit.astype(np.float32, copy=False)


def mri_to_unit(volume: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)):
    """DWI or ADC: negatives to 0, clip to the in-mask percentiles, scale to [0, 1], zero
    outside `mask`. Returns the unit volume and its `VolumeStats` (the clip bounds)."""
    volume = np.maximum(volume, 0)
    low, high = np.percentile(volume[mask], percentiles)
    if not high > low:
        raise ValueError(f"constant intensity {low:g} inside the brain mask: cannot scale")
    unit = (np.clip(volume, low, high) - np.float32(low)) / np.float32(high - low)
    unit *= mask
    return unit.astype(np.float32, copy=False), VolumeStats(float(low), float(high))


def denormalize_mri(x: np.ndarray, stats: VolumeStats) -> np.ndarray:
    """Map model-scale values ([-1, 1]) back to the volume's intensity scale. Values beyond
    [-1, 1] are clipped: training targets never leave that range, so neither may outputs."""
    unit = (np.clip(x, -1.0, 1.0) + 1.0) / 2.0
    return (unit * (stats.high - stats.low) + stats.low).astype(np.float32)


def usable_slices(mask: np.ndarray, *unit_volumes: np.ndarray) -> np.ndarray:
    """Axial indices where every unit-scale volume (X x Y x Z [x C]) is non-zero somewhere
    inside `mask` (X x Y x Z)."""
    usable = mask.any(axis=(0, 1))
    for vol in unit_volumes:
        inside = (vol > 0) & (mask if vol.ndim == 3 else mask[..., None])
        usable &= inside.any(axis=(0, 1) if vol.ndim == 3 else (0, 1, 3))
    return np.flatnonzero(usable)


def _to_signed(unit: np.ndarray) -> np.ndarray:
    """[0, 1] -> [-1, 1], in place (the argument is a fresh copy in every caller)."""
    unit *= 2
    unit -= 1
    return unit


def _slices_first(volume: np.ndarray, index: np.ndarray) -> np.ndarray:
    """X x Y x Z [x C] -> S x [C x] X x Y, contiguous, for the chosen axial slices."""
    picked = volume[:, :, index]
    order = (2, 0, 1) if volume.ndim == 3 else (2, 3, 0, 1)
    return np.ascontiguousarray(picked.transpose(order))


def preprocess_case(
    volumes: CaseVolumes, options: PreprocessOptions = PreprocessOptions(), *, require_target: bool = False,
    warn_resampled: bool = True,
) -> PreprocessedCase:
    """Preprocess a loaded case and keep its usable slices; a CTP resampled in time is warned about
    unless `warn_resampled` is False (the caller says it its own way). Raises `DataError` naming the case
    and file for a wrong number of CTP frames under frame_policy="refuse", a constant DWI/ADC
    inside the mask, a missing DWI/ADC when `require_target`, or no usable slice."""
    cid, files = volumes.case_id, volumes.files
    frames = volumes.ctp.shape[-1]
    if frames != options.n_frames and (options.frame_policy == "refuse" or frames < 2):
        raise DataError(
            f"CTP has {frames} time frames, the model expects {options.n_frames} "
            + ("(frame_policy='refuse')" if frames >= 2 else "(cannot interpolate from one frame)"),
            case=cid,
            path=files.ctp,
        )
    if frames != options.n_frames and warn_resampled:  # said: a model trained on other timing may not transfer
        warnings.warn(f"case {cid!r}, file {files.ctp}: CTP has {frames} time frames, resampled in time to the "
                      f"model's {options.n_frames} (frame_policy='refuse' makes this an error)", stacklevel=2)
    mask = volumes.mask
    ctp = ctp_to_unit(resample_frames(volumes.ctp, options.n_frames), mask, options.ctp_window)

    has_target = volumes.dwi is not None and volumes.adc is not None
    if require_target and not has_target:
        absent = "DWI" if volumes.dwi is None else "ADC"
        raise DataError(
            f"no {absent} file, needed for training (list cases with require=TRAINING_MODALITIES to catch this early)",
            case=cid,
            path=files.ctp.parent,
        )
    units, stats = [], []
    if has_target:
        for name, vol in (("dwi", volumes.dwi), ("adc", volumes.adc)):
            try:
                unit, st = mri_to_unit(vol, mask, options.percentiles)
            except ValueError as err:
                raise DataError(str(err), case=cid, path=getattr(files, name)) from None
            units.append(unit)
            stats.append(st)

    index = usable_slices(mask, ctp, *units)
    if index.size == 0:
        what = "DWI, ADC and CTP are all" if has_target else "CTP is"
        raise DataError(f"no usable slice: none where {what} non-zero inside the mask", case=cid, path=files.ctp)
    target = None
    if has_target:
        target = _to_signed(np.stack([_slices_first(u, index) for u in units], axis=1))
    lesion = volumes.lesion if volumes.lesion is not None else np.zeros_like(mask)
    return PreprocessedCase(
        case_id=cid,
        slice_index=index,
        ctp=_to_signed(_slices_first(ctp, index)),
        target=target,
        mask=_slices_first(mask, index),
        lesion=_slices_first(lesion, index),
        dwi_stats=stats[0] if has_target else None,
        adc_stats=stats[1] if has_target else None,
        spatial_shape=volumes.spatial_shape,
        affine=volumes.affine,
        header=volumes.header,
        has_lesion=volumes.lesion is not None,
        source_frames=frames,
    )
