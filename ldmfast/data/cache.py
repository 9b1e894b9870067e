"""A one-time on-disk cache of preprocessed slices, one folder per case.

A case's folder is named by a hash of its files (paths, sizes, modification times) and the
preprocessing options, so it is reused exactly while neither changes and rebuilt when one
does. Building a case's folder removes that case's older folders, so a cache folder holds
one version per case: datasets with different options want different cache folders. A
folder is written complete under a temporary name and renamed into place, so a
folder with the final name is always whole; `meta.json` records the case's slice indices
and DWI/ADC statistics. Arrays are plain .npy files, opened memory-mapped by the dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .atomic import atomic_path
from .brainmask import BRAIN_MASK_VERSION
from .errors import DataError
from .geometry import crop_window
from .layouts import MODALITIES, CaseFiles
from .loading import load_case
from .preprocess import PreprocessedCase, PreprocessOptions, VolumeStats, preprocess_case

#: Bump when the cache's content or format changes, so old folders are not reused.
CACHE_VERSION = 1
#: Arrays of a case folder, S slices first; masks are stored as uint8 (a quarter the size).
ARRAY_NAMES = ("ctp", "target", "mask", "lesion")
_KEY_CHARS = 16


@dataclass(frozen=True)
class CacheEntry:
    """One cached case: its folder, slice count and what maps outputs back to the volume."""

    case_id: str
    folder: Path
    slice_index: tuple[int, ...]
    spatial_shape: tuple[int, int, int]
    dwi_stats: VolumeStats
    adc_stats: VolumeStats
    has_lesion: bool
    #: brain voxels of the cached slices per in-plane row (X) and column (Y): what a centre crop
    #: to the training size cuts away
    brain_rows: tuple[int, ...] = ()
    brain_cols: tuple[int, ...] = ()

    @property
    def n_slices(self) -> int:
        return len(self.slice_index)

    def brain_cut_by(self, size: tuple[int, int]) -> tuple[int, int]:
        """(at least how many brain voxels a centre crop to `size` cuts away, brain voxels): the
        larger of the rows' and the columns' loss (exact when only one axis is cropped)."""
        lost = []
        for counts, want in ((self.brain_rows, size[0]), (self.brain_cols, size[1])):
            kept = crop_window(len(counts), want)
            lost.append(sum(counts) - sum(counts[kept]))
        return max(lost), sum(self.brain_rows)

    def array_path(self, name: str) -> Path:
        return self.folder / f"{name}.npy"


def case_key(case: CaseFiles, options: PreprocessOptions) -> str:
    """Hash of what a cached case depends on: every file's path, size and mtime, which
    modalities are absent, the preprocessing options and the cache version."""
    files = {}
    for modality in MODALITIES:
        path = getattr(case, modality)
        if path is None:
            files[modality] = None
            continue
        try:
            st = os.stat(path)
        except OSError as err:
            raise DataError(f"cannot read: {err.strerror}", case=case.case_id, path=path) from None
        files[modality] = [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
    blob = json.dumps(
        {"version": CACHE_VERSION, "case": case.case_id, "files": files, "options": dataclasses.asdict(options),
         # A mask computed from the CTP changes with the algorithm: its cases are rebuilt when it
         # does (cases with a mask file keep their folders).
         **({"computed_mask": BRAIN_MASK_VERSION} if case.mask is None else {})},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:_KEY_CHARS]


def _folder_stem(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", case_id)


def _recorded_case_id(folder: Path) -> str | None:
    try:
        return json.loads((folder / "meta.json").read_text()).get("case_id")
    except (OSError, ValueError, AttributeError):
        return None


def _read_entry(folder: Path) -> CacheEntry | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return _read_entry_from(folder, meta)


def _read_entry_from(folder: Path, meta: dict) -> CacheEntry | None:
    if "brain_rows" not in meta:
        return _with_brain_counts(folder, meta)
    return CacheEntry(
        case_id=meta["case_id"],
        folder=folder,
        slice_index=tuple(meta["slice_index"]),
        spatial_shape=tuple(meta["spatial_shape"]),
        dwi_stats=VolumeStats(**meta["dwi_stats"]),
        adc_stats=VolumeStats(**meta["adc_stats"]),
        has_lesion=meta["has_lesion"],
        brain_rows=tuple(meta["brain_rows"]),
        brain_cols=tuple(meta["brain_cols"]),
    )


def _brain_counts(mask: np.ndarray) -> dict[str, list[int]]:
    """Brain voxels (mask: S x X x Y) per in-plane row and column, over the cached slices."""
    return {"brain_rows": mask.sum(axis=(0, 2)).tolist(), "brain_cols": mask.sum(axis=(0, 1)).tolist()}


def _with_brain_counts(folder: Path, meta: dict) -> CacheEntry | None:
    """A folder of an earlier version, whose meta.json lacks the brain counts: counted from its
    mask once and written back (atomically; a read-only cache is counted each time)."""
    try:
        meta = {**meta, **_brain_counts(np.load(folder / "mask.npy", mmap_mode="r").astype(bool))}
    except (OSError, ValueError):
        return None  # no usable mask: rebuilt
    try:
        with atomic_path(folder / "meta.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=1))
    except OSError:
        pass
    return _read_entry_from(folder, meta)


def _write_folder(folder: Path, prepared: PreprocessedCase) -> None:
    arrays = {
        "ctp": prepared.ctp,
        "target": prepared.target,
        "mask": prepared.mask.astype(np.uint8),
        "lesion": prepared.lesion.astype(np.uint8),
    }
    folder.mkdir()
    for name in ARRAY_NAMES:
        np.save(folder / f"{name}.npy", arrays[name])
    meta = {
        "case_id": prepared.case_id,
        "slice_index": prepared.slice_index.tolist(),
        "spatial_shape": list(prepared.spatial_shape),
        "dwi_stats": dataclasses.asdict(prepared.dwi_stats),
        "adc_stats": dataclasses.asdict(prepared.adc_stats),
        "has_lesion": prepared.has_lesion,
        **_brain_counts(prepared.mask),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _build(case: CaseFiles, folder: Path, options: PreprocessOptions) -> CacheEntry:
    prepared = preprocess_case(load_case(case), options, require_target=True)
    try:
        with atomic_path(folder) as tmp:
            _write_folder(tmp, prepared)
    except OSError:
        # Another process renamed the same folder into place first: both are identical.
        if _read_entry(folder) is None:
            raise
    # Drop this case's folders for earlier versions of its files or options. Ids that differ only
    # in characters the folder name replaces ("case 1", "case_1") share a stem: the id recorded in
    # the folder decides, so that one case never deletes another's.
    stale = re.compile(re.escape(_folder_stem(case.case_id)) + rf"-[0-9a-f]{{{_KEY_CHARS}}}")
    for other in folder.parent.iterdir():
        if other != folder and stale.fullmatch(other.name) and _recorded_case_id(other) == case.case_id:
            shutil.rmtree(other, ignore_errors=True)
    return _read_entry(folder)


@dataclass
class CacheResult:
    """What `ensure_cached` found: entries in case order, and how many it had to build."""

    entries: list[CacheEntry]
    errors: list[DataError]
    n_built: int
    n_reused: int


def ensure_cached(
    cases: list[CaseFiles],
    cache_dir: str | os.PathLike,
    options: PreprocessOptions = PreprocessOptions(),
    *,
    skip_bad: bool = False,
    progress: bool = True,
) -> CacheResult:
    """Make sure every case has a cache folder under `cache_dir`, building the missing ones
    (load, check, preprocess, write). Cases need DWI and ADC. A bad case raises `DataError`,
    or with `skip_bad` is left out and its error kept in the result."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entries: list[CacheEntry | None] = []
    todo: list[tuple[int, CaseFiles, Path]] = []
    errors: list[DataError] = []
    for case in cases:
        try:
            folder = cache_dir / f"{_folder_stem(case.case_id)}-{case_key(case, options)}"
        except DataError as err:
            if not skip_bad:
                raise
            errors.append(err)
            continue
        entry = _read_entry(folder)
        if entry is None:
            todo.append((len(entries), case, folder))
        entries.append(entry)
    n_built = 0
    for position, case, folder in tqdm(todo, desc="caching slices", unit="case", disable=not progress or not todo):
        try:
            entries[position] = _build(case, folder, options)
            n_built += 1
        except DataError as err:
            if not skip_bad:
                raise
            errors.append(err)
    kept = [e for e in entries if e is not None]
    return CacheResult(entries=kept, errors=errors, n_built=n_built, n_reused=len(entries) - len(todo))
