"""Writing synthesized slices back as NIfTI volumes on the input's grid and scale."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from .atomic import atomic_path
from .geometry import fit_to_size
from .preprocess import PreprocessedCase, VolumeStats, denormalize_mri

#: Files a finished case has in the output folder, one per synthesized channel.
OUTPUT_CHANNELS = ("dwi", "adc")
#: the record `ldmfast synthesize` writes last in each case folder (settings, scale and clip bounds),
#: which the evaluation reads back
SYNTHESIS_RECORD = "synthesis.json"


def save_nifti_atomic(
    data: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header,
    path: str | os.PathLike,
    *,
    dtype: np.dtype | type | str | None = np.float32,
) -> Path:
    """Write `data` as NIfTI with `affine` and every field of `header` except those that
    follow from the data (dimensions, data type). `dtype` is the on-disk type; None keeps
    the header's. The file appears at `path` only once fully written (temporary name, then
    rename). A Nifti2Header gives a NIfTI-2 file, anything else NIfTI-1."""
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = image_class(data, affine, header)
    if dtype is not None:
        img.set_data_dtype(dtype)
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


def derived_header(header: nib.Nifti1Header) -> nib.Nifti1Header:
    """A copy of an input's header for an image computed from it (a synthesized DWI from a CTP):
    the grid, units and orientation stay; the display window (cal_min/cal_max), description and
    intent described the input's values, so they are cleared (a viewer would otherwise window the
    DWI with the CT's range)."""
    out = header.copy()
    out["cal_min"] = 0
    out["cal_max"] = 0
    out["descrip"] = b""
    out["aux_file"] = b""
    out.set_intent("none")
    return out


def assemble_volume(
    slices: np.ndarray, slice_index: np.ndarray, spatial_shape: tuple[int, int, int], fill: float = 0.0
) -> np.ndarray:
    """Place S axial slices (S x X x Y) at `slice_index` of an X x Y x Z volume; the other
    slices are `fill`."""
    slices = np.asarray(slices)
    expected = (len(slice_index), *spatial_shape[:2])
    if slices.shape != expected:
        raise ValueError(f"slices: expected shape {expected} for these slice indices, got {slices.shape}")
    volume = np.full(spatial_shape, fill, dtype=np.float32)
    volume[:, :, np.asarray(slice_index)] = np.moveaxis(slices, 0, -1)
    return volume


def synthesized_volume(slices: np.ndarray, prepared: PreprocessedCase, stats: VolumeStats) -> np.ndarray:
    """One channel of a case's synthesized slices (S x H x W in the model's [-1, 1], one per entry
    of prepared.slice_index, H x W the model's slice size) as an X x Y x Z volume on the case's
    grid and intensity scale: fitted back to the case's plane, and 0 outside the brain mask, where a
    crop to the model's size left the plane uncovered (no synthesis there), and in the slices not
    synthesized."""
    in_plane = prepared.spatial_shape[:2]
    covered = fit_to_size(np.ones(slices.shape[-2:], dtype=np.float32), in_plane, fill=0.0)
    values = denormalize_mri(fit_to_size(slices, in_plane, fill=-1.0), stats) * (prepared.mask * covered)
    return assemble_volume(values, prepared.slice_index, prepared.spatial_shape)


def output_paths(out_dir: str | os.PathLike, case_id: str) -> dict[str, Path]:
    """Where a case's synthesized volumes go: `out_dir/<case_id>/{dwi,adc}.nii.gz` (the
    release layout, so outputs read back like any case)."""
    return {name: Path(out_dir) / case_id / f"{name}.nii.gz" for name in OUTPUT_CHANNELS}


def sample_paths(out_dir: str | os.PathLike, case_id: str, sample: int) -> dict[str, Path]:
    """{"dwi": path, "adc": path} of one sample of a case: `output_paths` for sample 0,
    `<case>/{dwi,adc}_s<k>.nii.gz` for the further samples k of `ldmfast synthesize --samples`."""
    if sample == 0:
        return output_paths(out_dir, case_id)
    return {name: Path(out_dir) / case_id / f"{name}_s{sample}.nii.gz" for name in OUTPUT_CHANNELS}


def write_synthesis(
    out_dir: str | os.PathLike,
    prepared: PreprocessedCase,
    synthesized,
    *,
    stats: dict[str, VolumeStats] | None = None,
) -> dict[str, Path]:
    """Write a case's synthesized slices as DWI and ADC volumes on its CTP's grid.

    synthesized: S x 2 x H x W (numpy or torch), model scale [-1, 1], one slice per entry
        of `prepared.slice_index`; H x W may be a training crop, it is fitted back.
    stats: {"dwi": VolumeStats, "adc": VolumeStats} mapping back to intensities; defaults to
        the case's own (kept from its DWI/ADC), and is required when it has none.
    Voxels outside the brain mask or the synthesized slice (a crop) and slices that were not
    synthesized are 0.
    """
    if stats is None:
        if prepared.dwi_stats is None:
            raise ValueError(f"stats: case {prepared.case_id!r} has no DWI/ADC statistics; pass them")
        stats = {"dwi": prepared.dwi_stats, "adc": prepared.adc_stats}
    if hasattr(synthesized, "detach"):
        synthesized = synthesized.detach().cpu().numpy()
    synthesized = np.asarray(synthesized, dtype=np.float32)
    n = len(prepared.slice_index)
    if synthesized.ndim != 4 or synthesized.shape[:2] != (n, len(OUTPUT_CHANNELS)):
        raise ValueError(f"synthesized: expected {n} x 2 x H x W for case {prepared.case_id!r}, got {synthesized.shape}")
    paths = output_paths(out_dir, prepared.case_id)
    header = derived_header(prepared.header)
    for channel, name in enumerate(OUTPUT_CHANNELS):
        volume = synthesized_volume(synthesized[:, channel], prepared, stats[name])
        save_nifti_atomic(volume, prepared.affine, header, paths[name])
    return paths


def outputs_complete(out_dir: str | os.PathLike, case_id: str) -> bool:
    """Whether a case's outputs all exist with a readable header, so a rerun can skip it.
    Files are only ever renamed into place whole, so a present file is a finished one."""
    for path in output_paths(out_dir, case_id).values():
        try:
            nib.load(path)
        except (FileNotFoundError, ImageFileError, OSError, EOFError):
            return False
    return True
