"""FP8 (e4m3) GEMMs with per-row or per-block scales: quantization, reference, GPU path.

A linear layer y = x W^T + b in FP8 quantizes both operands to ``torch.float8_e4m3fn``
(4 exponent bits, 3 mantissa bits, largest finite value 448) with fp32 scales:

    x  ~ scale_x * q_x      q_x = round_e4m3(x / scale_x),  scale_x = amax / 448
    W  ~ scale_w * q_w      (weights quantized once and cached by the caller)
    y  = scale_x scale_w^T * (q_x q_w^T) + b                accumulated in fp32

Scales are per row (one per token of x, one per output channel of W: ``block=None``) or
per block of ``block`` consecutive columns along K (``block=128``: one scale per 1 x 128
tile of x and of W), which keeps an outlier from flattening its whole row.

* ``quantize_e4m3`` / ``dequantize_e4m3``: the scale computation and the e4m3 cast, in
  plain torch (any device);
* ``fp8_linear_reference``: the dequantized matmul in fp32, the numerical truth that the
  GPU path is tested against (it runs on the CPU);
* ``fp8_linear``: on CUDA devices with FP8 tensor cores (compute capability 8.9+: Ada,
  Hopper, Blackwell) one ``torch._scaled_mm`` with row-wise scales, bias and a bf16 output;
  impl="auto" runs it there and the reference elsewhere; an explicit impl="gemm" that cannot
  run raises ``ImplUnavailable`` saying why (``prdit_fast.ops.dispatch``).
  Block scales run only in the reference: ``_scaled_mm``'s block-wise scaling is not used.

Inference only: there is no backward (training keeps bf16).
"""
from __future__ import annotations

import torch

from prdit_fast.ops.dispatch import TORCH, resolve

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
# amax of an all-zero row or block: its scale must stay finite and non-zero
_SMALLEST_AMAX = 1e-12
FP8_CAPABILITY = (8, 9)


def fp8_unsupported(device: torch.device | str) -> str | None:
    """Why FP8 GEMMs (``torch._scaled_mm``) cannot run on ``device``; None when they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"FP8 GEMMs need an NVIDIA GPU with FP8 tensor cores; {device} has none"
    if not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no torch._scaled_mm (FP8 GEMMs need torch >= 2.4)"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} is compute capability {capability[0]}.{capability[1]}; "
                f"FP8 GEMMs need 8.9 or newer (Ada, Hopper, Blackwell)")
    return None


def _blocks(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """x (..., K) as (..., K / block, block), or (..., 1, K) for per-row scales."""
    K = x.shape[-1]
    if block is None:
        return x.unsqueeze(-2)
    if block < 1 or K % block:
        raise ValueError(f"block {block} must be a positive divisor of the reduced width {K}")
    return x.unflatten(-1, (K // block, block))


def quantize_e4m3(x: torch.Tensor, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (q (..., K) float8_e4m3fn, scale (..., K / block) fp32; (..., 1) per row).

    scale = amax(|x|) / 448 over each row (``block=None``) or each run of ``block`` columns,
    so the largest element of each maps to +-448 and nothing saturates; q = e4m3(x / scale),
    round to nearest even. An all-zero row or block gets a tiny positive scale and q = 0.
    """
    if not x.is_floating_point():
        raise ValueError(f"quantize_e4m3 takes a floating-point tensor, got {x.dtype}")
    grouped = _blocks(x.float(), block)
    amax = grouped.abs().amax(dim=-1, keepdim=True).clamp_min(_SMALLEST_AMAX)
    scale = amax / E4M3_MAX
    q = (grouped / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.flatten(-2), scale.squeeze(-1)


def dequantize_e4m3(q: torch.Tensor, scale: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """The fp32 tensor that (q, scale) stands for: q (..., K) e4m3, scale (..., K / block)."""
    return (_blocks(q.float(), block) * scale.unsqueeze(-1)).flatten(-2)


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         block: int | None = None) -> torch.Tensor:
    """x (..., K), weight (N, K), bias (N,) -> (..., N) in x's dtype: both operands rounded
    through e4m3 with ``block`` scales, then an fp32 matmul of the dequantized values."""
    xq = dequantize_e4m3(*quantize_e4m3(x, block), block)
    wq = dequantize_e4m3(*quantize_e4m3(weight, block), block)
    out = xq @ wq.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def fp8_linear(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
               impl: str = "auto") -> torch.Tensor:
    """x (..., K) in a 16-bit or fp32 dtype; weight_q (N, K) e4m3 and weight_scale (N, 1)
    fp32 from ``quantize_e4m3(weight)`` (per output row); bias (N,) -> (..., N) out_dtype.

    impl "gemm": one ``torch._scaled_mm`` on an FP8-capable GPU, x quantized per row on the
    way; "torch": the dequantized reference (any device); "auto": "gemm" where it runs.
    """
    if weight_q.dtype != E4M3 or weight_q.dim() != 2 or weight_scale.shape != (weight_q.shape[0], 1):
        raise ValueError(f"weight_q must be (N, K) float8_e4m3fn with weight_scale (N, 1) from quantize_e4m3; "
                         f"got {weight_q.dtype} {tuple(weight_q.shape)} and {tuple(weight_scale.shape)}")
    if x.shape[-1] != weight_q.shape[1]:
        raise ValueError(f"x has width {x.shape[-1]}, the weight expects {weight_q.shape[1]}")
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("FP8 GEMMs are inference only (no backward): run under torch.no_grad() "
                           "or train in bf16")
    rows = x.reshape(-1, x.shape[-1])
    if resolve("fp8_linear", impl, [x], fp8_unsupported(x.device)) == TORCH:
        out = dequantize_e4m3(*quantize_e4m3(rows)) @ dequantize_e4m3(weight_q, weight_scale).t()
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype).view(*x.shape[:-1], -1)
    x_q, x_scale = quantize_e4m3(rows)
    out = torch._scaled_mm(
        x_q, weight_q.t(), scale_a=x_scale, scale_b=weight_scale.t(),
        bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
    )
    return out.view(*x.shape[:-1], -1)
