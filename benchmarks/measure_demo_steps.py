"""Size ``prdit-fast demo``'s fixed step counts: time a few steps of each stage and of the
sampler, in wall time and in this process's CPU time, and project the demo's total.

On a shared machine the wall time says little about a free one; the CPU time does:
with T threads on T free cores a step takes at least CPU time / T (perfect scaling,
spin-waits counted as work) and at most the one-thread CPU time. Both bounds are
printed and written as JSON next to the commands that measured them.

    python benchmarks/measure_demo_steps.py --threads 1 --out benchmarks/results/<machine>-<date>/demo_steps_1thread.json
    python benchmarks/measure_demo_steps.py --threads 2 --out benchmarks/results/<machine>-<date>/demo_steps_2threads.json
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from prdit_fast.atomic import write_json
from prdit_fast.bench.timing import time_call
from prdit_fast.checkpoint import copy_matching_weights
from prdit_fast.commands import demo
from prdit_fast.diffusion import IaNDiffusion
from prdit_fast.models import create_model
from prdit_fast.phantom import PhantomDataset


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call, through ``prdit_fast.bench.time_call``."""
    timing = time_call(fn, torch.device("cpu"), warmup=0, min_reps=1, max_reps=1)
    return timing.median_ms / 1e3, timing.cpu_s


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=30, help="timed steps per stage (after 5 warm-up steps)")
    parser.add_argument("--sampler-steps", type=int, default=10, help="timed sampler steps (scaled to the demo's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    phantoms = PhantomDataset(args.size, 16, seed=0)
    data = torch.stack([phantoms[i] for i in range(len(phantoms))])
    generator = torch.Generator().manual_seed(0)
    rows = {}
    stage1 = create_model(demo.STAGE1, args.size)
    demo.train_stage(stage1, data, 5, args.batch_size, 1e-3, generator, "warm-up 1", progress=False)
    rows["stage1"] = timed(lambda: demo.train_stage(stage1, data, args.train_steps, args.batch_size, 1e-3, generator,
                                                    "stage 1", progress=False))
    stage2 = create_model(demo.STAGE2, args.size)
    copy_matching_weights(stage2, stage1.state_dict())
    demo.train_stage(stage2, data, 5, args.batch_size, 1e-3, generator, "warm-up 2", progress=False)
    rows["stage2"] = timed(lambda: demo.train_stage(stage2, data, args.train_steps, args.batch_size, 1e-3, generator,
                                                    "stage 2", progress=False))
    diffusion = IaNDiffusion()
    noise = diffusion.initial_noise((4, 1) + (args.size,) * 3, generator=generator)
    with torch.no_grad():
        rows["sampler"] = timed(lambda: diffusion.sample(stage2.eval(), noise, args.sampler_steps, "pc", 2,
                                                         generator=generator))
    per_step = {k: (w / n, c / n) for (k, (w, c)), n in zip(rows.items(),
                                                           (args.train_steps, args.train_steps, args.sampler_steps))}
    demo_steps = {"stage1": demo.STAGE1_STEPS, "stage2": demo.STAGE2_STEPS, "sampler": 100}  # 4 volumes, one batch
    projection = {
        "wall_here_s": sum(per_step[k][0] * n for k, n in demo_steps.items()),
        "cpu_s": sum(per_step[k][1] * n for k, n in demo_steps.items()),
    }
    projection["free_cores_lower_bound_s"] = projection["cpu_s"] / args.threads
    result = {
        "threads": args.threads, "size": args.size, "batch_size": args.batch_size,
        "seconds_per_step": {k: {"wall": w, "cpu": c} for k, (w, c) in per_step.items()},
        "demo_steps": demo_steps, "projection_training_and_sampling": projection,
        "cpu_share_here": sum(c for _, c in rows.values()) / sum(w for w, _ in rows.values()),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    for phase, (wall, cpu) in per_step.items():
        print(f"{phase}: {cpu:.4f} CPU-s per step ({wall:.4f} s wall here)")
    print(f"demo ({demo_steps}): {projection['cpu_s']:.0f} CPU-s with {args.threads} thread(s), "
          f"{projection['wall_here_s']:.0f} s wall at this machine's load")
    if args.out is not None:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
