"""The one place that decides which implementation of an op runs.

Every op in ``prdit_fast.ops`` takes ``impl=`` and asks ``resolve`` before it computes.
Implementations:

    "torch"   the plain-torch reference (models.py pieces); runs everywhere, the numerical truth
    "triton"  the op's fused Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)
    "gemm"    cuBLAS GEMMs: for local_denoiser composed with Triton memory-bound passes; for
              fp8_linear one torch._scaled_mm (CUDA with FP8 tensor cores, no Triton)

"auto" picks, from the tensors' device and dtype (``default_impl``):

    op               CPU           CPU + TRITON_INTERPRET=1   CUDA fp32   CUDA bf16 / fp16
    local_denoiser   torch         triton                     triton      gemm
    fp8_linear       torch         torch                      gemm        gemm
    every other op   torch         triton                     triton      triton

and falls back to "torch" when the op refuses these particular inputs (a dtype or size its
kernels do not cover, which the op states as a reason). An explicit "triton" or "gemm"
never falls back: it raises ``ImplUnavailable`` saying why it cannot run. The choice is
logged (logger ``prdit_fast.ops``, INFO) once per (op, implementation).

Why "gemm" is the 16-bit CUDA default of the local denoiser: on an H100 the fused
adaptive-SwiGLU kernels ran slower than cuBLAS GEMMs with separate Triton passes
(benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-25/swiglu-ops.txt); fp32 and the
interpreter keep the fused kernels, which no such measurement covers.
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch

from .common import interpreter_enabled, triton_importable

logger = logging.getLogger("prdit_fast.ops")

AUTO = "auto"
TORCH, TRITON, GEMM = "torch", "triton", "gemm"
# the implementations each op has besides "auto"
OP_IMPLS: dict[str, tuple[str, ...]] = {
    "unfold3d": (TORCH, TRITON),
    "fold3d": (TORCH, TRITON),
    "unpatchify": (TORCH, TRITON),
    "layernorm_modulate": (TORCH, TRITON),
    "gated_residual_layernorm_modulate": (TORCH, TRITON),
    "embed_layernorm_modulate": (TORCH, TRITON),
    "swiglu_gate_layernorm": (TORCH, TRITON),
    "adaptive_swiglu": (TORCH, TRITON),
    "local_denoiser": (TORCH, TRITON, GEMM),
    "sampler_update": (TORCH, TRITON),
    "flow_update": (TORCH, TRITON),
    "initial_noise": (TORCH, TRITON),
    "step_noise": (TORCH, TRITON),
    "fp8_linear": (TORCH, GEMM),
    "sr_assemble": (TORCH, TRITON),
    "gated_residual_linear": (TORCH, TRITON),
    "ms_ssim_cross": (TORCH, TRITON),
}
# ops whose "gemm" is cuBLAS alone (no Triton pass): only the op's own refusal can stop it
_GEMM_WITHOUT_TRITON = ("fp8_linear",)
_16BIT = (torch.bfloat16, torch.float16)
_announced: set[tuple[str, str]] = set()


class ImplUnavailable(ValueError):
    """An explicitly requested implementation cannot run on the given inputs."""


def triton_runs_on_device(device: torch.device | str) -> str | None:
    """Why Triton kernels cannot run on ``device`` here, or None when they can."""
    if not triton_importable():
        return "Triton is not installed"
    kind = torch.device(device).type
    if kind == "cuda":
        return None
    if kind == "cpu" and interpreter_enabled():
        return None
    return (f"Triton runs on CUDA tensors, or on CPU tensors only with TRITON_INTERPRET=1 set "
            f"before Triton is imported; got {kind} tensors")


def triton_runs_on(*tensors: torch.Tensor) -> bool:
    """True when a Triton kernel can run on all these tensors (one device type)."""
    kinds = {t.device.type for t in tensors}
    return len(kinds) == 1 and triton_runs_on_device(next(iter(kinds))) is None


def check_impl(op: str, impl: str) -> None:
    """Raise ValueError unless ``impl`` is "auto" or an implementation ``op`` has."""
    if op not in OP_IMPLS:
        raise ValueError(f"unknown op {op!r}; ops with implementations: {sorted(OP_IMPLS)}")
    if impl != AUTO and impl not in OP_IMPLS[op]:
        raise ValueError(f"{op}: impl must be 'auto' or one of {OP_IMPLS[op]}, got {impl!r}")


def default_impl(op: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """What impl="auto" runs for ``op`` on tensors of this device and dtype (the table in
    the module docstring), before the op's own per-input refusals."""
    check_impl(op, AUTO)
    on_cuda = torch.device(device).type == "cuda"
    if op in _GEMM_WITHOUT_TRITON:
        return GEMM if on_cuda else TORCH
    if triton_runs_on_device(device) is not None:
        return TORCH
    if GEMM in OP_IMPLS[op] and on_cuda and dtype in _16BIT:
        return GEMM
    return TRITON


def resolve(op: str, impl: str, tensors: Sequence[torch.Tensor], refusal: str | None = None) -> str:
    """The implementation that runs ``op`` on ``tensors`` ("torch", "triton" or "gemm").

    impl: the caller's choice ("auto" or one of ``OP_IMPLS[op]``). tensors: the op's
    inputs; the first one's dtype is the compute dtype. refusal: the op's reason its
    kernels cannot take these inputs (dtype, size), or None. Raises ``ImplUnavailable``
    when an explicitly requested kernel implementation cannot run.
    """
    check_impl(op, impl)
    if impl == TORCH:
        return announce(op, TORCH, "requested")
    device, dtype = tensors[0].device, tensors[0].dtype
    why = "requested" if impl != AUTO else f"default for {device.type} {dtype}"
    wanted = impl if impl != AUTO else default_impl(op, device, dtype)
    if wanted == TORCH:
        return announce(op, TORCH, triton_runs_on_device(device) if impl == AUTO and op not in _GEMM_WITHOUT_TRITON
                        else why)
    kinds = {t.device.type for t in tensors}
    if len(kinds) > 1:
        blocker = f"its tensors are on several device types {sorted(kinds)}"
    elif wanted == GEMM and op in _GEMM_WITHOUT_TRITON:
        blocker = refusal
    else:
        blocker = triton_runs_on_device(device) or refusal
    if blocker is None:
        return announce(op, wanted, why)
    if impl != AUTO:
        raise ImplUnavailable(f"{op}: impl={impl!r} cannot run: {blocker}. Use impl='auto' or 'torch'")
    return announce(op, TORCH, blocker)


def announce(op: str, chosen: str, why: str) -> str:
    """Log ``op runs chosen (why)`` the first time this (op, chosen) pair is seen; returns chosen.
    Not while torch.compile traces (a log call would break its graph): eager calls log."""
    if (op, chosen) not in _announced and not torch.compiler.is_compiling():
        _announced.add((op, chosen))
        logger.info("%s runs %s (%s)", op, chosen, why)
    return chosen


def per_op_impl(impl: str | Mapping[str, str], ops: Sequence[str]) -> dict[str, str]:
    """Expand a model-wide choice to one per op: a string applies to every op in ``ops``
    ("auto", "torch", or "triton", which applies to the ops that have Triton kernels, the
    others running "auto"); a mapping names ops whose choice is not "auto"."""
    if isinstance(impl, str):
        if impl not in (AUTO, TORCH, TRITON):
            raise ValueError(f"impl must be 'auto', 'torch', 'triton' or a mapping op -> impl, got {impl!r}")
        return {op: impl if impl in OP_IMPLS[op] or impl == AUTO else AUTO for op in ops}
    unknown = sorted(set(impl) - set(ops))
    if unknown:
        raise ValueError(f"impl names ops {unknown} that this model does not run; its ops: {list(ops)}")
    for op, choice in impl.items():
        check_impl(op, choice)
    return {op: impl.get(op, AUTO) for op in ops}
