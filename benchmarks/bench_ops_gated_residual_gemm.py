"""The adaLN gate + residual in the GEMM epilogue against what the fast backend runs now.

    python benchmarks/bench_ops_gated_residual_gemm.py --json epilogue.json      # GPU: PRDiT-B, 128^3, batch 4
    python benchmarks/bench_ops_gated_residual_gemm.py --device cpu --tiny       # the dry run: structure only

For ``attn.proj`` (K = h) and ``mlp.fc2`` (K = 4h) of a DiT block at M = batch x tokens,
hidden h, all timed with ``prdit_fast.bench.time_call``:

* ``composed``: cuBLAS ``F.linear`` writing the branch in bf16, then
  ``gated_residual_layernorm_modulate`` (x + gate * branch, LayerNorm, modulation: one
  Triton pass) -- the fast backend's DiT block today;
* ``epilogue``: ``gated_residual_linear`` (the gate and residual in the Triton GEMM's
  epilogue, x_new stored in fp32), then ``layernorm_modulate`` on x_new;
* the two GEMMs alone (cuBLAS bf16 and the epilogue GEMM), for the GEMM rate.

Both paths' (x_new, y) are compared (relative RMS). The faster one should be the default;
on the CPU every figure is a CPU figure and the Triton kernels run interpreted.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F

from prdit_fast import bench
from prdit_fast.atomic import write_json
from prdit_fast.devices import resolve_device

SCHEMA = "prdit-fast-epilogue/1"
GPU_TIMING = {"warmup": 3, "min_reps": 5, "max_reps": 50, "budget_s": 0.5}
CPU_TIMING = {"warmup": 1, "min_reps": 1, "max_reps": 2, "budget_s": 0.0}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def epilogue_rows(batch: int = 4, tokens: int = 4096, hidden: int = 768,
                  device: str | torch.device | None = None) -> dict[str, Any]:
    from prdit_fast.ops.adaln import gated_residual_layernorm_modulate, layernorm_modulate
    from prdit_fast.ops.gated_residual_gemm import gated_residual_linear

    device = resolve_device(device)
    cpu = device.type != "cuda"
    timing = CPU_TIMING if cpu else GPU_TIMING
    dtype = torch.float32 if cpu else torch.bfloat16  # the interpreter runs fp32
    M = batch * tokens
    rows = []
    for name, K in (("attn.proj", hidden), ("mlp.fc2", 4 * hidden)):
        a = torch.randn(batch, tokens, K, device=device, dtype=dtype)
        weight = (torch.randn(hidden, K, device=device) / K**0.5).to(dtype)
        bias = (0.1 * torch.randn(hidden, device=device)).to(dtype)
        gate, shift, scale = (0.3 * torch.randn(batch, hidden, device=device) for _ in range(3))
        x = torch.randn(batch, tokens, hidden, device=device)

        def composed():
            branch = F.linear(a, weight, bias)
            return gated_residual_layernorm_modulate(x, gate, branch, shift, scale, 1e-6, dtype)

        def epilogue():
            x_new = gated_residual_linear(a, weight, bias, gate, x, impl="triton")
            return x_new, layernorm_modulate(x_new, shift, scale, 1e-6, dtype)

        with torch.no_grad():
            (x_ref, y_ref), (x_new, y_new) = composed(), epilogue()
            row: dict[str, Any] = {"gemm": name, "M": M, "K": K, "N": hidden,
                                   "x_rel_rms": _rel(x_new, x_ref), "y_rel_rms": _rel(y_new, y_ref)}
            for label, fn in (("composed", composed), ("epilogue", epilogue),
                              ("cublas_gemm", lambda: F.linear(a, weight, bias)),
                              ("epilogue_gemm", lambda: gated_residual_linear(a, weight, bias, gate, x,
                                                                              impl="triton"))):
                row[f"{label}_ms"] = bench.time_call(fn, device, **timing).median_ms
        flop = 2.0 * M * K * hidden
        for label in ("cublas_gemm", "epilogue_gemm"):
            row[f"{label}_tflops"] = flop / (row[f"{label}_ms"] / 1e3) / 1e12
        row["x_composed"] = row["composed_ms"] / row["epilogue_ms"]
        rows.append(row)
    result = {"schema": SCHEMA, **bench.environment(device),
              "label": "CPU results (not GPU figures)" if cpu else "GPU",
              "settings": {"batch": batch, "tokens": tokens, "hidden": hidden, "dtype": str(dtype),
                           "autotune": "off (PRDIT_AUTOTUNE=0)" if os.environ.get("PRDIT_AUTOTUNE") == "0" else "on"},
              "rows": rows}
    result["summary"] = summary_lines(result)
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    s = result["settings"]
    lines = [f"batch {s['batch']} x {s['tokens']} tokens, hidden {s['hidden']}, {s['dtype']}, Triton autotune "
             f"{s['autotune']} [{result['label']}]", "",
             "| GEMM | K | composed ms | epilogue ms | x composed | cuBLAS GEMM TFLOP/s | epilogue GEMM TFLOP/s | "
             "x_new / y rel err |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['gemm']} | {r['K']} | {r['composed_ms']:.4f} | {r['epilogue_ms']:.4f} | "
                     f"{r['x_composed']:.2f} | {r['cublas_gemm_tflops']:.4g} | {r['epilogue_gemm_tflops']:.4g} | "
                     f"{r['x_rel_rms']:.1e} / {r['y_rel_rms']:.1e} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per volume (4096 = 128^3 at s = 8)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--device", default=None, help="cuda[:N] or cpu (default: cuda when available)")
    parser.add_argument("--tiny", action="store_true", help="batch 2, 9 tokens, hidden 24")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print("bench_ops_gated_residual_gemm.py: no CUDA GPU; skipped (pass --device cpu --tiny for a CPU run of its structure)")
        return 0
    if args.tiny:
        args.batch, args.tokens, args.hidden = 2, 9, 24
    result = epilogue_rows(args.batch, args.tokens, args.hidden, args.device)
    if args.json:
        write_json(args.json, result)
    print("\n".join(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
