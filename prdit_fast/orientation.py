"""The one axis convention of prdit_fast, and the conversions to and from files.

Every volume in memory, every preprocessed ``.npy`` and every array the model sees or
produces is ``v[d, h, w]`` with

- depth ``d``: superior (index 0) -> inferior,
- height ``h``: anterior (index 0) -> posterior,
- width ``w``: patient right (index 0) -> patient left,

so ``v[k]`` is an axial slice as a radiologist displays it (seen from the feet, anterior
at the top, the patient's right on the left of the screen). In nibabel's terms the
voxel indices increase toward ``CANONICAL_AXCODES = ("I", "P", "L")``.

Readers bring any file to this order from its geometry (``to_canonical``): a DICOM
series from ImagePositionPatient / ImageOrientationPatient, a NIfTI file from its
affine (oblique acquisitions land on the closest axis-aligned grid). Writers go
through ``to_nifti``: the NIfTI data array is (x, y, z) = (w, h, d) with an affine
that says exactly that, so viewers show the anatomy the right way round and reading
the file back returns the same array.

Two kinds of file carry no usable geometry, and their layout is fixed here:

- NIfTI files whose affine is the identity. The official LIDC-IDRI preprocessing
  (``processed.nii.gz``) converts DICOM with dicom2nifti, which reorients the array to
  LAS (x right -> left, y posterior -> anterior, z inferior -> superior), and then
  saves it with ``np.eye(4)``, which would claim RAS. Such files are read as
  ``IDENTITY_AFFINE_AXCODES`` (LAS); a file truly in RAS must carry a non-identity
  affine (any real scanner geometry has an origin or spacing other than 0 / 1 mm).
- RAD-ChestCT ``.npz`` arrays and ``.npy`` arrays: taken as already in the canonical
  order (RAD-ChestCT stores axial slices first); nothing in the file says otherwise.
"""
from __future__ import annotations

import numpy as np

CANONICAL_AXCODES: tuple[str, str, str] = ("I", "P", "L")  # toward which v[d, h, w]'s indices increase
NIFTI_AXCODES: tuple[str, str, str] = ("L", "P", "I")  # the written NIfTI's (x, y, z) = (w, h, d)
IDENTITY_AFFINE_AXCODES: tuple[str, str, str] = ("L", "A", "S")  # dicom2nifti's layout, see above


def has_geometry(affine: np.ndarray) -> bool:
    """False for the identity affine (a file written without geometry)."""
    return not np.allclose(affine, np.eye(4))


def axcodes_of(affine: np.ndarray) -> tuple[str, str, str]:
    """The patient directions the voxel axes of a NIfTI affine point to (identity -> LAS)."""
    import nibabel as nib

    return IDENTITY_AFFINE_AXCODES if not has_geometry(affine) else tuple(nib.aff2axcodes(affine))


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An array (i, j, k) with a voxel -> RAS+ mm ``affine`` -> (canonical ``v[d, h, w]``,
    voxel spacing (3,) in mm along (d, h, w)). An identity affine is read as
    ``IDENTITY_AFFINE_AXCODES`` with 1 mm voxels."""
    from nibabel import orientations as ornt

    source = ornt.axcodes2ornt(axcodes_of(affine))
    transform = ornt.ornt_transform(source, ornt.axcodes2ornt(CANONICAL_AXCODES))
    volume = np.ascontiguousarray(ornt.apply_orientation(data, transform))
    zooms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    spacing = np.empty(3)
    for source_axis, (target_axis, _) in enumerate(transform):
        spacing[int(target_axis)] = zooms[source_axis]
    return volume, spacing


def nifti_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """The affine of ``to_nifti``'s array: (x, y, z) = (w, h, d) toward L, P, I, with
    ``spacing`` the voxel size along (d, h, w)."""
    sd, sh, sw = (float(s) for s in spacing)
    return np.diag([-sw, -sh, -sd, 1.0])  # L, P, I are the negative RAS directions


def to_nifti(volume: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Canonical ``v[d, h, w]`` -> (NIfTI data array (x, y, z), affine); the inverse of
    ``to_canonical``."""
    return np.ascontiguousarray(volume.transpose(2, 1, 0)), nifti_affine(spacing)
