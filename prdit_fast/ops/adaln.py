"""Fused adaLN-Zero pieces of the DiT blocks (spec section 5).

One Triton kernel covers both fused ops; a row of the token matrix is one program row:

* ``layernorm_modulate(x, shift, scale)``: ``LayerNorm(x) * (1 + scale) + shift``
  (LayerNorm without affine, eps 1e-6; per-sample shift/scale broadcast over the tokens),
  the input of the next GEMM, written once in the compute dtype.
* ``gated_residual_layernorm_modulate(x, gate, branch, shift, scale)``: the residual gate
  ``x_new = x + gate * branch`` of one sub-block and the LayerNorm + modulation of the
  next, in ONE pass: returns ``(x_new, y)``. Every residual update of the network is
  followed by a LayerNorm (the next block, or the final layer), so the gate is always
  fused this way rather than run as a kernel of its own.

Statistics, ``1 + scale`` and the residual sum are fp32 whatever the storage dtypes;
``y`` is rounded once to ``out_dtype``. Backward is a ``torch.autograd.Function`` whose
backward uses torch ops on the saved fp32 statistics. Without a GPU (and without the
Triton interpreter) the functions fall back to the plain-torch references below, which
the tests compare the kernel against: fp32 agreement to ~1e-5 absolute.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import modulate
from .common import triton_importable, use_triton

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _adaln_fwd_kernel(
        X, GATE, BRANCH, SHIFT, SCALE, XOUT, Y, MEAN, RSTD,
        rows, cols, tokens, stride_mod, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        col = tl.arange(0, BLOCK_N)
        row_ok = row < rows
        mask = row_ok[:, None] & (col < cols)[None, :]
        sample = row // tokens  # shift/scale/gate are per sample
        offs = row[:, None] * cols + col[None, :]
        mod_offs = sample[:, None] * stride_mod + col[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            gate = tl.load(GATE + mod_offs, mask=mask, other=0.0).to(tl.float32)
            branch = tl.load(BRANCH + offs, mask=mask, other=0.0).to(tl.float32)
            x = x + gate * branch
            tl.store(XOUT + offs, x.to(XOUT.dtype.element_ty), mask=mask)
        mean = tl.sum(x, axis=1) / cols
        centered = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / cols + eps)
        shift = tl.load(SHIFT + mod_offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + mod_offs, mask=mask, other=0.0).to(tl.float32)
        y = centered * rstd[:, None] * (1.0 + scale) + shift
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean, mask=row_ok)
        tl.store(RSTD + row, rstd, mask=row_ok)


def _launch(x, gate, branch, shift, scale, eps, out_dtype):
    """x, branch: (B, N, H) contiguous; gate, shift, scale: (B, H) views with unit column
    stride and one common row stride. Returns (x_new or None, y, mean, rstd)."""
    B, N, H = x.shape
    rows = B * N
    y = torch.empty((B, N, H), device=x.device, dtype=out_dtype)
    x_new = torch.empty_like(x) if branch is not None else None
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_n = triton.next_power_of_2(H)
    # ~4096 elements per program: 16 per thread and tensor at 8 warps, no register spills
    # with five row tensors live (x, branch, gate, shift, scale)
    block_m = max(1, min(16, 4096 // block_n))
    grid = (triton.cdiv(rows, block_m),)
    _adaln_fwd_kernel[grid](
        x, gate if gate is not None else shift, branch if branch is not None else x, shift, scale,
        x_new if x_new is not None else y, y, mean, rstd,
        rows, H, N, shift.stride(0), eps,
        HAS_RESIDUAL=branch is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=8 if block_m * block_n >= 4096 else 4,
    )
    return x_new, y, mean, rstd


class _AdaLNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, branch, shift, scale, eps, out_dtype):
        x_new, y, mean, rstd = _launch(x, gate, branch, shift, scale, eps, out_dtype)
        ctx.save_for_backward(x_new if x_new is not None else x, mean, rstd, scale, gate, branch)
        ctx.has_residual = branch is not None
        return (x_new, y) if x_new is not None else y

    @staticmethod
    def backward(ctx, *grads):
        x_norm_in, mean, rstd, scale, gate, branch = ctx.saved_tensors
        if ctx.has_residual:
            grad_x_new, grad_y = grads
        else:
            grad_x_new, (grad_y,) = None, grads
        B, N, H = x_norm_in.shape
        xhat = (x_norm_in.float() - mean.view(B, N, 1)) * rstd.view(B, N, 1)
        grad_y = grad_y.float() if grad_y is not None else torch.zeros_like(xhat)
        grad_shift = grad_y.sum(dim=1)
        grad_scale = (grad_y * xhat).sum(dim=1)
        grad_xhat = grad_y * (1.0 + scale.float()).unsqueeze(1)
        # LayerNorm backward without affine: rstd * (g - mean(g) - xhat * mean(g * xhat))
        grad_in = rstd.view(B, N, 1) * (
            grad_xhat - grad_xhat.mean(dim=-1, keepdim=True) - xhat * (grad_xhat * xhat).mean(dim=-1, keepdim=True)
        )
        if grad_x_new is not None:
            grad_in = grad_in + grad_x_new.float()
        grad_gate = grad_branch = None
        if ctx.has_residual:
            grad_gate = (grad_in * branch.float()).sum(dim=1).to(gate.dtype)
            grad_branch = (grad_in * gate.float().unsqueeze(1)).to(branch.dtype)
        return (
            grad_in.to(x_norm_in.dtype), grad_gate, grad_branch,
            grad_shift.to(scale.dtype), grad_scale.to(scale.dtype), None, None,
        )


def _prepare(x, shift, scale, gate=None, branch=None):
    if x.dim() != 3:
        raise ValueError(f"expected tokens of shape (B, N, H), got {tuple(x.shape)}")
    B, _, H = x.shape
    vecs = [v for v in (shift, scale, gate) if v is not None]
    for v in vecs:
        if v.shape != (B, H):
            raise ValueError(f"per-sample modulation vectors must have shape ({B}, {H}), got {tuple(v.shape)}")
    if branch is not None and branch.shape != x.shape:
        raise ValueError(f"branch must match x {tuple(x.shape)}, got {tuple(branch.shape)}")
    stride = vecs[0].stride(0)
    if any(v.stride(1) != 1 or v.stride(0) != stride for v in vecs):
        # the kernel indexes all vectors with one row stride; views of one modulation matrix have it
        vecs = [v.contiguous() for v in vecs]
    shift, scale = vecs[0], vecs[1]
    gate = vecs[2] if gate is not None else None
    return x.contiguous(), shift, scale, gate, branch.contiguous() if branch is not None else None


def layernorm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm(x) (no affine) * (1 + scale) + shift.

    x: (B, N, H); shift, scale: (B, H) -> (B, N, H) in ``out_dtype`` (default x.dtype).
    backend: "auto" (Triton where it runs), "triton" or "torch" (the reference).
    """
    out_dtype = out_dtype or x.dtype
    if not use_triton(backend, [x, shift, scale]):
        return layernorm_modulate_reference(x, shift, scale, eps, out_dtype)
    x, shift, scale, _, _ = _prepare(x, shift, scale)
    return _AdaLNFunction.apply(x, None, None, shift, scale, eps, out_dtype)


def gated_residual_layernorm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor,
    branch: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_new = x + gate * branch;  y = LayerNorm(x_new) * (1 + scale) + shift.

    x, branch: (B, N, H); gate, shift, scale: (B, H) -> (x_new in x.dtype, y in
    ``out_dtype``, default x.dtype). backend: as for ``layernorm_modulate``.
    """
    out_dtype = out_dtype or x.dtype
    if not use_triton(backend, [x, gate, branch, shift, scale]):
        return gated_residual_layernorm_modulate_reference(x, gate, branch, shift, scale, eps, out_dtype)
    x, shift, scale, gate, branch = _prepare(x, shift, scale, gate, branch)
    return _AdaLNFunction.apply(x, gate, branch, shift, scale, eps, out_dtype)


# --------------------------------------------------------------------------- #
# Plain-torch references (CPU path and test oracle)
# --------------------------------------------------------------------------- #
def layernorm_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    y = modulate(F.layer_norm(x.float(), x.shape[-1:], eps=eps), shift.float(), scale.float())
    return y.to(out_dtype or x.dtype)


def gated_residual_layernorm_modulate_reference(
    x: torch.Tensor,
    gate: torch.Tensor,
    branch: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    x_new = (x.float() + gate.float().unsqueeze(1) * branch.float()).to(x.dtype)
    return x_new, layernorm_modulate_reference(x_new, shift, scale, eps, out_dtype or x.dtype)
