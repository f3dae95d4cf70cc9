"""Fused adaLN-Zero pieces of the DiT blocks (spec section 5).

One Triton kernel covers the three fused ops; a row of the token matrix is one program row:

* ``layernorm_modulate(x, shift, scale)``: ``LayerNorm(x) * (1 + scale) + shift``
  (LayerNorm without affine, eps 1e-6; per-sample shift/scale broadcast over the tokens),
  the input of the next GEMM, written once in the compute dtype.
* ``gated_residual_layernorm_modulate(x, gate, branch, shift, scale)``: the residual gate
  ``x_new = x + gate * branch`` of one sub-block and the LayerNorm + modulation of the
  next, in ONE pass: returns ``(x_new, y)``. Every residual update of the network is
  followed by a LayerNorm (the next block, or the final layer), so the gate is always
  fused this way rather than run as a kernel of its own.
* ``embed_layernorm_modulate(e, gamma, beta, embed_eps, pos, shift, scale)``: the tail of
  the patch embedder and the first block's adaLN, in ONE pass: the residual stream
  ``x = LayerNorm_affine(e) + pos`` (fp32) and ``y = LayerNorm(x) * (1 + scale) + shift``;
  returns ``(x, y)``.

``rms=True`` gives the no-mean form of the TF-PRDiT variant (spec section 15): the
normalisation before the modulation is the parameter-free RMSNorm ``x / sqrt(mean(x^2) + eps)``
(a constexpr flag of the same kernel; the patch embedder's own affine LayerNorm stays one).

Statistics (mean, then the centred variance; for rms the mean is 0), ``1 + scale`` and
the residual stream are fp32 whatever the storage dtypes; ``y`` is rounded once to ``out_dtype``. Backward is a
``torch.autograd.Function`` whose backward uses torch ops on the saved fp32 statistics.
impl="torch" (and "auto" without a GPU or the Triton interpreter) runs the
plain-torch references below, which the tests compare the kernel against: fp32 agreement
to ~1e-5 absolute.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import modulate
from .common import triton_importable
from .dispatch import TRITON, resolve

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _row_stats(x, mask, cols, eps, RMS: tl.constexpr):
        """Rows of x (fp32, zero where masked) -> (x - mean, zero where masked; mean; rstd).
        RMS: the mean is taken as 0 (RMSNorm)."""
        if RMS:
            mean = tl.zeros_like(tl.sum(x, axis=1))
        else:
            mean = tl.sum(x, axis=1) / cols
        centered = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / cols + eps)
        return centered, mean, rstd

    @triton.jit
    def _adaln_fwd_kernel(
        X, GATE, BRANCH, GAMMA, BETA, POS, SHIFT, SCALE, XOUT, Y, STATS,
        rows, cols, tokens, stride_mod, eps, embed_eps,
        INPUT: tl.constexpr, RMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # INPUT says what the normalised row is: "plain": X; "gated_residual":
        # X + GATE * BRANCH, stored to XOUT; "embed": LayerNorm(X) * GAMMA + BETA + POS[token],
        # stored to XOUT. STATS rows: mean, rstd of the normalised row, then ("embed") X's.
        row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        col = tl.arange(0, BLOCK_N)
        row_ok = row < rows
        col_ok = col < cols
        mask = row_ok[:, None] & col_ok[None, :]
        sample = row // tokens  # shift/scale/gate are per sample
        offs = row[:, None] * cols + col[None, :]
        mod_offs = sample[:, None] * stride_mod + col[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if INPUT == "gated_residual":
            gate = tl.load(GATE + mod_offs, mask=mask, other=0.0).to(tl.float32)
            branch = tl.load(BRANCH + offs, mask=mask, other=0.0).to(tl.float32)
            x = x + gate * branch
            tl.store(XOUT + offs, x.to(XOUT.dtype.element_ty), mask=mask)
        if INPUT == "embed":
            e_centered, e_mean, e_rstd = _row_stats(x, mask, cols, embed_eps, False)
            gamma = tl.load(GAMMA + col, mask=col_ok, other=0.0).to(tl.float32)
            beta = tl.load(BETA + col, mask=col_ok, other=0.0).to(tl.float32)
            token = row - sample * tokens  # the positional encoding is shared by the samples
            pos = tl.load(POS + token[:, None] * cols + col[None, :], mask=mask, other=0.0).to(tl.float32)
            # zero in masked columns (e_centered, beta, pos are 0 there), as the statistics below need
            x = e_centered * e_rstd[:, None] * gamma[None, :] + beta[None, :] + pos
            tl.store(XOUT + offs, x.to(XOUT.dtype.element_ty), mask=mask)
            tl.store(STATS + 2 * rows + row, e_mean, mask=row_ok)
            tl.store(STATS + 3 * rows + row, e_rstd, mask=row_ok)
        centered, mean, rstd = _row_stats(x, mask, cols, eps, RMS)
        shift = tl.load(SHIFT + mod_offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + mod_offs, mask=mask, other=0.0).to(tl.float32)
        y = centered * rstd[:, None] * (1.0 + scale) + shift
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(STATS + row, mean, mask=row_ok)
        tl.store(STATS + rows + row, rstd, mask=row_ok)


def _launch(x, shift, scale, eps, out_dtype, gate=None, branch=None, embed=None, rms=False):
    """x, branch: (B, N, H) contiguous; gate, shift, scale: (B, H) views with unit column
    stride and one common row stride; embed: None, or (gamma (H,), beta (H,), pos (N, H),
    embed_eps) with x the embedding before its affine LayerNorm (all contiguous).

    Returns (x_out or None, y, stats): x_out is x_new (gated residual) or the fp32
    residual stream (embed); stats (2, B*N) fp32 rows mean, rstd of the adaLN input,
    (4, B*N) with the embedding LayerNorm's mean, rstd appended for embed."""
    B, N, H = x.shape
    rows = B * N
    y = torch.empty((B, N, H), device=x.device, dtype=out_dtype)
    if embed is not None:
        mode, x_out = "embed", torch.empty((B, N, H), device=x.device, dtype=torch.float32)
        gamma, beta, pos, embed_eps = embed
    else:
        mode = "plain" if branch is None else "gated_residual"
        x_out = torch.empty_like(x) if branch is not None else None
        gamma = beta = pos = None
        embed_eps = 0.0
    stats = torch.empty((4 if embed is not None else 2, rows), device=x.device, dtype=torch.float32)
    block_n = triton.next_power_of_2(H)
    # ~4096 elements per program: 16 per thread and tensor at 8 warps, no register spills
    # with five row tensors live (x, branch, gate, shift, scale; embed: x, pos, shift, scale)
    block_m = max(1, min(16, 4096 // block_n))
    grid = (triton.cdiv(rows, block_m),)
    unused = x  # pointer slots the chosen INPUT mode never dereferences
    _adaln_fwd_kernel[grid](
        x, gate if gate is not None else unused, branch if branch is not None else unused,
        gamma if gamma is not None else unused, beta if beta is not None else unused,
        pos if pos is not None else unused, shift, scale,
        x_out if x_out is not None else y, y, stats,
        rows, H, N, shift.stride(0), eps, embed_eps,
        INPUT=mode, RMS=rms, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=8 if block_m * block_n >= 4096 else 4,
    )
    return x_out, y, stats


def _normalized(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """(x - mean) * rstd in fp32: x (B, N, H), mean, rstd (B*N,) -> (B, N, H)."""
    B, N, _ = x.shape
    return (x.float() - mean.view(B, N, 1)) * rstd.view(B, N, 1)


def _layernorm_input_grad(
    grad_xhat: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, rms: bool = False
) -> torch.Tensor:
    """Gradient into a LayerNorm's input from that into its normalised output xhat (before
    any affine): rstd * (g - mean(g) - xhat * mean(g * xhat)); for RMSNorm (``rms``) without
    the mean(g) term. (B, N, H) fp32; rstd (B*N,)."""
    B, N, _ = xhat.shape
    grad = grad_xhat - xhat * (grad_xhat * xhat).mean(dim=-1, keepdim=True)
    if not rms:
        grad = grad - grad_xhat.mean(dim=-1, keepdim=True)
    return rstd.view(B, N, 1) * grad


def _layernorm_modulate_backward(x, mean, rstd, scale, grad_y, grad_x_out, rms=False):
    """Backward of y = LayerNorm(x) * (1 + scale) + shift where x is also an output of the
    op (the residual stream) receiving ``grad_x_out`` (or None) directly.

    Returns (grad_x, grad_shift, grad_scale) in fp32: (B, N, H), (B, H), (B, H)."""
    xhat = _normalized(x, mean, rstd)
    grad_y = grad_y.float() if grad_y is not None else torch.zeros_like(xhat)
    grad_shift = grad_y.sum(dim=1)
    grad_scale = (grad_y * xhat).sum(dim=1)
    grad_x = _layernorm_input_grad(grad_y * (1.0 + scale.float()).unsqueeze(1), xhat, rstd, rms)
    if grad_x_out is not None:
        grad_x = grad_x + grad_x_out.float()
    return grad_x, grad_shift, grad_scale


class _AdaLNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, branch, shift, scale, eps, out_dtype, rms):
        x_new, y, stats = _launch(x, shift, scale, eps, out_dtype, gate, branch, rms=rms)
        ctx.save_for_backward(x_new if x_new is not None else x, stats, scale, gate, branch)
        ctx.has_residual = branch is not None
        ctx.rms = rms
        return (x_new, y) if x_new is not None else y

    @staticmethod
    def backward(ctx, *grads):
        x_norm_in, stats, scale, gate, branch = ctx.saved_tensors
        if ctx.has_residual:
            grad_x_new, grad_y = grads
        else:
            grad_x_new, (grad_y,) = None, grads
        grad_in, grad_shift, grad_scale = _layernorm_modulate_backward(
            x_norm_in, stats[0], stats[1], scale, grad_y, grad_x_new, ctx.rms
        )
        grad_gate = grad_branch = None
        if ctx.has_residual:
            grad_gate = (grad_in * branch.float()).sum(dim=1).to(gate.dtype)
            grad_branch = (grad_in * gate.float().unsqueeze(1)).to(branch.dtype)
        return (
            grad_in.to(x_norm_in.dtype), grad_gate, grad_branch,
            grad_shift.to(scale.dtype), grad_scale.to(scale.dtype), None, None, None,
        )


class _EmbedAdaLNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e, gamma, beta, embed_eps, pos, shift, scale, eps, out_dtype, rms):
        x, y, stats = _launch(e, shift, scale, eps, out_dtype, embed=(gamma, beta, pos, embed_eps), rms=rms)
        ctx.save_for_backward(e, x, stats, gamma, scale)
        ctx.beta_dtype = beta.dtype
        ctx.rms = rms
        return x, y

    @staticmethod
    def backward(ctx, grad_x, grad_y):
        e, x, stats, gamma, scale = ctx.saved_tensors
        grad_x, grad_shift, grad_scale = _layernorm_modulate_backward(
            x, stats[0], stats[1], scale, grad_y, grad_x, ctx.rms
        )
        ehat = _normalized(e, stats[2], stats[3])
        grad_e = _layernorm_input_grad(grad_x * gamma.float(), ehat, stats[3])
        grad_gamma = (grad_x * ehat).sum(dim=(0, 1)).to(gamma.dtype)
        grad_beta = grad_x.sum(dim=(0, 1)).to(ctx.beta_dtype)
        # pos is normally a buffer; its gradient is computed only when asked for
        grad_pos = grad_x.sum(dim=0) if ctx.needs_input_grad[4] else None
        return (
            grad_e.to(e.dtype), grad_gamma, grad_beta, None, grad_pos,
            grad_shift.to(scale.dtype), grad_scale.to(scale.dtype), None, None, None,
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


def _check_embed(e: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Shape checks of ``embed_layernorm_modulate``'s own inputs; returns pos as (N, H)."""
    if e.dim() != 3:
        raise ValueError(f"expected embeddings of shape (B, N, H), got {tuple(e.shape)}")
    _, N, H = e.shape
    for name, v in (("gamma", gamma), ("beta", beta)):
        if v.shape != (H,):
            raise ValueError(f"the embedding LayerNorm's {name} must have shape ({H},), got {tuple(v.shape)}")
    if pos.shape not in ((N, H), (1, N, H)):
        raise ValueError(f"pos must have shape ({N}, {H}) or (1, {N}, {H}), got {tuple(pos.shape)}")
    return pos.reshape(N, H)


def layernorm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    impl: str = "auto",
    rms: bool = False,
) -> torch.Tensor:
    """LayerNorm(x) (no affine) * (1 + scale) + shift; ``rms``: RMSNorm(x) instead.

    x: (B, N, H); shift, scale: (B, H) -> (B, N, H) in ``out_dtype`` (default x.dtype).
    impl: "auto", "triton" or "torch" (the reference); see ``prdit_fast.ops.dispatch``.
    """
    out_dtype = out_dtype or x.dtype
    if resolve("layernorm_modulate", impl, [x, shift, scale]) != TRITON:
        return layernorm_modulate_reference(x, shift, scale, eps, out_dtype, rms)
    x, shift, scale, _, _ = _prepare(x, shift, scale)
    return _AdaLNFunction.apply(x, None, None, shift, scale, eps, out_dtype, rms)


def gated_residual_layernorm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor,
    branch: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    impl: str = "auto",
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_new = x + gate * branch;  y = LayerNorm(x_new) * (1 + scale) + shift (``rms``: RMSNorm).

    x, branch: (B, N, H); gate, shift, scale: (B, H) -> (x_new in x.dtype, y in
    ``out_dtype``, default x.dtype). impl: as for ``layernorm_modulate``.
    """
    out_dtype = out_dtype or x.dtype
    if resolve("gated_residual_layernorm_modulate", impl, [x, gate, branch, shift, scale]) != TRITON:
        return gated_residual_layernorm_modulate_reference(x, gate, branch, shift, scale, eps, out_dtype, rms)
    x, shift, scale, gate, branch = _prepare(x, shift, scale, gate, branch)
    return _AdaLNFunction.apply(x, gate, branch, shift, scale, eps, out_dtype, rms)


def embed_layernorm_modulate(
    e: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    embed_eps: float,
    pos: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    impl: str = "auto",
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x = LayerNorm(e) * gamma + beta + pos;  y = LayerNorm(x) * (1 + scale) + shift
    (``rms``: RMSNorm(x) in y; the embedding's LayerNorm stays one).

    The patch embedder's affine LayerNorm (eps ``embed_eps``), the positional encoding and
    the first DiT block's adaLN in one pass over e.
    e: (B, N, H) any float dtype; gamma, beta: (H,); pos: (N, H) or (1, N, H), shared by
    the samples; shift, scale: (B, H) -> (x (B, N, H) fp32, the residual stream;
    y (B, N, H) in ``out_dtype``, default e.dtype). impl: as for ``layernorm_modulate``.
    """
    pos = _check_embed(e, gamma, beta, pos)
    out_dtype = out_dtype or e.dtype
    if resolve("embed_layernorm_modulate", impl, [e, gamma, beta, pos, shift, scale]) != TRITON:
        return embed_layernorm_modulate_reference(e, gamma, beta, embed_eps, pos, shift, scale, eps, out_dtype, rms)
    e, shift, scale, _, _ = _prepare(e, shift, scale)
    return _EmbedAdaLNFunction.apply(
        e, gamma.contiguous(), beta.contiguous(), embed_eps, pos.contiguous(), shift, scale, eps, out_dtype, rms
    )


# --------------------------------------------------------------------------- #
# Plain-torch references (CPU path and test oracle)
# --------------------------------------------------------------------------- #
def layernorm_modulate_reference(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    rms: bool = False,
) -> torch.Tensor:
    norm = F.rms_norm if rms else F.layer_norm
    y = modulate(norm(x.float(), x.shape[-1:], eps=eps), shift.float(), scale.float())
    return y.to(out_dtype or x.dtype)


def gated_residual_layernorm_modulate_reference(
    x: torch.Tensor,
    gate: torch.Tensor,
    branch: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    x_new = (x.float() + gate.float().unsqueeze(1) * branch.float()).to(x.dtype)
    return x_new, layernorm_modulate_reference(x_new, shift, scale, eps, out_dtype or x.dtype, rms)


def embed_layernorm_modulate_reference(
    e: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    embed_eps: float,
    pos: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    pos = _check_embed(e, gamma, beta, pos)
    x = F.layer_norm(e.float(), e.shape[-1:], gamma.float(), beta.float(), embed_eps) + pos.float()
    return x, layernorm_modulate_reference(x, shift, scale, eps, out_dtype or e.dtype, rms)
