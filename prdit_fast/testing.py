"""Helpers shared by the tests and the benchmarks (not used by the library itself)."""
from __future__ import annotations

import os

import torch


def interpret_without_gpu() -> None:
    """Run Triton kernels under the interpreter when there is no GPU (tests, CPU benchmark
    collection). Call before ``prdit_fast.ops`` or Triton is first imported: Triton reads
    the switch at import, and the ops choose their autotune configs at import."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
