"""The one timer of the benchmarks (``time_call``) and the device measurements built on it:
matmul peak, copy bandwidth, peak memory."""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_ms: float
    reps: int
    first_call_s: float  # includes compilation, autotuning, graph capture


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int = 2, min_reps: int = 3,
              max_reps: int = 50, budget_s: float = 2.0) -> Timing:
    """Median wall time of ``fn`` in ms after ``warmup`` untimed calls (the first one, which
    compiles / captures, is timed apart).

    The first timed rep sets how many follow: as many as fill ``budget_s``, within
    [min_reps, max_reps]. On CUDA each rep is timed with CUDA events; on CPU with perf_counter.
    """

    def timed() -> float:
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            return begin.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    start = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        fn()
    synchronize(device)
    times = [timed()]
    reps = int(min(max_reps, max(min_reps, budget_s * 1e3 // max(times[0], 1e-3))))
    times += [timed() for _ in range(reps - 1)]
    return Timing(statistics.median(times), reps, first)


def measure_matmul_peak(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16,
                        budget_s: float = 1.0) -> dict[str, Any]:
    """Dense matmul throughput (n x n) @ (n x n) in TFLOP/s: the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    timing = time_call(lambda: torch.matmul(a, b, out=out), device, warmup=3, min_reps=5, budget_s=budget_s)
    del a, b, out
    release(device)
    return {"tflops": 2.0 * n**3 / (timing.median_ms / 1e3) / 1e12, "shape": [n, n, n],
            "dtype": str(dtype).replace("torch.", ""), "reps": timing.reps}


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2**30, budget_s: float = 1.0) -> dict[str, Any]:
    """Device-to-device copy bandwidth in GB/s, counting the read and the write (2 x nbytes)."""
    src = torch.empty(nbytes, device=device, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    timing = time_call(lambda: dst.copy_(src), device, warmup=3, min_reps=5, budget_s=budget_s)
    del src, dst
    release(device)
    return {"gbps": 2.0 * nbytes / (timing.median_ms / 1e3) / 1e9, "bytes": nbytes,
            "counts": "read + write", "reps": timing.reps}


def release(device: torch.device) -> None:
    """Give freed memory back so the next cell starts clean (after an OOM above all)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
