"""``prdit-fast bench data``: how fast each data source feeds training, per CPU core,
and how many loader cores one GPU would need.

Sources, each built here as synthetic volumes in the official layout (a chest phantom
at 128^3, upsampled to the stored edge, with 12 HU of fresh noise per volume so the
files compress like CT, min-max to [0, 1]):

- ``official-lidc``: ``LIDC-IDRI/<case>/<series>/processed.nii.gz``, float32, gzip,
  identity affine (what the official ``preproc_lidc-idri.py`` writes);
- ``official-rad``: ``trnNNNNN.npz`` (``np.savez_compressed``, keys ``ct`` and
  ``volume``, float32), the official RAD-ChestCT layout;
- ``npy``: ``prdit-fast preprocess`` output (float16 ``.npy``, memory-mapped);
- ``cache``: the training cache (``prdit_fast.data.cache``) built from the LIDC files at
  the training edge.

A sample is what training consumes: one ``VolumeDataset`` (or cache) item at the
training edge, read in this process with one torch thread; files are in the page cache
(read once before timing). samples/s per core = 1 / the median CPU time of an item
(``time.process_time``: user + system time of this process, so other jobs on a shared
machine do not count; the wall time is reported beside it, with the load average).

Cores per GPU = GPU samples/s / samples/s per core. The GPU rate is measured in the same
run when CUDA is present (the training step of ``--variant`` with the fast backend, as
``prdit-fast bench`` times it); on the CPU it is the ``--gpu-rate S=RATE`` given, and the
report names its ``--gpu-rate-source``.
"""
from __future__ import annotations

import datetime
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..atomic import atomic_path, write_json
from .environment import device_slug, environment

SOURCES = ("official-lidc", "official-rad", "npy", "cache")


def _unit_volumes(edge: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` float32 (edge,)^3 volumes in [0, 1]: one phantom, fresh noise each."""
    from ..phantom import chest_phantom

    base_edge = min(edge, 128)
    base = chest_phantom(base_edge, seed=seed, noise_hu=0.0)
    f = edge // base_edge
    base = np.repeat(np.repeat(np.repeat(base, f, 0), f, 1), f, 2)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        hu = np.clip(base + rng.normal(0.0, 12.0, base.shape).astype(np.float32), -1000.0, None)
        out.append(((hu - hu.min()) / (hu.max() - hu.min())).astype(np.float32))
    return out


def make_sources(folder: Path, edge: int, count: int, kinds: tuple[str, ...] = SOURCES[:3]) -> dict[str, list[Path]]:
    """The file sources ``kinds`` (default all three) of ``count`` volumes of edge ``edge``
    under ``folder``."""
    import nibabel as nib

    files: dict[str, list[Path]] = {k: [] for k in SOURCES[:3]}
    for n, v in enumerate(_unit_volumes(edge, count), 1):
        if "official-lidc" in kinds:
            path = folder / "LIDC-IDRI" / f"LIDC-IDRI-{n:04d}" / "1.3.6.1.4.1.14519" / "processed.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(v, np.eye(4)), str(path))
            files["official-lidc"].append(path)
        if "official-rad" in kinds:
            path = folder / "rad_chestct" / f"trn{n:05d}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, ct=v, volume=v)
            files["official-rad"].append(path)
        if "npy" in kinds:
            path = folder / "npy" / f"volume_{n:04d}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, v.astype(np.float16))
            files["npy"].append(path)
    return files


def _item_seconds(dataset, reps: int = 1) -> tuple[list[float], list[float]]:
    """(CPU seconds, wall seconds) of each item read, ``reps`` passes over ``dataset``."""
    cpu, wall = [], []
    for _ in range(reps):
        for i in range(len(dataset)):
            c0, w0 = time.process_time(), time.perf_counter()
            dataset[i]
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    return cpu, wall


def gpu_training_rate(variant: str, size: int, device: torch.device) -> dict[str, Any]:
    """Samples/s of one fast-backend training step of ``variant`` at ``size``^3 on ``device``."""
    from ..models import create_model
    from .setups import SETUPS, PreparedSetup
    from .timing import is_out_of_memory, release, time_call

    batch = 4 if size <= 128 else 1
    setup = next(s for s in SETUPS if s.name == "fast")
    try:
        model = create_model(variant, size).to(device)
        t = time_call(PreparedSetup(setup, model, device, "default").training_run(batch), device)
        return {"samples_per_s": batch / (t.median_ms / 1e3), "batch": batch, "status": "ok",
                "source": f"measured in this run: {variant} fast backend, bf16, batch {batch}"}
    except Exception as err:  # an OOM at 256^3 leaves the other rows
        return {"samples_per_s": None, "status": "OOM" if is_out_of_memory(err) else str(err).splitlines()[0]}
    finally:
        release(device)


def run_data_benchmark(out: str | Path, sizes: tuple[int, ...] = (128, 256), volumes: int = 3,
                       gpu_rates: dict[int, float] | None = None, gpu_rate_source: str | None = None,
                       variant: str = "PRDiT-B/12/4", device: torch.device | None = None,
                       work_dir: str | Path | None = None, tag: str | None = None, argv: list[str] | None = None,
                       log: Callable[[str], None] = print) -> tuple[dict[str, Any], Path]:
    """Measure every source at every training edge in ``sizes``; write
    ``OUT/<cpu-slug>-<date>/bench-data[-TAG].{json,md}``. Returns (result, markdown path)."""
    import tempfile

    from ..data.cache import CacheSpec, storage_dtype, training_cache
    from ..data.dataset import VolumeDataset

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu = torch.device("cpu")
    edge = max(sizes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    gpu: dict[int, dict[str, Any]] = {}
    try:
        with tempfile.TemporaryDirectory(dir=work_dir, prefix="prdit-bench-data-") as tmp:
            started = time.perf_counter()
            files = make_sources(Path(tmp), edge, volumes)
            log(f"bench data: {volumes} synthetic volumes per source at {edge}^3 in "
                f"{time.perf_counter() - started:.0f} s")
            for size in sizes:
                for kind in SOURCES:
                    if kind == "cache":
                        spec = CacheSpec(tuple(files["official-lidc"]), size, 1, "lidc", storage_dtype("auto", "lidc"))
                        t0 = time.perf_counter()
                        dataset = training_cache(spec, Path(tmp) / "cache")
                        build_s = time.perf_counter() - t0
                    else:
                        dataset, build_s = VolumeDataset(files[kind], size), None
                    _item_seconds(dataset)  # page cache and first-touch warm-up
                    cpu_s, wall_s = _item_seconds(dataset, reps=2)
                    median = max(statistics.median(cpu_s), 1e-6)  # process_time ticks are coarse on some systems
                    row = {"source": kind, "stored_edge": edge, "size": size, "item_ms": 1e3 * median,
                           "item_wall_ms": 1e3 * statistics.median(wall_s),
                           "samples_per_s_per_core": 1.0 / median, "items_timed": len(cpu_s),
                           "file_mb": sum(p.stat().st_size for p in (files.get(kind) or [dataset.path])) / 1e6
                           / (len(files.get(kind) or [None]))}
                    if build_s is not None:
                        row["cache_build_s_per_volume"] = build_s / volumes
                        row["file_mb"] = dataset.path.stat().st_size / 1e6 / volumes
                    rows.append(row)
                    log(f"  {size}^3 {kind:14s} {row['item_ms']:8.3g} ms/sample  "
                        f"{row['samples_per_s_per_core']:8.3g} samples/s per core")
    finally:
        torch.set_num_threads(threads)
    for size in sizes:
        if device.type == "cuda":
            gpu[size] = gpu_training_rate(variant, size, device)
        elif gpu_rates and size in gpu_rates:
            gpu[size] = {"samples_per_s": gpu_rates[size], "status": "given",
                         "source": gpu_rate_source or "given with --gpu-rate (no source named)"}
    for row in rows:
        rate = (gpu.get(row["size"]) or {}).get("samples_per_s")
        row["cores_per_gpu"] = rate / row["samples_per_s_per_core"] if rate else None
    env = environment(cpu, argv)
    env["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = {"kind": "data", "environment": env, "volumes_per_source": volumes, "sizes": list(sizes),
              "gpu_rate": {str(k): v for k, v in gpu.items()}, "rows": rows, "method": __doc__}
    folder = Path(out) / f"{device_slug(cpu)}-{datetime.date.today().isoformat()}"
    stem = "bench-data" + (f"-{tag}" if tag else "")
    write_json(folder / f"{stem}.json", result)
    with atomic_path(folder / f"{stem}.md") as tmp_md:
        tmp_md.write_text(to_markdown(result))
    return result, folder / f"{stem}.md"


def to_markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    v = env["versions"]
    lines = [
        f"# Data sources: samples/s per CPU core ({env['device']['cpu']})", "",
        f"- machine: {env['device']['cpu']}, {env['device']['cpu_count']} CPUs visible; one torch thread per "
        f"measurement; python {v['python']}, torch {v['torch']}, numpy {np.__version__}",
        f"- commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}, date {env['date']}, load average "
        f"at the end {env.get('load_average')}",
        f"- command: `{env['command']}`",
        f"- {result['volumes_per_source']} synthetic volumes per source (official layouts, see "
        f"`prdit_fast/bench/data.py`); a sample is one training item at the edge S; median of "
        f"{result['rows'][0]['items_timed'] if result['rows'] else 0} page-cached reads",
    ]
    for size, g in result["gpu_rate"].items():
        rate = g.get("samples_per_s")
        lines.append(f"- GPU rate at {size}^3: " + (f"{rate:.1f} samples/s ({g['source']})" if rate else g["status"]))
    if not result["gpu_rate"]:
        lines.append("- no GPU rate (no CUDA device and no --gpu-rate): cores per GPU not computed")
    lines += ["", "| source | stored edge | S | CPU ms/sample | samples/s per core | cores per GPU | wall ms/sample | "
                  "MB per volume |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        cores = f"{r['cores_per_gpu']:.3g}" if r.get("cores_per_gpu") else "–"
        lines.append(f"| {r['source']} | {r['stored_edge']} | {r['size']} | {r['item_ms']:.3g} | "
                     f"{r['samples_per_s_per_core']:.3g} | {cores} | {r['item_wall_ms']:.3g} | {r['file_mb']:.3g} |")
    builds = [r for r in result["rows"] if r.get("cache_build_s_per_volume")]
    if builds:
        lines += ["", "Cache build (each LIDC volume read once, pooled, written): " + ", ".join(
            f"{r['cache_build_s_per_volume']:.2f} s per volume at {r['size']}^3" for r in builds)]
    return "\n".join(lines) + "\n"
