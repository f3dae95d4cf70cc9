"""SwiGLU gate + affine LayerNorm in one pass (the middle of spec section 4's SwiGLU).

    gu = [g | u]                      (M, 2D): one GEMM's output, m @ [Wg; Wx]^T + [bg; bx]
    p  = SiLU(g) * u
    h  = LayerNorm(p) * gamma + beta  (eps of the SwiGLU's ``norm``, 1e-5)

One Triton program reads whole rows of ``gu`` once, keeps ``p`` in fp32 registers for
the statistics (mean, then the centred variance, no sum-of-squares cancellation) and
writes ``h`` once in ``gu``'s dtype. The reference rounds ``SiLU(g)``, ``p`` and the
LayerNorm input to the compute dtype in turn; here only ``h`` is rounded.

The backward uses torch ops on the saved ``gu`` and the fp32 row statistics (explicit
LayerNorm and SiLU derivatives), so nothing but (M,) vectors is stored beyond ``gu``.
impl="torch" (and "auto" where Triton cannot run) runs the plain-torch reference below;
the tests compare the kernel against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import triton_importable
from .dispatch import TRITON, resolve

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_gate_ln_fwd_kernel(
        GU, GAMMA, BETA, H, MEAN, RSTD,
        rows, cols, stride_gu, eps,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        col = tl.arange(0, BLOCK_N)
        row_ok = row < rows
        col_ok = col < cols
        mask = row_ok[:, None] & col_ok[None, :]
        gate_offs = row[:, None] * stride_gu + col[None, :]
        g = tl.load(GU + gate_offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + gate_offs + cols, mask=mask, other=0.0).to(tl.float32)
        p = g * tl.sigmoid(g) * u  # masked lanes: g = u = 0 -> p = 0
        mean = tl.sum(p, axis=1) / cols
        centered = tl.where(mask, p - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / cols + eps)
        gamma = tl.load(GAMMA + col, mask=col_ok, other=0.0).to(tl.float32)
        beta = tl.load(BETA + col, mask=col_ok, other=0.0).to(tl.float32)
        h = centered * rstd[:, None] * gamma[None, :] + beta[None, :]
        tl.store(H + row[:, None] * cols + col[None, :], h.to(H.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean, mask=row_ok)
        tl.store(RSTD + row, rstd, mask=row_ok)


def _launch(gu: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float):
    """gu: (M, 2D) with unit column stride -> (h (M, D) in gu.dtype, mean, rstd fp32 (M,))."""
    rows, width = gu.shape
    cols = width // 2
    h = torch.empty((rows, cols), device=gu.device, dtype=gu.dtype)
    mean = torch.empty(rows, device=gu.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_n = triton.next_power_of_2(cols)
    # ~4096 elements per program and row tensor (g, u, p live at once): no spills at 8 warps
    block_m = max(1, min(16, 4096 // block_n))
    grid = (triton.cdiv(rows, block_m),)
    _swiglu_gate_ln_fwd_kernel[grid](
        gu, gamma, beta, h, mean, rstd, rows, cols, gu.stride(0), eps,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m * block_n >= 4096 else 4,
    )
    return h, mean, rstd


class _SwiGLUGateLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu, gamma, beta, eps):
        h, mean, rstd = _launch(gu, gamma, beta, eps)
        ctx.save_for_backward(gu, gamma, mean, rstd)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        gu, gamma, mean, rstd = ctx.saved_tensors
        cols = gu.shape[1] // 2
        g, u = gu[:, :cols].float(), gu[:, cols:].float()
        sig = torch.sigmoid(g)
        silu = g * sig
        xhat = (silu * u - mean[:, None]) * rstd[:, None]
        grad_h = grad_h.float()
        grad_gamma = (grad_h * xhat).sum(dim=0)
        grad_beta = grad_h.sum(dim=0)
        grad_xhat = grad_h * gamma.float()
        # LayerNorm backward: rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        grad_p = rstd[:, None] * (
            grad_xhat - grad_xhat.mean(dim=1, keepdim=True) - xhat * (grad_xhat * xhat).mean(dim=1, keepdim=True)
        )
        # d SiLU(g) / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
        grad_g = grad_p * u * (sig * (1.0 + g * (1.0 - sig)))
        grad_gu = torch.cat([grad_g, grad_p * silu], dim=1).to(gu.dtype)
        return grad_gu, grad_gamma.to(gamma.dtype), grad_beta.to(gamma.dtype), None


def swiglu_gate_layernorm(
    gu: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5, impl: str = "auto"
) -> torch.Tensor:
    """LayerNorm(SiLU(g) * u) * gamma + beta, where ``gu = [g | u]`` along the last dim.

    gu: (..., 2D); gamma, beta: (D,) -> (..., D) in gu's dtype. impl: "auto", "triton" (error if it
    cannot run) or "torch" (the reference); see ``prdit_fast.ops.dispatch``.
    """
    if gu.dim() < 1 or gu.shape[-1] % 2:
        raise ValueError(f"gu must be (..., 2D) = [gate | value], got shape {tuple(gu.shape)}")
    cols = gu.shape[-1] // 2
    if gamma.shape != (cols,) or beta.shape != (cols,):
        raise ValueError(
            f"gamma and beta must have shape ({cols},) for gu of width {2 * cols}, "
            f"got {tuple(gamma.shape)} and {tuple(beta.shape)}"
        )
    unsupported = None
    if gu.dtype not in _SUPPORTED_DTYPES:
        unsupported = f"the kernel supports fp32/bf16/fp16, got {gu.dtype}"
    if gu.numel() == 0 or resolve("swiglu_gate_layernorm", impl, [gu, gamma, beta], unsupported) != TRITON:
        return swiglu_gate_layernorm_reference(gu, gamma, beta, eps)
    rows = gu.reshape(-1, 2 * cols)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    h = _SwiGLUGateLayerNormFunction.apply(rows, gamma, beta, eps)
    return h.view(*gu.shape[:-1], cols)


def swiglu_gate_layernorm_reference(
    gu: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Plain torch, fp32 inside: (..., 2D) -> (..., D) in gu's dtype."""
    g, u = gu.float().chunk(2, dim=-1)
    h = F.layer_norm(F.silu(g) * u, u.shape[-1:], gamma.float(), beta.float(), eps)
    return h.to(gu.dtype)
