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
    median_ms: float  # wall time per call: CUDA events on a GPU, perf_counter on the CPU
    reps: int
    first_call_s: float  # includes compilation, autotuning, graph capture (warmup=0: the first timed rep)
    host_ms: float = 0.0  # median time until fn returned, before waiting for the device: Python + launches
    cpu_s: float = 0.0  # median CPU seconds of this process per call (all its threads)
    result: Any = None  # what fn returned on the last call


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int = 2, min_reps: int = 3,
              max_reps: int = 50, budget_s: float = 2.0) -> Timing:
    """Median wall time of ``fn`` in ms after ``warmup`` untimed calls (the first one, which
    compiles / captures, is timed apart); ``warmup=0, min_reps=max_reps=1`` times a single
    call, e.g. of a long computation whose ``result`` is wanted.

    The first timed rep sets how many follow: as many as fill ``budget_s``, within
    [min_reps, max_reps]. On CUDA each rep is timed with CUDA events; on CPU with perf_counter.
    """

    def timed() -> tuple[float, float, float, Any]:
        cpu = time.process_time()
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            begin.record()
            out = fn()
            end.record()
            host = (time.perf_counter() - t0) * 1e3
            end.synchronize()
            wall = begin.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            out = fn()
            wall = host = (time.perf_counter() - t0) * 1e3
        return wall, host, time.process_time() - cpu, out

    first = None
    if warmup > 0:
        start = time.perf_counter()
        fn()
        synchronize(device)
        first = time.perf_counter() - start
        for _ in range(warmup - 1):
            fn()
    synchronize(device)
    reps = [timed()]
    count = int(min(max_reps, max(min_reps, budget_s * 1e3 // max(reps[0][0], 1e-3))))
    reps += [timed() for _ in range(count - 1)]
    wall, host, cpu = (statistics.median(rep[i] for rep in reps) for i in range(3))
    return Timing(wall, count, reps[0][0] / 1e3 if first is None else first, host, cpu, reps[-1][3])


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
