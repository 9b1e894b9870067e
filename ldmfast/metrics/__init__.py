"""ldmfast.metrics: the paper's evaluation (MAE, PSNR, SSIM, MS-SSIM, lesion MAE, FID) on
batches of slices, per volume and per data set, and an HTML report."""

from .extractors import EXTRACTORS, build_extractor, extract_features, load_extractor
from .fid import FeatureStatistics, feature_statistics, fid_from_features, fid_from_statistics, frechet_distance
from .image import MS_SSIM_WEIGHTS, lesion_mae, mae, ms_ssim, mse, psnr, psnr_from_mse, ssim

__all__ = [
    "EXTRACTORS",
    "MS_SSIM_WEIGHTS",
    "FeatureStatistics",
    "build_extractor",
    "extract_features",
    "feature_statistics",
    "fid_from_features",
    "fid_from_statistics",
    "frechet_distance",
    "lesion_mae",
    "load_extractor",
    "mae",
    "ms_ssim",
    "mse",
    "psnr",
    "psnr_from_mse",
    "ssim",
]
