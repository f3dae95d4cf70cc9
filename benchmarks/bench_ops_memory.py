"""The memory-bound Triton ops of the local path against plain torch, as achieved bandwidth.

    python -m pytest benchmarks/bench_ops_memory.py --benchmark-only -s [-k "unfold and S128"] \
        [--benchmark-json=ops_memory.json]

At the paper's shapes (p = 12, s = 8, pad = 2, C = 1, B = 4; S = 128 and 256) each op
runs as the Triton kernel ("triton"), the plain-torch reference ("torch", eager) and
``torch.compile`` of that reference ("compile"):

* unfold3d    x (B, C, S^3) fp32 -> tokens (B, N, C p^3)     fp32, + fp32 -> bf16 tokens (Triton)
* fold3d      tokens -> volume, sum                          fp32, + bf16 (Triton); the torch rows are a
              scatter_add with the index map built once outside the timing (the best plain torch)
* unpatchify  coarse + fine tokens (B, N, s^3 2C) -> (B, 2C, S^3), fp32
* sampler     the fused update on a corrector row: tokens + residual, x -> x_next, x0_hat
              (no "compile" row at 256^3: see SAMPLER_CASES)

Each row's ``extra_info`` (kept by ``--benchmark-json``; ``-s`` also prints one line per
row): from the ``roofline`` fixture (benchmarks/conftest.py) ``gbps`` and
``fraction_of_copy_bandwidth`` against ``copy_bandwidth_gbps``, the 1 GiB device copy
measured once in the same session; ``bytes`` (everything read and written once: the
minimum traffic of one call) and ``us`` (median time per call). Calls are timed as a
CUDA graph of ``INNER`` calls (device time, no launch overhead; ``timing =
"cuda_graph"``), except the sampler reference, which reads the step on the host and is
timed as a plain loop (``timing = "loop"``). Without CUDA only a tiny CPU case of the
reference unfold runs, so the file collects and passes anywhere.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from benchmarks.conftest import requires_cuda
from prdit_fast import models
from prdit_fast.diffusion import IaNDiffusion
from prdit_fast.ops.sampling import sample_key, sampler_update, sampler_update_reference
from prdit_fast.ops.unfold import fold3d, unfold3d
from prdit_fast.ops.token_cubes import unpatchify
from prdit_fast.schedules import build_step_table


PATCH, STRIDE, PAD, CHANNELS, BATCH = 12, 8, 2, 1, 4
SIZES = (128, 256)
INNER = 20  # calls per timed round
ROUNDS = 10


def _time_per_call(benchmark, fn: Callable[[], object], capturable: bool) -> float:
    """Median seconds per call of ``fn`` (already warm)."""
    torch.cuda.synchronize()
    if capturable:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # allocator warm-up off the default stream, as capture requires
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(INNER):
                fn()

        def run():
            graph.replay()
            torch.cuda.synchronize()

    else:

        def run():
            for _ in range(INNER):
                fn()
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    if capturable:
        graph.reset()  # free its memory pool now: S = 256 outputs are ~1 GB each
    return benchmark.stats.stats.median / INNER


def _report(benchmark, roofline, fn, nbytes: int, capturable: bool = True) -> None:
    fn()  # compile / autotune outside the timing (and outside any graph capture)
    seconds = _time_per_call(benchmark, fn, capturable)
    # a timed round is INNER calls: the roofline sees INNER times the bytes of one call
    info = roofline(benchmark, bytes_moved=INNER * nbytes)
    benchmark.extra_info.update(bytes=nbytes, us=round(seconds * 1e6, 2), timing="cuda_graph" if capturable else "loop")
    print(
        f"\n{benchmark.name}: {seconds * 1e6:.1f} us, {info['gbps']:.0f} GB/s = "
        f"{info['fraction_of_copy_bandwidth']:.0%} of copy ({info['copy_bandwidth_gbps']:.0f} GB/s)"
    )


_compiled: dict[str, Callable] = {}


def _compile(name: str, fn: Callable) -> Callable:
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


def _scatter_fold(tokens: torch.Tensor, source: torch.Tensor, numel: int) -> torch.Tensor:
    """fold3d's plain-torch reference (``fold3d_reference``) without rebuilding its index map."""
    B = tokens.shape[0]
    out = torch.zeros((B, numel), device=tokens.device, dtype=torch.float32)
    return out.scatter_add_(1, source.expand(B, -1), tokens.reshape(B, -1).float()).to(tokens.dtype)


def _sum_unpatchify(a: torch.Tensor, b: torch.Tensor, size: int) -> torch.Tensor:
    return models.unpatchify(a + b, size, STRIDE, 2 * CHANNELS)


IMPLS = ("triton", "torch", "compile")
CASES = [pytest.param(impl, size, torch.float32, id=f"{impl}-S{size}-fp32") for size in SIZES for impl in IMPLS]
CASES += [pytest.param("triton", size, torch.bfloat16, id=f"triton-S{size}-bf16") for size in SIZES]


@requires_cuda
@pytest.mark.parametrize("impl,size,dtype", CASES)
def test_unfold3d(benchmark, roofline, impl, size, dtype):
    """dtype is the tokens' dtype: the volume is always fp32 (the sampler state), so the
    bf16 row is the fast path's fp32 volume -> bf16 tokens in one pass."""
    x = torch.randn(BATCH, CHANNELS, size, size, size, device="cuda")
    fn = {
        "triton": lambda: unfold3d(x, PATCH, STRIDE, PAD, out_dtype=dtype, impl="triton"),
        "torch": lambda: models.unfold3d(x, PATCH, STRIDE, PAD),
        "compile": lambda: _compile("unfold", models.unfold3d)(x, PATCH, STRIDE, PAD),
    }[impl]
    tokens = BATCH * (size // STRIDE) ** 3 * CHANNELS * PATCH**3
    _report(benchmark, roofline, fn, x.numel() * x.element_size() + tokens * dtype.itemsize)


@requires_cuda
@pytest.mark.parametrize("impl,size,dtype", CASES)
def test_fold3d(benchmark, roofline, impl, size, dtype):
    N = (size // STRIDE) ** 3
    tokens = torch.randn(BATCH, N, CHANNELS * PATCH**3, device="cuda").to(dtype)
    numel = CHANNELS * size**3
    voxel = torch.arange(numel, device="cuda", dtype=torch.float64).view(1, CHANNELS, size, size, size)
    source = models.unfold3d(voxel, PATCH, STRIDE, PAD).long().reshape(1, -1)
    fn = {
        "triton": lambda: fold3d(tokens, size, PATCH, STRIDE, PAD, impl="triton"),
        "torch": lambda: _scatter_fold(tokens, source, numel),
        "compile": lambda: _compile("fold", _scatter_fold)(tokens, source, numel),
    }[impl]
    _report(benchmark, roofline, fn, (tokens.numel() + BATCH * numel) * tokens.element_size())


@requires_cuda
@pytest.mark.parametrize("impl,size", [pytest.param(i, s, id=f"{i}-S{s}") for s in SIZES for i in IMPLS])
def test_unpatchify_residual(benchmark, roofline, impl, size):
    shape = (BATCH, (size // STRIDE) ** 3, STRIDE**3 * 2 * CHANNELS)
    a, b = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")
    fn = {
        "triton": lambda: unpatchify(a, size, STRIDE, 2 * CHANNELS, residual=b, impl="triton"),
        "torch": lambda: _sum_unpatchify(a, b, size),
        "compile": lambda: _compile("unpatchify", _sum_unpatchify)(a, b, size),
    }[impl]
    _report(benchmark, roofline, fn, 3 * a.numel() * a.element_size())


SAMPLER_CASES = [
    pytest.param(impl, size, id=f"{impl}-S{size}")
    for size in SIZES
    for impl in IMPLS
    # dynamo unrolls philox_normal's loop over 2^20-counter chunks: 16 chunks at 256^3
    # make a compile of minutes for a baseline that still splits at the host reads
    if not (impl == "compile" and size > 128)
]


@requires_cuda
@pytest.mark.parametrize("impl,size", SAMPLER_CASES)
def test_sampler_update_corrector(benchmark, roofline, impl, size):
    shape = (BATCH, (size // STRIDE) ** 3, STRIDE**3 * 2 * CHANNELS)
    tokens, residual = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")
    x = torch.randn(BATCH, CHANNELS, size, size, size, device="cuda")
    x0 = torch.empty_like(x)
    table = build_step_table(IaNDiffusion(), 10, "pc", 2, "cuda")
    step = torch.zeros(1, dtype=torch.int64, device="cuda")  # row 0 is a corrector row
    keys = torch.tensor([sample_key(0, i) for i in range(BATCH)], device="cuda")
    kwargs = dict(residual=residual, x_out=x, x0_out=x0)
    fn = {
        "triton": lambda: sampler_update(tokens, x, table, step, keys, impl="triton", **kwargs),
        "torch": lambda: sampler_update_reference(tokens, x, table, step, keys, **kwargs),
        "compile": lambda: _compile("sampler", sampler_update_reference)(tokens, x, table, step, keys, **kwargs),
    }[impl]
    # tokens + residual read, x read and written, x0_hat written
    # the reference reads the step on the host, which a CUDA graph cannot capture
    _report(benchmark, roofline, fn, (2 * tokens.numel() + 3 * x.numel()) * 4, capturable=impl == "triton")


def test_reference_unfold_tiny_cpu(benchmark):
    """Runs everywhere (no GPU): keeps the file collectable and exercised in CI-like runs."""
    x = torch.randn(1, 1, 16, 16, 16)
    tokens = benchmark(models.unfold3d, x, PATCH, STRIDE, PAD)
    assert tokens.shape == (1, 8, PATCH**3)
