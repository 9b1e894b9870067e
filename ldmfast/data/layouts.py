"""Readers that list cases and their files for the three supported folder layouts.

Listing only checks that files exist; their content is checked when a case is loaded
(`ldmfast.data.loading.load_case`). Every reader returns a `CaseList`: with
`skip_bad=True` a bad case is left out and its `DataError` kept in `CaseList.errors`,
otherwise the first bad case raises.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import DataError

#: Modalities a case may have besides the always-required CTP.
OPTIONAL_MODALITIES = ("mask", "dwi", "adc", "lesion")
MODALITIES = ("ctp",) + OPTIONAL_MODALITIES
#: What a training set needs on top of CTP.
TRAINING_MODALITIES = ("dwi", "adc")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case. Only CTP is required; a missing mask is computed from CTP."""

    case_id: str
    ctp: Path
    mask: Path | None = None
    dwi: Path | None = None
    adc: Path | None = None
    lesion: Path | None = None

    def files(self) -> dict[str, Path]:
        """The modalities present, in `MODALITIES` order, mapped to their files."""
        return {m: getattr(self, m) for m in MODALITIES if getattr(self, m) is not None}


class CaseList(list):
    """A list of `CaseFiles`, plus the `DataError`s of the cases left out by `skip_bad`."""

    def __init__(self, cases: Iterable[CaseFiles] = (), errors: Iterable[DataError] = ()):
        super().__init__(cases)
        self.errors: list[DataError] = list(errors)


def _check_require(require: Iterable[str]) -> tuple[str, ...]:
    require = tuple(require)
    unknown = [m for m in require if m not in OPTIONAL_MODALITIES]
    if unknown:
        raise ValueError(f"require: unknown modality {unknown}; choose among {OPTIONAL_MODALITIES}")
    return require


_Item = TypeVar("_Item")


def _collect(items: Iterable[_Item], read_case: Callable[[_Item], CaseFiles], skip_bad: bool) -> CaseList:
    """Read every case, keeping the errors of bad ones when `skip_bad` (else raise the first)."""
    result = CaseList()
    for item in items:
        try:
            result.append(read_case(item))
        except DataError as err:
            if not skip_bad:
                raise
            result.errors.append(err)
    duplicated = sorted(i for i, n in Counter(c.case_id for c in result).items() if n > 1)
    if duplicated:
        raise DataError(f"case ids must be unique; repeated: {duplicated}")
    return result


def _missing(case_id: str, modality: str, expected: Path) -> DataError:
    return DataError(f"missing {modality.upper()} file", case=case_id, path=expected)


# --- 1. the reference release: one folder per case ------------------------------------------


def _release_file(case_dir: Path, modality: str) -> Path | None:
    found = [case_dir / f"{modality}{s}" for s in _NIFTI_SUFFIXES if (case_dir / f"{modality}{s}").is_file()]
    if len(found) > 1:
        raise DataError(f"both {found[0].name} and {found[1].name} exist; keep one", case=case_dir.name, path=found[0])
    return found[0] if found else None


def _read_release_case(case_dir: Path, require: tuple[str, ...]) -> CaseFiles:
    files = {m: _release_file(case_dir, m) for m in MODALITIES}
    for modality in ("ctp",) + require:
        if files[modality] is None:
            raise _missing(case_dir.name, modality, case_dir / f"{modality}.nii.gz")
    return CaseFiles(case_id=case_dir.name, **files)


def release_cases(root: str | os.PathLike, *, require: Iterable[str] = (), skip_bad: bool = False) -> CaseList:
    """Cases of the reference release's layout: `root/<case>/{ctp,dwi,adc,mask,lesion}.nii[.gz]`.

    `require` names optional modalities that must be present (e.g. `TRAINING_MODALITIES`).
    Folders whose name starts with "." are skipped (temporary files, caches).
    """
    root = Path(root)
    require = _check_require(require)
    if not root.is_dir():
        raise DataError("data folder not found", path=root)
    case_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not case_dirs:
        raise DataError("no case folder inside", path=root)
    return _collect(case_dirs, lambda d: _read_release_case(d, require), skip_bad)


# --- 2. ISLES'24 BIDS derivatives --------------------------------------------------------------

# Patterns tried in order within a session folder; the ISLES'24 releases differ on whether
# follow-up files carry "space-ncct" and on the session label ("ses-01" vs "ses-0001").
_ISLES_PATTERNS = {
    "ctp": (1, ("*space-ncct_ctp.nii*", "*_ctp.nii*")),
    "dwi": (2, ("*space-ncct_dwi.nii*", "*_dwi.nii*")),
    "adc": (2, ("*space-ncct_adc.nii*", "*_adc.nii*")),
    "lesion": (2, ("*space-ncct_lesion-msk.nii*", "*_lesion-msk.nii*")),
    "mask": (1, ("*space-ncct_brain-msk.nii*", "*_brain-msk.nii*")),
}
_SESSION = re.compile(r"ses-(\d+)$")


def _isles_file(subject: Path, session: int, patterns: tuple[str, ...]) -> Path | None:
    for ses_dir in sorted(subject.iterdir()):
        match = _SESSION.match(ses_dir.name)
        if not (ses_dir.is_dir() and match and int(match.group(1)) == session):
            continue
        for pattern in patterns:
            found = sorted(p for p in ses_dir.glob(pattern) if p.name.endswith(_NIFTI_SUFFIXES))
            if len(found) > 1:
                raise DataError(f"{len(found)} files match {pattern}; expected one", case=subject.name, path=found[0])
            if found:
                return found[0]
    return None


def _read_isles_case(subject: Path, require: tuple[str, ...]) -> CaseFiles:
    files = {m: _isles_file(subject, ses, patterns) for m, (ses, patterns) in _ISLES_PATTERNS.items()}
    for modality in ("ctp",) + require:
        if files[modality] is None:
            session, patterns = _ISLES_PATTERNS[modality]
            raise _missing(subject.name, modality, subject / f"ses-0{session}" / patterns[0])
    return CaseFiles(case_id=subject.name, **files)


def isles24_cases(root: str | os.PathLike, *, require: Iterable[str] = (), skip_bad: bool = False) -> CaseList:
    """Cases of ISLES'24 BIDS derivatives: `[root/]derivatives/sub-*/ses-01/*space-ncct_ctp.nii.gz`
    with follow-up DWI, ADC and lesion mask in `ses-02`. ISLES'24 ships no brain mask, so the
    mask is computed from CTP at load time (a `*brain-msk.nii.gz` in ses-01 is used if present).
    """
    root = Path(root)
    require = _check_require(require)
    derivatives = root / "derivatives" if (root / "derivatives").is_dir() else root
    if not derivatives.is_dir():
        raise DataError("data folder not found", path=root)
    subjects = sorted(p for p in derivatives.iterdir() if p.is_dir() and p.name.startswith("sub-"))
    if not subjects:
        raise DataError("no sub-* folder inside", path=derivatives)
    return _collect(subjects, lambda s: _read_isles_case(s, require), skip_bad)


# --- 3. a CSV manifest -------------------------------------------------------------------------

MANIFEST_COLUMNS = ("case_id",) + MODALITIES


def _read_manifest_row(row: dict[str, str], line: int, base: Path, manifest: Path, require: tuple[str, ...]) -> CaseFiles:
    case_id = (row.get("case_id") or "").strip()
    if None in row:
        columns = len(row) - 1
        raise DataError(f"line {line}: {columns + len(row[None])} cells, but the header has {columns} columns "
                        "(a stray comma?)", case=case_id or None, path=manifest)
    if not case_id:
        raise DataError(f"line {line}: empty case_id", path=manifest)
    files: dict[str, Path | None] = {}
    for modality in MODALITIES:
        cell = (row.get(modality) or "").strip()
        path = (base / cell) if cell else None  # an absolute cell replaces base
        if path is not None and not path.is_file():
            raise _missing(case_id, modality, path)
        files[modality] = path
    for modality in ("ctp",) + require:
        if files[modality] is None:
            raise DataError(f"line {line}: no {modality.upper()} file given", case=case_id, path=manifest)
    return CaseFiles(case_id=case_id, **files)


def manifest_cases(manifest: str | os.PathLike, *, require: Iterable[str] = (), skip_bad: bool = False) -> CaseList:
    """Cases listed in a CSV file with a header row `case_id,ctp[,mask,dwi,adc,lesion]`.

    Relative paths are relative to the manifest's folder; an empty cell means "absent".
    """
    manifest = Path(manifest)
    require = _check_require(require)
    if not manifest.is_file():
        raise DataError("manifest not found", path=manifest)
    with open(manifest, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets write a BOM
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or ()]
        unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
        if unknown or "case_id" not in columns or "ctp" not in columns:
            raise DataError(
                f"header must name case_id and ctp, and only columns among {MANIFEST_COLUMNS}; got {columns}",
                path=manifest,
            )
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:  # DictReader would keep the last column of a name and drop the others unseen
            raise DataError(f"header names {', '.join(repeated)} more than once", path=manifest)
        # DictReader files cells beyond the header's columns under the key None
        rows = [({k if k is None else k.strip(): v for k, v in row.items()}, i) for i, row in enumerate(reader, start=2)]
    return _collect(rows, lambda r: _read_manifest_row(r[0], r[1], manifest.parent, manifest, require), skip_bad)


# --- choosing the layout -------------------------------------------------------------------------

LAYOUTS = ("auto", "release", "isles24", "manifest")


def detect_layout(source: str | os.PathLike) -> str:
    """"manifest" for a .csv file, "isles24" for a folder with derivatives/ or sub-* folders,
    else "release"."""
    source = Path(source)
    if source.suffix.lower() == ".csv":
        return "manifest"
    if (source / "derivatives").is_dir() or (source.is_dir() and any(source.glob("sub-*/ses-*"))):
        return "isles24"
    return "release"


def find_cases(
    source: str | os.PathLike, *, layout: str = "auto", require: Iterable[str] = (), skip_bad: bool = False
) -> CaseList:
    """List the cases of `source` (a folder or a CSV manifest) in the given or detected layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: {layout!r} is not one of {LAYOUTS}")
    readers = {"release": release_cases, "isles24": isles24_cases, "manifest": manifest_cases}
    chosen = detect_layout(source) if layout == "auto" else layout
    return readers[chosen](source, require=require, skip_bad=skip_bad)

