"""Folders of volumes for evaluation, read onto the model's [-1, 1] scale.

Real sets are read exactly as training reads them (``prdit_fast.data.VolumeDataset``):
``prdit-fast preprocess`` output (``*.npy``), the official LIDC layout
(``<case>/processed.nii.gz``) or RAD-ChestCT ``.npz``, anywhere below the folder, values in
[0, 1], average-pooled to the evaluated edge and mapped to [-1, 1].

Generated sets: ``prdit-fast sample`` output, ``sample_*.nii.gz`` or ``sample_*.npy``,
mapped back to [-1, 1] by the inverse of what ``sample`` wrote (``prdit_fast.data.recipes``),
as its ``summary.json`` records it: ``"units": "normalized"`` is [0, 1]; ``"HU"`` is the
intensity recipe's HU window; folders without a record are HU through [-1000, 1000] (what
``sample`` wrote before it kept records).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..data.dataset import VolumeDataset, read_unit_volume
from ..errors import UsageError
from ..data.recipes import RECIPES
from ..volumes import load_volume

_CHUNK = 1 << 22
LEGACY_HU_WINDOW = (-1000.0, 1000.0)


def real_dataset(folder: str | os.PathLike, size: int) -> VolumeDataset:
    """The real set below ``folder`` at edge ``size``. Raises UsageError when it holds no volumes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--real {folder} is not a folder")
    try:
        return VolumeDataset(folder, size)
    except ValueError as e:
        raise UsageError(f"--real {folder}: {e}") from e


def generated_volume_files(folder: str | os.PathLike, flag: str = "--fake") -> list[Path]:
    """``sample_*.nii.gz`` (else ``sample_*.npy``) in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder} is not a folder")
    nifti, arrays = sorted(folder.glob("sample_*.nii.gz")), sorted(folder.glob("sample_*.npy"))
    if nifti and arrays:
        raise UsageError(f"{flag} {folder} mixes {len(nifti)} sample_*.nii.gz and {len(arrays)} sample_*.npy volumes: "
                         f"keep one format (both are scored alike) so no volume is silently left out")
    if not nifti and not arrays:
        raise UsageError(f"{flag} {folder} holds no sample_*.nii.gz or sample_*.npy (prdit-fast sample output)")
    return nifti or arrays


def generated_window(folder: str | os.PathLike) -> tuple[float, float] | None:
    """The HU window [0, 1] was stretched to when ``sample`` wrote ``folder`` (its last run's
    record in summary*.json), or None for normalized [0, 1] volumes."""
    runs: list[dict] = []
    for summary in sorted(Path(folder).glob("summary*.json")):
        try:
            content = json.loads(summary.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--fake: {summary} is not readable JSON ({e}); restore it or remove it") from e
        runs += content.get("runs", [content]) if isinstance(content, dict) else []
    recorded = [run for run in runs if isinstance(run, dict) and run.get("units")]
    if not recorded:
        return LEGACY_HU_WINDOW
    last = recorded[-1]
    if last["units"] == "normalized":
        return None
    return RECIPES.get(str(last.get("intensity")), RECIPES["unknown"]).hu_window or LEGACY_HU_WINDOW


def read_generated(path: Path, hu_window: tuple[float, float] | None, size: int | None = None) -> np.ndarray:
    """A generated volume (HU through ``hu_window``, or [0, 1] when None) -> (S, S, S) float32
    in [-1, 1]. UsageError naming the file when it is not a cube of edge ``size`` (when
    given) or holds NaN or inf (refused, never clipped into range)."""
    volume = load_volume(path)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise UsageError(f"--fake: {path}: expected a cubic volume, got shape {tuple(volume.shape)}")
    if size is not None and volume.shape[0] != size:
        raise UsageError(f"--fake: {path} is {volume.shape[0]}^3, the other generated volumes {size}^3: "
                         f"evaluate one edge at a time")
    if not np.isfinite(volume).all():
        bad = int(np.size(volume) - np.isfinite(volume).sum())
        raise UsageError(f"--fake: {path} holds {bad} NaN or inf voxels; regenerate or remove it")
    if hu_window is None:
        return np.clip(volume, 0.0, 1.0) * 2 - 1
    lo, hi = hu_window
    return ((np.clip(volume, lo, hi) - lo) / (hi - lo) * 2 - 1).astype(np.float32)


def real_edge(dataset: VolumeDataset) -> int:
    """The stored edge of the real set's first volume (its header or memory map: no decode of
    ``.npy``)."""
    return int(read_unit_volume(dataset.files[0]).shape[-1])


def batches(volumes: Iterator[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    """(S, S, S) arrays -> (b, 1, S, S, S) float32 tensors of ``batch_size`` (the last may be smaller)."""
    pending: list[np.ndarray] = []
    for volume in volumes:
        pending.append(volume)
        if len(pending) == batch_size:
            yield torch.from_numpy(np.stack(pending))[:, None]
            pending = []
    if pending:
        yield torch.from_numpy(np.stack(pending))[:, None]


def files_key(files: list[Path], root: Path, recipe: str) -> str:
    """SHA-256 over each file's path below ``root`` and contents, and the reading ``recipe``:
    the cache key of a real set (renaming the folder keeps it; changing a byte does not)."""
    digest = hashlib.sha256(recipe.encode())
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
