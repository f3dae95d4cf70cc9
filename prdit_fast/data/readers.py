"""Readers for CT volumes: DICOM series, NIfTI and RAD-ChestCT ``.npz``.

Every reader returns ``(volume, affine)``: ``volume`` a float32 array of Hounsfield
units in prdit_fast's one axis order ``v[d, h, w]`` (depth superior -> inferior, height
anterior -> posterior, width patient right -> left; defined and documented in
``prdit_fast.orientation``) and ``affine`` the (4, 4) map from its voxel indices
(d, h, w) to scanner (RAS+) millimetres, so a result written with it overlays the
source; ``read_volume`` gives ``(volume, spacing)``, the voxel size in mm along (d, h, w).
DICOM series and NIfTI files are reoriented from their geometry; RAD-ChestCT ``.npz``
arrays carry none and are taken as stored (see ``prdit_fast.orientation``) with the
origin at voxel 0 and 1 mm voxels unless the archive holds a ``spacing`` array.

A gantry-tilted DICOM series (slice positions that step off the slice normal) is
resampled onto the orthogonal grid of its slices, as dicom2nifti does, rather than
silently sheared; direction cosines that are not orthogonal are refused.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..orientation import canonical_affine, reorient, voxel_sizes

log = logging.getLogger("prdit_fast.data")

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NPZ_SUFFIX = ".npz"
DICOM_SUFFIX = ".dcm"
DICOM_MAGIC = b"DICM"  # bytes 128-131 of a DICOM Part 10 file, after the 128-byte preamble

# Relative tolerance on slice gaps: DICOM positions are written with limited
# precision, so gaps of a regular series agree only to a fraction of a percent.
_GAP_TOLERANCE = 0.1
# In-plane drift of the slice positions (pixels over the whole series) below which a series
# is taken as untilted, and the deviation from a straight line above which it is refused.
_TILT_TOLERANCE_PX = 0.1
_LINE_TOLERANCE_PX = 0.5


class VolumeReadError(ValueError):
    """A file or series that cannot be read as one CT volume."""


def _lps_to_ras(affine: np.ndarray) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def read_dicom_series(directory: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one DICOM series directory -> (float32 HU volume (d, h, w), affine (4, 4)).

    Files that are not DICOM (e.g. LIDC's XML annotations) and DICOM objects
    without pixel data are ignored. Slices are ordered by ImagePositionPatient
    projected on the slice normal (cross product of the ImageOrientationPatient
    direction cosines). A gantry tilt (positions stepping off the normal along a
    straight line) is resampled away (``_untilt``). Raises VolumeReadError for
    several series in one directory, duplicate slice positions, uneven slice gaps
    (missing slices), inconsistent or non-orthogonal orientation, positions off a
    straight line, different slice sizes, or fewer than two slices.
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
    if abs(row_dir @ col_dir) > 1e-3 or not np.allclose([row_dir @ row_dir, col_dir @ col_dir], 1.0, atol=1e-3):
        raise VolumeReadError(
            f"{directory}: ImageOrientationPatient {orient.round(4).tolist()} is not two orthogonal unit vectors; "
            f"prdit_fast cannot place such slices (convert the series with a tool that resamples it)"
        )
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
    drift = positions[order] - first
    # where each slice's first pixel lies in the first slice's pixel grid (rows, columns)
    shift = np.stack([drift @ col_dir / dr, drift @ row_dir / dc], axis=1)
    # Voxel (i, j, k) = (column, row, slice) -> patient LPS position.
    affine = np.eye(4)
    affine[:3, 0] = row_dir * dc
    affine[:3, 1] = col_dir * dr
    affine[:3, 2] = normal * gap
    affine[:3, 3] = first
    if np.abs(shift).max() > _TILT_TOLERANCE_PX:
        vol, affine = _untilt(vol, affine, shift, directory)
    volume, canonical = reorient(vol.transpose(2, 1, 0), _lps_to_ras(affine))
    return volume, canonical


def _untilt(vol: np.ndarray, affine: np.ndarray, shift: np.ndarray, directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """A gantry-tilted series (slice k's pixel grid shifted by ``shift[k]`` = k * s
    pixels (rows, columns) in its plane) resampled by linear interpolation onto the
    orthogonal grid that holds every slice whole (as dicom2nifti does); voxels no slice
    covers get the series' lowest value. ``vol`` is (slice, row, column), ``affine`` the
    orthogonal LPS one of the first slice; returns both for the new grid."""
    from scipy import ndimage

    n = len(vol)
    step = shift[-1] / (n - 1)
    off_line = np.abs(shift - np.arange(n)[:, None] * step).max()
    if off_line > _LINE_TOLERANCE_PX:
        raise VolumeReadError(
            f"{directory}: the slice positions do not lie on a straight line ({off_line:.2f} pixels off); "
            f"not one regular volume"
        )
    gap_mm = float(np.linalg.norm(affine[:3, 2]))
    pixel_mm = np.array([np.linalg.norm(affine[:3, 1]), np.linalg.norm(affine[:3, 0])])
    tilt = np.degrees(np.arctan(np.linalg.norm(step * pixel_mm) / gap_mm))
    low = np.minimum(0.0, shift[-1])  # the new grid starts this many pixels before the first slice's
    size = np.ceil(np.array(vol.shape[1:]) + np.abs(shift[-1]) - 1e-6).astype(int)
    log.warning("%s: gantry tilt of %.2f degrees: resampled onto an orthogonal %d x %d grid (was %d x %d)",
                directory, tilt, size[0], size[1], *vol.shape[1:])
    # output (k, r, c) reads input (k, r + low_r - k s_r, c + low_c - k s_c)
    matrix = np.array([[1.0, 0.0, 0.0], [-step[0], 1.0, 0.0], [-step[1], 0.0, 1.0]])
    out = ndimage.affine_transform(vol, matrix, offset=[0.0, low[0], low[1]], output_shape=(n, *size), order=1,
                                   mode="constant", cval=float(vol.min()))
    straight = affine.copy()
    straight[:3, 3] = affine[:3, :3] @ np.array([low[1], low[0], 0.0]) + affine[:3, 3]
    return out.astype(np.float32, copy=False), straight


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file (values taken as HU after the header's scl_slope / scl_inter)
    -> (float32 volume (d, h, w), affine (4, 4)), reoriented as documented above."""
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
    vol, affine = reorient(data, img.affine)
    return vol.astype(np.float32, copy=False), affine


def read_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a RAD-ChestCT ``.npz``: the array under key 'ct', or the only array, in HU
    -> (float32 volume (d, h, w), affine (4, 4)): taken as stored, origin at voxel 0, the
    voxel size from a 'spacing' array when present, else 1 mm."""
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
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise VolumeReadError(f"{path}: invalid voxel spacing {spacing.tolist()}")
    return vol, canonical_affine(spacing)


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


def read_volume_affine(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read any supported volume -> (float32 HU array (d, h, w), affine (4, 4) float64:
    voxel (d, h, w) -> scanner RAS+ mm)."""
    if not Path(path).exists():
        raise VolumeReadError(f"{path}: no such file or directory")
    reader = {"dicom": read_dicom_series, "nifti": read_nifti, "npz": read_npz}[volume_kind(path)]
    vol, affine = reader(path)
    spacing = voxel_sizes(affine)
    if not np.all(np.isfinite(affine)) or np.any(spacing <= 0):
        raise VolumeReadError(f"{path}: invalid voxel geometry (spacing {spacing.tolist()})")
    return vol, np.asarray(affine, dtype=np.float64)


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read any supported volume -> (float32 HU array (d, h, w), spacing (3,) mm float64)."""
    vol, affine = read_volume_affine(path)
    return vol, voxel_sizes(affine)


def is_dicom_file(path: Path) -> bool:
    """True for a DICOM Part 10 file (the 'DICM' mark after its 128-byte preamble),
    whatever its name."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == DICOM_MAGIC
    except OSError:
        return False


def find_volumes(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand inputs into volumes: NIfTI / npz files as given; a folder holding DICOM
    files (``*.dcm``, or files of any name that carry the DICOM mark, such as
    ``dicom/0051/IM0000``) is a series; other folders are searched recursively. A folder
    given explicitly that holds files but none of the known kinds is taken as a DICOM
    series of files without the mark (read as DICOM anyway)."""
    found: list[Path] = []
    known = NIFTI_SUFFIXES + (NPZ_SUFFIX,)
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
            if any(f.endswith(DICOM_SUFFIX) for f in lower) or any(
                    not lo.endswith(known) and is_dicom_file(Path(root) / f) for f, lo in sorted(zip(files, lower))):
                found.append(Path(root))
            found.extend(Path(root) / f for f, lo in sorted(zip(files, lower)) if lo.endswith(known))
        if len(found) == before and any(p.is_file() for p in item.iterdir()):
            found.append(item)
    return found
