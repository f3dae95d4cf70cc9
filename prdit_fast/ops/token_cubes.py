"""Output assembly (spec section 6) in Triton: the coarse + fine token sum fused with the
placement of each token's s^3 cube into the volume.

    unpatchify(tokens, size, stride, channels, residual=None)   (B, N, s^3 Cout) -> (B, Cout, S, S, S)

Each token is an s^3 cube laid out (d, h, w, channel), channel fastest; cubes tile the
volume in raster order (depth slowest). ``residual`` (the fine tokens, same shape) is
added to ``tokens`` in fp32 before the placement, so ``unpatchify(a, ..., residual=b)``
equals ``layout.unpatchify(a + b, ...)`` with the sum taken in fp32 and rounded ONCE to
the output dtype (``out_dtype``, default: the promoted dtype of the token tensors; pass
torch.float32 to keep an fp32 volume from bf16 tokens). A pure copy when there is no
residual. Autograd: both token tensors receive the patchify (the inverse permutation) of
the output gradient, in their own dtypes; first-order only.

``cube_token_offset`` (a ``triton.jit`` helper) is the index map shared with the fused
sampler update.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import layout
from .common import autotune_configs, triton_importable
from .dispatch import TRITON, resolve
from .unfold import TRITON_DTYPES

_INT32_LIMIT = 2**31
_MAX_GRID_Y = 65535  # CUDA limit of the grid axis that carries the batch

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def cube_token_offset(m, S: tl.constexpr, STRIDE: tl.constexpr, COUT: tl.constexpr):
        """Offset, within one sample's tokens (N, s^3 Cout), of channel 0 of voxel m
        (m: linear index of (d, h, w) in an S^3 volume)."""
        G: tl.constexpr = S // STRIDE
        d = m // (S * S)
        h = m // S % S
        w = m % S
        token = (d // STRIDE * G + h // STRIDE) * G + w // STRIDE
        within = (d % STRIDE * STRIDE + h % STRIDE) * STRIDE + w % STRIDE
        return token * (STRIDE * STRIDE * STRIDE * COUT) + within * COUT

    @triton.autotune(
        # the interpreter pays per operation, not per element: few, large programs there
        configs=autotune_configs(interpreted=[triton.Config({"BLOCK_M": 16384}, num_warps=4)], tuned=[
            triton.Config({"BLOCK_M": 1024}, num_warps=4),
            triton.Config({"BLOCK_M": 2048}, num_warps=4),
            triton.Config({"BLOCK_M": 2048}, num_warps=8),
            triton.Config({"BLOCK_M": 4096}, num_warps=8),
        ]),
        key=["S", "STRIDE", "COUT", "TO_VOLUME"],
    )
    @triton.jit
    def _cube_copy_kernel(
        TOK, RES, VOL,
        S: tl.constexpr, STRIDE: tl.constexpr, COUT: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr, TO_VOLUME: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        # BLOCK_M voxels of one sample, every channel: volume accesses are contiguous along
        # m; token accesses are runs of s voxels at stride Cout (the other channels of the
        # same runs are read by the same program, from L1)
        VOLUME: tl.constexpr = S * S * S
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        b = tl.program_id(1).to(tl.int64)
        ok = m < VOLUME
        tok_offset = b * (VOLUME * COUT) + cube_token_offset(m, S, STRIDE, COUT)
        vol_offset = b * (VOLUME * COUT) + m
        for c in tl.static_range(COUT):
            if TO_VOLUME:
                v = tl.load(TOK + tok_offset + c, mask=ok).to(tl.float32)
                if HAS_RESIDUAL:
                    v += tl.load(RES + tok_offset + c, mask=ok).to(tl.float32)
                tl.store(VOL + vol_offset + c * VOLUME, v.to(VOL.dtype.element_ty), mask=ok)
            else:
                v = tl.load(VOL + vol_offset + c * VOLUME, mask=ok)
                tl.store(TOK + tok_offset + c, v.to(TOK.dtype.element_ty), mask=ok)


def _launch(tokens, residual, volume, size: int, stride: int, channels: int, to_volume: bool) -> None:
    """Copy between contiguous tokens (B, N, s^3 Cout) and a contiguous volume (B, Cout, S^3)."""
    B = volume.shape[0]
    if volume.numel() == 0:
        return

    def grid(meta):
        return (triton.cdiv(size**3, meta["BLOCK_M"]), B)

    _cube_copy_kernel[grid](
        tokens, residual if residual is not None else tokens, volume,
        S=size, STRIDE=stride, COUT=channels, HAS_RESIDUAL=residual is not None, TO_VOLUME=to_volume,
    )


class _UnpatchifyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, residual, size, stride, channels, out_dtype):
        ctx.geometry = (size, stride, channels)
        ctx.dtypes = (tokens.dtype, residual.dtype if residual is not None else None)
        volume = torch.empty((tokens.shape[0], channels, size, size, size), device=tokens.device, dtype=out_dtype)
        _launch(tokens, residual, volume, size, stride, channels, to_volume=True)
        return volume

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_volume):
        size, stride, channels = ctx.geometry
        tokens_dtype, residual_dtype = ctx.dtypes
        needs_tokens, needs_residual = ctx.needs_input_grad[:2]
        grad = torch.empty(
            (grad_volume.shape[0], (size // stride) ** 3, stride**3 * channels),
            device=grad_volume.device, dtype=tokens_dtype,
        )
        _launch(grad, None, grad_volume.contiguous(), size, stride, channels, to_volume=False)
        grad_residual = None
        if needs_residual:
            grad_residual = grad if residual_dtype == tokens_dtype else grad.to(residual_dtype)
        return grad if needs_tokens else None, grad_residual, None, None, None, None


def unpatchify(
    tokens: torch.Tensor,
    size: int,
    stride: int,
    channels: int,
    residual: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Place each token's s^3 cube (channel fastest) into the volume, after adding ``residual``.

    tokens, residual: (B, (S/s)^3, s^3 Cout) -> (B, Cout, S, S, S) in ``out_dtype``
    (default: torch.promote_types of the two token dtypes). The sum is fp32, rounded once.
    ``impl``: "auto" (Triton where it runs, else ``layout.unpatchify``), "triton" or
    "torch"; see ``prdit_fast.ops.dispatch``. Differentiable with respect to both token tensors.
    """
    layout.validate_tiling(size, stride, stride, 0)
    N, width = (size // stride) ** 3, stride**3 * channels
    if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (N, width):
        raise ValueError(
            f"unpatchify to a {size}^3 volume of {channels} channels with stride {stride} expects tokens "
            f"(B, {N}, {width}), got shape {tuple(tokens.shape)}"
        )
    if residual is not None and residual.shape != tokens.shape:
        raise ValueError(f"residual must have the tokens' shape {tuple(tokens.shape)}, got {tuple(residual.shape)}")
    if out_dtype is None:
        out_dtype = tokens.dtype if residual is None else torch.promote_types(tokens.dtype, residual.dtype)
    operands = [tokens] if residual is None else [tokens, residual]
    limits = None
    if any(t.dtype not in TRITON_DTYPES for t in operands) or out_dtype not in TRITON_DTYPES:
        limits = f"dtypes must be among {TRITON_DTYPES}"
    elif N * width >= _INT32_LIMIT:
        limits = "one sample spans 2^31 elements or more (the kernel indexes a sample with int32)"
    elif tokens.shape[0] > _MAX_GRID_Y:
        limits = f"batch {tokens.shape[0]} exceeds {_MAX_GRID_Y}"
    if resolve("unpatchify", impl, operands, limits) != TRITON:
        total = tokens.float() if residual is None else tokens.float() + residual.float()
        return layout.unpatchify(total.to(out_dtype), size, stride, channels)
    return _UnpatchifyFunction.apply(
        tokens.contiguous(), residual.contiguous() if residual is not None else None, size, stride, channels, out_dtype
    )
