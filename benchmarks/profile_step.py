"""Where the time of one fast-backend denoising step goes: kernels, categories, overhead.

    python -m benchmarks.profile_step --out $OUT                 # PRDiT-B/12/4, 128^3, batch 4, bf16 (GPU)
    python -m benchmarks.profile_step --variant B/12/12 --batch 1 --steps 3 --out $OUT --trace

Builds ``randomized_model(variant, size)`` on the device, wraps it with
``accelerate(model, dtype)`` and drives it with the sampling engine
(``engine.Sampler(fast, batch, steps, cuda_graph=False)``): one step is exactly what the
engine's CUDA graph captures (``forward_tokens`` + the fused predictor-corrector update),
run eagerly so that every kernel is visible to the profiler. After ``WARMUP_STEPS`` untimed
steps (the first calls compile and autotune the Triton kernels), ``--rounds`` rounds of
``steps`` steps are timed without the profiler (``prdit_fast.bench.time_call``: CUDA events; ``perf_counter`` on the CPU),
then one round of ``steps`` steps runs under ``torch.profiler``. Reported per step:

* every device kernel (on the CPU: every op, by self time) with its calls, ms, share of
  the summed kernel time and of the wall time, and its category (``CATEGORY_PATTERNS``);
* the same summed per category;
* the wall time, the summed kernel time and their gap (the device idles waiting for
  launches: host overhead, which the engine's CUDA graph removes), and the host time to
  launch a step (when it exceeds the kernel time, the step is launch-bound); the profiled
  round's own wall time is reported apart, since the profiler adds host overhead;
* the model FLOP (``prdit_fast.flops``, times the batch), the achieved TFLOP/s over the
  wall time and, on a GPU, the MFU against a bf16 8192^3 matmul measured in the same run,
  plus the rate of the attention kernels on the attention FLOP and of the GEMM kernels on
  the remaining FLOP.

Output: Markdown on stdout; with ``--out DIR`` also ``profile-<variant>-<size>-b<batch>.md``
and ``.json`` there (``--trace`` adds a Chrome trace ``...-trace.json``), written
atomically. The JSON records device, torch / Triton versions, date, git commit ("unknown"
where the tree has no ``.git``) and the settings.

On the CPU impl "auto" runs the ops' plain-torch references; Triton runs there only
under ``TRITON_INTERPRET=1``, and the profiler does not see interpreted kernels by name
(their time lands in the self time of the autograd Function wrapping them, or in the gap).
A CPU report checks the structure, not GPU figures.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

SCHEMA = "prdit-fast-profile/1"
WARMUP_STEPS = 3  # the first calls compile / autotune Triton kernels; later ones run warm
TIMING_ROUNDS = 5
MATMUL_PEAK_N = 8192
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
KERNEL_NAME_WIDTH = 90  # Markdown only; the JSON keeps full names

# How a kernel name (on the CPU: an op name) becomes a category. Checked in this order,
# case-insensitive ``re.search``, first match wins, so a kernel is counted exactly once:
#   triton     kernels of our @triton.jit functions (prdit_fast.ops, found by import, see
#              ``triton_function_names``; their device names start with the function name)
#              or anything named like a torch-inductor Triton kernel; the category is then
#              "triton:<function name>", one per kernel, because they are memory-bound and
#              each tells its own story. Checked first: "_layernorm_epilogue_gemm_kernel" is Triton.
#   attention  flash-attn 2/3/4, cuDNN SDPA, PyTorch flash / memory-efficient SDPA,
#              xformers (cutlass fmha); before gemm, since FA3 and fmha names contain "cutlass"
#   gemm       cuBLAS / cuBLASLt (sm90_xmma_gemm, nvjet, gemv, split-K reduce), cutlass,
#              and on the CPU the aten matrix products
# and whatever matches none is OTHER: torch elementwise and reduction kernels, copies, memsets.
CATEGORY_PATTERNS: dict[str, str] = {
    "triton": r"^triton_",
    "attention": r"flash|fmha|sdpa|cudnn|attention|xformers",
    "gemm": (
        r"gemm|gemv|nvjet|xmma|cublas|cutlass|splitkreduce"
        r"|^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_addmm_activation)$"
    ),
}
OTHER = "elementwise/other"


# --------------------------------------------------------------------------- #
# Categories
# --------------------------------------------------------------------------- #
def _function_name(obj: Any) -> str | None:
    """The Python name of a Triton kernel object (a JITFunction, an interpreted function, or
    an autotuner / heuristics wrapper around one), or None for anything else."""
    if not type(obj).__module__.startswith("triton"):
        return None
    while hasattr(obj, "fn"):
        obj = obj.fn
    return getattr(obj, "__name__", None)


def triton_function_names() -> tuple[str, ...]:
    """Names of every @triton.jit function in ``prdit_fast.ops``, longest first (so that a
    name that prefixes another never claims its kernels). Modules that fail to import are
    skipped: their kernels cannot run either."""
    from prdit_fast import ops

    names = set()
    for info in pkgutil.iter_modules(ops.__path__):
        try:
            module = importlib.import_module(f"{ops.__name__}.{info.name}")
        except Exception:  # an optional op whose dependencies are missing
            continue
        names.update(n for n in map(_function_name, vars(module).values()) if n)
    return tuple(sorted(names, key=lambda n: (-len(n), n)))


def categorize(name: str, triton_names: tuple[str, ...]) -> str:
    """The category of a kernel (or CPU op) ``name``; see ``CATEGORY_PATTERNS``."""
    for function in triton_names:
        if name == function or name.startswith(function + "_"):
            return f"triton:{function}"
    for category, pattern in CATEGORY_PATTERNS.items():
        if re.search(pattern, name, flags=re.IGNORECASE):
            return f"triton:{name}" if category == "triton" else category
    return OTHER


# --------------------------------------------------------------------------- #
# Measurement
# --------------------------------------------------------------------------- #
def _kernel_times(prof: torch.profiler.profile, device: torch.device) -> tuple[dict[str, float], dict[str, int]]:
    """{name: total microseconds}, {name: calls} of what ran in ``prof``: device kernels,
    copies and memsets on a GPU; CPU ops by self time (nothing counted twice) on the CPU."""
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    if device.type == "cuda":
        for event in prof.events():
            if event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False):
                continue
            totals[event.name] += event.time_range.elapsed_us()
            calls[event.name] += 1
    else:
        for avg in prof.key_averages():
            if avg.self_cpu_time_total > 0:
                totals[avg.key] += avg.self_cpu_time_total
                calls[avg.key] += avg.count
    return dict(totals), dict(calls)


def profile_step(
    variant: str = "PRDiT-B/12/4",
    size: int = 128,
    batch: int = 4,
    steps: int = 5,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    impl: str | None = None,
    timing_rounds: int = TIMING_ROUNDS,
    trace: str | Path | None = None,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Profile ``steps`` engine steps of the fast backend; returns the report (see
    ``format_markdown`` for its reading and the module docstring for the method).

    device: None for cuda when available, else cpu. dtype: "bf16" or "fp32" (None: bf16 on
    CUDA, fp32 on the CPU). impl: ``accelerate``'s impl argument ("auto", "triton",
    "torch"; None: "auto"). trace: also write a Chrome trace of the profiled round there.
    """
    from prdit_fast import bench
    from prdit_fast.devices import resolve_device
    from prdit_fast.engine import Sampler, keys_for
    from prdit_fast.fast import accelerate
    from prdit_fast.flops import flops_breakdown, flops_per_step
    from prdit_fast.models import variant_config
    from prdit_fast.ops.attention_backends import last_backend
    from prdit_fast.testing import randomized_model

    try:
        device = resolve_device(device)
    except RuntimeError as err:  # torch.device's own error for an unparsable string
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from err
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device}")
    dtype = dtype or ("bf16" if device.type == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    impl = impl or "auto"
    for name, value, low in (("steps", steps, 1), ("timing_rounds", timing_rounds, 1), ("batch", batch, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    variant = bench.variant_name(variant)
    variant_config(variant, size)  # a variant / edge pair that does not tile fails here, before any work
    if device.type == "cuda":
        torch.cuda.set_device(device)

    env = bench.environment(device, argv)
    peak = bench.measure_matmul_peak(device, MATMUL_PEAK_N, torch.bfloat16) if device.type == "cuda" else None
    model = randomized_model(variant, size).to(device)
    fast = accelerate(model, dtype=DTYPES[dtype], impl=impl)
    sampler = Sampler(fast, batch, steps, "pc", k=2, cuda_graph=False)
    sampler.sample(keys_for(0, range(batch)))  # x_T and the sampler's buffers; runs `steps` steps

    def run_steps() -> None:
        # the engine's own step, exactly what its CUDA graph captures, run eagerly
        for _ in range(steps):
            sampler.advance()

    def rewind() -> None:
        # outside every timed region: the step counter must stay inside the step table
        sampler.step.zero_()
        bench.synchronize(device)

    warmup_steps = steps  # sample() above
    while warmup_steps < WARMUP_STEPS:
        rewind()
        run_steps()
        warmup_steps += steps
    rounds, host_rounds = [], []
    for _ in range(timing_rounds):
        rewind()
        # one call: wall (CUDA events on a GPU) and host time (until run_steps returns, before
        # waiting for the device: what Python and the launches take)
        timing = bench.time_call(run_steps, device, warmup=0, min_reps=1, max_reps=1)
        rounds.append(timing.median_ms / steps)
        host_rounds.append(timing.host_ms / steps)
    wall_ms = statistics.median(rounds)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    rewind()
    with torch.profiler.profile(activities=activities) as prof:
        # time_call waits for the device before the profiler stops
        profiled_ms = bench.time_call(run_steps, device, warmup=0, min_reps=1, max_reps=1).median_ms / steps
    totals_us, calls = _kernel_times(prof, device)
    if not totals_us:
        raise RuntimeError(
            "the profiler recorded no kernels (on a GPU: is CUPTI available to this torch build?)"
        )
    if trace is not None:
        from prdit_fast.atomic import atomic_path

        with atomic_path(trace) as tmp:
            prof.export_chrome_trace(str(tmp))

    triton_names = triton_function_names()
    kernel_ms = sum(totals_us.values()) / 1e3 / steps
    rows = [
        {
            "name": name,
            "category": categorize(name, triton_names),
            "calls_per_step": calls[name] / steps,
            "ms_per_step": us / 1e3 / steps,
        }
        for name, us in totals_us.items()
    ]
    rows.sort(key=lambda r: -r["ms_per_step"])
    by_category: dict[str, dict[str, Any]] = {}
    for row in rows:
        row["pct_of_kernels"] = 100.0 * row["ms_per_step"] / kernel_ms
        row["pct_of_wall"] = 100.0 * row["ms_per_step"] / wall_ms
        cat = by_category.setdefault(row["category"], {"category": row["category"], "ms_per_step": 0.0,
                                                       "calls_per_step": 0.0, "kernels": 0})
        cat["ms_per_step"] += row["ms_per_step"]
        cat["calls_per_step"] += row["calls_per_step"]
        cat["kernels"] += 1
    categories = sorted(by_category.values(), key=lambda c: -c["ms_per_step"])
    for cat in categories:
        cat["pct_of_kernels"] = 100.0 * cat["ms_per_step"] / kernel_ms
        cat["pct_of_wall"] = 100.0 * cat["ms_per_step"] / wall_ms

    cfg = model.config
    breakdown = {k: v * batch for k, v in flops_breakdown(cfg).items()}
    flop = flops_per_step(cfg) * batch
    tflops = flop / (wall_ms / 1e3) / 1e12
    rates = _category_rates(breakdown, by_category)

    notes = []
    if device.type == "cpu":
        notes.append("CPU run: CPU ops by self time, perf_counter wall time; structure only, not GPU figures.")
        notes.append("On the CPU the attention backend is 'math' (einsum): its matrix products count as gemm.")
    notes.extend(rates.pop("notes"))
    return {
        "schema": SCHEMA,
        "settings": {
            "variant": variant, "size": size, "batch": batch, "steps": steps,
            "dtype": dtype, "impl": impl, "device": str(device), "sampler": "pc", "k": 2,
            "cuda_graph": False, "warmup_steps": warmup_steps, "timing_rounds": timing_rounds,
            "autotune": _autotune_setting(),
        },
        **env,
        "attention_backend": last_backend() if cfg.depth else None,
        "timing": "CUDA events" if device.type == "cuda" else "perf_counter",
        "wall_ms_per_step": wall_ms,
        "wall_ms_per_step_rounds": rounds,
        "host_ms_per_step": statistics.median(host_rounds),
        "profiled_wall_ms_per_step": profiled_ms,
        "kernel_ms_per_step": kernel_ms,
        "gap_ms_per_step": wall_ms - kernel_ms,
        "launches_per_step": sum(calls.values()) / steps,
        "flop_per_step": flop,
        "flop_breakdown_per_step": breakdown,
        "achieved_tflops": tflops,
        "peak": peak,
        "mfu": tflops / peak["tflops"] if peak else None,
        **rates,
        "categories": categories,
        "rows": rows,
        "notes": notes,
    }


def _category_rates(breakdown: dict[str, float], by_category: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """TFLOP/s of the attention kernels on the attention FLOP, and of the gemm kernels on
    every other FLOP; None where it would mislead (no such kernels, or Triton GEMMs
    doing part of that work)."""
    notes = []
    attention_flop = breakdown["blocks_attention"]
    gemm_flop = sum(breakdown.values()) - attention_flop

    def rate(flop: float, category: str) -> float | None:
        ms = by_category.get(category, {}).get("ms_per_step", 0.0)
        return flop / (ms / 1e3) / 1e12 if flop and ms else None

    gemm_rate = rate(gemm_flop, "gemm")
    triton_gemms = [c for c in by_category if c.startswith("triton:") and "gemm" in c.lower()]
    if gemm_rate is not None and triton_gemms:
        notes.append(f"gemm TFLOP/s not given: Triton GEMMs ({', '.join(triton_gemms)}) do part of the GEMM FLOP.")
        gemm_rate = None
    return {"attention_tflops_in_kernels": rate(attention_flop, "attention"),
            "gemm_tflops_in_kernels": gemm_rate, "notes": notes}


def _autotune_setting() -> str:
    return "off (PRDIT_AUTOTUNE=0: first config)" if os.environ.get("PRDIT_AUTOTUNE", "1") == "0" else "on"


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #
def _short(name: str) -> str:
    name = name.replace("|", "\\|")
    return name if len(name) <= KERNEL_NAME_WIDTH else name[: KERNEL_NAME_WIDTH - 3] + "..."


def _opt(value: float | None, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def format_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: summary, categories, then every kernel (ms per step)."""
    s, cuda = report["settings"], report["device"]["type"] == "cuda"
    unit = "kernel" if cuda else "CPU op (self time)"
    peak = report["peak"]
    lines = [
        f"# One fast-backend step: {s['variant']} at {s['size']}^3, batch {s['batch']}, {s['dtype']}",
        "",
        (f"{report['device']['name']} ({s['device']}); torch {report['versions']['torch']}, Triton "
        f"{report['versions']['triton']}; commit {report['git_commit']}; {report['date']}. Impl "
        f"{s['impl']} (Triton autotune {s['autotune']}), attention {report['attention_backend'] or '–'}, "
        f"pc sampler k=2, no CUDA graph; {s['steps']} profiled steps after {s['warmup_steps']} warm-up "
        f"steps; wall time: median of {s['timing_rounds']} unprofiled rounds ({report['timing']})."),
        "",
        "| per step | value |",
        "| --- | --- |",
        f"| wall time (no profiler) | {report['wall_ms_per_step']:.3f} ms |",
        f"| host time to launch the step (Python + launches, no profiler) | {report['host_ms_per_step']:.3f} ms |",
        f"| wall time under the profiler | {report['profiled_wall_ms_per_step']:.3f} ms |",
        (f"| summed {unit} time | {report['kernel_ms_per_step']:.3f} ms "
        f"({100 * report['kernel_ms_per_step'] / report['wall_ms_per_step']:.1f}% of wall) |"),
        f"| gap = wall - {unit} time (launch / host overhead) | {report['gap_ms_per_step']:.3f} ms |",
        f"| {unit} calls | {report['launches_per_step']:.1f} |",
        f"| model FLOP (prdit_fast.flops x batch) | {report['flop_per_step'] / 1e9:.4g} GFLOP |",
        f"| achieved over wall time | {report['achieved_tflops']:.4g} TFLOP/s |",
        f"| bf16 matmul peak {MATMUL_PEAK_N}^3 (measured) | {_opt(peak and peak['tflops'], '{:.4g} TFLOP/s')} |",
        f"| MFU | {_opt(report['mfu'], '{:.1%}')} |",
        f"| attention kernels on attention FLOP | {_opt(report['attention_tflops_in_kernels'], '{:.4g} TFLOP/s')} |",
        f"| gemm kernels on the other FLOP | {_opt(report['gemm_tflops_in_kernels'], '{:.4g} TFLOP/s')} |",
        "",
        "## By category",
        "",
        "| category | kernels | calls | ms | % of kernel time | % of wall |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {c['category']} | {c['kernels']} | {c['calls_per_step']:.4g} | {c['ms_per_step']:.4f} | "
              f"{c['pct_of_kernels']:.1f} | {c['pct_of_wall']:.1f} |" for c in report["categories"]]
    lines += ["", f"## By {unit}", "",
              f"| {unit} | category | calls | ms | % of kernel time | % of wall |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| `{_short(r['name'])}` | {r['category']} | {r['calls_per_step']:.4g} | {r['ms_per_step']:.4f} | "
              f"{r['pct_of_kernels']:.1f} | {r['pct_of_wall']:.1f} |" for r in report["rows"]]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def output_stem(variant: str, size: int, batch: int) -> str:
    """profile-<variant slug>-<size>-b<batch>, e.g. profile-prdit-b-12-4-128-b4 for B/12/4."""
    from prdit_fast.bench import slugify, variant_name

    return f"profile-{slugify(variant_name(variant))}-{size}-b{batch}"


def write_report(report: dict[str, Any], folder: str | Path) -> dict[str, Path]:
    """<stem>.md and <stem>.json under ``folder`` (created), each written atomically."""
    from prdit_fast.atomic import atomic_path

    folder = Path(folder)
    s = report["settings"]
    stem = output_stem(s["variant"], s["size"], s["batch"])
    paths = {"markdown": folder / f"{stem}.md", "json": folder / f"{stem}.json"}
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(format_markdown(report))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="PRDiT-B/12/4")
    parser.add_argument("--size", type=int, default=128, help="volume edge S")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (and steps per timing round)")
    parser.add_argument("--device", default=None, help="cuda[:N] or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--impl", choices=("auto", "triton", "torch"), default="auto",
                        help="accelerate()'s impl: auto = the documented default per device and dtype")
    parser.add_argument("--rounds", type=int, default=TIMING_ROUNDS, help="unprofiled timing rounds")
    parser.add_argument("--out", help="write profile-<variant>-<size>-b<batch>.{md,json} into this folder")
    parser.add_argument("--trace", action="store_true", help="with --out, also a Chrome trace <stem>-trace.json")
    args = parser.parse_args(argv)
    if args.trace and not args.out:
        parser.error("--trace needs --out")
    full_argv = [sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])
    try:
        stem = output_stem(args.variant, args.size, args.batch)
        trace = Path(args.out) / f"{stem}-trace.json" if args.trace else None
        report = profile_step(args.variant, args.size, args.batch, args.steps, args.device, args.dtype,
                              args.impl, args.rounds, trace=trace, argv=full_argv)
    except ValueError as err:
        parser.error(str(err))
    print(format_markdown(report))
    if args.out:
        paths = write_report(report, args.out)
        print("wrote " + ", ".join(str(p) for p in list(paths.values()) + ([trace] if trace else [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
