"""ldmfast.data: NIfTI readers for three layouts, preprocessing as the reference release does
it, a cached and augmented slice dataset, the output writer and a phantom data set.

Pure Python (numpy, nibabel, scipy, torch): nothing here needs the compiled ops.
"""

from .augment import AugmentConfig, augment_slice
from .brainmask import compute_brain_mask
from .cache import CacheEntry, CacheResult, case_key, ensure_cached
from .dataset import SliceDataset, slice_sample
from .errors import DataError
from .geometry import fit_to_size
from .layouts import (
    LAYOUTS,
    MODALITIES,
    TRAINING_MODALITIES,
    CaseFiles,
    CaseList,
    detect_layout,
    find_cases,
    isles24_cases,
    manifest_cases,
    release_cases,
)
from .loading import CaseVolumes, load_case
from .phantom import make_phantom_dataset, phantom_complete
from .preprocess import (
    PreprocessedCase,
    PreprocessOptions,
    VolumeStats,
    ctp_to_unit,
    denormalize_mri,
    mri_to_unit,
    preprocess_case,
    resample_frames,
    usable_slices,
)
from .writer import (assemble_volume, derived_header, output_paths, outputs_complete, sample_paths, save_nifti_atomic,
                     write_synthesis)

__all__ = [
    "LAYOUTS",
    "MODALITIES",
    "TRAINING_MODALITIES",
    "AugmentConfig",
    "CacheEntry",
    "CacheResult",
    "CaseFiles",
    "CaseList",
    "CaseVolumes",
    "DataError",
    "PreprocessOptions",
    "PreprocessedCase",
    "SliceDataset",
    "VolumeStats",
    "assemble_volume",
    "augment_slice",
    "case_key",
    "compute_brain_mask",
    "ctp_to_unit",
    "denormalize_mri",
    "derived_header",
    "detect_layout",
    "ensure_cached",
    "find_cases",
    "fit_to_size",
    "isles24_cases",
    "load_case",
    "make_phantom_dataset",
    "phantom_complete",
    "manifest_cases",
    "mri_to_unit",
    "output_paths",
    "sample_paths",
    "outputs_complete",
    "preprocess_case",
    "release_cases",
    "resample_frames",
    "save_nifti_atomic",
    "slice_sample",
    "usable_slices",
    "write_synthesis",
]
