"""The paper's preprocessing (spec section 9) and a resumable, parallel driver.

LIDC-IDRI: resample to 1 mm isotropic (cubic spline), centre crop / pad to S^3
(padding with -1000 HU, air), clip below -1000 HU, clip above the volume's 99.9th
percentile, min-max to [0, 1].
RAD-ChestCT: clip to [-1000, 1000] HU, centre crop / pad to S^3 (pad -1000 HU),
map linearly to [0, 1] ((HU + 1000) / 2000).

Output: one ``<name>.npy`` per volume (axes (d, h, w) as defined in
``prdit_fast.orientation``), float16 by default (values in [0, 1]; float16 keeps
steps of <= 4.9e-4, about 2 HU on LIDC's range) or float32, plus ``manifest.json``
recording the output's spacing and intensity recipe (``prdit_fast.data.recipes``) and
each volume's source, original spacing and shape, output and status.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_path, remove_stale_temps, write_json
from .readers import read_volume
from .recipes import MANIFEST, recipe_manifest

AIR_HU = -1000.0
DATASETS = ("lidc", "rad")
OUTPUT_DTYPES = ("float16", "float32")


def resample_isotropic(volume: np.ndarray, spacing, target_mm: float = 1.0, order: int = 3) -> np.ndarray:
    """Resample (d, h, w) with voxel size ``spacing`` (mm) to ``target_mm`` isotropic.

    The output has round(shape * spacing / target) voxels per axis; spline of
    ``order`` (3 = cubic, with prefilter), edges extended by nearest value.
    """
    from scipy import ndimage

    factors = np.asarray(spacing, dtype=np.float64) / target_mm
    if np.allclose(factors, 1.0):
        return volume.astype(np.float32, copy=False)
    return ndimage.zoom(volume.astype(np.float32, copy=False), factors, order=order, mode="nearest",
                        prefilter=order > 1)


def center_crop_or_pad(volume: np.ndarray, size: int, fill: float = AIR_HU) -> np.ndarray:
    """Centre crop each axis longer than ``size`` and pad each shorter one with ``fill``
    -> (size, size, size). An odd excess goes to the end of the axis."""
    out = np.full((size,) * 3, fill, dtype=volume.dtype)
    src, dst = [], []
    for n in volume.shape:
        if n >= size:
            a = (n - size) // 2
            src.append(slice(a, a + size))
            dst.append(slice(0, size))
        else:
            a = (size - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def preprocess_lidc(volume: np.ndarray, spacing, size: int = 256) -> np.ndarray:
    """HU volume (d, h, w) with spacing (mm) -> float32 (size,)*3 in [0, 1] (LIDC recipe)."""
    vol = center_crop_or_pad(resample_isotropic(volume, spacing), size, AIR_HU)
    vol = np.maximum(vol, AIR_HU)
    vol = np.minimum(vol, np.percentile(vol, 99.9))
    lo, hi = float(vol.min()), float(vol.max())
    if hi <= lo:
        raise ValueError(f"the volume is constant ({lo} HU) after cropping; nothing to normalize")
    return ((vol - lo) / (hi - lo)).astype(np.float32)


def preprocess_rad(volume: np.ndarray, size: int = 256) -> np.ndarray:
    """HU volume -> float32 (size,)*3 in [0, 1] (RAD-ChestCT recipe: no resampling)."""
    vol = center_crop_or_pad(np.clip(volume, AIR_HU, -AIR_HU).astype(np.float32), size, AIR_HU)
    return (vol - AIR_HU) / (-2 * AIR_HU)


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """np.save through a temporary file in the same folder, renamed over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def output_names(sources: list[Path]) -> list[str]:
    """A unique, readable file stem per source: its path relative to the sources'
    common folder, separators replaced by '__', known suffixes dropped; a short hash
    of the full path is appended where two would collide."""
    resolved = [s.resolve() for s in sources]
    if not resolved:
        return []
    common = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    stems = []
    for r in resolved:
        rel = str(r.relative_to(common)) if r != common else r.name
        rel = re.sub(r"(\.nii\.gz|\.nii|\.npz)$", "", rel, flags=re.IGNORECASE)
        stems.append(re.sub(r"[^A-Za-z0-9._-]+", "_", rel.replace(os.sep, "__")).strip("._") or "volume")
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else f"{s}-{hashlib.sha1(str(r).encode()).hexdigest()[:8]}"
            for s, r in zip(stems, resolved)]


def process_one(source: str, output: str, dataset: str, size: int, dtype: str) -> dict:
    """Read, preprocess and write one volume; never raises: failures come back as a
    record with status 'failed' and the error message."""
    record = {"source": source, "output": Path(output).name, "status": "failed"}
    t0 = time.perf_counter()
    try:
        vol, spacing = read_volume(source)
        record.update(original_shape=list(vol.shape), original_spacing=[round(float(s), 6) for s in spacing])
        out = preprocess_lidc(vol, spacing, size) if dataset == "lidc" else preprocess_rad(vol, size)
        save_npy_atomic(output, out.astype(dtype))
        out_spacing = [1.0, 1.0, 1.0] if dataset == "lidc" else record["original_spacing"]
        record.update(status="ok", output_spacing=out_spacing, shape=list(out.shape), seconds=round(time.perf_counter() - t0, 3))
    except Exception as e:  # one bad volume must not stop a run over a thousand
        record["error"] = f"{type(e).__name__}: {e}"
    return record


def preprocess_volumes(
    sources: list[Path],
    out_dir: str | os.PathLike,
    dataset: str,
    size: int = 256,
    dtype: str = "float16",
    workers: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Preprocess ``sources`` into ``out_dir`` and write its manifest; returns the manifest.

    Volumes whose output already exists are skipped (status 'exists'), so a rerun
    resumes; temporary files a killed run left in ``out_dir`` are removed first; the
    manifest's settings must match a previous run's in the same folder. Inputs are only
    read.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temps(out_dir)
    if stale:
        log(f"removed {len(stale)} unfinished files a killed run left in {out_dir}")
    settings = {"dataset": dataset, "size": size, "dtype": dtype}
    manifest_path = out_dir / MANIFEST
    previous: dict[str, dict] = {}
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        old_settings = {k: old.get(k) for k in settings}
        if old_settings != settings:
            raise ValueError(
                f"{out_dir} holds volumes preprocessed with {old_settings}, not {settings}; "
                f"use another --out folder"
            )
        previous = {v["output"]: v for v in old.get("volumes", [])}

    records: dict[str, dict] = {}
    todo = []
    for src, name in zip(sources, output_names(sources)):
        out = out_dir / f"{name}.npy"
        if out.exists():
            records[out.name] = {**previous.get(out.name, {"source": str(src), "output": out.name}), "status": "exists"}
        else:
            todo.append((str(src), str(out)))
    if len(records):
        log(f"{len(records)} of {len(sources)} volumes already done in {out_dir}; skipping them")

    def bar(it, total):
        if not progress:
            return it
        from tqdm.auto import tqdm

        return tqdm(it, total=total, desc=f"preprocess {dataset}", unit="vol")

    if workers <= 1:
        results = bar((process_one(s, o, dataset, size, dtype) for s, o in todo), len(todo))
        for r in results:
            records[r["output"]] = r
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(process_one, s, o, dataset, size, dtype) for s, o in todo]
            for fut in bar(as_completed(futures), len(futures)):
                r = fut.result()
                records[r["output"]] = r
    for r in records.values():
        if r["status"] == "failed":
            log(f"FAILED {r['source']}: {r['error']}")
    # Keep records of earlier runs' volumes not named this time, so the manifest describes the folder.
    for name, r in previous.items():
        records.setdefault(name, r)
    manifest = {**settings, **recipe_manifest(dataset, size), "volumes": sorted(records.values(), key=lambda r: r["output"])}
    write_json(manifest_path, manifest)
    return manifest
