"""Writing and reading CT volumes: NIfTI, mid-slice PNG previews, .npy.

In memory a volume is ``v[d, h, w]`` in HU, in the one axis order defined in
``prdit_fast.orientation`` (depth superior -> inferior, height anterior -> posterior,
width patient right -> left); the NIfTI files are written and read through that module,
so viewers show the anatomy the right way round and ``load_volume`` returns the same
array. ``Volume`` is such an array with its geometry and units, what the Python API
(``prdit_fast.Pipeline``, ``prdit_fast.data.preprocess.to_scanner``) returns.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_path
from .orientation import canonical_affine, to_canonical, to_nifti, voxel_sizes

# (low, high) HU shown from black to white
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-1350.0, 150.0),  # level -600, width 1500
    "mediastinal": (-160.0, 240.0),  # level 40, width 400
    "bone": (-450.0, 1050.0),  # level 300, width 1500
}


def as_volume_array(volume: np.ndarray | torch.Tensor) -> np.ndarray:
    """(S, S, S) or a singleton-batch/channel (1, 1, S, S, S) -> float32 numpy (D, H, W)."""
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().float().cpu().numpy()
    volume = np.asarray(volume)
    squeezed = volume.reshape(volume.shape[-3:]) if volume.ndim > 3 and np.prod(volume.shape[:-3]) == 1 else volume
    if squeezed.ndim != 3:
        raise ValueError(f"expected one volume of shape (D, H, W) (or (1, 1, D, H, W)), got shape {volume.shape}")
    return squeezed.astype(np.float32, copy=False)


def save_nifti(
    path: str | os.PathLike,
    volume: np.ndarray | torch.Tensor,
    spacing: tuple[float, float, float] | None = None,
    dtype: str = "int16",
    description: str = "",
    affine: np.ndarray | None = None,
    axcodes: tuple[str, str, str] | None = None,
) -> Path:
    """Write a volume (D, H, W) as NIfTI (``.nii`` or ``.nii.gz``), atomically; the bytes
    depend only on the arguments (gzip without a time stamp).

    spacing: voxel size in mm along (depth, height, width), voxel 0 at the origin
        (default 1 mm); or
    affine: (4, 4) voxel (d, h, w) -> scanner RAS+ mm (``prdit_fast.orientation``), for
        a volume that must overlay its source (origin, direction); not with ``spacing``.
    dtype: 'int16' (rounded HU, what scanners store) or 'float32'.
    description: the header's ``descrip`` (at most 80 ASCII characters), e.g. the units.
    axcodes: the directions the file's data axes (x, y, z) point to, e.g. a source
        file's ``("L", "P", "S")`` so the output has its layout; default
        ``orientation.NIFTI_AXCODES`` (for a canonical affine). The world geometry is the same.
    """
    import nibabel as nib
    from nibabel import orientations as ornt

    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise ValueError(f"NIfTI file names end in .nii or .nii.gz, got {path.name}")
    if dtype not in ("int16", "float32"):
        raise ValueError(f"dtype must be 'int16' or 'float32', got {dtype!r}")
    if affine is not None and spacing is not None:
        raise ValueError("pass the spacing or the affine of the volume, not both")
    if affine is None:
        spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be three positive sizes in mm, got {spacing}")
        affine = canonical_affine(spacing)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"affine must be a finite, invertible (4, 4) matrix, got {affine.tolist()}")
    if len(description) > 80 or not description.isascii():
        raise ValueError(f"a NIfTI description holds at most 80 ASCII characters, got {description!r}")
    data, nifti = to_nifti(as_volume_array(volume), affine=affine)
    if axcodes is not None:  # reorder the data axes only; nifti keeps every voxel where it was
        transform = ornt.ornt_transform(ornt.io_orientation(nifti), ornt.axcodes2ornt(tuple(axcodes)))
        nifti = nifti @ ornt.inv_ornt_aff(transform, data.shape)
        data = np.ascontiguousarray(ornt.apply_orientation(data, transform))
    if dtype == "int16":
        data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    image = nib.Nifti1Image(data, nifti)
    image.header.set_xyzt_units("mm")
    image.header.set_qform(nifti, code=1)  # scanner coordinates
    image.header.set_sform(nifti, code=1)
    image.header["descrip"] = description.encode()
    raw = image.to_bytes()
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(raw, mtime=0) if path.name.endswith(".gz") else raw)
    return path


@dataclass
class Volume:
    """One CT volume with its geometry and units.

    array: float32 ``v[d, h, w]`` in the axis order of ``prdit_fast.orientation``.
    affine: (4, 4) voxel (d, h, w) -> scanner RAS+ mm.
    units: 'HU', or 'normalized [0, 1]' where the intensity recipe cannot be inverted.
    description: what the values are (the NIfTI header's description, <= 80 characters).
    """

    array: np.ndarray
    affine: np.ndarray
    units: str
    description: str = ""

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (d, h, w)."""
        return tuple(float(s) for s in voxel_sizes(self.affine))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    def save(self, path: str | os.PathLike) -> Path:
        """Write as NIfTI (``.nii`` / ``.nii.gz``; int16 for HU, else float32) with the
        affine and units in the header; any viewer overlays it on its source."""
        return save_nifti(path, self.array, dtype="int16" if self.units == "HU" else "float32",
                          description=(self.description or self.units)[:80], affine=self.affine)

    def to_metatensor(self) -> Any:
        """A MONAI ``MetaTensor`` (1, x, y, z) in the layout and affine MONAI's
        ``LoadImage(ensure_channel_first=True)`` gives for ``save()``'s file. Needs MONAI."""
        try:
            from monai.data import MetaTensor
        except ImportError as e:
            raise ImportError("Volume.to_metatensor needs MONAI: pip install monai") from e
        data, nifti = to_nifti(self.array, affine=self.affine)
        return MetaTensor(torch.from_numpy(data.copy())[None], affine=torch.from_numpy(nifti),
                          meta={"units": self.units, "description": self.description, "space": "RAS"})


def load_volume(path: str | os.PathLike) -> np.ndarray:
    """A volume as float32 (D, H, W) in our axis order: NIfTI (any orientation; reoriented
    from its affine) or ``.npy`` (taken as already (D, H, W))."""
    path = Path(path)
    if path.name.endswith(".npy"):
        return as_volume_array(np.load(path, allow_pickle=False))
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise ValueError(f"load_volume reads .nii, .nii.gz and .npy files, got {path.name}")
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path} holds a {data.ndim}-D image of shape {data.shape}; expected one 3-D volume")
    return to_canonical(data, image.affine)[0]


def mid_slices(volume: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axial (seen from the feet), coronal and sagittal mid-slices, each (rows, cols), with
    superior at the top of the coronal and sagittal views."""
    v = as_volume_array(volume)
    d, h, w = v.shape
    return v[d // 2], v[:, h // 2, :], v[:, :, w // 2]


def save_slices_png(
    path: str | os.PathLike,
    volume: np.ndarray | torch.Tensor,
    windows: tuple[str | tuple[float, float], ...] = ("lung", "mediastinal"),
    min_panel: int = 192,
) -> Path:
    """Write a PNG of the axial, coronal and sagittal mid-slices side by side, one row per
    HU window ('lung', 'mediastinal', 'bone', or (low, high) HU). Small volumes are
    enlarged by an integer factor (nearest neighbour) so each panel is at least
    ``min_panel`` pixels. Atomic."""
    from PIL import Image

    panels = mid_slices(volume)
    scale = max(1, -(-min_panel // max(p.shape[0] for p in panels)))
    gap = max(2, scale)
    rows = []
    for window in windows:
        if isinstance(window, str) and window not in WINDOWS:
            raise ValueError(f"unknown window {window!r}; use one of {list(WINDOWS)} or (low, high) HU")
        lo, hi = WINDOWS[window] if isinstance(window, str) else window
        if not hi > lo:
            raise ValueError(f"window {window} must have high > low")
        scaled = [np.kron(np.clip((p - lo) / (hi - lo), 0, 1), np.ones((scale, scale), np.float32)) for p in panels]
        height = max(s.shape[0] for s in scaled)
        row = []
        for s in scaled:
            pad = np.zeros((height, s.shape[1] + gap), np.float32)
            pad[: s.shape[0], : s.shape[1]] = s
            row.append(pad)
        rows.append(np.concatenate(row, axis=1)[:, :-gap])
    width = max(r.shape[1] for r in rows)
    sheet = np.zeros((sum(r.shape[0] for r in rows) + gap * (len(rows) - 1), width), np.float32)
    top = 0
    for r in rows:
        sheet[top : top + r.shape[0], : r.shape[1]] = r
        top += r.shape[0] + gap
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.rint(sheet * 255).astype(np.uint8)).save(tmp, format="PNG")
    return path
