"""Training datasets: preprocessed volumes on disk, or the synthetic phantom.

Both yield float32 tensors of shape (C, S, S, S) with values in [-1, 1], in the axis
order of ``prdit_fast.orientation``.

Which volumes (``build_dataset``), in the official configs' terms:

- ``data.train_list`` / ``data.val_list``: text files, one volume per line (the official
  ``train.txt`` / ``val.txt``). An entry is an absolute path, a path relative to
  ``data.path``, or a path relative to the list's own folder (tried in that order).
- otherwise ``data.path``: a folder (searched recursively) or one such list file.
- the synthetic phantom only when ``data.dataset: phantom`` or when no data is named.

Volume files: ``.npy`` (``prdit-fast preprocess``; memory-mapped), NIfTI
``.nii`` / ``.nii.gz`` (the official LIDC-IDRI ``processed.nii.gz``; an uncompressed
``.nii`` is memory-mapped) and ``.npz`` (the official RAD-ChestCT preprocessing: key
``volume`` or ``ct``). Values in [0, 1] at an edge that ``image_size`` divides.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger("prdit_fast.data")

# Preprocessed volumes are in [0, 1]; float16 storage may round just past the ends.
_RANGE_SLACK = 1e-2
VOLUME_SUFFIXES = (".npy", ".nii.gz", ".nii", ".npz")
DATASET_KINDS = ("phantom",)  # values of data.dataset; None: the files named by path / lists


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


def is_volume_file(path: Path) -> bool:
    """A volume file a dataset reads: a known suffix, not hidden (``atomic_path``'s
    temporary files are hidden and have no suffix), not the preprocessing manifest."""
    name = path.name.lower()
    return not name.startswith(".") and name.endswith(VOLUME_SUFFIXES)


def read_list(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Path]:
    """The volumes of a split file: one path per line (blank lines and ``#`` comments
    skipped); relative entries are looked up under ``root`` first, then next to the list.
    FileNotFoundError names the list and the first entry not found."""
    list_file = Path(list_file).expanduser()
    if not list_file.is_file():
        raise FileNotFoundError(f"split list {list_file}: no such file")
    files = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        candidates = [Path(entry).expanduser()]
        if not candidates[0].is_absolute():
            candidates = ([Path(root).expanduser() / entry] if root else []) + [list_file.parent / entry]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"{list_file} line {number}: volume {entry} not found (looked for {', '.join(map(str, candidates))})"
            )
        files.append(found)
    if not files:
        raise ValueError(f"split list {list_file} names no volumes")
    return files


def list_volume_files(path: str | os.PathLike) -> list[Path]:
    """``path`` is a folder of volumes (searched recursively, sorted) or a list file (see
    ``read_list``; relative entries relative to the list's folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and is_volume_file(f))
        if not files:
            raise ValueError(
                f"data.path {path}: no volumes ({', '.join(VOLUME_SUFFIXES)}) found; run `prdit-fast preprocess` first"
            )
        return files
    if p.is_file():
        return read_list(p)
    raise FileNotFoundError(f"data.path {path}: no such folder or list file")


def read_unit_volume(path: Path) -> np.ndarray:
    """A preprocessed volume as stored, (S, S, S) or (C, S, S, S), in the axis order of
    ``prdit_fast.orientation`` (NIfTI reoriented from its affine); memory-mapped for
    ``.npy`` and uncompressed ``.nii``."""
    name = path.name.lower()
    if name.endswith(".npy"):
        return np.load(path, mmap_mode="r")
    if name.endswith(".npz"):
        with np.load(path) as archive:
            key = next((k for k in ("volume", "ct") if k in archive.files), None)
            if key is None:
                raise ValueError(f"{path}: expected an array under key 'volume' or 'ct', found {archive.files}")
            return archive[key]
    import nibabel as nib

    from ..orientation import to_canonical

    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return to_canonical(data, image.affine)[0]


class VolumeDataset(Dataset):
    """Preprocessed volumes (values in [0, 1], (S, S, S) or (C, S, S, S)), average-pooled
    to ``image_size`` and mapped to [-1, 1].

    ``source``: a folder or list file (see ``list_volume_files``), or the files
    themselves. Each item: float32 tensor (C, image_size, image_size, image_size). The
    dataset holds only paths and reads per item, so it works in any number of
    DataLoader workers.
    """

    def __init__(self, source: str | os.PathLike | list[Path], image_size: int, in_channels: int = 1):
        self.files = [Path(f) for f in source] if isinstance(source, (list, tuple)) else list_volume_files(source)
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        f = self.files[index]
        arr = read_unit_volume(f)
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


def data_files(data: dict, split: str = "train") -> list[Path] | None:
    """The volume files a config's ``data`` section names for ``split`` ('train' or
    'val'), or None when it names none (the phantom). Raises FileNotFoundError naming
    what is missing, ValueError for a contradictory section."""
    named = data.get(f"{split}_list") or (data.get("path") if split == "train" else None)
    if data.get("dataset") == "phantom":
        if data.get("train_list") or data.get("val_list") or data.get("path"):
            raise ValueError(
                "data.dataset is 'phantom' but data.path / data.train_list / data.val_list name files; "
                "remove data.dataset to train on the files, or the file keys to train on the phantom"
            )
        return None
    if not named:
        return None
    if data.get(f"{split}_list"):
        return read_list(data[f"{split}_list"], data.get("path") or None)
    return list_volume_files(named)


def build_dataset(data: dict, in_channels: int = 1, seed: int = 0, split: str = "train") -> Dataset | None:
    """The ``split`` set named by a config's ``data`` section (see the module docstring);
    the phantom (``data.phantom_length`` volumes) when it names no data. For 'val'
    without ``data.val_list``: a phantom validation set of other seeds when training on
    the phantom, else None."""
    size = int(data["image_size"])
    files = data_files(data, split)
    if files is not None:
        return VolumeDataset(files, size, in_channels)
    if split == "val" and (data.get("train_list") or data.get("path")):
        return None
    if in_channels != 1:
        raise ValueError("the synthetic phantom has 1 channel; set model.in_channels: 1 or name data (data.path)")
    from ..phantom import PhantomDataset

    if split == "val":
        return PhantomDataset(size, max(1, int(data.get("phantom_length", 64)) // 8), seed + 1_000_003)
    return PhantomDataset(size, int(data.get("phantom_length", 64)), seed)
