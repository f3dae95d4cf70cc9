"""End-to-end benchmark of PRDiT over every backend in one run (``prdit-fast bench``).

For each cell (variant, volume edge S, batch B) and each backend it measures

    sample_step_ms      one sampler step (model call + predictor-corrector update) for the
                        batch: the median over timed reps of a ``steps_per_rep``-step
                        sample divided by ``steps_per_rep``, after warm-up
    volumes_per_hour    B * 3600 s / (1000 steps * step time)
    train_samples_per_s B / (forward + loss + backward + clip + AdamW step)
    peak memory         torch.cuda.max_memory_allocated, reset per cell
    MFU                 FLOP/s against a bf16 matmul peak measured at the start of the run

and ratios against the reference (eager fp32, TF32 off). From these: GPU-hour projections
of the paper's two-stage recipe and of sampling 1,000 volumes (GPU runs, from throughput
at 128^3 only; a CPU run or another edge projects nothing), and per backend the largest
batch that fits in memory at each volume edge. Results go to
``<out>/<device-slug>-<YYYY-MM-DD>/bench.{json,md,png}``; CPU results are labelled CPU.

The package, by step: ``setups`` (the ways a model is run), ``timing`` (the one timer and the
device measurements), ``cells`` (one cell and the largest-batch search), ``projections``
(GPU-hours, MFU, ratios), ``report`` (Markdown, chart, files), ``run`` (the whole run),
``environment`` (where it ran).
"""
from __future__ import annotations

from .cells import BenchOptions, bench_cell, capacity_search, error_line, largest_fitting, variant_name
from .environment import device_slug, environment, slugify
from .projections import (
    add_derived,
    capacity_summary,
    model_flops_utilization,
    projections,
    sampling_gpu_hours,
    step_flops,
    training_gpu_hours,
    volumes_per_hour,
)
from .run import run_benchmark
from .setups import REFERENCE, SETUP_NAMES, SETUPS, PreparedSetup, Setup, numerics, skip_reason
from .timing import (
    Timing,
    is_out_of_memory,
    measure_copy_bandwidth,
    measure_matmul_peak,
    peak_memory_gib,
    release,
    reset_peak_memory,
    synchronize,
    time_call,
)

__all__ = [
    "BenchOptions", "bench_cell", "capacity_search", "error_line", "largest_fitting", "variant_name",
    "device_slug", "environment", "slugify",
    "add_derived", "capacity_summary", "model_flops_utilization", "projections", "sampling_gpu_hours",
    "step_flops", "training_gpu_hours", "volumes_per_hour",
    "run_benchmark",
    "REFERENCE", "SETUP_NAMES", "SETUPS", "PreparedSetup", "Setup", "numerics", "skip_reason",
    "Timing", "is_out_of_memory", "measure_copy_bandwidth", "measure_matmul_peak", "peak_memory_gib", "release",
    "reset_peak_memory", "synchronize", "time_call",
]
