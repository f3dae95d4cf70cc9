"""The released 256^3 model, every way to run it, in one run: PRDiT-B/16/12-s16 with flow
matching (spec section 14), sampling and training.

    python -m benchmarks.bench_flow_matching --json fm.json            # B/16/12-s16 at 256^3, batch 1 and 2
    python -m benchmarks.bench_flow_matching --rows fast-graph compile --json fm-compile.json
    python -m benchmarks.bench_flow_matching --checkpoint prdit256_fm.pt --json fm.json   # the released file
    python -m benchmarks.bench_flow_matching --device cpu --variant PRDiT-XS/4/0 --size 8 --steps 2

The network is loaded the way a user of the release loads it: ``--checkpoint`` names the
released file (official layout), read by ``prdit_fast.load_checkpoint`` (its EMA weights);
without it, random weights (every weight N(0, 0.02), so the figures do not depend on a
trained model) are first written in the official layout (``save_official_checkpoint``, the
flow-matching head: ``out_channels`` = ``in_channels``) and read back the same way.
``weights`` in the result says which.

Sampling rows, each at every ``--batch-sizes`` (one network evaluation ``forward_ms``; one
Euler step ``step_ms``; a whole ``--steps``-step Euler sample ``whole_s`` and
``s_per_volume``, the initial noise drawn inside the timed region; ``peak_memory_gib`` of
the row; ``attention``, the attention kernels one evaluation launched; ``rel_rms_error`` of
one evaluation against the fp32 reference with TF32 off; ``mfu`` against a bf16 matmul
peak measured in this run):

* ``official``       the official loop as its users run it: ``FlowMatching.sample`` over the
                     reference in fp32 with TF32 matmuls, SDPA attention;
* ``reference-bf16`` the reference under ``torch.autocast(bfloat16)``, driven by the engine;
* ``fast-eager``     ``accelerate(model, bf16)`` in the engine's ``Sampler``, no graph;
* ``fast-graph``     the same, one CUDA graph per step;
* ``compile``        ``torch.compile(reference, mode="max-autotune")`` under bf16 autocast,
                     driven by the engine (its own CUDA graphs); run last (minutes of autotuning).

Training rows (``--training``: one optimizer step of ``--train-batch`` x ``--accum`` volumes
with the flow-matching loss, activation checkpointing of the trainable blocks:
``train_step_s``, ``samples_per_s``, ``peak_memory_gib``): ``official`` (fp32 eager, SDPA),
``reference-bf16`` (bf16 autocast, as the official configs' ``training.amp``), ``fast`` (the
fast backend, bf16).

Ratios (``x_official``, ``x_compile``) are step-time ratios within this run at the same batch
size. ``--json`` is rewritten after every row, so a run cut off keeps its rows. On the CPU
the compile and graph rows are skipped with the reason recorded and every figure is a CPU
figure (``label``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.bench_sampling import _CompiledStep, _rel_rms, attention_kernels, attention_label, skip_reason, tf32
from benchmarks.bench_sampling import RowSpec as _RowSpec
from prdit_fast import bench
from prdit_fast.atomic import write_json
from prdit_fast.devices import resolve_device

SCHEMA = "prdit-fast-flow-matching/2"
VARIANT, SIZE, STEPS, BATCH_SIZES = "PRDiT-B/16/12-s16", 256, 100, (1, 2)
SAMPLING_ROWS = (
    _RowSpec("official", "FlowMatching.sample over the reference, fp32 with TF32 matmuls, SDPA", "reference",
             official_loop=True, tf32=True),
    _RowSpec("reference-bf16", "reference, SDPA, bf16 autocast; engine Euler step, eager", "reference",
             autocast_bf16=True),
    _RowSpec("fast-eager", "accelerate(model, bf16), engine Euler step (fused update), eager", "fast"),
    _RowSpec("fast-graph", "accelerate(model, bf16), engine Euler step replayed from one CUDA graph", "fast",
             cuda_graph=True),
    _RowSpec("compile", 'torch.compile(reference, mode="max-autotune"), bf16 autocast; engine Euler step',
             "reference", autocast_bf16=True, compiled=True),
)
SAMPLING_NAMES = tuple(r.name for r in SAMPLING_ROWS)
TRAINING_ROWS = (
    _RowSpec("official", "reference fp32 eager, SDPA, activation checkpointing", "reference"),
    _RowSpec("reference-bf16", "reference, bf16 autocast (training.amp), activation checkpointing", "reference",
             autocast_bf16=True),
    _RowSpec("fast", "accelerate(model, bf16), activation checkpointing off (reference-only option)", "fast"),
)
TIMING = {"warmup": 2, "min_reps": 3, "max_reps": 20, "budget_s": 2.0}
CPU_TIMING = {"warmup": 1, "min_reps": 1, "max_reps": 2, "budget_s": 0.0}


def fm_model(variant: str, size: int, std: float = 0.02) -> torch.nn.Module:
    """The velocity-head network, every weight N(0, std) (a fresh PRDiT predicts zero)."""
    from prdit_fast.models import create_model

    torch.manual_seed(0)
    model = create_model(variant, size, out_channels=1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def released_model(variant: str, size: int, device: torch.device,
                   checkpoint: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(the network every row runs, where its weights came from), loaded by ``load_checkpoint``
    from a file in the official layout: ``checkpoint`` (variant and size from the file), or
    ``fm_model(variant, size)`` written to a temporary one first."""
    from prdit_fast.checkpoint import load_checkpoint, save_official_checkpoint

    with tempfile.TemporaryDirectory(prefix="prdit-fm-bench-") as folder:
        if checkpoint is None:
            model = fm_model(variant, size)
            cfg = model.config
            config = {"model": {"name": cfg.name, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels},
                      "data": {"image_size": size}}
            path = save_official_checkpoint(Path(folder) / "fm.pt", model, model, config)
            del model
            source = "random N(0, 0.02), written in the official layout and read by load_checkpoint"
        else:
            path, source = Path(checkpoint), f"{checkpoint} (read by load_checkpoint)"
        model = load_checkpoint(path, map_location=device)
    cfg = model.config
    if cfg.out_channels != cfg.in_channels:
        raise ValueError(f"{path} holds an IaN network ({cfg.out_channels} output channels for {cfg.in_channels} "
                         f"input): this benchmark measures the flow-matching model; give the released 256^3 file")
    return model.eval(), {"source": source, "checkpoint_weights": model.checkpoint_weights}


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def sampling_row(spec, model, batch: int, steps: int, device: torch.device, timing: dict, compile_mode: str,
                 truth: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict:
    from prdit_fast.engine import Sampler, keys_for
    from prdit_fast.fast import accelerate
    from prdit_fast.flow_matching import FlowMatching

    cfg = model.config
    shape = (batch, cfg.in_channels) + (cfg.input_size,) * 3
    x, t, want = truth
    cpu = device.type != "cuda"
    if spec.network == "fast":
        net = accelerate(model, dtype=torch.float32 if cpu else torch.bfloat16, impl="torch" if cpu else "auto")
    else:
        net = _CompiledStep(model, compile_mode) if spec.compiled else model
    autocast_dtype = torch.bfloat16 if spec.autocast_bf16 else None

    def forward():
        with torch.no_grad(), _autocast(device, spec.autocast_bf16):
            return net(x, t)

    out: dict[str, Any] = {"rel_rms_error": _rel_rms(forward().float(), want)}  # the first call builds / compiles
    out["forward_ms"] = bench.time_call(forward, device, **timing).median_ms
    out["attention"] = attention_label(attention_kernels(forward, device), cfg.depth, graphs=spec.compiled)
    if spec.network == "fast" and cfg.depth:
        from prdit_fast.ops.attention_backends import last_backend

        out["attention"] = f"{last_backend()}: {out['attention']}"
    if spec.official_loop:
        fm = FlowMatching()

        def sample(n: int) -> Callable[[], Any]:
            return lambda: fm.sample(model, fm.initial_noise(shape, device=device), n, "euler")

        out["step_ms"] = bench.time_call(sample(1), device, **timing).median_ms
        out["cuda_graph"] = False
    else:
        calls = timing["warmup"] + timing["max_reps"] + 1
        keys = keys_for(0, range(batch))
        engine = Sampler(net, batch, max(steps, calls), "euler", dtype=autocast_dtype, cuda_graph=spec.cuda_graph)
        engine.sample(keys)
        engine.step.zero_()
        out["step_ms"] = bench.time_call(engine.advance, device, **timing).median_ms
        out["cuda_graph"] = engine.cuda_graph
        engine = None
        bench.release(device)
        engine = Sampler(net, batch, steps, "euler", dtype=autocast_dtype, cuda_graph=spec.cuda_graph)

        def sample(n: int) -> Callable[[], Any]:
            return lambda: engine.sample(keys)

    whole = bench.time_call(sample(steps), device, warmup=1, min_reps=1, max_reps=1, budget_s=0.0)
    out["whole_s"] = whole.median_ms / 1e3
    out["s_per_volume"] = out["whole_s"] / batch
    return out


def training_row(spec, model, batch: int, accum: int, device: torch.device, timing: dict) -> dict:
    from prdit_fast.fast import accelerate
    from prdit_fast.flow_matching import FlowMatching
    from prdit_fast.training import enable_activation_checkpointing

    trained = copy.deepcopy(model).train()
    if trained.config.depth:  # stage 2: the coarse path stays frozen, as in training
        trained.freeze_coarse_path()
    if spec.network == "fast":
        cpu = device.type != "cuda"
        net = accelerate(trained, dtype=torch.float32 if cpu else torch.bfloat16, impl="torch" if cpu else "auto")
        checkpointed = 0
    else:
        net, checkpointed = trained, enable_activation_checkpointing(trained)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, **({"fused": True} if device.type == "cuda" else {}))
    fm = FlowMatching()
    shape = (batch, trained.config.in_channels) + (trained.config.input_size,) * 3
    micro = [torch.randn(shape, device=device).clamp(-1, 1) for _ in range(accum)]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for x in micro:
            with _autocast(device, spec.autocast_bf16):
                loss = fm.training_losses(net, x)["loss"].mean() / accum
            loss.backward()
        optimizer.step()

    seconds = bench.time_call(step, device, **timing).median_ms / 1e3
    return {"train_step_s": seconds, "samples_per_s": batch * accum / seconds,
            "activation_checkpointed_blocks": checkpointed}


def run(variant: str = VARIANT, size: int = SIZE, batch_sizes: tuple[int, ...] = BATCH_SIZES, steps: int = STEPS,
        train_batch: int = 2, accum: int = 2, device: str | torch.device | None = None,
        compile_mode: str = "max-autotune", training: bool = False, rows: tuple[str, ...] = SAMPLING_NAMES,
        on_row: Callable[[dict], None] | None = None, checkpoint: str | None = None) -> dict[str, Any]:
    """The sampling ``rows`` at every batch size (compile last), then, with ``training``, every
    training row; a failing row (OOM, compile error) is recorded; ``on_row(result)`` after each.
    ``checkpoint``: the released file (its variant and size replace ``variant`` and ``size``);
    None: random weights through the official layout (``released_model``)."""
    from prdit_fast.flops import flops_per_step

    unknown = [r for r in rows if r not in SAMPLING_NAMES]
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; valid: {list(SAMPLING_NAMES)}")
    device = resolve_device(device)
    cpu = device.type != "cuda"
    timing = CPU_TIMING if cpu else TIMING
    peak = bench.measure_matmul_peak(device, 256 if cpu else 8192, torch.bfloat16)
    model, weights = released_model(bench.variant_name(variant), size, device, checkpoint)
    size = model.config.input_size
    flop = flops_per_step(model.config)
    result: dict[str, Any] = {
        "schema": SCHEMA, **bench.environment(device), "label": "CPU results (not GPU figures)" if cpu else "GPU",
        "settings": {"variant": model.config.name, "size": size, "batch_sizes": list(batch_sizes), "steps": steps,
                     "solver": "euler", "train_batch": train_batch, "grad_accum_steps": accum,
                     "compile_mode": compile_mode},
        "weights": weights, "peak": peak, "flop_per_evaluation_per_volume": flop, "sampling": [], "training": [],
    }
    chosen = [s for s in SAMPLING_ROWS if s.name in rows]
    # torch.compile's autotuning takes minutes: every other row first, at every batch size
    jobs = [("sampling", spec, b) for compiled in (False, True) for b in batch_sizes for spec in chosen
            if spec.compiled == compiled]
    jobs += [("training", s, train_batch) for s in TRAINING_ROWS] if training else []
    truth: dict[int, tuple] = {}
    for kind, spec, batch in jobs:
        row: dict[str, Any] = {"row": spec.name, "batch": batch, "description": spec.description}
        # the official loop runs on the CPU too: in fp32 there (TF32 is a GPU mode)
        reason = None if spec.official_loop else skip_reason(spec, device)
        if reason is not None:
            row["status"] = f"skipped: {reason}"
            result[kind].append(row)
            if on_row is not None:
                on_row(result)
            continue
        bench.release(device)
        try:
            if kind == "sampling" and batch not in truth:
                truth.clear()  # one batch size's inputs at a time
                bench.release(device)
                generator = torch.Generator(device).manual_seed(0)
                x = torch.randn((batch, 1) + (size,) * 3, device=device, generator=generator)
                t = torch.full((batch,), 500.0, device=device)
                with tf32(False), torch.no_grad():
                    truth[batch] = (x, t, model(x, t).float())
            bench.reset_peak_memory(device)
            with tf32(spec.tf32):
                if kind == "sampling":
                    row.update(sampling_row(spec, model, batch, steps, device, timing, compile_mode, truth[batch]))
                    row["mfu"] = flop * batch / (row["step_ms"] / 1e3) / 1e12 / peak["tflops"]
                else:
                    row.update(training_row(spec, model, train_batch, accum, device, timing))
            row["status"] = "ok"
            row["peak_memory_gib"] = bench.peak_memory_gib(device)
        except Exception as err:  # one failing row must not hide the rest
            row["status"] = "OOM" if bench.is_out_of_memory(err) else f"error: {bench.error_line(err)}"
        result[kind].append(row)
        if spec.compiled:
            torch.compiler.reset()
        _add_ratios(result)
        if on_row is not None:
            on_row(result)
    return result


def _add_ratios(result: dict[str, Any]) -> None:
    for kind, key in (("sampling", "step_ms"), ("training", "train_step_s")):
        ok = {(r["row"], r.get("batch")): r for r in result[kind] if r.get("status") == "ok"}
        for (_, batch), r in ok.items():
            for other, name in (("official", "x_official"), ("compile", "x_compile")):
                if (other, batch) in ok:
                    r[name] = ok[other, batch][key] / r[key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default=VARIANT)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--rows", nargs="+", choices=SAMPLING_NAMES, default=list(SAMPLING_NAMES))
    parser.add_argument("--compile-mode", default="max-autotune")
    parser.add_argument("--training", action="store_true", help="also the training rows")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--checkpoint", help="the released file (official layout); its variant and size replace "
                        "--variant and --size (default: random weights written in the official layout)")
    parser.add_argument("--device")
    parser.add_argument("--json", help="write the result here (rewritten after every row)")
    args = parser.parse_args(argv)

    def save(result: dict) -> None:
        if args.json:
            write_json(args.json, result)

    result = run(args.variant, args.size, tuple(args.batch_sizes), args.steps, args.train_batch, args.accum,
                 args.device, args.compile_mode, args.training, tuple(args.rows), on_row=save,
                 checkpoint=args.checkpoint)
    save(result)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
