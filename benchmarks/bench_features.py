"""Block-5 feature throughput (the official ``mode="encode"``, spec section 16), every way
to run it, in one run: PRDiT-B/12/12 at 128^3 by default.

    python -m benchmarks.bench_features --json features.json             # B/12/12 at 128^3, batch 4
    python -m benchmarks.bench_features --device cpu --variant PRDiT-XS/10/8 --size 16 --batch-size 3

Rows (one call returning the (B, N, hidden) tokens after block 5 for a batch of volumes:
``ms_per_batch``, ``volumes_per_s``; ``x_official`` is the ratio to the first row, in this
run; ``attention`` names the attention kernel the call ran):

* ``official``        the reference's ``forward(x, t=50, mode="encode")``, fp32 eager, TF32
                      off, SDPA attention (what the official encode mode computes);
* ``reference-bf16``  the same under ``torch.autocast(bfloat16)``;
* ``compile``         ``torch.compile(reference, mode="max-autotune")`` encode mode under bf16
                      autocast (``--compile``; minutes of compilation);
* ``fast``            ``accelerate(model, bf16)(x, mode="encode")``: unfold, timestep MLP,
                      patch embedder and blocks 0..5 only, bf16 GEMMs, fp32 residual stream,
                      fused adaLN kernels.

``max_abs_err`` of each row is against the ``official`` row's features. On the CPU the
fast row runs fp32 (bf16 Triton dots are wrong under the interpreter), the compile row is
skipped with its reason, and every figure is a CPU figure (``label``): the GPU figure is
owed to the GPU session (benchmarks/gpu_session.sh).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any, Callable

import torch

from benchmarks.bench_sampling import attention_kernels, attention_label, tf32
from prdit_fast import bench
from prdit_fast.atomic import write_json
from prdit_fast.devices import resolve_device
from prdit_fast.testing import randomized_model

SCHEMA = "prdit-fast-features/1"
VARIANT, SIZE, BATCH = "PRDiT-B/12/12", 128, 4
ROWS = ("official", "reference-bf16", "compile", "fast")


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, torch.bfloat16) if enabled else contextlib.nullcontext()


def _row(name: str, call: Callable[[], torch.Tensor], device: torch.device, batch: int, depth: int,
         baseline: torch.Tensor | None, budget_s: float) -> tuple[dict[str, Any], torch.Tensor]:
    with torch.no_grad():
        features = call().float()
        timing = bench.time_call(call, device, warmup=2, min_reps=3, budget_s=budget_s)
        kernels = attention_kernels(call, device)
    row = {
        "row": name, "status": "ok", "ms_per_batch": round(timing.median_ms, 3),
        "volumes_per_s": round(batch / (timing.median_ms / 1e3), 3), "reps": timing.reps,
        "first_call_s": round(timing.first_call_s, 3), "attention": attention_label(kernels, depth),
        "shape": list(features.shape),
    }
    if baseline is not None:
        row["max_abs_err"] = float((features - baseline).abs().max())
    return row, features


def run(variant: str = VARIANT, size: int = SIZE, batch: int = BATCH, device: str | None = None,
        compile_reference: bool = False, budget_s: float = 3.0) -> dict[str, Any]:
    from prdit_fast.fast import accelerate

    dev = resolve_device(device)
    cpu = dev.type != "cuda"
    model = randomized_model(variant, size).to(dev)
    if model.config.depth < 6:
        raise ValueError(f"{variant} has depth {model.config.depth}; the encode mode needs depth >= 6")
    torch.manual_seed(0)
    x = torch.rand(batch, model.config.in_channels, size, size, size, device=dev) * 2 - 1
    result: dict[str, Any] = {
        "schema": SCHEMA, **bench.environment(dev), "label": "CPU results (not GPU figures)" if cpu else "GPU",
        "variant": variant, "size": size, "batch": batch, "timestep": 50, "block": 5, "rows": [],
    }
    fast_dtype = torch.float32 if cpu else torch.bfloat16
    fast = accelerate(model, dtype=fast_dtype)
    calls: dict[str, Callable[[], torch.Tensor] | str] = {}
    calls["official"] = lambda: model(x, mode="encode")  # timed with TF32 off (below)
    calls["reference-bf16"] = lambda: _with(_autocast(dev, True), lambda: model(x, mode="encode"))
    if compile_reference and not cpu:
        torch.compiler.reset()
        compiled = torch.compile(model, mode="max-autotune")
        calls["compile"] = lambda: _with(_autocast(dev, True), lambda: compiled(x, mode="encode"))
    else:
        calls["compile"] = ("skipped: torch.compile max-autotune of the reference takes minutes on a few CPU cores"
                            if cpu else "skipped: pass --compile")
    calls["fast"] = lambda: fast(x, mode="encode")
    baseline = None
    for name in ROWS:
        call = calls[name]
        if isinstance(call, str):
            result["rows"].append({"row": name, "status": call})
            continue
        try:
            with tf32(False) if name == "official" else contextlib.nullcontext():
                row, features = _row(name, call, dev, batch, model.config.depth, baseline, budget_s)
        except Exception as e:  # one failing row must not lose the others
            result["rows"].append({"row": name, "status": f"failed: {type(e).__name__}: {e}"})
            continue
        if name == "fast":
            row["compute_dtype"] = str(fast_dtype).replace("torch.", "")
        if baseline is None:
            baseline = features
        result["rows"].append(row)
        bench.release(dev)
    official = next((r for r in result["rows"] if r["row"] == "official" and r["status"] == "ok"), None)
    for row in result["rows"]:
        if official is not None and row["status"] == "ok":
            row["x_official"] = round(official["ms_per_batch"] / row["ms_per_batch"], 3)
    return result


def _with(context, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with context:
        return fn()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default=VARIANT)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile max-autotune row (GPU)")
    parser.add_argument("--budget-s", type=float, default=3.0, help="timing budget per row")
    parser.add_argument("--device")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    result = run(args.variant, args.size, args.batch_size, args.device, args.compile, args.budget_s)
    if args.json:
        write_json(args.json, result)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
