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


def reorient(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An array (i, j, k) with a voxel -> RAS+ mm ``affine`` -> (canonical ``v[d, h, w]``,
    its affine: voxel (d, h, w) -> RAS+ mm). Only axes are permuted and flipped, so the
    returned affine keeps the file's exact geometry (origin, obliquity). An identity
    affine is read as ``IDENTITY_AFFINE_AXCODES`` with 1 mm voxels."""
    from nibabel import orientations as ornt

    affine = np.asarray(affine, dtype=np.float64)
    if not has_geometry(affine):
        affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS, origin 0: the layout of such files (module docstring)
    transform = ornt.ornt_transform(ornt.axcodes2ornt(axcodes_of(affine)), ornt.axcodes2ornt(CANONICAL_AXCODES))
    volume = np.ascontiguousarray(ornt.apply_orientation(data, transform))
    return volume, affine @ ornt.inv_ornt_aff(transform, data.shape)


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """The voxel size (3,) in mm along the array axes of ``affine`` (its column norms)."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An array (i, j, k) with a voxel -> RAS+ mm ``affine`` -> (canonical ``v[d, h, w]``,
    voxel spacing (3,) in mm along (d, h, w)); ``reorient`` also gives the affine."""
    volume, canonical = reorient(data, affine)
    return volume, voxel_sizes(canonical)


def canonical_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """The affine (voxel (d, h, w) -> RAS+ mm) of a canonical array with voxel size
    ``spacing`` along (d, h, w) and voxel (0, 0, 0) at the origin."""
    sd, sh, sw = (float(s) for s in spacing)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = -sd, -sh, -sw, 1.0  # I, P, L: negative RAS
    return affine


def nifti_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """The affine of ``to_nifti``'s array: (x, y, z) = (w, h, d) toward L, P, I, with
    ``spacing`` the voxel size along (d, h, w)."""
    return canonical_affine(spacing)[:, [2, 1, 0, 3]]


def to_nifti(volume: np.ndarray, spacing: tuple[float, float, float] | None = None,
             affine: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Canonical ``v[d, h, w]`` -> (NIfTI data array (x, y, z), affine); the inverse of
    ``to_canonical``. Geometry from ``affine`` (voxel (d, h, w) -> RAS+ mm, e.g. the one
    ``reorient`` returned: the written file overlays the original in world space) or, when
    None, from ``spacing`` with the origin at voxel 0."""
    if affine is None:
        if spacing is None:
            raise ValueError("to_nifti needs the spacing or the affine of the volume")
        affine = canonical_affine(spacing)
    return np.ascontiguousarray(volume.transpose(2, 1, 0)), np.asarray(affine, dtype=np.float64)[:, [2, 1, 0, 3]]
