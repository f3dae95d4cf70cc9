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

Preprocessing can be undone: each volume's record in the manifest, and its sidecar
``<name>.json`` next to the ``.npy``, hold what maps it back (``GEOMETRY_FIELDS``): the
source's affine and shape, the resampling and crop / pad offsets, the output grid's own
affine (voxel (d, h, w) -> scanner RAS+ mm) and the HU range [0, 1] stands for
(``hu_min``, ``hu_max``: the volume's own for LIDC's per-volume min-max, the window for
RAD). ``to_scanner`` turns that volume, or any model output of that data (a sample, a
reconstruction; average-pooled grids included), into HU on the scanner's grid.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ..atomic import atomic_path, remove_stale_temps, write_json
from ..orientation import voxel_sizes
from .readers import read_volume_affine
from .recipes import MANIFEST, lidc_hu_range, recipe_manifest

if TYPE_CHECKING:
    from ..volumes import Volume

AIR_HU = -1000.0
DATASETS = ("lidc", "rad")
OUTPUT_DTYPES = ("float16", "float32")
SIDECAR_FORMAT = "prdit_fast.preprocessed"
# the fields of a volume's sidecar (and manifest record) that map its output back to HU and scanner space
GEOMETRY_FIELDS = ("source_shape", "source_affine", "resample_index_scale", "resampled_shape", "crop_offset",
                   "shape", "affine", "spacing_mm", "hu_min", "hu_max")


def resample_isotropic(volume: np.ndarray, spacing, target_mm: float = 1.0, order: int = 3) -> np.ndarray:
    """Resample (d, h, w) with voxel size ``spacing`` (mm) to ``target_mm`` isotropic.

    The output has round(shape * spacing / target) voxels per axis; spline of
    ``order`` (3 = cubic, with prefilter), edges extended by nearest value. The first
    and last voxels of each axis keep their centres (``resample_index_scale``).
    """
    from scipy import ndimage

    factors = np.asarray(spacing, dtype=np.float64) / target_mm
    if np.allclose(factors, 1.0):
        return volume.astype(np.float32, copy=False)
    return ndimage.zoom(volume.astype(np.float32, copy=False), factors, order=order, mode="nearest",
                        prefilter=order > 1)


def resample_index_scale(source_shape, resampled_shape) -> list[float]:
    """Per axis, the source index step of one resampled voxel: ``resample_isotropic``
    (scipy's zoom) maps resampled index o to source index o * (n_in - 1) / (n_out - 1)."""
    return [1.0 if n_out == n_in or n_out < 2 else (n_in - 1) / (n_out - 1)
            for n_in, n_out in zip(source_shape, resampled_shape)]


def crop_offsets(shape, size: int) -> list[int]:
    """Per axis, the index in an array of ``shape`` of voxel 0 of ``center_crop_or_pad``'s
    (size,)*3 output (negative where the axis is padded)."""
    return [(n - size) // 2 if n >= size else -((size - n) // 2) for n in shape]


def center_crop_or_pad(volume: np.ndarray, size: int, fill: float = AIR_HU) -> np.ndarray:
    """Centre crop each axis longer than ``size`` and pad each shorter one with ``fill``
    -> (size, size, size). An odd excess goes to the end of the axis."""
    out = np.full((size,) * 3, fill, dtype=volume.dtype)
    src, dst = [], []
    for n, a in zip(volume.shape, crop_offsets(volume.shape, size)):
        if n >= size:
            src.append(slice(a, a + size))
            dst.append(slice(0, size))
        else:
            src.append(slice(0, n))
            dst.append(slice(-a, -a + n))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def _output_geometry(source_affine: np.ndarray, source_shape, resampled_shape, size: int) -> dict[str, Any]:
    """The geometry fields of a volume resampled from ``source_shape`` to ``resampled_shape``
    and centre-cropped / padded to ``size``: output index o -> source index
    (o + crop_offset) * resample_index_scale -> scanner mm through ``source_affine``."""
    scale = resample_index_scale(source_shape, resampled_shape)
    offset = crop_offsets(resampled_shape, size)
    to_source = np.diag(scale + [1.0])
    to_source[:3, 3] = np.asarray(offset, dtype=np.float64) * scale
    affine = np.asarray(source_affine, dtype=np.float64) @ to_source
    return {
        "source_shape": list(map(int, source_shape)), "source_affine": np.round(source_affine, 6).tolist(),
        "resample_index_scale": scale, "resampled_shape": list(map(int, resampled_shape)), "crop_offset": offset,
        "shape": [size] * 3, "affine": np.round(affine, 6).tolist(), "spacing_mm": np.round(voxel_sizes(affine), 6).tolist(),
    }


def _lidc(volume: np.ndarray, spacing, size: int) -> tuple[np.ndarray, tuple[int, ...], float, float]:
    """The LIDC recipe -> ([0, 1] array, resampled shape, HU of 0, HU of 1)."""
    resampled = resample_isotropic(volume, spacing)
    vol = center_crop_or_pad(resampled, size, AIR_HU)
    lo, hi = lidc_hu_range(vol, AIR_HU)
    vol = np.clip(vol, lo, hi)
    if hi <= lo:
        raise ValueError(f"the volume is constant ({lo} HU) after cropping; nothing to normalize")
    return ((vol - lo) / (hi - lo)).astype(np.float32), resampled.shape, lo, hi


def preprocess_lidc(volume: np.ndarray, spacing, size: int = 256) -> np.ndarray:
    """HU volume (d, h, w) with spacing (mm) -> float32 (size,)*3 in [0, 1] (LIDC recipe)."""
    return _lidc(volume, spacing, size)[0]


def preprocess_rad(volume: np.ndarray, size: int = 256) -> np.ndarray:
    """HU volume -> float32 (size,)*3 in [0, 1] (RAD-ChestCT recipe: no resampling)."""
    vol = center_crop_or_pad(np.clip(volume, AIR_HU, -AIR_HU).astype(np.float32), size, AIR_HU)
    return (vol - AIR_HU) / (-2 * AIR_HU)


def preprocess_with_geometry(volume: np.ndarray, affine: np.ndarray, dataset: str, size: int
                             ) -> tuple[np.ndarray, dict[str, Any]]:
    """``dataset``'s recipe on an HU volume (d, h, w) with its ``affine`` -> (float32
    (size,)*3 in [0, 1], the ``GEOMETRY_FIELDS`` that undo it)."""
    if dataset == "lidc":
        out, resampled_shape, lo, hi = _lidc(volume, voxel_sizes(affine), size)
    else:
        out, resampled_shape, (lo, hi) = preprocess_rad(volume, size), volume.shape, (AIR_HU, -AIR_HU)
    return out, {**_output_geometry(affine, volume.shape, resampled_shape, size), "hu_min": lo, "hu_max": hi}


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
        rel = re.sub(r"(\.nii\.gz|\.nii|\.npz|\.npy)$", "", rel, flags=re.IGNORECASE)
        stems.append(re.sub(r"[^A-Za-z0-9._-]+", "_", rel.replace(os.sep, "__")).strip("._") or "volume")
    counts: dict[str, int] = {Path(MANIFEST).stem: 1}  # <name>.json is the sidecar: never manifest.json
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else f"{s}-{hashlib.sha1(str(r).encode()).hexdigest()[:8]}"
            for s, r in zip(stems, resolved)]


def sidecar_path(output: str | os.PathLike) -> Path:
    """The sidecar JSON of a preprocessed ``<name>.npy``: ``<name>.json`` beside it."""
    output = Path(output)
    return output.with_name(output.name[: -len(".npy")] + ".json" if output.name.endswith(".npy") else output.name + ".json")


def process_one(source: str, output: str, dataset: str, size: int, dtype: str) -> dict:
    """Read, preprocess and write one volume and its sidecar; never raises: failures
    come back as a record with status 'failed' and the error message."""
    record: dict[str, Any] = {"source": source, "output": Path(output).name, "status": "failed"}
    t0 = time.perf_counter()
    try:
        vol, affine = read_volume_affine(source)
        record.update(original_shape=list(vol.shape), original_spacing=[round(float(s), 6) for s in voxel_sizes(affine)])
        out, geometry = preprocess_with_geometry(vol, affine, dataset, size)
        # the sidecar first: a volume on disk always has one
        write_json(sidecar_path(output), {"format": SIDECAR_FORMAT, "version": 1, "source": source,
                                          "output": record["output"], "intensity": dataset, "values": [0.0, 1.0],
                                          **geometry})
        save_npy_atomic(output, out.astype(dtype))
        out_spacing = [1.0, 1.0, 1.0] if dataset == "lidc" else record["original_spacing"]
        record.update(status="ok", output_spacing=out_spacing, **geometry, seconds=round(time.perf_counter() - t0, 3))
    except Exception as e:  # one bad volume must not stop a run over a thousand
        record["error"] = f"{type(e).__name__}: {e}"
    return record


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of a preprocessed volume: the ``<name>.json`` itself or its
    ``<name>.npy``. ValueError naming what to do when it is missing or predates the
    geometry fields."""
    path = Path(path)
    side = path if path.name.endswith(".json") else sidecar_path(path)
    if not side.is_file():
        raise ValueError(f"{side} does not exist: no preprocessing record for {path.name} (volumes preprocessed "
                         f"before prdit_fast kept them: run prdit-fast preprocess again into a new --out folder)")
    record = json.loads(side.read_text())
    missing = [f for f in GEOMETRY_FIELDS if f not in record]
    if record.get("format") != SIDECAR_FORMAT or missing:
        raise ValueError(f"{side} is not a prdit-fast preprocess sidecar (missing {', '.join(missing) or 'format'})")
    return record


def to_scanner(volume: Any, sidecar: Mapping[str, Any] | str | os.PathLike, grid: str = "model",
               value_range: tuple[float, float] = (0.0, 1.0)) -> "Volume":
    """A volume in the preprocessed data's intensities -> a ``prdit_fast.volumes.Volume``
    in HU placed in the scanner's space of the source that ``sidecar`` describes.

    volume: (D, H, W) (or with singleton batch / channel dims), numpy or torch: the
        preprocessed ``.npy`` itself or a model output of that data (a sample, a
        reconstruction) on its grid or on an average-pooled one (edge dividing the
        preprocessing edge, as training at a smaller ``image_size`` sees it).
    sidecar: the volume's sidecar record or its path (``read_sidecar``).
    grid: 'model' keeps the volume's voxels, with the affine that puts them where they lie
        in the scanner (``save()`` overlays the source); 'source' resamples (linearly)
        onto the source's own voxel grid and affine; voxels the crop removed get
        ``hu_min``.
    value_range: the volume's values for ``hu_min`` and ``hu_max``: (0, 1) for the
        preprocessed data (default), (-1, 1) for raw model outputs.
    Values outside the range are clipped to it: the recipe knows no HU beyond it.
    """
    from ..volumes import Volume, as_volume_array

    record = read_sidecar(sidecar) if isinstance(sidecar, (str, os.PathLike)) else dict(sidecar)
    if grid not in ("model", "source"):
        raise ValueError(f"grid must be 'model' or 'source', got {grid!r}")
    array = as_volume_array(volume)
    edge = int(record["shape"][0])
    if len(set(array.shape)) != 1 or edge % array.shape[0]:
        raise ValueError(f"a volume of shape {array.shape} is not on the {edge}^3 preprocessing grid of "
                         f"{record.get('output')} nor on an average-pooled one (a cube whose edge divides {edge})")
    lo, hi = value_range
    # in float64: hu_min and hu_max come back exactly, no HU past the recipe's range
    unit = np.clip((array.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
    hu = record["hu_min"] + unit * (record["hu_max"] - record["hu_min"])
    f = edge // array.shape[0]
    # pooled voxel j averages preprocessed voxels j f .. j f + f - 1: its centre is at j f + (f - 1) / 2
    pooled = np.diag([float(f)] * 3 + [1.0])
    pooled[:3, 3] = (f - 1) / 2
    affine = np.asarray(record["affine"], dtype=np.float64) @ pooled
    description = f"HU ({record['intensity']} preprocessing undone)"
    if grid == "model":
        return Volume(hu.astype(np.float32), affine, "HU", description)
    from scipy import ndimage

    source_affine = np.asarray(record["source_affine"], dtype=np.float64)
    to_model = np.linalg.inv(affine) @ source_affine  # source index -> model index
    out = ndimage.affine_transform(hu.astype(np.float32), to_model[:3, :3], offset=to_model[:3, 3],
                                   output_shape=tuple(record["source_shape"]), order=1, mode="nearest")
    inside = ndimage.affine_transform(np.ones_like(hu, dtype=np.float32), to_model[:3, :3], offset=to_model[:3, 3],
                                      output_shape=tuple(record["source_shape"]), order=0, mode="constant", cval=0.0)
    out[inside == 0] = record["hu_min"]
    return Volume(out.astype(np.float32), source_affine, "HU", description)


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
