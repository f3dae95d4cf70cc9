"""``run_benchmark``: every cell and setup of one ``prdit-fast bench`` run."""
from __future__ import annotations

import datetime
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from ..devices import resolve_device
from ..testing import randomized_model
from .cells import BenchOptions, bench_cell, capacity_search, default_batch, timing_settings
from .environment import device_slug, environment
from .projections import add_derived, capacity_summary, projections, step_flops
from .report import fmt_ratio, write_results
from .setups import SETUPS, Setup, skip_reason
from .timing import measure_copy_bandwidth, measure_matmul_peak, release

SCHEMA = "prdit-fast-bench/1"


def _row_line(index: int, total: int, r: dict[str, Any], seconds: float) -> str:
    head = f"[{index:>3}/{total}] {r['variant']:<14} {r['size']:>3}^3 b{r['batch']:<3} {r['backend']:<15}"
    if r["sample_status"] == "ok":
        mem = r.get("sample_peak_memory_gib")
        samp = (f"step {r['sample_step_ms']:.4g} ms ({fmt_ratio(r.get('sample_speedup'))}), "
                f"{r['volumes_per_hour']:.3g} vol/h" + (f", {mem:.2f} GiB" if mem is not None else ""))
    else:
        samp = f"sampling {r['sample_status']}"
    if r["train_status"] == "ok":
        mem = r.get("train_peak_memory_gib")
        train = (f"train {r['train_samples_per_s']:.3g} samples/s ({fmt_ratio(r.get('train_speedup'))})"
                 + (f", {mem:.2f} GiB" if mem is not None else ""))
    else:
        train = f"train {r['train_status']}"
    return f"{head} {samp}; {train}  [{seconds:.1f} s]"


def run_benchmark(opts: BenchOptions, log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run every cell and backend, write bench.json / bench.md / bench.png, return (result, paths).

    JSON and Markdown are rewritten after every cell, so an interrupted run keeps what it
    measured; the chart is drawn at the end.
    """
    try:
        device = resolve_device(opts.device)
    except RuntimeError as err:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {opts.device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    opts.resolve(device)
    started = time.perf_counter()
    cpu = device.type == "cpu"
    env = environment(device, opts.argv)
    folder = Path(opts.out) / f"{device_slug(device)}-{datetime.date.today().isoformat()}"
    timing = timing_settings(opts, device)
    label = "CPU results (not GPU figures)" if cpu else "GPU"
    log(f"prdit-fast bench: {env['device']['name']} [{label}], torch {env['versions']['torch']}, "
        f"output {folder}")

    backends_info = []
    runnable: list[Setup] = []
    for b in SETUPS:
        if b.name not in opts.backends:
            continue
        reason = skip_reason(b, device, explicit=opts.explicit_backends and b.name in opts.backends)
        backends_info.append({"name": b.name, "description": b.description,
                              "status": "run" if reason is None else "skipped", "reason": reason})
        if reason is None:
            runnable.append(b)
        else:
            log(f"skip {b.name}: {reason}")

    matmul_n, copy_bytes = (512, 64 * 2**20) if cpu else (8192, 2**30)
    peaks = {"matmul": measure_matmul_peak(device, matmul_n), "copy": measure_copy_bandwidth(device, copy_bytes)}
    log(f"bf16 matmul {matmul_n}^3: {peaks['matmul']['tflops']:.3g} TFLOP/s; copy {copy_bytes / 2**30:.3g} GiB: "
        f"{peaks['copy']['gbps']:.4g} GB/s")

    result: dict[str, Any] = {
        "schema": SCHEMA,
        "device_type": device.type,
        "label": label,
        **env,
        "quick": opts.quick,
        "settings": {k: v for k, v in asdict(opts).items() if k not in ("argv", "explicit_backends")}
        | {"timing": timing, "sampler": "pc", "k": 2,
           "batch_by_size": {s: list(opts.batches or (default_batch(s, device),)) for s in opts.sizes}},
        "peaks": peaks,
        "backends": backends_info,
        "flops": {},
        "rows": [],
        "projections": [],
        "capacity": [],
        "capacity_summary": {},
        "notes": [],
    }
    if cpu:
        result["notes"].append("CPU run: every figure is a CPU figure; no GPU-hour projections.")
    if any(b.compiled for b in runnable):
        result["notes"].append(f"torch.compile mode: {opts.compile_mode}; its compile time is in "
                               f"sample_first_call_s / train_first_call_s, not in the step times.")
    flops_by_cell: dict[tuple[str, int], dict[str, Any]] = {}
    cells = [(v, s, b) for s in opts.sizes for v in opts.variants
             for b in (opts.batches or (default_batch(s, device),))]
    total = len(cells) * len(runnable)
    index = 0
    stop = False

    def over_budget() -> bool:
        return opts.time_budget_s is not None and time.perf_counter() - started > opts.time_budget_s

    for size in opts.sizes:
        for variant in opts.variants:
            if (variant, size) not in flops_by_cell:
                flops_by_cell[(variant, size)] = step_flops(variant, size)
                result["flops"][f"{variant}@{size}"] = flops_by_cell[(variant, size)]
            base = randomized_model(variant, size)
            for batch in [b for v, s, b in cells if (v, s) == (variant, size)]:
                for backend in runnable:
                    index += 1
                    row = {"variant": variant, "size": size, "batch": batch, "backend": backend.name,
                           "device_type": device.type}
                    cell_start = time.perf_counter()
                    stop = stop or over_budget()
                    if stop:
                        row.update(sample_status="skipped (time budget)", train_status="skipped (time budget)")
                    else:
                        row.update(bench_cell(base, backend, batch, device, opts, timing))
                    result["rows"].append(row)
                    add_derived(result["rows"], flops_by_cell, peaks["matmul"]["tflops"])
                    log(_row_line(index, total, row, time.perf_counter() - cell_start))
                    write_results(result, folder, opts.stem, chart=False)
            del base
            release(device)

    result["projections"] = [] if cpu else projections(result["rows"], tuple(b.name for b in runnable))
    if not opts.capacity:
        result["capacity_note"] = "disabled with --no-capacity"
    elif cpu:
        result["capacity_note"] = ("CPU run: host memory has no device limit worth searching "
                                   "(and swapping would hurt other work)")
    else:
        for size in opts.sizes:
            if over_budget():
                result["capacity_note"] = "time budget reached before every search ran"
                break
            base = randomized_model(opts.capacity_variant, size)
            for backend in runnable:
                if over_budget():
                    result["capacity_note"] = "time budget reached before every search ran"
                    break
                c = capacity_search(base, backend, device, opts.capacity_seconds)
                c.update(backend=backend.name, size=size, variant=opts.capacity_variant)
                result["capacity"].append(c)
                log(f"capacity {opts.capacity_variant} {size}^3 {backend.name}: max batch {c.get('max_batch')} "
                    f"({c.get('status')}{', bounded by ' + c['bounded_by'] if c.get('bounded_by') else ''}) "
                    f"[{c['seconds']} s]")
            del base
            release(device)
        result["capacity_summary"] = capacity_summary(result["capacity"])
    result["seconds"] = round(time.perf_counter() - started, 1)
    paths = write_results(result, folder, opts.stem)
    log(f"wrote {paths['json']}, {paths['markdown'].name}, {paths['png'].name} in {result['seconds']} s")
    return result, paths
