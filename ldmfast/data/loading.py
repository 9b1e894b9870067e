"""Loading one case's NIfTI files into validated arrays on a common grid."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from .brainmask import compute_brain_mask
from .errors import DataError
from .layouts import CaseFiles

#: Largest difference (in mm, per affine element) tolerated between modalities' affines:
#: co-registered files written by different tools differ by float rounding only.
AFFINE_TOLERANCE = 1e-3


@dataclass
class CaseVolumes:
    """One case's volumes on the CTP's voxel grid, checked for consistency.

    `header` and `affine` are the CTP's: the template for the case's synthesized outputs.
    """

    files: CaseFiles
    ctp: np.ndarray  # float32, X x Y x Z x frames, HU
    mask: np.ndarray  # bool, X x Y x Z
    dwi: np.ndarray | None  # float32, X x Y x Z
    adc: np.ndarray | None  # float32, X x Y x Z
    lesion: np.ndarray | None  # bool, X x Y x Z
    affine: np.ndarray
    header: nib.Nifti1Header
    mask_computed: bool

    @property
    def case_id(self) -> str:
        return self.files.case_id

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return self.mask.shape


def _open(case_id: str, path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(path)
    except FileNotFoundError:
        raise DataError("file not found", case=case_id, path=path) from None
    except (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError) as err:
        # HeaderDataError, ValueError: a header nibabel rejects (unknown data type, bad offsets)
        raise DataError(f"cannot read as NIfTI: {err}", case=case_id, path=path) from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"not a NIfTI image ({type(img).__name__})", case=case_id, path=path)
    return img


def _spatial_shape(case_id: str, path: Path, img: nib.Nifti1Image) -> tuple[int, ...]:
    shape = img.shape
    # Some tools store a 3D volume as X x Y x Z x 1.
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(f"expected a 3D volume, got shape {img.shape}", case=case_id, path=path)
    return shape


def _read(case_id: str, path: Path, img: nib.Nifti1Image, shape: tuple[int, ...]) -> np.ndarray:
    try:
        data = img.get_fdata(dtype=np.float32, caching="unchanged").reshape(shape)
    except (OSError, EOFError, zlib.error, ValueError, HeaderDataError) as err:
        raise DataError(f"cannot read the voxel data: {err}", case=case_id, path=path) from err
    bad = data.size - np.count_nonzero(np.isfinite(data))
    if bad:
        raise DataError(f"{bad} non-finite voxels (NaN or inf)", case=case_id, path=path)
    return data


def load_case(case: CaseFiles) -> CaseVolumes:
    """Read and check a case: CTP is 4D; other modalities are 3D with the CTP's spatial shape
    and affine; no voxel is NaN or inf; the brain mask (read, or computed from CTP when the
    case has none) is not empty. Any violation raises `DataError` naming the case and file.
    Headers are all checked before any voxel data is read, so a bad case fails fast.
    """
    cid = case.case_id
    ctp_img = _open(cid, case.ctp)
    if len(ctp_img.shape) != 4:
        raise DataError(
            f"CTP must be 4D (X x Y x Z x time frames); got {len(ctp_img.shape)}D shape {ctp_img.shape}",
            case=cid,
            path=case.ctp,
        )
    slice_axis = nib.aff2axcodes(ctp_img.affine)[2]
    if slice_axis not in ("S", "I"):
        # Slices are taken along the third array axis: another orientation would train on (or
        # synthesize) coronal or sagittal slices without a word.
        raise DataError(f"the third axis, along which slices are taken, runs {slice_axis} by the affine, not "
                        "inferior-superior: reorient the volumes to axial slices (e.g. fslreorient2std)",
                        case=cid, path=case.ctp)
    grid = ctp_img.shape[:3]
    others = {}
    for modality, path in case.files().items():
        if modality == "ctp":
            continue
        img = _open(cid, path)
        shape = _spatial_shape(cid, path, img)
        if shape != grid:
            raise DataError(
                f"{modality.upper()} shape {shape} differs from CTP's {grid} ({case.ctp.name})", case=cid, path=path
            )
        gap = float(np.max(np.abs(img.affine - ctp_img.affine)))
        if gap > AFFINE_TOLERANCE:
            raise DataError(
                f"{modality.upper()} affine differs from CTP's ({case.ctp.name}) by up to {gap:.4g}", case=cid, path=path
            )
        others[modality] = (path, img, shape)

    ctp = _read(cid, case.ctp, ctp_img, ctp_img.shape)
    arrays = {m: _read(cid, path, img, shape) for m, (path, img, shape) in others.items()}
    mask_computed = "mask" not in arrays
    mask = compute_brain_mask(ctp) if mask_computed else arrays["mask"] > 0
    if not mask.any():
        how = "brain mask computed from CTP is empty" if mask_computed else "brain mask is empty"
        raise DataError(how, case=cid, path=case.ctp if mask_computed else case.mask)
    lesion = arrays.get("lesion")
    return CaseVolumes(
        files=case,
        ctp=ctp,
        mask=mask,
        dwi=arrays.get("dwi"),
        adc=arrays.get("adc"),
        lesion=None if lesion is None else lesion > 0,
        affine=ctp_img.affine,
        header=ctp_img.header,
        mask_computed=mask_computed,
    )
