"""Benchmark: bandwidth of the native CUDA kernels (``kernels/native.py``) against a
device-to-device copy of the same number of bytes, measured in the same run (GPU only).

    python -m benchmarks.bench_native [--sizes 128 256] [--batch 4] [--patch 12] [--json out.json]

Per op, volume edge S and dtype, one row: ``ms`` and ``gbps`` of the native op counting
the minimal traffic (every input byte read once, every output byte written once),
``copy_gbps`` of a copy moving as many bytes, ``fraction_of_copy`` = gbps / copy_gbps,
and ``triton_ms`` / ``triton_gbps`` of the Triton op where Triton runs:

    unfold3d         read B C S^3,               write B N C p^3
    fold3d (sum)     read B N C p^3,             write B C S^3
    unpatchify       read 2 B N s^3 Cout (coarse + fine),  write B Cout S^3   (Cout = 2)
    sampler_update   read B N s^3 2C + x (fp32), write x_next, x0_hat (fp32); corrector step

Each op's output is checked against the Triton op / plain-torch reference before timing.
``native_bandwidth_rows()`` returns the rows for the end-to-end bench. Without a GPU or
the library, ``main`` prints why and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

import pytest
import torch

from kernels import native
from prdit_fast import models
from prdit_fast.atomic import atomic_path
from prdit_fast.bench import measure_copy_bandwidth, time_call
from prdit_fast.diffusion import IaNDiffusion
from prdit_fast.ops import sampling as ops_sampler
from prdit_fast.ops import token_cubes as ops_unpatchify
from prdit_fast.ops import unfold as ops_unfold
from prdit_fast.ops.common import triton_importable
from prdit_fast.schedules import build_step_table

STRIDE = 8
OUT_CHANNELS = 2  # Cout = 2 C for CT (C = 1)


def _rate(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def _measure(
    op: str, size: int, batch: int, patch: int, dtype: torch.dtype, nbytes: int,
    native_fn: Callable[[], Any], triton_fn: Callable[[], Any] | None, device: torch.device,
) -> dict[str, Any]:

    native_ms = time_call(native_fn, device, warmup=3, min_reps=5, budget_s=1.0).median_ms
    # the copy moves nbytes in total: read nbytes / 2, write nbytes / 2
    copy_gbps = measure_copy_bandwidth(device, max(nbytes // 2, 1), budget_s=0.5)["gbps"]
    row = {
        "op": op, "size": size, "batch": batch, "patch": patch, "dtype": str(dtype).replace("torch.", ""),
        "bytes": nbytes, "ms": native_ms, "gbps": _rate(nbytes, native_ms),
        "copy_gbps": copy_gbps, "fraction_of_copy": _rate(nbytes, native_ms) / copy_gbps,
        "triton_ms": None, "triton_gbps": None,
    }
    if triton_fn is not None:
        triton_ms = time_call(triton_fn, device, warmup=3, min_reps=5, budget_s=1.0).median_ms
        row.update(triton_ms=triton_ms, triton_gbps=_rate(nbytes, triton_ms))
    return row


def native_bandwidth_rows(
    sizes: tuple[int, ...] = (128, 256),
    batch: int = 4,
    patch: int = 12,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
    with_triton: bool = True,
) -> list[dict[str, Any]]:
    """Bandwidth rows (see the module doc) for every op x size x dtype on the current GPU.

    RuntimeError with ``native.status()`` when the native ops cannot run;
    AssertionError when an op's output disagrees with its reference.
    """
    if not native.available():
        raise RuntimeError(f"native ops cannot run: {native.status()}")
    device = torch.device("cuda", torch.cuda.current_device())
    use_triton = with_triton and triton_importable()
    pad = (patch - STRIDE) // 2
    rows = []
    for size in sizes:
        N = (size // STRIDE) ** 3
        for dtype in dtypes:
            isz = torch.tensor([], dtype=dtype).element_size()
            volume_elems = batch * size**3
            x = torch.randn(batch, 1, size, size, size, device=device).to(dtype)
            tokens = native.unfold3d(x, patch, STRIDE, pad)
            assert torch.equal(tokens, models.unfold3d(x, patch, STRIDE, pad)), "unfold3d mismatch"
            rows.append(_measure(
                "unfold3d", size, batch, patch, dtype, (volume_elems + tokens.numel()) * isz,
                lambda: native.unfold3d(x, patch, STRIDE, pad),
                (lambda: ops_unfold.unfold3d(x, patch, STRIDE, pad, impl="triton")) if use_triton else None,
                device,
            ))
            folded = native.fold3d(tokens, size, patch, STRIDE, pad)
            reference = ops_unfold.fold3d_reference(tokens, size, patch, STRIDE, pad)
            torch.testing.assert_close(folded.float(), reference.float(), rtol=1e-2, atol=1e-2)
            rows.append(_measure(
                "fold3d", size, batch, patch, dtype, (volume_elems + tokens.numel()) * isz,
                lambda: native.fold3d(tokens, size, patch, STRIDE, pad),
                (lambda: ops_unfold.fold3d(tokens, size, patch, STRIDE, pad, impl="triton")) if use_triton else None,
                device,
            ))
            del tokens, folded, reference, x

            coarse = torch.randn(batch, N, STRIDE**3 * OUT_CHANNELS, device=device).to(dtype)
            fine = torch.randn_like(coarse)
            out = native.unpatchify(coarse, size, STRIDE, OUT_CHANNELS, residual=fine)
            assert torch.equal(out, models.unpatchify(coarse + fine, size, STRIDE, OUT_CHANNELS)), "unpatchify mismatch"
            rows.append(_measure(
                "unpatchify+residual", size, batch, patch, dtype, (2 * coarse.numel() + out.numel()) * isz,
                lambda: native.unpatchify(coarse, size, STRIDE, OUT_CHANNELS, residual=fine),
                (lambda: ops_unpatchify.unpatchify(coarse, size, STRIDE, OUT_CHANNELS, fine, impl="triton"))
                if use_triton else None,
                device,
            ))
            del fine, out

            # sampler update on a corrector step (row 0 of a 4-step pc schedule draws noise)
            state = torch.randn(batch, 1, size, size, size, device=device)
            table = build_step_table(IaNDiffusion(), 4, "pc", 2, device)
            step = torch.zeros(1, dtype=torch.int64, device=device)
            keys = torch.tensor([ops_sampler.sample_key(1, i) for i in range(batch)], device=device)
            x_next, x0_hat = torch.empty_like(state), torch.empty_like(state)
            native.sampler_update(coarse, state, table, step, keys, stride=STRIDE, x_out=x_next, x0_out=x0_hat)
            tri_next, _ = ops_sampler.sampler_update(coarse, state, table, step, keys, stride=STRIDE)
            torch.testing.assert_close(x_next, tri_next, rtol=1e-5, atol=1e-5)
            rows.append(_measure(
                "sampler_update", size, batch, patch, dtype, coarse.numel() * isz + 3 * state.numel() * 4,
                lambda: native.sampler_update(coarse, state, table, step, keys, stride=STRIDE, x_out=x_next,
                                              x0_out=x0_hat),
                (lambda: ops_sampler.sampler_update(coarse, state, table, step, keys, stride=STRIDE, x_out=x_next,
                                                    x0_out=x0_hat, impl="triton")) if use_triton else None,
                device,
            ))
            del coarse, state, x_next, x0_hat, tri_next
            torch.cuda.empty_cache()
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'op':22s} {'S':>4s} {'dtype':9s} {'native ms':>10s} {'GB/s':>8s} {'copy GB/s':>10s} "
             f"{'of copy':>8s} {'triton ms':>10s}"]
    for r in rows:
        triton = f"{r['triton_ms']:10.3f}" if r["triton_ms"] is not None else f"{'-':>10s}"
        lines.append(f"{r['op']:22s} {r['size']:4d} {r['dtype']:9s} {r['ms']:10.3f} {r['gbps']:8.0f} "
                     f"{r['copy_gbps']:10.0f} {100 * r['fraction_of_copy']:7.1f}% {triton}")
    return "\n".join(lines)


def test_native_bandwidth_at_128(cuda_device):
    """pytest benchmarks/: the rows at S = 128 (each op checked against its reference)."""
    if not native.available():
        pytest.skip(native.status())
    rows = native_bandwidth_rows(sizes=(128,))
    print("\n" + format_rows(rows))
    assert len(rows) == 8 and all(r["gbps"] > 0 for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=12)
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton comparison")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not native.available():
        print(f"bench_native: nothing to measure ({native.status()})")
        return 0
    rows = native_bandwidth_rows(tuple(args.sizes), args.batch, args.patch, with_triton=not args.no_triton)
    print(f"{torch.cuda.get_device_name()}, batch {args.batch}, patch {args.patch}")
    print(format_rows(rows))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
