"""Sampling baselines a sceptic accepts: every way to run PRDiT, in one run, on one GPU.

    python -m benchmarks.bench_sampling --json rows.json          # B/12/4 at 128^3, batch 4
    python -m benchmarks.bench_sampling --rows fast-graph compile --whole-budget 120

Rows (``ROWS``), in the order they run (the slow torch.compile build last, so a capped
session keeps the others):

* ``fast-graph``     ``accelerate(model, bf16)`` sampled by ``engine.Sampler``, one CUDA
                     graph per step;
* ``official``       the official code path as its users run it: the reference network
                     in fp32, eager, TF32 off, attention through SDPA, the plain sampler
                     loop (``IaNDiffusion.sample``) copying x0_hat to the host every step;
* ``reference-bf16`` the reference (SDPA) under ``torch.autocast(bfloat16)``;
* ``reference-tf32`` the reference (SDPA) in fp32 with TF32 matmuls;
* ``fast-eager``     the fast backend, the engine's step without the graph;
* ``compile``        ``torch.compile(reference, mode="max-autotune")`` (SDPA) under bf16
                     autocast (its own CUDA graphs: max-autotune captures them).

Every row but ``official`` drives its network with the engine's sampler step (the fused
predictor-corrector update, step counter and timesteps on the device, no host sync), so
rows differ only in the network. Per row, all with ``prdit_fast.bench.time_call``:

* ``forward_ms``   one network call on a fixed (x, t): median over reps;
* ``step_ms``      one sampler step (network + update): median over reps;
* ``whole_s_<n>``  a whole n-step sample of the batch, initial noise drawn INSIDE the timed
                   region for every row alike (engine: from the per-volume keys; official:
                   ``IaNDiffusion.initial_noise``); one untimed call first. A whole run that
                   would take more than ``--whole-budget`` seconds (projected from the
                   shorter one, both calls counted) is not run: ``whole_s_<n>`` is then
                   absent and ``projected_s_<n>`` = n x its step time says why;
* ``attention``    the attention kernels that ran: the device kernels (CPU: ops) of one
                   network call under ``torch.profiler`` that ``profile_step.categorize``
                   files as attention, shortened (flash / mem-efficient / cudnn / ...);
                   "materialized (no attention kernel)" when none did (bmm + softmax);
* ``mfu``          the model FLOP (``prdit_fast.flops`` x batch) over ``step_ms``, against a
                   bf16 matmul peak measured at the start of this run;
* ``x_official``, ``x_compile``: step-time ratios, within this run only;
* ``rel_rms_error`` of one network call against the fp32 reference with TF32 off.

``--sr-size S_HI`` measures the PRDiT-SR wrapper (spec section 8) over the variant at
``--size`` refining to S_HI (default head 768 / 12 / 8 / 2, head weights randomized like the
base's): every row runs the wrapper (``official``: the reference wrapper in the plain loop;
fast rows: ``accelerate`` -> ``FastPRDiTSR``), volumes are S_HI^3 and the FLOP count is the
wrapper's (``prdit_fast.flops``: base + head).

On the CPU (``--device cpu``, for the dry run of ``gpu_session.sh`` and the tests): tf32,
compile and fast-graph are skipped with the reason recorded, the fast rows compute in fp32
with the plain-torch kernels, and every figure is a CPU figure.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Callable, NamedTuple

import torch

from benchmarks import profile_step as _profile_step  # its kernel categories
from prdit_fast import bench
from prdit_fast.atomic import write_json
from prdit_fast.devices import resolve_device
from prdit_fast.testing import randomized_model

SCHEMA = "prdit-fast-baselines/1"
STEP_COUNTS = (100, 1000)
WHOLE_BUDGET_S = 45.0  # per row and whole-sample length, both calls (untimed + timed)
SINGLE_TIMING = {"warmup": 3, "min_reps": 5, "max_reps": 50, "budget_s": 2.0}
FORWARD_TIMESTEP = 500
CPU_SINGLE_TIMING = {"warmup": 1, "min_reps": 1, "max_reps": 2, "budget_s": 0.0}  # structure, not figures
# the profiler's dispatcher entry on the CPU, not a kernel: the op under it names the kernel
_DISPATCH_OPS = {"aten::scaled_dot_product_attention"}


class RowSpec(NamedTuple):
    name: str
    description: str
    network: str  # "reference" or "fast"
    official_loop: bool = False
    tf32: bool = False
    autocast_bf16: bool = False
    compiled: bool = False
    cuda_graph: bool = False


ROWS: tuple[RowSpec, ...] = (
    RowSpec("fast-graph", "accelerate(model, bf16), engine step replayed from one CUDA graph", "fast", cuda_graph=True),
    RowSpec("official", "reference fp32 eager, TF32 off, SDPA attention; IaNDiffusion.sample with "
            "x0_hat.cpu() every step (the official loop)", "reference", official_loop=True),
    RowSpec("reference-bf16", "reference, SDPA attention, torch.autocast bf16; engine step, eager", "reference",
            autocast_bf16=True),
    RowSpec("reference-tf32", "reference, SDPA attention, fp32 tensors with TF32 matmuls; engine step, eager",
            "reference", tf32=True),
    RowSpec("fast-eager", "accelerate(model, bf16), engine step, eager (no graph)", "fast"),
    RowSpec("compile", 'torch.compile(reference, mode="max-autotune"), SDPA attention, bf16 autocast; '
            "engine step", "reference", autocast_bf16=True, compiled=True),
)
ROW_NAMES = tuple(r.name for r in ROWS)


def skip_reason(spec: RowSpec, device: torch.device, compile_on_cpu: bool = False) -> str | None:
    """Why ``spec`` does not run on ``device``; None when it runs."""
    if device.type == "cuda":
        return None
    if spec.tf32:
        return "TF32 is an NVIDIA tensor-core mode; on the CPU it would be the fp32 row again"
    if spec.cuda_graph:
        return "CUDA graphs need a CUDA GPU"
    if spec.compiled and not compile_on_cpu:
        return "torch.compile max-autotune of the reference takes minutes on a few CPU cores"
    return None


# --------------------------------------------------------------------------- #
# Attention kernel labels
# --------------------------------------------------------------------------- #
_SHORT_ATTENTION = (  # (pattern in the kernel name, short label), first match wins
    ("cudnn", "cudnn"), ("flash_fwd", "flash"), ("flash_attn", "flash"), ("flash", "flash"),
    ("fmha", "mem-efficient"), ("efficient", "mem-efficient"), ("xformers", "xformers"), ("math", "math"),
)


def short_attention_label(name: str) -> str:
    low = name.lower()
    return next((label for pattern, label in _SHORT_ATTENTION if pattern in low), name[:40])


def attention_kernels(run: Callable[[], Any], device: torch.device) -> list[str]:
    """Names of the kernels (CPU: ops) filed as attention by ``profile_step.categorize``
    while ``run()`` executes once under ``torch.profiler``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run()
        bench.synchronize(device)
    wanted = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    names = {e.name for e in prof.events() if e.device_type == wanted}
    triton_names = _profile_step.triton_function_names()
    return sorted(n for n in names - _DISPATCH_OPS if _profile_step.categorize(n, triton_names) == "attention")


def attention_label(kernels: list[str], depth: int, graphs: bool = False) -> str:
    """Short label of the attention kernels of one call; ``graphs``: the call replays CUDA
    graphs (compile max-autotune), where seeing no attention kernel proves nothing."""
    if depth == 0:
        return "none (depth 0)"
    if not kernels:
        return "none seen (CUDA graph replay)" if graphs else "materialized (no attention kernel)"
    return "+".join(sorted({short_attention_label(k) for k in kernels}))


# --------------------------------------------------------------------------- #
# Rows
# --------------------------------------------------------------------------- #
@contextlib.contextmanager
def tf32(enabled: bool):
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class _CompiledStep(torch.nn.Module):
    """The compiled reference, telling its CUDA graphs (max-autotune) that each call starts a
    new iteration, so the previous call's outputs may be overwritten."""

    def __init__(self, reference: torch.nn.Module, mode: str):
        super().__init__()
        self.reference = reference
        self.config = reference.config
        torch.compiler.reset()
        self.compiled = torch.compile(reference, mode=mode)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(x, t)


def _rel_rms(out: torch.Tensor, truth: torch.Tensor) -> float:
    return ((out.double() - truth.double()).norm() / truth.double().norm()).item()


def baseline_rows(
    variant: str = "PRDiT-B/12/4",
    size: int = 128,
    batch: int = 4,
    rows: tuple[str, ...] = ROW_NAMES,
    step_counts: tuple[int, ...] = STEP_COUNTS,
    whole_budget_s: float = WHOLE_BUDGET_S,
    device: str | torch.device | None = None,
    compile_mode: str = "max-autotune",
    peak_matmul_edge: int | None = None,
    on_row: Callable[[dict], None] | None = None,
    sr_size: int | None = None,
) -> dict[str, Any]:
    """Run the ``rows`` (names from ``ROW_NAMES``) and return {settings, peak, rows, ...};
    ``on_row(result)`` is called after every row with the result so far (partial results).
    ``sr_size``: measure the PRDiT-SR wrapper over ``variant`` at ``size`` refining to it."""
    from prdit_fast.diffusion import IaNDiffusion
    from prdit_fast.engine import Sampler, keys_for
    from prdit_fast.fast import accelerate
    from prdit_fast.flops import flops_per_step

    unknown = [r for r in rows if r not in ROW_NAMES]
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; valid: {list(ROW_NAMES)}")
    if sorted(step_counts) != list(step_counts) or not step_counts or step_counts[0] < 1:
        raise ValueError(f"step counts must be increasing integers >= 1, got {list(step_counts)}")
    device = resolve_device(device)
    cpu = device.type != "cuda"
    variant = bench.variant_name(variant)
    peak = bench.measure_matmul_peak(device, peak_matmul_edge or (256 if cpu else 8192), torch.bfloat16)
    model = randomized_model(variant, size)
    if sr_size is not None:
        model = randomized_sr_model(model, sr_size)
        size = sr_size
    model = model.to(device)
    cfg = model.config
    step_flop = flops_per_step(cfg) * batch
    keys = keys_for(0, range(batch))
    shape = (batch, cfg.in_channels) + (size,) * 3
    generator = torch.Generator(device).manual_seed(0)
    x_fixed = 0.5 * torch.randn(shape, device=device, generator=generator)
    # laid out as the engine passes t (one step for the batch, expanded): a compiled network
    # called both ways would otherwise be built twice
    t_fixed = torch.tensor([FORWARD_TIMESTEP], device=device).expand(batch)
    with tf32(False), torch.no_grad():
        truth = model(x_fixed, t_fixed)
    fast_dtype = torch.float32 if cpu else torch.bfloat16
    fast_impl = "torch" if cpu else "auto"
    result: dict[str, Any] = {
        "schema": SCHEMA, **bench.environment(device),
        "settings": {"variant": cfg.name, "size": size, "batch": batch, "sampler": "pc", "k": 2,
                     "step_counts": list(step_counts), "whole_budget_s": whole_budget_s,
                     "compile_mode": compile_mode,
                     "single_step_timing": CPU_SINGLE_TIMING if cpu else SINGLE_TIMING,
                     "fast_dtype": str(fast_dtype).replace("torch.", ""), "fast_impl": fast_impl},
        "peak": peak, "flop_per_step": step_flop, "rows": [],
        "label": "CPU results (not GPU figures)" if cpu else "GPU",
    }

    for spec in (s for s in ROWS if s.name in rows):
        row: dict[str, Any] = {"row": spec.name, "description": spec.description}
        reason = skip_reason(spec, device)
        if reason is not None:
            row["status"] = f"skipped: {reason}"
            result["rows"].append(row)
            continue
        bench.release(device)
        bench.reset_peak_memory(device)
        try:
            with tf32(spec.tf32):
                row.update(_measure(spec, model, cfg, batch, keys, shape, step_counts, whole_budget_s, device,
                                    compile_mode, fast_dtype, fast_impl, x_fixed, t_fixed, truth,
                                    Sampler, accelerate, IaNDiffusion))
            row["status"] = "ok"
            row["tflops"] = step_flop / (row["step_ms"] / 1e3) / 1e12
            row["mfu"] = row["tflops"] / peak["tflops"]
            row["peak_memory_gib"] = bench.peak_memory_gib(device)
        except Exception as err:  # one failing row (OOM, compile error) must not hide the rest
            row["status"] = "OOM" if bench.is_out_of_memory(err) else f"error: {bench.error_line(err)}"
        result["rows"].append(row)
        _add_ratios(result["rows"])
        if on_row is not None:
            on_row(result)
        if spec.compiled:
            torch.compiler.reset()
    return result


def randomized_sr_model(base: torch.nn.Module, sr_size: int, std: float = 0.02) -> torch.nn.Module:
    """The PRDiT-SR wrapper (default head) over the randomized ``base``, its head drawn from
    N(0, std) too (a fresh head adds exactly zero, spec section 8), in eval mode."""
    from prdit_fast.sr import create_sr_model

    model = create_sr_model(base, sr_size)
    with torch.no_grad():
        for p in model.head_parameters():
            p.normal_(0.0, std)
    return model.eval()


def _measure(spec, model, cfg, batch, keys, shape, step_counts, whole_budget_s, device, compile_mode,
             fast_dtype, fast_impl, x_fixed, t_fixed, truth, Sampler, accelerate, IaNDiffusion) -> dict:
    out: dict[str, Any] = {}
    if spec.network == "fast":
        net = accelerate(model, dtype=fast_dtype, impl=fast_impl)
        out["dtype"] = {torch.bfloat16: "bf16", torch.float32: "fp32"}[fast_dtype]
        autocast_dtype = None
    else:
        net = _CompiledStep(model, compile_mode) if spec.compiled else model
        autocast_dtype = torch.bfloat16 if spec.autocast_bf16 else None
        out["dtype"] = "bf16 autocast" if spec.autocast_bf16 else ("fp32 tf32" if spec.tf32 else "fp32")

    def forward() -> torch.Tensor:
        # autocast exactly as engine.Sampler enters it (cache off), for the same reason
        ctx = (torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=False) if autocast_dtype
               else contextlib.nullcontext())
        with torch.no_grad(), ctx:
            return net(x_fixed, t_fixed)

    out["rel_rms_error"] = _rel_rms(forward().float(), truth)  # the first call builds / compiles
    timing = CPU_SINGLE_TIMING if device.type != "cuda" else SINGLE_TIMING
    out["forward_ms"] = bench.time_call(forward, device, **timing).median_ms
    out["attention_kernels"] = attention_kernels(forward, device)
    out["attention"] = attention_label(out["attention_kernels"], cfg.depth, graphs=spec.compiled)
    if spec.network == "fast" and cfg.depth:
        from prdit_fast.ops.attention_backends import last_backend

        out["attention"] = f"{last_backend()}: {out['attention']}"

    if spec.official_loop:
        diffusion = IaNDiffusion()
        generator = torch.Generator(device).manual_seed(0)

        def host_copy(n: int, x: torch.Tensor, x0_hat: torch.Tensor) -> None:
            x0_hat.cpu()  # the official loop's per-step host copy (a sync every step)

        def sampler_for(steps: int) -> Callable[[], Any]:
            def whole() -> Any:
                noise = diffusion.initial_noise(shape, generator=generator, device=device)
                return diffusion.sample(model, noise, steps, "pc", 2, generator=generator, callback=host_copy)

            return whole

        one_step = sampler_for(1)  # noise, one model call, the update, the host copy
        out["step_ms"] = bench.time_call(one_step, device, **timing).median_ms
        out["step_note"] = "IaNDiffusion.sample with steps=1 (noise draw, model call, update, host copy)"
        out["cuda_graph"] = False
    else:
        # the single-step engine's table must hold every call time_call makes (warm-up + reps)
        table_steps = max(step_counts[0], timing["warmup"] + timing["max_reps"])
        engine = Sampler(net, batch, table_steps, "pc", k=2, dtype=autocast_dtype, cuda_graph=spec.cuda_graph)
        engine.sample(keys)  # buffers and x_T in place, kernels warm
        engine.step.zero_()  # the single steps below stay inside the step table
        out["step_ms"] = bench.time_call(engine.advance, device, **timing).median_ms
        out["cuda_graph"] = engine.cuda_graph
        if engine.graph_reason:
            out["cuda_graph_reason"] = engine.graph_reason

        def sampler_for(steps: int) -> Callable[[], Any]:
            nonlocal engine
            if engine.steps != steps:
                engine = None  # its buffers and graph go before the next engine's are made
                bench.release(device)
                engine = Sampler(net, batch, steps, "pc", k=2, dtype=autocast_dtype, cuda_graph=spec.cuda_graph)
            current = engine
            return lambda: current.sample(keys)

    done_steps, done_s = None, None
    for steps in step_counts:
        per_step_s = done_s / done_steps if done_s else out["step_ms"] / 1e3
        projected = 2 * per_step_s * steps  # the untimed call and the timed one
        if projected > whole_budget_s:
            out[f"projected_s_{steps}"] = per_step_s * steps
            out[f"whole_{steps}_note"] = (f"not run: two calls projected at {projected:.0f} s, over the "
                                          f"{whole_budget_s:.0f} s budget per whole-sample measurement")
            continue
        whole = bench.time_call(sampler_for(steps), device, warmup=1, min_reps=1, max_reps=1, budget_s=0.0)
        done_steps, done_s = steps, whole.median_ms / 1e3
        out[f"whole_s_{steps}"] = done_s
        out[f"s_per_volume_{steps}"] = done_s / batch
    return out


def _add_ratios(rows: list[dict]) -> None:
    by_name = {r["row"]: r for r in rows if r.get("status") == "ok"}
    for r in by_name.values():
        for other, key in (("official", "x_official"), ("compile", "x_compile")):
            if other in by_name:
                r[key] = by_name[other]["step_ms"] / r["step_ms"]


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #
def _fmt(value: Any, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one line per row."""
    s = result["settings"]
    counts = s["step_counts"]
    head = (f"{s['variant']} at {s['size']}^3, batch {s['batch']}, {result['device']['name']} "
            f"[{result['label']}]; bf16 matmul peak {result['peak']['tflops']:.4g} TFLOP/s measured in this run; "
            f"ratios are step-time ratios within this run")
    cols = (["row", "attention", "dtype", "graph", "forward ms", "step ms"]
            + [f"whole {n} s" for n in counts] + [f"s/volume @{counts[-1]}", "MFU", "x official", "x compile",
                                                  "rel err"])
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in result["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['row']} | {r.get('status')} |" + " |" * (len(cols) - 2))
            continue
        whole = []
        for n in counts:
            if f"whole_s_{n}" in r:
                whole.append(f"{r[f'whole_s_{n}']:.3f}")
            else:
                whole.append(f"({r[f'projected_s_{n}']:.3f} projected)")
        last = counts[-1]
        per_volume = r.get(f"s_per_volume_{last}")
        per_volume_text = (f"{per_volume:.3f}" if per_volume is not None
                           else f"({r[f'projected_s_{last}'] / s['batch']:.3f} projected)")
        lines.append("| " + " | ".join(
            [r["row"], r["attention"], r["dtype"], "yes" if r["cuda_graph"] else "no",
             f"{r['forward_ms']:.3f}", f"{r['step_ms']:.3f}", *whole, per_volume_text, f"{r['mfu']:.1%}",
             _fmt(r.get("x_official"), "{:.2f}"), _fmt(r.get("x_compile"), "{:.2f}"),
             f"{r['rel_rms_error']:.2e}"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="PRDiT-B/12/4")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sr-size", type=int, default=None, metavar="S_HI",
                        help="measure the PRDiT-SR wrapper refining the variant at --size to S_HI (e.g. 128 -> 256)")
    parser.add_argument("--rows", nargs="+", choices=ROW_NAMES, default=list(ROW_NAMES))
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEP_COUNTS),
                        help="whole-sample lengths, increasing (default 100 1000)")
    parser.add_argument("--whole-budget", type=float, default=WHOLE_BUDGET_S,
                        help="seconds one whole-sample measurement (two calls) may take; longer ones are projected")
    parser.add_argument("--compile-mode", default="max-autotune")
    parser.add_argument("--device", default=None, help="cuda[:N] or cpu (default: cuda when available)")
    parser.add_argument("--json", help="write the result here (rewritten after every row)")
    args = parser.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print("bench_sampling.py: no CUDA GPU; skipped (pass --device cpu with a tiny --variant / --size for a "
              "CPU run of its structure)")
        return 0
    try:
        device = resolve_device(args.device)
    except RuntimeError as err:
        parser.error(f"device must be 'cpu' or 'cuda[:N]': {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; pass --device cpu for a CPU run")
    on_row = (lambda result: write_json(args.json, result)) if args.json else None
    try:
        result = baseline_rows(args.variant, args.size, args.batch_size, tuple(args.rows), tuple(args.steps),
                               args.whole_budget, device, args.compile_mode, on_row=on_row, sr_size=args.sr_size)
    except ValueError as err:
        parser.error(str(err))
    if args.json:
        write_json(args.json, result)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
