"""Reading, preprocessing and serving CT volumes (spec section 9)."""
from .dataset import VolumeDataset, average_pool, build_dataset
from .preprocess import center_crop_or_pad, preprocess_lidc, preprocess_rad, preprocess_volumes, resample_isotropic
from .readers import (
    VolumeReadError, find_volumes, read_dicom_series, read_npz, read_nifti, read_volume, read_volume_affine,
)

__all__ = [
    "VolumeDataset",
    "VolumeReadError",
    "average_pool",
    "build_dataset",
    "center_crop_or_pad",
    "find_volumes",
    "preprocess_lidc",
    "preprocess_rad",
    "preprocess_volumes",
    "read_dicom_series",
    "read_nifti",
    "read_npz",
    "read_volume",
    "read_volume_affine",
    "resample_isotropic",
]
