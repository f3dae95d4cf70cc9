"""PRDiT-SR output assembly (spec section 8) in Triton: the base's low-resolution
prediction upsampled and added to the head's tokens in one pass, so the upsampled
prediction never exists as a full-resolution tensor of its own.

    sr_assemble(base, size, stride, head=None, to="volume")
        base (B, 2C, S_lo^3) fp32: the base's [eps_lo, x0_lo]; head (B, N', s'^3 2C) or None
        to="volume": (B, 2C, S^3) fp32 = unpatchify(head) + up(base)
        to="tokens": (B, N', s'^3 2C) fp32 = head + up(base) in the head's token layout
                     (what the engine's fused sampler update reads)

``up`` is ``prdit_fast.layout.upsample_prediction``: eps nearest (voxel i reads i // f), x0
trilinear with align_corners=False (source coordinate (i + 0.5) S_lo / S - 0.5, clamped
at 0; the upper neighbour clamped at S_lo - 1), f = S / S_lo an integer. Token layout as
``unpatchify``: s'^3 cubes, (d, h, w, channel) channel fastest, raster order.

Inference only (no autograd): ``FastPRDiTSR`` uses it where no gradient is needed and the
plain-torch composition otherwise. Triton covers fp32 base volumes with per-sample sizes
below 2^31 elements; "auto" takes the plain-torch reference elsewhere.
"""
from __future__ import annotations

import torch

from ..layout import unpatchify, upsample_prediction, volume_to_tokens
from .common import triton_importable
from .dispatch import TRITON, resolve

_INT32_LIMIT = 2**31
_MAX_GRID_Y = 65535
_TARGETS = ("volume", "tokens")

if triton_importable():
    import triton
    import triton.language as tl

    from .token_cubes import cube_token_offset

    @triton.jit
    def _trilinear_axis(i, SCALE: tl.constexpr, S_LO: tl.constexpr):
        # source index pair and weights along one axis, as upsample_trilinear3d computes them
        src = tl.maximum((i.to(tl.float32) + 0.5) * SCALE - 0.5, 0.0)
        i0 = src.to(tl.int32)  # floor: src >= 0
        i1 = tl.where(i0 < S_LO - 1, i0 + 1, i0)
        l1 = src - i0.to(tl.float32)
        return i0, i1, 1.0 - l1, l1

    @triton.jit
    def upsampled_base(BASE, b, c, m, ok, S: tl.constexpr, S_LO: tl.constexpr, SCALE: tl.constexpr,
                       C: tl.constexpr):
        """(eps, x0) fp32 of channel c at voxels m (linear (d, h, w) of S^3) of sample b: the
        base's [eps_lo, x0_lo] (B, 2C, S_LO^3) fp32 upsampled, eps nearest, x0 trilinear.
        Shared by the assembly kernel and the sampler update (``ops.sampling``)."""
        F: tl.constexpr = S // S_LO
        V_LO: tl.constexpr = S_LO * S_LO * S_LO
        d = m // (S * S)
        h = m // S % S
        w = m % S
        nearest = (d // F * S_LO + h // F) * S_LO + w // F
        d0, d1, ld0, ld1 = _trilinear_axis(d, SCALE, S_LO)
        h0, h1, lh0, lh1 = _trilinear_axis(h, SCALE, S_LO)
        w0, w1, lw0, lw1 = _trilinear_axis(w, SCALE, S_LO)
        eps_plane = BASE + (b * 2 * C + c) * V_LO
        x0_plane = BASE + (b * 2 * C + C + c) * V_LO
        eps = tl.load(eps_plane + nearest, mask=ok)
        r00 = (d0 * S_LO + h0) * S_LO
        r01 = (d0 * S_LO + h1) * S_LO
        r10 = (d1 * S_LO + h0) * S_LO
        r11 = (d1 * S_LO + h1) * S_LO
        x0 = ld0 * (
            lh0 * (lw0 * tl.load(x0_plane + r00 + w0, mask=ok) + lw1 * tl.load(x0_plane + r00 + w1, mask=ok))
            + lh1 * (lw0 * tl.load(x0_plane + r01 + w0, mask=ok) + lw1 * tl.load(x0_plane + r01 + w1, mask=ok))
        ) + ld1 * (
            lh0 * (lw0 * tl.load(x0_plane + r10 + w0, mask=ok) + lw1 * tl.load(x0_plane + r10 + w1, mask=ok))
            + lh1 * (lw0 * tl.load(x0_plane + r11 + w0, mask=ok) + lw1 * tl.load(x0_plane + r11 + w1, mask=ok))
        )
        return eps, x0

    @triton.jit
    def _sr_assemble_kernel(
        BASE, HEAD, OUT,
        S: tl.constexpr, S_LO: tl.constexpr, SCALE: tl.constexpr, STRIDE: tl.constexpr, C: tl.constexpr,
        HAS_HEAD: tl.constexpr, TO_VOLUME: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        VOLUME: tl.constexpr = S * S * S
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        b = tl.program_id(1).to(tl.int64)
        ok = m < VOLUME
        tok_offset = b * (VOLUME * 2 * C) + cube_token_offset(m, S, STRIDE, 2 * C)
        for c in tl.static_range(C):
            eps, x0 = upsampled_base(BASE, b, c, m, ok, S, S_LO, SCALE, C)
            if HAS_HEAD:
                eps += tl.load(HEAD + tok_offset + c, mask=ok).to(tl.float32)
                x0 += tl.load(HEAD + tok_offset + C + c, mask=ok).to(tl.float32)
            if TO_VOLUME:
                tl.store(OUT + (b * 2 * C + c) * VOLUME + m, eps, mask=ok)
                tl.store(OUT + (b * 2 * C + C + c) * VOLUME + m, x0, mask=ok)
            else:
                tl.store(OUT + tok_offset + c, eps, mask=ok)
                tl.store(OUT + tok_offset + C + c, x0, mask=ok)


def check_base(base: torch.Tensor, size: int, stride: int) -> None:
    """ValueError unless ``base`` is a cubic (B, 2C, S_lo^3) prediction that upsamples to ``size``^3 by an
    integer factor > 1, with ``size`` a multiple of ``stride``."""
    if base.dim() != 5 or base.shape[1] % 2 or len(set(base.shape[2:])) != 1:
        raise ValueError(f"base must be a cubic (B, 2C, S_lo, S_lo, S_lo) prediction, got {tuple(base.shape)}")
    lo = base.shape[-1]
    if size % lo or size == lo or size % stride:
        raise ValueError(f"size {size} must be a multiple (> 1) of the base edge {lo} and of the stride {stride}")


def sr_assemble_reference(
    base: torch.Tensor, size: int, stride: int, head: torch.Tensor | None = None, to: str = "volume"
) -> torch.Tensor:
    """The plain-torch composition ``sr_assemble`` fuses (the numerical truth)."""
    channels = base.shape[1]
    up = upsample_prediction(base.float(), size, channels // 2)
    if head is not None:
        up = up + unpatchify(head.float(), size, stride, channels)
    return up if to == "volume" else volume_to_tokens(up, stride)


def sr_assemble(
    base: torch.Tensor,
    size: int,
    stride: int,
    head: torch.Tensor | None = None,
    to: str = "volume",
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Upsample the base's [eps_lo, x0_lo] (B, 2C, S_lo^3) to ``size``^3 and add the head's
    tokens (B, N', ``stride``^3 2C) when given; ``to`` "volume" -> (B, 2C, S^3) fp32,
    "tokens" -> (B, N', stride^3 2C) fp32. ``impl``: "auto", "triton" or "torch"
    (``prdit_fast.ops.dispatch``). No autograd."""
    if to not in _TARGETS:
        raise ValueError(f"to must be one of {_TARGETS}, got {to!r}")
    check_base(base, size, stride)
    B, channels, lo = base.shape[0], base.shape[1], base.shape[-1]
    tokens_shape = (B, (size // stride) ** 3, stride**3 * channels)
    if head is not None and tuple(head.shape) != tokens_shape:
        raise ValueError(f"head tokens must have shape {tokens_shape}, got {tuple(head.shape)}")
    operands = [base] if head is None else [base, head]
    limits = None
    if base.dtype != torch.float32 or (head is not None and head.dtype not in (torch.float32, torch.bfloat16, torch.float16)):
        limits = "the base prediction must be fp32 (head tokens fp32 / bf16 / fp16)"
    elif channels * size**3 >= _INT32_LIMIT:
        limits = "one sample spans 2^31 elements or more (the kernel indexes a sample with int32)"
    elif B > _MAX_GRID_Y:
        limits = f"batch {B} exceeds {_MAX_GRID_Y}"
    if resolve("sr_assemble", impl, operands, limits) != TRITON:
        return sr_assemble_reference(base, size, stride, head, to)
    shape = (B, channels, size, size, size) if to == "volume" else tokens_shape
    out = torch.empty(shape, device=base.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    base = base.contiguous()
    head = head.contiguous() if head is not None else None
    block = 4096 if base.is_cuda else 16384  # the interpreter pays per operation: few large programs

    def grid(meta):
        return (triton.cdiv(size**3, meta["BLOCK_M"]), B)

    _sr_assemble_kernel[grid](
        base, head if head is not None else base, out,
        S=size, S_LO=lo, SCALE=lo / size, STRIDE=stride, C=channels // 2,
        HAS_HEAD=head is not None, TO_VOLUME=to == "volume", BLOCK_M=block,
    )
    return out
