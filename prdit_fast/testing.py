"""What the tests and benchmarks share: random weights, error metrics, the CPU switch for
Triton. Not used by the library's own code paths."""
from __future__ import annotations

import os

import torch

from .models import PRDiT, create_model


def interpret_without_gpu() -> None:
    """Run Triton kernels under the interpreter when there is no GPU (tests, CPU benchmark
    collection). Call before ``prdit_fast.ops`` or Triton is first imported: Triton reads
    the switch at import, and the ops choose their autotune configs at import."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def randomize_(module: torch.nn.Module, std: float | None = None) -> torch.nn.Module:
    """Every parameter of ``module`` random, in place. A fresh PRDiT predicts exactly zero
    (spec section 12), so implementations must be compared, and timed, on random weights.

    std None: scaled to keep activations O(1) (matrices N(0, 1/fan_in), LayerNorm weights
    U(0.5, 1.5), everything else N(0, 0.3)); a number: every parameter N(0, std).
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if std is not None:
                p.normal_(0.0, std)
            elif p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return module


def randomized_model(variant: str, size: int, seed: int = 0, std: float = 0.02) -> PRDiT:
    """``create_model(variant, size)`` with every weight N(0, std) drawn from ``seed``; on
    the CPU, in eval mode (callers move it)."""
    torch.manual_seed(seed)
    return randomize_(create_model(variant, size), std).eval()


def rel_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error ||a - ref|| / ||ref||, in float64."""
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def rel_max(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the reference's largest magnitude, in float64."""
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)).item()
