"""Training datasets: preprocessed volumes on disk, or the synthetic phantom.

Both yield float32 tensors of shape (C, S, S, S) with values in [-1, 1].
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

# Preprocessed volumes are in [0, 1]; float16 storage may round just past the ends.
_RANGE_SLACK = 1e-2


def average_pool(volume: np.ndarray, size: int) -> np.ndarray:
    """Average-pool a cubic (S, S, S) array to (size, size, size); size must divide S."""
    edge = volume.shape[-1]
    if edge % size:
        raise ValueError(f"cannot average-pool a volume of edge {edge} to {size}: {size} must divide {edge}")
    f = edge // size
    if f == 1:
        return np.asarray(volume, dtype=np.float32)
    v = np.asarray(volume, dtype=np.float32).reshape(size, f, size, f, size, f)
    return v.mean(axis=(1, 3, 5), dtype=np.float32)


def list_volume_files(path: str | os.PathLike) -> list[Path]:
    """``path`` is a folder of ``.npy`` volumes (sorted by name) or a text file listing
    one ``.npy`` per line (relative paths are relative to the list's folder)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.npy"))
    elif p.is_file():
        lines = [ln.strip() for ln in p.read_text().splitlines()]
        files = [(p.parent / ln) for ln in lines if ln and not ln.startswith("#")]
    else:
        raise FileNotFoundError(f"data.path {path}: no such folder or list file")
    if not files:
        raise ValueError(f"data.path {path}: no .npy volumes found; run `prdit-fast preprocess` first")
    return files


class VolumeDataset(Dataset):
    """Preprocessed volumes (``.npy``, (S, S, S) or (C, S, S, S), values in [0, 1]),
    average-pooled to ``image_size`` and mapped to [-1, 1].

    Each item: float32 tensor (C, image_size, image_size, image_size). Files are
    memory-mapped per read, so the dataset holds only paths and works in any number
    of DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike, image_size: int, in_channels: int = 1):
        self.files = list_volume_files(path)
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        f = self.files[index]
        arr = np.load(f, mmap_mode="r")
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[0] != self.in_channels or len(set(arr.shape[1:])) != 1:
            raise ValueError(
                f"{f}: expected a cubic volume of shape (S, S, S) or ({self.in_channels}, S, S, S), got {arr.shape}"
            )
        vol = np.stack([average_pool(c, self.image_size) for c in arr])
        if not np.isfinite(vol).all():
            raise ValueError(f"{f}: contains NaN or inf values; re-run the preprocessing for this volume")
        lo, hi = float(vol.min()), float(vol.max())
        if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
            raise ValueError(
                f"{f}: values span [{lo:.4g}, {hi:.4g}], expected [0, 1]; run `prdit-fast preprocess` on raw volumes"
            )
        return torch.from_numpy(vol * 2 - 1)


def build_dataset(data: dict, in_channels: int = 1, seed: int = 0) -> Dataset:
    """The training set named by a config's ``data`` section: ``data.path`` (folder or
    list of preprocessed volumes), or the synthetic phantom when it is empty/None
    (``data.phantom_length`` volumes)."""
    size = int(data["image_size"])
    if data.get("path"):
        return VolumeDataset(data["path"], size, in_channels)
    if in_channels != 1:
        raise ValueError("the synthetic phantom has 1 channel; set model.in_channels: 1 or give data.path")
    from ..phantom import PhantomDataset

    return PhantomDataset(size, int(data.get("phantom_length", 64)), seed)
