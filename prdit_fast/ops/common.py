"""What the Triton ops share: whether Triton can run for given tensors, and tolerances."""
from __future__ import annotations

import functools
import os
from typing import Sequence

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


BACKENDS = ("auto", "triton", "torch")


def use_triton(backend: str, tensors: Sequence[torch.Tensor], unsupported: str | None = None) -> bool:
    """Resolve ``backend`` for one call of an op in prdit_fast.ops.

    "torch" -> False; "triton" -> True, or ValueError saying why the kernel cannot run;
    "auto" -> True exactly when the kernel can run. ``unsupported`` is the op's own reason
    to refuse these inputs (dtype, size), or None.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    why = unsupported
    if why is None and not triton_runs_on(*tensors):
        why = (
            "Triton cannot run on these tensors: it needs CUDA tensors with Triton installed, "
            "or CPU tensors with TRITON_INTERPRET=1 set before Triton is imported"
        )
    if why is None:
        return True
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run this call: {why}. Use backend='auto' or 'torch'")
    return False


def autotune_configs(tuned: list, interpreted: list) -> list:
    """Configs for ``triton.autotune``: ``interpreted`` under the interpreter (which pays
    per operation, so few large programs), the first of ``tuned`` when PRDIT_AUTOTUNE=0
    (tests on a GPU: correctness needs no tuning, and tuning costs minutes of compiles),
    else all of ``tuned``."""
    if interpreter_enabled():
        return interpreted
    if os.environ.get("PRDIT_AUTOTUNE", "1") == "0":
        return tuned[:1]
    return tuned


def interpret_without_gpu() -> None:
    """Run Triton kernels under the interpreter when there is no GPU (tests, CPU benchmark
    collection). Call before Triton is first imported: Triton reads it at import."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
