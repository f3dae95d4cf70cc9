"""Benchmark: fused adaptive SwiGLU and the fused local denoiser (GPU only).

    python -m benchmarks.bench_ops_swiglu [--batch 4 --tokens 4096 --dim 1728] [--json out.json]

Reports milliseconds and achieved TFLOP/s for
  - adaptive SwiGLU: fused Triton (bf16, fp32) vs the reference eager composition (fp32,
    bf16) and torch.compile of it (bf16); FLOPs = 3 GEMMs of 2 M D^2 (fc1_g, fc1_x, fc2);
    bf16 kernel 1 in both forms (per-sample folded weights, prologue), and the per-sample
    fold of fc1_g + fc1_x alone (ms and GB/s of its B-copy write plus one read of W);
  - local denoiser: fused (impl="triton") and gemm-path (impl="gemm", cuBLAS GEMMs) vs
    eager and torch.compile of ``coarse.mlp_denoise`` (bf16);
    FLOPs = 6 x 2 M D^2 + 2 M D (s^3 Cout);
  - a bf16 matmul peak measured in the same run (cuBLAS 8192^3, and cuBLAS at the
    SwiGLU's own M x D x D shape), and the fused op's fraction of that peak.
Targets on H100 (not asserted): fused SwiGLU >= 70% of the measured peak; local
denoiser >= 2x torch.compile. Without CUDA it prints a note and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from prdit_fast.atomic import atomic_path
from prdit_fast.bench import time_call
from prdit_fast.testing import randomize_, rel_rms


def _median_ms(fn) -> float:
    return time_call(fn, torch.device("cuda"), warmup=5, min_reps=30, max_reps=30).median_ms


def run(batch: int, tokens: int, dim: int) -> dict:
    from prdit_fast.models import LocalDenoiser, SwiGLU
    from prdit_fast.ops.denoiser import local_denoiser
    from prdit_fast.ops.layernorm_gemm import chunk_moments, folded_norm_linear, tiles_within_samples
    from prdit_fast.ops.swiglu import (
        adaptive_swiglu,
        fused_adaptive_swiglu_rows,
        reference_adaptive_swiglu,
        swiglu_params,
    )

    dev = "cuda"
    M = batch * tokens
    results: dict = {"device": torch.cuda.get_device_name(), "batch": batch, "tokens": tokens, "dim": dim,
                     "torch": torch.__version__}
    rows = []

    def record(name: str, ms: float, flops: float) -> None:
        tflops = flops / (ms * 1e-3) / 1e12
        rows.append({"name": name, "ms": ms, "tflops": tflops})
        print(f"{name:48s} {ms:9.3f} ms {tflops:8.1f} TFLOP/s", flush=True)

    big = 8192
    a = torch.randn(big, big, device=dev, dtype=torch.bfloat16)
    b = torch.randn(big, big, device=dev, dtype=torch.bfloat16)
    record("cuBLAS bf16 matmul 8192^3 (peak)", _median_ms(lambda: a @ b), 2 * big**3)
    a = torch.randn(M, dim, device=dev, dtype=torch.bfloat16)
    w = torch.randn(dim, dim, device=dev, dtype=torch.bfloat16)
    record(f"cuBLAS bf16 matmul {M}x{dim}x{dim}", _median_ms(lambda: a @ w.t()), 2 * M * dim * dim)
    peak = max(rows[0]["tflops"], rows[1]["tflops"])
    del a, b, w

    swiglu_flops = 3 * 2 * M * dim * dim
    block = randomize_(SwiGLU(dim)).to(dev)
    x = torch.randn(batch, tokens, dim, device=dev)
    shift, scale = 0.5 * torch.randn(batch, dim, device=dev), 0.5 * torch.randn(batch, dim, device=dev)
    block16 = SwiGLU(dim).to(dev).bfloat16()
    block16.load_state_dict(block.state_dict())
    x16, shift16, scale16 = x.bfloat16(), shift.bfloat16(), scale.bfloat16()
    compiled = torch.compile(reference_adaptive_swiglu)
    with torch.no_grad():
        record("adaptive SwiGLU eager fp32", _median_ms(lambda: reference_adaptive_swiglu(x, shift, scale, block)),
               swiglu_flops)
        record("adaptive SwiGLU eager bf16",
               _median_ms(lambda: reference_adaptive_swiglu(x16, shift16, scale16, block16)), swiglu_flops)
        record("adaptive SwiGLU torch.compile bf16",
               _median_ms(lambda: compiled(x16, shift16, scale16, block16)), swiglu_flops)
        record("adaptive SwiGLU fused fp32",
               _median_ms(lambda: adaptive_swiglu(x, shift, scale, block, impl="triton")), swiglu_flops)
        record("adaptive SwiGLU fused bf16",
               _median_ms(lambda: adaptive_swiglu(x16, shift16, scale16, block16, impl="triton")), swiglu_flops)
        fused_swiglu = rows[-1]["tflops"]
        rows16, params16 = x16.view(M, dim), swiglu_params(block16)
        stats16 = chunk_moments(rows16)
        for fold in (True, False) if tiles_within_samples(tokens, torch.bfloat16) else (False,):
            form = "folded" if fold else "prologue"
            record(f"adaptive SwiGLU fused bf16, fc1 {form}", _median_ms(lambda fold=fold: fused_adaptive_swiglu_rows(
                rows16, stats16, tokens, shift16, scale16, params16, 1e-6, block16.norm.eps,
                fold_modulation=fold)), swiglu_flops)
        wg, bg, wx, bx = params16[:4]
        gain = 1.0 + scale16.float()
        fold_ms = _median_ms(lambda: (folded_norm_linear(wg, bg, gain, shift16), folded_norm_linear(wx, bx, gain, shift16)))
        fold_bytes = 2 * (batch + 1) * dim * dim * 2
        results["fc1_fold_ms"] = fold_ms
        print(f"{'per-sample fold of fc1_g + fc1_x':48s} {fold_ms:9.3f} ms {fold_bytes / fold_ms / 1e6:8.1f} GB/s")
        truth = reference_adaptive_swiglu(x, shift, scale, block)
        results["swiglu_bf16_rel_err_vs_fp32"] = {
            "fused": rel_rms(adaptive_swiglu(x16, shift16, scale16, block16, impl="triton"), truth),
            "eager": rel_rms(reference_adaptive_swiglu(x16, shift16, scale16, block16), truth),
        }
    results["swiglu_fraction_of_peak"] = fused_swiglu / peak
    print(f"bf16 relative error vs fp32 eager: {results['swiglu_bf16_rel_err_vs_fp32']}")

    out_dim = 8**3 * 2
    module = randomize_(LocalDenoiser(dim, out_dim)).to(dev).bfloat16()
    c16 = torch.randn(batch, dim, device=dev, dtype=torch.bfloat16)
    denoiser_flops = 6 * 2 * M * dim * dim + 2 * M * dim * out_dim
    compiled_module = torch.compile(module)
    with torch.no_grad():
        record("local denoiser eager bf16", _median_ms(lambda: module(x16, c16)), denoiser_flops)
        compiled_ms = _median_ms(lambda: compiled_module(x16, c16))
        record("local denoiser torch.compile bf16", compiled_ms, denoiser_flops)
        fused_ms = _median_ms(lambda: local_denoiser(x16, c16, module, impl="triton"))
        record("local denoiser fused bf16", fused_ms, denoiser_flops)
        gemm_ms = _median_ms(lambda: local_denoiser(x16, c16, module, impl="gemm"))
        record("local denoiser gemm-path bf16", gemm_ms, denoiser_flops)
        truth = module.float()(x16.float(), c16.float())
        module.bfloat16()
        results["denoiser_bf16_rel_err_vs_fp32"] = {
            impl: rel_rms(local_denoiser(x16, c16, module, impl=impl), truth)
            for impl in ("triton", "gemm")
        }
    print(f"local denoiser bf16 relative error vs fp32: {results['denoiser_bf16_rel_err_vs_fp32']}")
    results["denoiser_speedup_vs_compile"] = compiled_ms / fused_ms
    results["denoiser_gemm_speedup_vs_compile"] = compiled_ms / gemm_ms
    results["rows"] = rows
    results["peak_tflops"] = peak
    print(f"fused SwiGLU: {100 * results['swiglu_fraction_of_peak']:.1f}% of measured bf16 peak "
          f"{peak:.1f} TFLOP/s (target >= 70%)")
    print(f"local denoiser: fused {results['denoiser_speedup_vs_compile']:.2f}x, gemm-path "
          f"{results['denoiser_gemm_speedup_vs_compile']:.2f}x torch.compile (target >= 2x)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per volume (4096 = 128^3 at s = 8)")
    parser.add_argument("--dim", type=int, default=1728, help="token width D = C p^3 (1728 for p = 12)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ops_swiglu: no CUDA GPU, nothing to measure")
        return 0
    results = run(args.batch, args.tokens, args.dim)
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
