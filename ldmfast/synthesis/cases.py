"""One case made ready for synthesis: its CTP slices at the model's slice size and the intensity
scale its outputs will be written in."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ldmfast.data import CaseFiles, DataError, PreprocessedCase, PreprocessOptions, VolumeStats, fit_to_size
from ldmfast.data.loading import load_case
from ldmfast.data.preprocess import mri_to_unit, preprocess_case

#: The [0, 1] scale as clip bounds: denormalizing with it maps [-1, 1] to [0, 1].
UNIT_STATS = VolumeStats(0.0, 1.0)


@dataclass
class SynthesisCase:
    """prepared: the case's usable slices (CTP-based selection) and geometry;
    ctp: S x frames x H x W model input in [-1, 1] at the model slice size;
    stats: {"dwi", "adc"} clip bounds to write with; scale: "case", "model" or "unit";
    cropped_brain: brain-mask voxels of the usable slices that a crop to the model's slice size
    (--size) leaves out (not synthesized: written as 0)."""

    prepared: PreprocessedCase
    ctp: np.ndarray
    stats: dict[str, VolumeStats]
    scale: str
    cropped_brain: int = 0

    @property
    def case_id(self) -> str:
        return self.prepared.case_id


def _case_stats(volumes, options: PreprocessOptions) -> dict[str, VolumeStats]:
    """The DWI and ADC clip bounds the reference release keeps per volume (PAPER.md)."""
    stats = {}
    for name in ("dwi", "adc"):
        try:
            stats[name] = mri_to_unit(getattr(volumes, name), volumes.mask, options.percentiles)[1]
        except ValueError as err:
            raise DataError(str(err), case=volumes.case_id, path=getattr(volumes.files, name)) from None
    return stats


def prepare_case(files: CaseFiles, *, frames: int, multiple: int, size: tuple[int, int] | None = None,
                 scale: str = "auto", reference_stats: dict[str, tuple[float, float]] | None = None) -> SynthesisCase:
    """Load and preprocess a case for synthesis. Slices are chosen where the CTP is usable
    (DWI/ADC, when present, serve only for the output scale, so a whole volume is synthesized).
    Raises DataError naming the case and file for anything that stops it."""
    if files.case_id in (".", "..") or "/" in files.case_id or "\\" in files.case_id:
        raise DataError("the case id names the output folder: it may not contain a path separator or be . or ..",
                        case=files.case_id, path=files.ctp)
    has_targets = files.dwi is not None and files.adc is not None
    if scale == "case" and not has_targets:
        raise DataError("scale = 'case' needs the case's DWI and ADC files (use scale = 'auto' or 'unit')",
                        case=files.case_id, path=files.ctp.parent)
    use_targets = has_targets and scale in ("auto", "case")
    # Files not needed are not read: a damaged lesion mask must not stop a synthesis.
    files = dataclasses.replace(files, lesion=None, **({} if use_targets else {"dwi": None, "adc": None}))
    options = PreprocessOptions(n_frames=frames)
    volumes = load_case(files)
    if use_targets:
        stats, chosen = _case_stats(volumes, options), "case"
        volumes = dataclasses.replace(volumes, dwi=None, adc=None)
    elif reference_stats is not None and scale == "auto":
        stats, chosen = {k: VolumeStats(*v) for k, v in reference_stats.items()}, "model"
    else:
        stats, chosen = {"dwi": UNIT_STATS, "adc": UNIT_STATS}, "unit"
    prepared = preprocess_case(volumes, options, warn_resampled=False)  # the run's log says it (add_case)
    ctp = prepared.ctp
    cropped_brain = 0
    if size is not None:
        ctp = fit_to_size(ctp, tuple(size), fill=-1.0)  # -1: the model scale of CTP background
        covered = fit_to_size(np.ones(tuple(size), dtype=bool), prepared.mask.shape[-2:], fill=False)
        cropped_brain = int(np.count_nonzero(prepared.mask & ~covered))
    elif any(s % multiple for s in ctp.shape[-2:]):
        raise DataError(f"in-plane size {ctp.shape[-2]} x {ctp.shape[-1]} is not divisible by {multiple}, as this "
                        "model needs; give --size H W to crop/pad slices to one that is", case=files.case_id,
                        path=files.ctp)
    return SynthesisCase(prepared, np.ascontiguousarray(ctp, dtype=np.float32), stats, chosen, cropped_brain)
