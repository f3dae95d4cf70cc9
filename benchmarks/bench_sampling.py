"""Sampling throughput of PRDiT on one GPU: CUDA graph vs eager vs the official-style loop.

    python benchmarks/bench_sampling.py                      # B/12/4 at 128^3, batch 1
    python benchmarks/bench_sampling.py --batch-size 4 --json rows.json

What is measured: the GPU wall time of ``--timed-steps`` denoising steps (after a
warm-up run), divided by the step count; volumes/hour at 100 and 1000 steps from that step
time. The ``fast+graph`` row also times whole 100- and 1000-step samples (one engine
each, capture excluded: ``measured_s_per_volume_{n}``, ``measured_volumes_per_hour_{n}``),
which include the per-sample work (initial noise, outputs) the step time leaves out.
MFU: the model's FLOP per step (``prdit_fast.flops``) over the step time, against a bf16
8192^3 matmul peak measured in the same run.

Rows:
* ``fast+graph``  fast backend (bf16), one CUDA graph per step, fused sampler update;
* ``fast eager``  the same step without the graph;
* ``official``    the reference network in fp32, eager, ``IaNDiffusion.sample`` with a
                  host copy of x0_hat every step, as the official sampling loop does.

The floor: spec section 11, a 1000-step sample of B/12/4 at 128^3 is 680 TFLOP, 0.85 s on
a GPU sustaining 800 TFLOP/s in bf16; ``floor_ratio`` = GPU s per 1000-step volume / floor.
Skips (exit 0) without a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import torch

from prdit_fast.bench import measure_matmul_peak, peak_memory_gib, randomized_model, release, reset_peak_memory, synchronize
from prdit_fast.devices import resolve_device

FLOOR_TFLOPS = 800.0  # bf16 dense throughput that spec section 11 calls the physical floor


def _time_steps(run: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per step of ``run`` (which performs ``steps`` steps), after one warm-up call."""
    run()
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def sampling_rows(
    variant: str = "PRDiT-B/12/4",
    size: int = 128,
    batch_size: int = 1,
    timed_steps: int = 20,
    step_counts: tuple[int, ...] = (100, 1000),
    dtype: torch.dtype = torch.bfloat16,
    include_official: bool = True,
    device: str | torch.device = "cuda",
    peak_matmul_edge: int = 8192,
) -> list[dict]:
    """One dict per configuration: name, backend, dtype, cuda_graph, batch_size, step_ms
    (per batch), gpu_s_per_volume_{n}, volumes_per_hour_{n} for n in ``step_counts``,
    floor_s_per_1000_step_volume, floor_ratio, peak_gpu_memory_gib, note."""
    from prdit_fast.diffusion import IaNDiffusion
    from prdit_fast.engine import Sampler, keys_for
    from prdit_fast.flops import flops_per_step

    device = resolve_device(device)
    peak_tflops = measure_matmul_peak(device, peak_matmul_edge, torch.bfloat16)["tflops"]
    model = randomized_model(variant, size).to(device)
    step_flop = flops_per_step(model.config) * batch_size
    floor_s = flops_per_step(model.config) * 1000 / (FLOOR_TFLOPS * 1e12)
    keys = keys_for(0, range(batch_size))
    rows = []

    def row(name: str, backend: str, row_dtype: torch.dtype, graph: bool, step_s: float, note: str, **extra) -> dict:
        per_volume_step = step_s / batch_size
        r = {
            "name": name, "variant": model.config.name, "size": size, "backend": backend,
            "dtype": str(row_dtype).replace("torch.", ""), "cuda_graph": graph, "batch_size": batch_size,
            "step_ms": round(step_s * 1e3, 3),
        }
        for n in step_counts:
            r[f"gpu_s_per_volume_{n}"] = round(per_volume_step * n, 3)
            r[f"volumes_per_hour_{n}"] = round(3600 / (per_volume_step * n), 1)
        r["floor_s_per_1000_step_volume"] = float(f"{floor_s:.4g}")
        r["floor_ratio"] = round(per_volume_step * 1000 / floor_s, 2)
        r["tflops"] = float(f"{step_flop / step_s / 1e12:.4g}")
        r["mfu"] = float(f"{step_flop / step_s / 1e12 / peak_tflops:.4g}")
        r["peak_tflops"] = float(f"{peak_tflops:.4g}")
        peak = peak_memory_gib(device)
        r["peak_gpu_memory_gib"] = round(peak, 2) if peak is not None else None
        r["note"] = note
        r.update(extra)
        rows.append(r)
        return r

    def engine_row(name: str, net: torch.nn.Module, backend: str, row_dtype: torch.dtype, graph: bool,
                   whole_runs: bool = False) -> None:
        release(device)
        reset_peak_memory(device)

        def engine_for(steps: int) -> Sampler:
            return Sampler(net, batch_size, steps, "pc", k=2, dtype=None if backend == "fast" else row_dtype,
                           cuda_graph=graph)

        engine = engine_for(timed_steps)
        step_s = _time_steps(lambda: engine.sample(keys), timed_steps, device)
        measured = {}
        if whole_runs:
            for n in step_counts:
                whole = engine_for(n)
                seconds = _time_steps(lambda: whole.sample(keys), 1, device)
                measured[f"measured_s_per_volume_{n}"] = round(seconds / batch_size, 3)
                measured[f"measured_volumes_per_hour_{n}"] = round(3600 * batch_size / seconds, 1)
                del whole
        row(name, backend, engine.dtype, engine.cuda_graph, step_s,
            f"step time measured over {timed_steps} steps x volumes/hour extrapolated to n steps",
            attention=engine.describe()["attention"], graph_reason=engine.graph_reason or None, **measured)
        del engine

    try:
        from prdit_fast.fast import accelerate
    except ImportError:
        accelerate = None
    if accelerate is not None:
        fast_model = accelerate(model, dtype=dtype)
        engine_row("fast+graph", fast_model, "fast", dtype, True, whole_runs=True)
        engine_row("fast eager", fast_model, "fast", dtype, False)
        del fast_model
    engine_row("reference+graph", model, "reference", dtype, True)

    if include_official:
        release(device)
        reset_peak_memory(device)
        diffusion = IaNDiffusion()
        shape = (batch_size, model.config.in_channels) + (size,) * 3
        official_dtype = next(model.parameters()).dtype

        def official() -> None:
            noise = diffusion.initial_noise(shape, device=device)
            # the official loop copies each step's prediction to the host (a sync per step)
            diffusion.sample(model, noise, timed_steps, "pc", 2, callback=lambda n, x, x0: x0.cpu())

        step_s = _time_steps(official, timed_steps, device)
        row("official", "reference", official_dtype, False, step_s,
            "reference network fp32 eager, IaNDiffusion.sample, x0_hat.cpu() every step")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="PRDiT-B/12/4")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--timed-steps", type=int, default=20)
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--no-official", action="store_true", help="skip the slow fp32 official-style loop")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_sampling: no CUDA GPU, skipped")
        return 0
    rows = sampling_rows(
        args.variant, args.size, args.batch_size, args.timed_steps,
        dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype], include_official=not args.no_official,
    )
    print(f"GPU: {torch.cuda.get_device_name()}  ({args.variant} at {args.size}^3, batch {args.batch_size})")
    cols = ["name", "dtype", "cuda_graph", "step_ms", "mfu", "gpu_s_per_volume_100", "volumes_per_hour_100",
            "gpu_s_per_volume_1000", "volumes_per_hour_1000", "measured_s_per_volume_1000",
            "measured_volumes_per_hour_1000", "floor_ratio", "peak_gpu_memory_gib"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c)) for c in cols))
    print(f"floor: {rows[0]['floor_s_per_1000_step_volume']} s per 1000-step volume at {FLOOR_TFLOPS:.0f} TFLOP/s; "
          f"volumes/hour are the measured step time x the step count, measured_* are timed whole samples; "
          f"MFU against the bf16 peak measured in this run, {rows[0]['peak_tflops']} TFLOP/s")
    official = next((r for r in rows if r["name"] == "official"), None)
    fast = next((r for r in rows if r["name"] == "fast+graph"), None)
    if official and fast:
        print(f"fast+graph vs official: {official['step_ms'] / fast['step_ms']:.2f}x volumes/hour")
    if args.json:
        from prdit_fast.atomic import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
