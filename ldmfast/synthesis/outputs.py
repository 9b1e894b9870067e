"""A case's output files: where they go, whether they are complete, and writing them.

Layout: `OUT/<case>/dwi.nii.gz` and `adc.nii.gz` (sample 0, the release layout that
`ldmfast evaluate` reads), `dwi_s<k>.nii.gz` and `adc_s<k>.nii.gz` for further samples k, and
`synthesis.json` (settings, scale, slices), written last. Every file is written under a
temporary name and renamed, and the record is removed before a case is (re)written, so a case
is finished exactly when its record exists and names its files. A record also says which
settings made the files (`record_conflict`): a rerun resumes only what the same settings made.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from ldmfast.data import derived_header, sample_paths, save_nifti_atomic
from ldmfast.data.atomic import atomic_path
from ldmfast.data.writer import OUTPUT_CHANNELS, SYNTHESIS_RECORD, synthesized_volume

from .cases import SynthesisCase

RECORD_NAME = SYNTHESIS_RECORD
_TEMP_PREFIX = ".tmp-"  # ldmfast.data.atomic's temporary names
_SAMPLE_FILE = re.compile(r"^(?:%s)_s(\d+)\.nii\.gz$" % "|".join(OUTPUT_CHANNELS))


def read_record(out_dir: str | os.PathLike, case_id: str) -> dict | None:
    """A case's synthesis.json, or None when there is none (never written, or being rewritten)."""
    try:
        record = json.loads((Path(out_dir) / case_id / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def record_conflict(record: dict, settings: dict) -> str | None:
    """How a case's record differs from this run's settings (those the record has: records of
    older versions lack some), or None: outputs another run's settings made are not this run's.
    The model folder's path counts only in records without its fingerprint (model_files): with
    it, a model folder moved or copied elsewhere is still the model that made the outputs."""
    differ = []
    for key, value in settings.items():
        if key == "model" and "model_files" in record:
            continue
        if key in record and record[key] != value:
            was, now = repr(record[key]), repr(value)
            differ.append(f"{key} {was}, now {now}" if len(was) + len(now) <= 100 else key)
    return "; ".join(differ) or None


def case_complete(out_dir: str | os.PathLike, case_id: str, samples: int, record: dict | None = None) -> bool:
    """Whether the case's record (read from the folder unless given) names every file of `samples`
    samples, and each has a readable header."""
    record = read_record(out_dir, case_id) if record is None else record
    if record is None:
        return False
    listed = set(record.get("files") or ())
    for sample in range(samples):
        for path in sample_paths(out_dir, case_id, sample).values():
            if path.name not in listed:
                return False
            try:
                nib.load(path)
            except (OSError, ImageFileError, EOFError, ValueError):
                return False
    return True


def keep_first_samples(out_dir: str | os.PathLike, case_id: str, samples: int, record: dict) -> None:
    """Make a finished case of more samples one of its first `samples`, as a rerun asking fewer
    would have written it (sample k's seeds do not depend on how many were asked): the record,
    rewritten first, lists only those and says `samples`; then the further files go. Evaluation
    measures the samples a record lists, so the folder's cases keep one count."""
    keep = {path.name for k in range(samples) for path in sample_paths(out_dir, case_id, k).values()}
    case_dir = Path(out_dir) / case_id
    trimmed = {**record, "samples": samples, "files": [name for name in record.get("files", []) if name in keep]}
    with atomic_path(case_dir / RECORD_NAME) as tmp:
        tmp.write_text(json.dumps(trimmed, indent=1) + "\n")
    remove_samples_from(case_dir, samples)


def remove_samples_from(case_dir: Path, first: int) -> None:
    """Delete a case's sample files of sample `first` on (`first` >= 1: sample 0 is the case)."""
    for path in case_dir.iterdir():
        match = _SAMPLE_FILE.match(path.name)
        if match and int(match.group(1)) >= first:
            path.unlink(missing_ok=True)


def remove_stale_temporaries(case_dir: Path) -> None:
    """Delete temporary files a killed run left in a case folder. Only one process writes a
    case, so any temporary there at the start of its writing is a dead run's."""
    if case_dir.is_dir():
        for path in case_dir.iterdir():
            if path.name.startswith(_TEMP_PREFIX) and path.is_file():
                path.unlink(missing_ok=True)


def write_case(out_dir: str | os.PathLike, case: SynthesisCase, images: np.ndarray, record: dict) -> list[Path]:
    """Write a case's synthesized volumes, then its record.

    images: samples x S x 2 x H x W in the model's [-1, 1], one slice per entry of the case's
    slice_index, H x W the model slice size (fitted back to the case's in-plane size here).
    Voxels outside the brain mask, outside the model's slice where it was cropped (--size) and
    slices not synthesized are 0; intensities follow case.stats (its scale). The NIfTI files carry
    the CTP's affine and header (less its display window, description and intent). Sample files
    of an earlier run with more samples are removed."""
    prepared = case.prepared
    expected = (len(prepared.slice_index), len(OUTPUT_CHANNELS))
    if images.ndim != 5 or images.shape[1:3] != expected:
        raise ValueError(f"images: expected samples x {expected[0]} x 2 x H x W for case {case.case_id!r}, "
                         f"got {images.shape}")
    case_dir = Path(out_dir) / case.case_id
    (case_dir / RECORD_NAME).unlink(missing_ok=True)  # unfinished until the record is back
    remove_stale_temporaries(case_dir)
    header = derived_header(prepared.header)
    written = []
    for sample in range(images.shape[0]):
        paths = sample_paths(out_dir, case.case_id, sample)
        for channel, name in enumerate(OUTPUT_CHANNELS):
            volume = synthesized_volume(images[sample, :, channel], prepared, case.stats[name])
            written.append(save_nifti_atomic(volume, prepared.affine, header, paths[name]))
    remove_samples_from(case_dir, images.shape[0])  # an earlier run's further samples are not this run's
    record = {**record, "case_id": case.case_id, "scale": case.scale,
              "stats": {name: [s.low, s.high] for name, s in case.stats.items()},
              "slice_index": [int(i) for i in prepared.slice_index],
              "files": [p.name for p in written]}
    with atomic_path(case_dir / RECORD_NAME) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return written
