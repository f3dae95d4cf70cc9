"""Readers for CT volumes: DICOM series, NIfTI and RAD-ChestCT ``.npz``.

Every reader returns ``(volume, spacing)``: ``volume`` a float32 array of
Hounsfield units in prdit_fast's one axis order ``v[d, h, w]`` (depth superior ->
inferior, height anterior -> posterior, width patient right -> left; defined and
documented in ``prdit_fast.orientation``) and ``spacing`` the voxel size in mm along
those axes, shape (3,). DICOM series and NIfTI files are reoriented from their
geometry; RAD-ChestCT ``.npz`` arrays carry none and are taken as stored (see
``prdit_fast.orientation``); their spacing is reported as 1 mm unless the archive
holds a ``spacing`` array.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..orientation import to_canonical

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NPZ_SUFFIX = ".npz"
DICOM_SUFFIX = ".dcm"

# Relative tolerance on slice gaps: DICOM positions are written with limited
# precision, so gaps of a regular series agree only to a fraction of a percent.
_GAP_TOLERANCE = 0.1


class VolumeReadError(ValueError):
    """A file or series that cannot be read as one CT volume."""


def _lps_to_ras(affine: np.ndarray) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def read_dicom_series(directory: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one DICOM series directory -> (float32 HU volume (d, h, w), spacing (3,) mm).

    Files that are not DICOM (e.g. LIDC's XML annotations) and DICOM objects
    without pixel data are ignored. Slices are ordered by ImagePositionPatient
    projected on the slice normal (cross product of the ImageOrientationPatient
    direction cosines). Raises VolumeReadError for several series in one
    directory, duplicate slice positions, uneven slice gaps (missing slices),
    inconsistent orientation or slice size, or fewer than two slices.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    directory = Path(directory)
    if not directory.is_dir():
        raise VolumeReadError(f"{directory}: not a directory (a DICOM series is read from its folder)")
    slices = []
    for f in sorted(p for p in directory.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(f)
        except InvalidDicomError:
            continue
        if "PixelData" not in ds:
            continue
        slices.append((f, ds))
    if not slices:
        raise VolumeReadError(f"{directory}: no DICOM images found")

    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise VolumeReadError(
            f"{directory}: mixed series: {len(series)} SeriesInstanceUIDs ({', '.join(sorted(series)[:4])}"
            f"{', ...' if len(series) > 4 else ''}); put each series in its own folder"
        )
    if len(slices) < 2:
        raise VolumeReadError(f"{directory}: a volume needs at least 2 slices, found {len(slices)}")

    missing = [str(f.name) for f, ds in slices if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds
               or "PixelSpacing" not in ds]
    if missing:
        raise VolumeReadError(
            f"{directory}: {len(missing)} slices lack ImagePositionPatient / ImageOrientationPatient / "
            f"PixelSpacing (e.g. {missing[0]}); cannot place them in space"
        )
    orient = np.array([float(v) for v in slices[0][1].ImageOrientationPatient], dtype=np.float64)
    shape = (int(slices[0][1].Rows), int(slices[0][1].Columns))
    for f, ds in slices:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], orient, atol=1e-4):
            raise VolumeReadError(f"{directory}: {f.name} has a different ImageOrientationPatient; not one volume")
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise VolumeReadError(f"{directory}: {f.name} is {ds.Rows}x{ds.Columns}, others {shape[0]}x{shape[1]}")
    row_dir, col_dir = orient[:3], orient[3:]  # along a row (column index), along a column (row index)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    gaps = np.diff(along)
    gap = float(np.median(gaps))
    dup = np.flatnonzero(gaps < 1e-3 * max(gap, 1e-3))
    if dup.size:
        a, b = slices[order[dup[0]]][0].name, slices[order[dup[0] + 1]][0].name
        raise VolumeReadError(
            f"{directory}: duplicate slice position {along[dup[0]]:.3f} mm ({a} and {b}); "
            f"remove the duplicates or split the series"
        )
    uneven = np.flatnonzero(np.abs(gaps - gap) > _GAP_TOLERANCE * gap)
    if uneven.size:
        k = uneven[0]
        raise VolumeReadError(
            f"{directory}: uneven slice spacing (missing slices?): gap {gaps[k]:.3f} mm at position "
            f"{along[k]:.3f} mm, typical gap {gap:.3f} mm"
        )

    vol = np.empty((len(slices),) + shape, dtype=np.float32)
    for n, idx in enumerate(order):
        f, ds = slices[idx]
        slope = float(ds.get("RescaleSlope", 1.0))
        intercept = float(ds.get("RescaleIntercept", 0.0))
        vol[n] = ds.pixel_array.astype(np.float32) * slope + intercept

    dr, dc = (float(v) for v in slices[0][1].PixelSpacing)  # between rows, between columns
    first = positions[order[0]]
    # Voxel (i, j, k) = (column, row, slice) -> patient LPS position.
    affine = np.eye(4)
    affine[:3, 0] = row_dir * dc
    affine[:3, 1] = col_dir * dr
    affine[:3, 2] = normal * gap
    affine[:3, 3] = first
    return to_canonical(vol.transpose(2, 1, 0), _lps_to_ras(affine))


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file (values taken as HU after the header's scl_slope / scl_inter)
    -> (float32 volume (d, h, w), spacing (3,) mm), reoriented as documented above."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:  # nibabel raises many types for corrupt files
        raise VolumeReadError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeReadError(f"{path}: expected a 3D volume, got shape {data.shape}")
    vol, spacing = to_canonical(data, img.affine)
    return vol.astype(np.float32, copy=False), spacing


def read_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a RAD-ChestCT ``.npz``: the array under key 'ct', or the only array, in HU.
    Spacing comes from a 'spacing' array when present, else 1 mm."""
    try:
        with np.load(path) as z:
            keys = list(z.keys())
            arrays = [k for k in keys if k != "spacing"]
            if "ct" in keys:
                key = "ct"
            elif len(arrays) == 1:
                key = arrays[0]
            else:
                raise VolumeReadError(f"{path}: expected an array under key 'ct' or a single array, found keys {keys}")
            vol = np.asarray(z[key], dtype=np.float32)
            spacing = np.asarray(z["spacing"], dtype=np.float64) if "spacing" in keys else np.ones(3)
    except VolumeReadError:
        raise
    except Exception as e:
        raise VolumeReadError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if vol.ndim != 3 or spacing.shape != (3,):
        raise VolumeReadError(f"{path}: expected a 3D volume and 3 spacings, got {vol.shape} and {spacing.shape}")
    return vol, spacing


def volume_kind(path: str | os.PathLike) -> str:
    """'dicom' for a directory, 'nifti' / 'npz' by file suffix; VolumeReadError otherwise."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(NPZ_SUFFIX):
        return "npz"
    raise VolumeReadError(
        f"{path}: unknown volume type; expected a DICOM series folder, a NIfTI file ({', '.join(NIFTI_SUFFIXES)}) "
        f"or a RAD-ChestCT {NPZ_SUFFIX}"
    )


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read any supported volume -> (float32 HU array (d, h, w), spacing (3,) mm float64)."""
    if not Path(path).exists():
        raise VolumeReadError(f"{path}: no such file or directory")
    reader = {"dicom": read_dicom_series, "nifti": read_nifti, "npz": read_npz}[volume_kind(path)]
    vol, spacing = reader(path)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise VolumeReadError(f"{path}: invalid voxel spacing {spacing.tolist()}")
    return vol, np.asarray(spacing, dtype=np.float64)


def find_volumes(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand inputs into volumes: NIfTI / npz files as given; a folder holding DICOM
    files (``*.dcm``) is a series; other folders are searched recursively. A folder
    given explicitly that holds files but none of the known kinds is taken as a DICOM
    series of extension-less files."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise FileNotFoundError(f"{item}: no such file or directory")
        if item.is_file():
            found.append(item)
            continue
        before = len(found)
        for root, dirs, files in os.walk(item):
            dirs.sort()
            lower = [f.lower() for f in files]
            if any(f.endswith(DICOM_SUFFIX) for f in lower):
                found.append(Path(root))
            found.extend(Path(root) / f for f, lo in sorted(zip(files, lower)) if lo.endswith(NIFTI_SUFFIXES + (NPZ_SUFFIX,)))
        if len(found) == before and any(p.is_file() for p in item.iterdir()):
            found.append(item)
    return found
