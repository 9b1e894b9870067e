"""A synthetic stroke data set in the reference release's layout, deterministic by seed.

Each case is a head on a 1 x 1 x 4 mm grid: air around a skull shell around a brain
(an irregular ellipsoid) with grey/white matter-like texture and ventricles. CTP frames
follow gamma-variate contrast arrival curves in HU. A lesion case has an infarct core
(almost no enhancement) inside a larger hypoperfused territory (delayed, lower
enhancement); DWI is bright and ADC dark in the core only, and the lesion mask is the core.
It exists to exercise every stage quickly on a CPU, not to be realistic in detail.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from .layouts import OPTIONAL_MODALITIES, find_cases
from .writer import save_nifti_atomic

VOXEL_MM = (1.0, 1.0, 4.0)
FRAME_SECONDS = 3.0


@dataclass(frozen=True)
class _Tissue:
    """Per-tissue values: CTP baseline and peak enhancement (HU), DWI and ADC intensities."""

    baseline_hu: float
    enhancement_hu: float
    dwi: float
    adc: float


_GREY = _Tissue(baseline_hu=38.0, enhancement_hu=35.0, dwi=520.0, adc=850.0)
_WHITE = _Tissue(baseline_hu=30.0, enhancement_hu=15.0, dwi=450.0, adc=750.0)
_CSF = _Tissue(baseline_hu=8.0, enhancement_hu=1.0, dwi=150.0, adc=2800.0)
_AIR_HU, _BONE_HU = -1000.0, 700.0
# Infarct core: restricted diffusion (DWI up, ADC down) and almost no contrast arrival.
_CORE_DWI, _CORE_ADC, _CORE_FLOW = 1.9, 0.55, 0.08
# Hypoperfused territory around the core: contrast arrives later, lower and more spread out.
_DELAY_S, _PENUMBRA_FLOW, _PENUMBRA_SPREAD = 6.0, 0.5, 1.5


def _gamma_variate(t: np.ndarray, arrival: np.ndarray, time_to_peak: np.ndarray, alpha: float = 3.0) -> np.ndarray:
    """Contrast curve normalized to peak 1 at arrival + time_to_peak, zero before arrival."""
    s = np.clip((t - arrival) / time_to_peak, 0.0, None)
    return s**alpha * np.exp(alpha * (1.0 - s))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], sigma_mm: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth random field (sigma in mm, on the anisotropic grid)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), [sigma_mm / v for v in VOXEL_MM])
    return (field - field.mean()) / (field.std() + 1e-12)


def _phantom_case(rng: np.random.Generator, shape: tuple[int, int, int], n_frames: int, lesion: bool) -> dict:
    """All arrays of one case: ctp (X x Y x Z x frames, HU), dwi, adc, mask, lesion."""
    nx, ny, nz = shape
    x, y, z = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    # Brain: an ellipsoid whose edge wobbles with a few random low-order harmonics.
    semi = np.array([0.40 * nx, 0.45 * ny, 0.70 * nz]) * rng.uniform(0.95, 1.05, 3)
    u, v, w = x / semi[0], y / semi[1], z / semi[2]
    radius = np.sqrt(u**2 + v**2 + w**2)
    angle = np.arctan2(v, u)
    edge = 1.0 + sum(rng.uniform(0.01, 0.04) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
    brain = radius < edge
    skull = (radius >= edge) & (radius < edge + 3.0 / semi[0])

    texture = _smooth_field(rng, shape, sigma_mm=3.0)
    white = brain & (texture > 0.0) & (radius < 0.8 * edge)
    ventricles = brain & (
        ((np.abs(x) - 0.12 * semi[0]) / (0.07 * semi[0])) ** 2 + (y / (0.25 * semi[1])) ** 2 + (w / 0.5) ** 2 < 1
    )
    def tissue_map(field: str) -> np.ndarray:
        grey, white_value, csf = (getattr(t, field) for t in (_GREY, _WHITE, _CSF))
        values = np.where(ventricles, csf, np.where(white, white_value, grey))
        return values * (1.0 + 0.05 * texture) * brain

    core = np.zeros(shape, dtype=bool)
    penumbra = np.zeros(shape, dtype=bool)
    if lesion:
        # Centre at 30-60% of the way to the edge in a random in-plane direction.
        theta = rng.uniform(0, 2 * np.pi)
        reach = rng.uniform(0.3, 0.6)
        centre = np.array([reach * np.cos(theta) * semi[0], reach * np.sin(theta) * semi[1], rng.uniform(-0.3, 0.3) * nz])
        size = np.array([rng.uniform(0.08, 0.15) * nx, rng.uniform(0.08, 0.15) * ny, rng.uniform(1.0, 2.0)])
        distance = np.sqrt(sum(((c - m) / s) ** 2 for c, m, s in zip((x, y, z), centre, size)))
        wobble = 0.15 * _smooth_field(rng, shape, sigma_mm=4.0)
        core = brain & ~ventricles & (distance + wobble < 1.0)
        penumbra = brain & ~core & (distance + wobble < 2.2)

    # CTP: baseline plus enhancement times the arrival curve; hypoperfused tissue is late,
    # lower and broader, the core barely enhances.
    t = np.arange(n_frames) * FRAME_SECONDS
    arrival = np.full(shape, rng.uniform(5.0, 9.0))
    time_to_peak = np.full(shape, 7.0)
    flow = np.ones(shape)
    arrival[penumbra | core] += _DELAY_S
    time_to_peak[penumbra | core] *= _PENUMBRA_SPREAD
    flow[penumbra] = _PENUMBRA_FLOW
    flow[core] = _CORE_FLOW
    curves = _gamma_variate(t, arrival[..., None], time_to_peak[..., None])
    ctp = tissue_map("baseline_hu")[..., None] + (tissue_map("enhancement_hu") * flow)[..., None] * curves
    ctp[~brain] = _AIR_HU
    ctp[skull] = _BONE_HU
    ctp += rng.normal(0.0, 3.0, ctp.shape)

    dwi = tissue_map("dwi") * np.where(core, _CORE_DWI, 1.0)
    adc = tissue_map("adc") * np.where(core, _CORE_ADC, 1.0)
    # Magnitude images: noise on a zero background stays positive, as on a scanner.
    dwi = np.abs(dwi + rng.normal(0.0, 10.0, shape))
    adc = np.abs(adc + rng.normal(0.0, 20.0, shape))
    return {
        "ctp": np.round(ctp).astype(np.int16),
        "dwi": dwi.astype(np.float32),
        "adc": adc.astype(np.float32),
        "mask": brain.astype(np.uint8),
        "lesion": core.astype(np.uint8),
    }


def _header(affine: np.ndarray, shape: tuple[int, ...]) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_zooms(VOXEL_MM + ((FRAME_SECONDS,) if len(shape) == 4 else ()))
    header.set_xyzt_units("mm", "sec")
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    return header


def make_phantom_dataset(
    out_dir: str | os.PathLike,
    n_cases: int = 8,
    shape: tuple[int, int, int] = (64, 64, 8),
    n_frames: int = 15,
    seed: int = 0,
    lesion_fraction: float = 0.75,
    *,
    progress: bool = True,
) -> list[Path]:
    """Write `n_cases` phantom cases to `out_dir/phantom_NNN/{ctp,dwi,adc,mask,lesion}.nii.gz`
    and return their folders. round(n_cases * lesion_fraction) cases have a lesion, chosen by
    `seed`; the rest are lesion-free. The same arguments always give identical files."""
    if n_cases < 1:
        raise ValueError(f"n_cases: must be >= 1, got {n_cases}")
    if len(shape) != 3 or min(shape) < 1 or min(shape[:2]) < 16:
        raise ValueError(f"shape: expected (X, Y, Z) with X, Y >= 16 and Z >= 1, got {tuple(shape)}")
    if n_frames < 2:
        raise ValueError(f"n_frames: must be >= 2, got {n_frames}")
    if not 0.0 <= lesion_fraction <= 1.0:
        raise ValueError(f"lesion_fraction: must be within [0, 1], got {lesion_fraction}")
    if seed < 0:  # numpy's generators take none ("expected non-negative integer", naming nothing)
        raise ValueError(f"seed: must be >= 0, got {seed}")
    shape = tuple(int(s) for s in shape)
    n_lesion = round(n_cases * lesion_fraction)
    with_lesion = set(np.random.default_rng(seed).permutation(n_cases)[:n_lesion].tolist())

    affine = np.diag(VOXEL_MM + (1.0,))
    affine[:3, 3] = [-(n - 1) / 2 * v for n, v in zip(shape, VOXEL_MM)]  # centre the head at 0
    out_dir = Path(out_dir)
    folders = []
    for i in tqdm(range(n_cases), desc="phantom", unit="case", disable=not progress):
        rng = np.random.default_rng([seed, i])  # per case, so a case does not depend on n_cases
        arrays = _phantom_case(rng, shape, n_frames, lesion=i in with_lesion)
        folder = out_dir / f"phantom_{i:03d}"
        for name, data in arrays.items():
            save_nifti_atomic(data, affine, _header(affine, data.shape), folder / f"{name}.nii.gz", dtype=data.dtype)
        folders.append(folder)
    return folders


def phantom_complete(root: str | os.PathLike, n_cases: int, shape: tuple[int, int, int]) -> bool:
    """Whether `root` holds exactly the `n_cases` cases make_phantom_dataset writes, each with every
    file and of `shape` (files are renamed into place whole, so a present file is a finished one;
    an interrupted generation leaves a case short)."""
    root = Path(root)
    if not root.is_dir():
        return False
    found = find_cases(root, require=OPTIONAL_MODALITIES, skip_bad=True)
    if found.errors or [c.case_id for c in found] != [f"phantom_{i:03d}" for i in range(n_cases)]:
        return False
    return all(tuple(nib.load(c.dwi).shape) == tuple(shape) for c in found)
