"""Shared fixtures of the kernel benchmarks: ``pytest benchmarks/ --benchmark-only`` on a GPU.

* ``bench_*.py`` files are collected as test modules (besides ``test_*.py``);
* ``requires_cuda`` marks a benchmark that needs a GPU; ``cuda_device`` skips without one;
* ``copy_bandwidth_gbps`` and ``matmul_peak_tflops`` measure the device's copy bandwidth
  (read + write of 1 GiB) and bf16 matmul throughput (8192^3) ONCE per session, with the
  same code as ``prdit-fast bench`` (``prdit_fast.bench``);
* ``roofline(benchmark, flops=..., bytes_moved=...)`` adds achieved TFLOP/s and GB/s and
  their fractions of those two measurements to the benchmark's ``extra_info``;
* pytest-benchmark's machine info gains the GPU name, driver, CUDA, torch and Triton
  versions and the git commit (``--benchmark-json`` keeps them).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from prdit_fast.testing import interpret_without_gpu

# Triton modules then import cleanly without a GPU (their benchmarks skip)
interpret_without_gpu()

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")
    config.addinivalue_line("markers", "requires_cuda: the benchmark needs a CUDA GPU")


@pytest.fixture(scope="session")
def cuda_device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def copy_bandwidth_gbps(cuda_device) -> float:
    """Device-to-device copy of 1 GiB, GB/s counting read + write: the bandwidth roof."""
    from prdit_fast.bench import measure_copy_bandwidth

    return measure_copy_bandwidth(cuda_device, 2**30)["gbps"]


@pytest.fixture(scope="session")
def matmul_peak_tflops(cuda_device) -> float:
    """bf16 8192^3 matmul throughput in TFLOP/s: the compute roof."""
    from prdit_fast.bench import measure_matmul_peak

    return measure_matmul_peak(cuda_device, 8192, torch.bfloat16)["tflops"]


@pytest.fixture
def roofline(copy_bandwidth_gbps, matmul_peak_tflops):
    """Call after ``benchmark(...)`` ran: ``roofline(benchmark, flops=F, bytes_moved=M)`` with
    the FLOPs and bytes of ONE call; stores achieved rates and fractions of the roofs in
    ``benchmark.extra_info`` and returns them."""

    def annotate(benchmark, flops: float | None = None, bytes_moved: float | None = None) -> dict:
        seconds = benchmark.stats.stats.median
        info = {"copy_bandwidth_gbps": copy_bandwidth_gbps, "matmul_peak_tflops": matmul_peak_tflops}
        if flops:
            info["tflops"] = flops / seconds / 1e12
            info["fraction_of_matmul_peak"] = info["tflops"] / matmul_peak_tflops
        if bytes_moved:
            info["gbps"] = bytes_moved / seconds / 1e9
            info["fraction_of_copy_bandwidth"] = info["gbps"] / copy_bandwidth_gbps
        benchmark.extra_info.update(info)
        return info

    return annotate


if importlib.util.find_spec("pytest_benchmark") is not None:

    def pytest_benchmark_update_machine_info(config, machine_info):
        from prdit_fast.bench import environment

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        env = environment(device, argv=["pytest"] + list(config.invocation_params.args))
        machine_info["prdit_fast"] = {k: env[k] for k in ("device", "versions", "git_commit", "git_dirty", "date",
                                                          "command")}
