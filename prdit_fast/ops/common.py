"""What the Triton ops share: whether Triton can run for given tensors, and tolerances."""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on the CPU (slow; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(*tensors: torch.Tensor) -> bool:
    """True when a Triton kernel can run on these tensors: CUDA tensors with Triton
    installed, or CPU tensors under the Triton interpreter."""
    if not triton_importable():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreter_enabled() and not any(t.is_cuda for t in tensors)
