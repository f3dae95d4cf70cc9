"""FP8 (e4m3) against bf16: GEMM speed at the model's shapes, step time, and whole samples.

    python benchmarks/bench_fp8.py --json fp8.json                      # GPU: B/12/4, 128^3, batch 4
    python benchmarks/bench_fp8.py --checkpoint ema.pt --volumes 32      # accuracy on trained weights
    python benchmarks/bench_fp8.py --device cpu --tiny                   # the dry run: structure only

Three parts, all timed with ``prdit_fast.bench.time_call``:

* ``gemms``: every GEMM shape of the transformer and patch embedder at M = batch x tokens:
  ``F.linear`` in bf16, ``fp8_linear`` (x quantized per row on the way + ``torch._scaled_mm``),
  and ``_scaled_mm`` alone on pre-quantized x (what a quantizing epilogue upstream would
  leave): ms and TFLOP/s each;
* ``steps``: one sampler step of ``accelerate(model, bf16)`` and of
  ``accelerate(model, float8_e4m3fn)``, each in ``engine.Sampler`` with a CUDA graph;
* ``accuracy``: whole ``--steps``-step samples (default 1000) of ``--volumes`` volumes in
  both dtypes from the same Philox keys: per volume the PSNR in HU (window [-1000, 1000],
  ``phantom.unit_to_hu``) of the FP8 x0_hat against the bf16 one, and the RMSE in HU.
  Judged on whole samples, never on one step. With random weights (no ``--checkpoint``)
  this measures how far the FP8 path drifts from bf16, not sample quality: the
  evaluation metrics on a trained checkpoint are what decides FP8.

On the CPU (``--tiny``) FP8 runs through the dequantized reference (``impl="torch"``) on
PRDiT-XS/10/2 at 16^3: every figure is a CPU figure.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F

from prdit_fast import bench
from prdit_fast.atomic import write_json
from prdit_fast.devices import resolve_device
from prdit_fast.testing import randomized_model

SCHEMA = "prdit-fast-fp8/1"
GPU_TIMING = {"warmup": 3, "min_reps": 5, "max_reps": 50, "budget_s": 0.5}
CPU_TIMING = {"warmup": 1, "min_reps": 1, "max_reps": 2, "budget_s": 0.0}


def gemm_shapes(cfg) -> list[tuple[str, int, int]]:
    """(name, K, N) of every transformer / patch-embedder GEMM."""
    h, D = cfg.hidden, cfg.token_dim
    return [("embed.fc1", D, 4 * h), ("embed.fc2", 4 * h, h), ("embed.skip", D, h), ("qkv", h, 3 * h),
            ("proj", h, h), ("fc1", h, 4 * h), ("fc2", 4 * h, h), ("final", h, cfg.out_token_dim)]


def gemm_rows(cfg, rows: int, device: torch.device, timing: dict) -> list[dict[str, Any]]:
    from prdit_fast.ops.fp8_linear import fp8_linear, quantize_e4m3

    impl = "auto" if device.type == "cuda" else "torch"
    out = []
    for name, K, N in gemm_shapes(cfg):
        x = torch.randn(rows, K, device=device, dtype=torch.bfloat16)
        w = (torch.randn(N, K, device=device) / math.sqrt(K)).to(torch.bfloat16)
        b = torch.randn(N, device=device, dtype=torch.bfloat16)
        w_q, w_scale = quantize_e4m3(w)
        flop = 2.0 * rows * K * N
        row: dict[str, Any] = {"gemm": name, "M": rows, "K": K, "N": N}
        with torch.no_grad():
            row["bf16_ms"] = bench.time_call(lambda: F.linear(x, w, b), device, **timing).median_ms
            row["fp8_ms"] = bench.time_call(lambda: fp8_linear(x, w_q, w_scale, b, impl=impl), device,
                                            **timing).median_ms
            if device.type == "cuda":
                x_q, x_scale = quantize_e4m3(x)
                row["fp8_gemm_only_ms"] = bench.time_call(
                    lambda: torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.t(), bias=b,
                                             out_dtype=torch.bfloat16), device, **timing).median_ms
        for key in ("bf16", "fp8", "fp8_gemm_only"):
            if f"{key}_ms" in row:
                row[f"{key}_tflops"] = flop / (row[f"{key}_ms"] / 1e3) / 1e12
        out.append(row)
    return out


def psnr_hu(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(PSNR in dB over the 2000 HU window, RMSE in HU) of ``ours`` against ``reference``,
    both in the model's [-1, 1] units (clipped into the window first)."""
    from prdit_fast.phantom import HU_WINDOW, unit_to_hu

    rmse = (unit_to_hu(ours.double()) - unit_to_hu(reference.double())).pow(2).mean().sqrt().item()
    span = HU_WINDOW[1] - HU_WINDOW[0]
    return (math.inf if rmse == 0 else 20 * math.log10(span / rmse)), rmse


def fp8_rows(variant: str = "PRDiT-B/12/4", size: int = 128, batch: int = 4, steps: int = 1000, volumes: int = 8,
             checkpoint: str | None = None, device: str | torch.device | None = None) -> dict[str, Any]:
    from prdit_fast.engine import Sampler, keys_for
    from prdit_fast.fast import accelerate
    from prdit_fast.ops.fp8_linear import E4M3

    device = resolve_device(device)
    cpu = device.type != "cuda"
    timing = CPU_TIMING if cpu else GPU_TIMING
    if checkpoint:
        from prdit_fast.checkpoint import load_checkpoint

        model = load_checkpoint(checkpoint, map_location=device, input_size=size).eval()
    else:
        model = randomized_model(bench.variant_name(variant), size).to(device)
    cfg = model.config
    impl = "torch" if cpu else "auto"
    result: dict[str, Any] = {
        "schema": SCHEMA, **bench.environment(device),
        "label": "CPU results (not GPU figures)" if cpu else "GPU",
        "settings": {"variant": cfg.name, "size": size, "batch": batch, "steps": steps, "volumes": volumes,
                     "weights": checkpoint or "random N(0, 0.02) (drift from bf16, not sample quality)",
                     "impl": impl, "scales": "per row (activations per token, weights per output channel)"},
    }
    result["gemms"] = gemm_rows(cfg, batch * cfg.num_tokens, device, timing)

    engines = {}
    for label, dtype in (("bf16", torch.bfloat16), ("fp8", E4M3)):
        net = accelerate(model, dtype=dtype, impl=impl)
        engine = Sampler(net, batch, steps, "pc", k=2, cuda_graph=not cpu)
        if not engine.cuda_graph:  # a captured engine is warm and holds x_T of key 0 already
            engine.sample(keys_for(0, range(batch)))
        engine.step.zero_()
        step = bench.time_call(engine.advance, device, **timing)
        engines[label] = engine
        result.setdefault("steps", []).append({"dtype": label, "step_ms": step.median_ms, "cuda_graph": engine.cuda_graph})
    bf16_ms = result["steps"][0]["step_ms"]
    result["steps"][1]["x_bf16"] = bf16_ms / result["steps"][1]["step_ms"]

    per_volume = []
    for first in range(0, volumes, batch):
        keys = keys_for(0, range(first, min(first + batch, volumes)))
        x0 = {label: engine.sample(keys)[1] for label, engine in engines.items()}
        for i in range(len(keys)):
            psnr, rmse = psnr_hu(x0["fp8"][i], x0["bf16"][i])
            per_volume.append({"volume": first + i, "psnr_hu_db": psnr, "rmse_hu": rmse})
    result["accuracy"] = {
        "per_volume": per_volume,
        "psnr_hu_db_min": min(v["psnr_hu_db"] for v in per_volume),
        "psnr_hu_db_mean": sum(v["psnr_hu_db"] for v in per_volume) / len(per_volume),
        "rmse_hu_max": max(v["rmse_hu"] for v in per_volume),
    }
    result["summary"] = summary_lines(result)
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    s, acc = result["settings"], result["accuracy"]
    lines = [f"{s['variant']} at {s['size']}^3, batch {s['batch']} [{result['label']}]; weights: {s['weights']}", "",
             "| GEMM | M x K x N | bf16 ms | fp8 ms (with x quantization) | fp8 GEMM only ms | x bf16 |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for g in result["gemms"]:
        only = g.get("fp8_gemm_only_ms")
        lines.append(f"| {g['gemm']} | {g['M']} x {g['K']} x {g['N']} | {g['bf16_ms']:.4f} | {g['fp8_ms']:.4f} | "
                     f"{'–' if only is None else f'{only:.4f}'} | {g['bf16_ms'] / g['fp8_ms']:.2f} |")
    bf16, fp8 = result["steps"]
    lines += ["", f"sampler step: bf16 {bf16['step_ms']:.3f} ms, fp8 {fp8['step_ms']:.3f} ms "
              f"({fp8['x_bf16']:.2f}x; CUDA graph {fp8['cuda_graph']})",
              f"{len(acc['per_volume'])} whole {s['steps']}-step samples, fp8 x0_hat vs bf16: PSNR (HU window) "
              f"min {acc['psnr_hu_db_min']:.2f} dB, mean {acc['psnr_hu_db_mean']:.2f} dB; RMSE max "
              f"{acc['rmse_hu_max']:.2f} HU"]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="PRDiT-B/12/4")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000, help="sampler steps of each whole sample")
    parser.add_argument("--volumes", type=int, default=8, help="volumes sampled in each dtype")
    parser.add_argument("--checkpoint", help="trained weights (load_checkpoint); default: random weights")
    parser.add_argument("--device", default=None, help="cuda[:N] or cpu (default: cuda when available)")
    parser.add_argument("--tiny", action="store_true", help="PRDiT-XS/10/2 at 16^3, batch 1, 2 steps, 1 volume")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print("bench_fp8.py: no CUDA GPU; skipped (pass --device cpu --tiny for a CPU run of its structure)")
        return 0
    if args.tiny:
        args.variant, args.size, args.batch, args.steps, args.volumes = "PRDiT-XS/10/2", 16, 1, 2, 1
    try:
        result = fp8_rows(args.variant, args.size, args.batch, args.steps, args.volumes, args.checkpoint, args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.json:
        write_json(args.json, result)
    print("\n".join(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
