"""Overlapping 3D patch extraction (spec section 3) and its exact adjoint, in Triton.

    unfold3d(x, patch, stride, pad)                    (B, C, D, H, W) -> (B, N, C p^3)
    fold3d(tokens, size, patch, stride, pad, reduce)   (B, N, C p^3)   -> (B, C, D, H, W)

``unfold3d`` is ``layout.unfold3d`` without the padded copy: the reflect padding is index
math (a mirrored coordinate), tokens are in raster order of the window grid (depth
slowest) and each window is flattened (channel, d, h, w). It is a pure copy (exact in
every dtype); ``out_dtype`` casts on the store, e.g. fp32 volume -> bf16 tokens in one pass.

``fold3d`` is the adjoint: every token entry is added back onto the voxel it was read from,
so entries read from the mirrored padding land on the interior voxels they mirror.
It is a GATHER, not a scatter: each output voxel enumerates its own contributions (per
axis: the padded positions that reflect onto it, times the windows covering each), so
it is deterministic and needs no atomics. Sums are fp32, rounded once to ``out_dtype``
(default: the tokens' dtype). ``reduce="mean"`` divides each voxel by its number of contributions, so
``fold3d(unfold3d(x), ..., reduce="mean") == x`` (the overlap-averaged reconstruction).

Autograd: the backward of unfold3d is fold3d (sum) and vice versa (for "mean" the
gradient is divided by the counts before unfolding), each gradient in its input's dtype;
both are built from the two Functions, so higher-order gradients work too.

Volumes may have distinct D, H, W; each edge must satisfy ``layout.validate_tiling``.
The Triton path covers fp32 / bf16 / fp16 with per-sample offsets below 2^31 and up to
65535 samples; otherwise ``impl="auto"`` uses the plain-torch reference
(``layout.unfold3d`` and ``fold3d_reference``). When the windows tile without overlap
(patch == stride, pad 0: the stride-16 256^3 models) there is nothing to mirror or
overlap-add: ``impl="auto"`` then runs the torch implementation, which is
``blocked_unfold3d``, one permuted copy (cast on the store) whose autograd is the
inverse permutation; an explicit ``impl="triton"`` still runs the kernel.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from .. import layout
from .common import autotune_configs, triton_importable
from .dispatch import TRITON, resolve

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32_LIMIT = 2**31
_MAX_GRID_Z = 65535  # CUDA limit of the grid axis that carries the batch
_FOLD_W_SLOTS = 3  # contributions per voxel along w that the fold kernel unrolls

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _reflect(i, size: tl.constexpr):
        # F.pad(mode="reflect") for -size < i < 2 size - 1: mirror without repeating the edge
        i = tl.where(i < 0, -i, i)
        return tl.minimum(i, 2 * size - 2 - i)

    # A program copies BLOCK_T tokens, looping over the window rows (channel, kd, kh): per
    # row, P consecutive voxels along w land on P consecutive token entries. The index math
    # of a token (its window origin, the mirrored w coordinates) is done once, outside the
    # loop, and a row's reflect in d and h once per row; what remains per element is an
    # address add, the load and the store: a tile of flat token columns, recovering
    # (c, kd, kh, kw) from the column by division per element, made the copy
    # instruction-bound (SASS counts: benchmarks/results/design-notes.md). Under the
    # interpreter, which pays per operation, the same kernel with the largest token block.
    @triton.autotune(
        configs=autotune_configs(interpreted=[triton.Config({"BLOCK_T": 128}, num_warps=4)], tuned=[
            triton.Config({"BLOCK_T": 64}, num_warps=4),
            triton.Config({"BLOCK_T": 32}, num_warps=2),
            triton.Config({"BLOCK_T": 32}, num_warps=4),
            triton.Config({"BLOCK_T": 128}, num_warps=4),
            triton.Config({"BLOCK_T": 128}, num_warps=8),
        ]),
        key=["C", "D", "H", "W", "P"],
    )
    @triton.jit
    def _unfold3d_kernel(
        X, OUT, stride_b, stride_c, stride_d, stride_h, stride_w,
        C: tl.constexpr, D: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
        P: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        # [BLOCK_T tokens, BLOCK_P >= P window columns kw] of one sample per loop step;
        # offsets within a sample are int32, the sample base is int64
        GH: tl.constexpr = H // STRIDE
        GW: tl.constexpr = W // STRIDE
        N: tl.constexpr = (D // STRIDE) * GH * GW
        WIDTH: tl.constexpr = C * P * P * P
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        kw = tl.arange(0, BLOCK_P)
        b = tl.program_id(1).to(tl.int64)
        mask = (t < N)[:, None] & (kw < P)[None, :]
        d0 = (t // (GH * GW)) * STRIDE - PAD  # window origin in unpadded coordinates
        h0 = (t // GW % GH) * STRIDE - PAD
        w = _reflect(((t % GW) * STRIDE - PAD)[:, None] + kw[None, :], W)
        src = X + b * stride_b + w * stride_w
        dst = OUT + b * (N * WIDTH) + t[:, None] * WIDTH + kw[None, :]
        for c in range(C):
            for kd in range(P):
                plane = c * stride_c + _reflect(d0 + kd, D) * stride_d
                for kh in range(P):
                    row = plane + _reflect(h0 + kh, H) * stride_h
                    vals = tl.load(src + row[:, None], mask=mask)
                    tl.store(dst + ((c * P + kd) * P + kh) * P, vals.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _covering_windows(i, G: tl.constexpr, P: tl.constexpr, STRIDE: tl.constexpr):
        # windows g with g*STRIDE <= i < g*STRIDE + P, 0 <= g < G: (first g, count)
        last = tl.minimum(i // STRIDE, G - 1)
        first = tl.where(i >= P, (i - P + STRIDE) // STRIDE, 0)
        return first, tl.maximum(last - first + 1, 0)

    @triton.jit
    def _axis_sources(x, SIZE: tl.constexpr, P: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr):
        # The padded positions that reflect onto coordinate x (itself, its mirror in the
        # front padding, its mirror in the back padding) and, for each, the first window
        # covering it and how many windows do (0 where that mirror does not exist).
        G: tl.constexpr = SIZE // STRIDE
        i0 = x + PAD
        i1 = PAD - x
        i2 = 2 * SIZE - 2 - x + PAD
        first0, n0 = _covering_windows(i0, G, P, STRIDE)
        first1, n1 = _covering_windows(i1, G, P, STRIDE)
        first2, n2 = _covering_windows(i2, G, P, STRIDE)
        n1 = tl.where((x >= 1) & (x <= PAD), n1, 0)
        n2 = tl.where((x >= SIZE - 1 - PAD) & (x <= SIZE - 2), n2, 0)
        return i0, first0, n0, i1, first1, n1, i2, first2, n2

    @triton.jit
    def _axis_slot(j, i0, first0, n0, i1, first1, n1, i2, first2, n2, STRIDE: tl.constexpr):
        # the j-th contribution along one axis: (window index, offset in the window, exists)
        in0 = j < n0
        in01 = j < n0 + n1
        g = tl.where(in0, first0 + j, tl.where(in01, first1 + j - n0, first2 + j - n0 - n1))
        i = tl.where(in0, i0, tl.where(in01, i1, i2))
        return g, i - g * STRIDE, j < n0 + n1 + n2

    # A program is a [BLOCK_H, BLOCK_W >= W] tile of one (channel, d) plane of one sample.
    # Contributions are separable per axis: d's are scalars of the program, h's are
    # vectors over the tile's rows and w's over its columns, and every table is computed
    # once, before the loops; the w slots are unrolled (at most _FOLD_W_SLOTS per voxel), so
    # the loop body is address adds, masked loads and fp32 adds, instead of each loop step
    # recomputing its w slot from the per-voxel source lists (SASS counts:
    # benchmarks/results/design-notes.md).
    @triton.autotune(
        configs=autotune_configs(interpreted=[triton.Config({"BLOCK_H": 64}, num_warps=4)], tuned=[
            triton.Config({"BLOCK_H": 8}, num_warps=4),
            triton.Config({"BLOCK_H": 4}, num_warps=4),
            triton.Config({"BLOCK_H": 16}, num_warps=8),
            triton.Config({"BLOCK_H": 8}, num_warps=8),
            triton.Config({"BLOCK_H": 2}, num_warps=2),
        ]),
        key=["C", "D", "H", "W", "P"],
    )
    @triton.jit
    def _fold3d_kernel(
        TOK, OUT,
        C: tl.constexpr, D: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
        P: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, MEAN: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        GH: tl.constexpr = H // STRIDE
        GW: tl.constexpr = W // STRIDE
        N: tl.constexpr = (D // STRIDE) * GH * GW
        WIDTH: tl.constexpr = C * P * P * P
        plane = tl.program_id(0)  # c * D + d
        c = plane // D
        d = plane % D
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        w = tl.arange(0, BLOCK_W)
        b = tl.program_id(2).to(tl.int64)
        h_ok = h < H
        w_ok = w < W
        d_i0, d_f0, d_n0, d_i1, d_f1, d_n1, d_i2, d_f2, d_n2 = _axis_sources(d, D, P, STRIDE, PAD)
        h_i0, h_f0, h_n0, h_i1, h_f1, h_n1, h_i2, h_f2, h_n2 = _axis_sources(h, H, P, STRIDE, PAD)
        w_i0, w_f0, w_n0, w_i1, w_f1, w_n1, w_i2, w_f2, w_n2 = _axis_sources(w, W, P, STRIDE, PAD)
        nd = d_n0 + d_n1 + d_n2
        nh = h_n0 + h_n1 + h_n2
        nw = w_n0 + w_n1 + w_n2
        # the w slots of every column, once: token column offset and whether it exists
        gw, kw, vw = _axis_slot(0, w_i0, w_f0, w_n0, w_i1, w_f1, w_n1, w_i2, w_f2, w_n2, STRIDE)
        col0, ok0 = gw * WIDTH + kw, w_ok & vw
        gw, kw, vw = _axis_slot(1, w_i0, w_f0, w_n0, w_i1, w_f1, w_n1, w_i2, w_f2, w_n2, STRIDE)
        col1, ok1 = gw * WIDTH + kw, w_ok & vw
        gw, kw, vw = _axis_slot(2, w_i0, w_f0, w_n0, w_i1, w_f1, w_n1, w_i2, w_f2, w_n2, STRIDE)
        col2, ok2 = gw * WIDTH + kw, w_ok & vw
        w_slots = tl.max(tl.where(w_ok, nw, 0), axis=0)
        tok = TOK + b * (N * WIDTH) + c * (P * P * P)
        acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
        for jd in range(0, nd):
            gd, kd, _ = _axis_slot(jd, d_i0, d_f0, d_n0, d_i1, d_f1, d_n1, d_i2, d_f2, d_n2, STRIDE)
            for jh in range(0, tl.max(tl.where(h_ok, nh, 0), axis=0)):
                gh, kh, vh = _axis_slot(jh, h_i0, h_f0, h_n0, h_i1, h_f1, h_n1, h_i2, h_f2, h_n2, STRIDE)
                row = tok + ((gd * GH + gh) * (GW * WIDTH) + kd * (P * P) + kh * P)[:, None]
                row_ok = (h_ok & vh)[:, None]
                acc += tl.load(row + col0[None, :], mask=row_ok & ok0[None, :], other=0.0).to(tl.float32)
                if w_slots > 1:
                    acc += tl.load(row + col1[None, :], mask=row_ok & ok1[None, :], other=0.0).to(tl.float32)
                if w_slots > 2:
                    acc += tl.load(row + col2[None, :], mask=row_ok & ok2[None, :], other=0.0).to(tl.float32)
        if MEAN:
            acc = acc / tl.maximum(nd * (nh[:, None] * nw[None, :]), 1).to(tl.float32)
        dst = b * (C * D * H * W) + plane * (H * W) + h[:, None] * W + w[None, :]
        tl.store(OUT + dst, acc.to(OUT.dtype.element_ty), mask=h_ok[:, None] & w_ok[None, :])


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #
def _grid_counts(size: tuple[int, int, int], stride: int) -> int:
    D, H, W = size
    return (D // stride) * (H // stride) * (W // stride)


def _launch_unfold(x: torch.Tensor, patch: int, stride: int, pad: int, out_dtype: torch.dtype) -> torch.Tensor:
    """x: (B, C, D, H, W), any strides -> (B, N, C p^3) contiguous."""
    B, C, D, H, W = x.shape
    N, width = _grid_counts((D, H, W), stride), C * patch**3
    out = torch.empty((B, N, width), device=x.device, dtype=out_dtype)
    if out.numel() == 0:
        return out

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_T"]), B)

    _unfold3d_kernel[grid](
        x, out, *x.stride(), C=C, D=D, H=H, W=W, P=patch, STRIDE=stride, PAD=pad, BLOCK_P=triton.next_power_of_2(patch)
    )
    return out


def _launch_fold(
    tokens: torch.Tensor, size: tuple[int, int, int], patch: int, stride: int, pad: int, mean: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """tokens: (B, N, C p^3) -> (B, C, D, H, W) contiguous (fp32 sums, rounded once)."""
    tokens = tokens.contiguous()
    B, _, width = tokens.shape
    C = width // patch**3
    D, H, W = size
    out = torch.empty((B, C, D, H, W), device=tokens.device, dtype=out_dtype)
    if out.numel() == 0:
        return out

    def grid(meta):
        return (C * D, triton.cdiv(H, meta["BLOCK_H"]), B)

    _fold3d_kernel[grid](
        tokens, out, C=C, D=D, H=H, W=W, P=patch, STRIDE=stride, PAD=pad, MEAN=mean, BLOCK_W=triton.next_power_of_2(W)
    )
    return out


def _fold_counts(device: torch.device, size: tuple[int, int, int], patch: int, stride: int, pad: int) -> torch.Tensor:
    """(1, 1, D, H, W) fp32: how many token entries each voxel contributes to."""
    ones = torch.ones((1, _grid_counts(size, stride), patch**3), device=device, dtype=torch.float32)
    return _launch_fold(ones, size, patch, stride, pad, False, torch.float32)


class _Unfold3dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, patch, stride, pad, out_dtype):
        ctx.geometry = (tuple(x.shape[2:]), patch, stride, pad, x.dtype)
        return _launch_unfold(x, patch, stride, pad, out_dtype)

    @staticmethod
    def backward(ctx, grad_tokens):
        size, patch, stride, pad, x_dtype = ctx.geometry
        return _Fold3dFunction.apply(grad_tokens, size, patch, stride, pad, False, x_dtype), None, None, None, None


class _Fold3dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, size, patch, stride, pad, mean, out_dtype):
        ctx.geometry = (size, patch, stride, pad, mean, tokens.dtype)
        return _launch_fold(tokens, size, patch, stride, pad, mean, out_dtype)

    @staticmethod
    def backward(ctx, grad_volume):
        size, patch, stride, pad, mean, tokens_dtype = ctx.geometry
        if mean:
            counts = _fold_counts(grad_volume.device, size, patch, stride, pad)
            grad_volume = grad_volume.float() / counts
        grad_tokens = _Unfold3dFunction.apply(grad_volume, patch, stride, pad, tokens_dtype)
        return grad_tokens, None, None, None, None, None, None


# --------------------------------------------------------------------------- #
# Functional API
# --------------------------------------------------------------------------- #
def _as_size(size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(size, int):
        return (size, size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 3:
        raise ValueError(f"size must be an int or (D, H, W), got {size!r}")
    return size


def _validate(size: tuple[int, int, int], patch: int, stride: int, pad: int) -> None:
    for edge in size:
        layout.validate_tiling(edge, patch, stride, pad)


@functools.lru_cache(maxsize=None)
def _most_contributions(edge: int, patch: int, stride: int, pad: int) -> int:
    """The most token entries that fold onto one voxel along an axis of length ``edge``:
    every padded position reflects onto a voxel and lies in the windows that cover it."""
    counts = [0] * edge
    for position in range(edge + 2 * pad):
        voxel = abs(position - pad)
        voxel = min(voxel, 2 * edge - 2 - voxel)
        counts[voxel] += sum(1 for g in range(edge // stride) if g * stride <= position < g * stride + patch)
    return max(counts)


def _kernel_limits(
    dtypes: tuple[torch.dtype, torch.dtype], batch: int, sample_extent: int, sample_tokens: int
) -> str | None:
    """Why the Triton kernels cannot take these tensors (input and output dtypes, sizes), or None."""
    if any(dtype not in TRITON_DTYPES for dtype in dtypes):
        return f"dtypes {dtypes} are not all among {TRITON_DTYPES}"
    if max(sample_extent, sample_tokens) >= _INT32_LIMIT:
        return "one sample spans 2^31 elements or more (the kernels index a sample with int32)"
    if batch > _MAX_GRID_Z:
        return f"batch {batch} exceeds {_MAX_GRID_Z}"
    return None


def blocked_unfold3d(x: torch.Tensor, patch: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``unfold3d`` for windows that tile without overlap (stride = patch, pad 0): a view
    of x as (B, gd, gh, gw, C, p, p, p) and ONE copy into that contiguous layout, in
    ``out_dtype`` (default x.dtype). x: (B, C, D, H, W), edges divisible by ``patch`` ->
    (B, N, C p^3). Exact; differentiable (the gradient is the inverse permutation)."""
    _validate(tuple(x.shape[2:]), patch, patch, 0)
    B, C, D, H, W = x.shape
    p = patch
    windows = x.reshape(B, C, D // p, p, H // p, p, W // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    out = torch.empty(windows.shape, device=x.device, dtype=out_dtype or x.dtype)
    out.copy_(windows)
    return out.view(B, (D // p) * (H // p) * (W // p), C * p**3)


def unfold3d(
    x: torch.Tensor, patch: int, stride: int, pad: int, *, out_dtype: torch.dtype | None = None, impl: str = "auto"
) -> torch.Tensor:
    """Overlapping windows of the reflect-padded volume, as tokens.

    x: (B, C, D, H, W) fp32 / bf16 / fp16, any strides -> (B, N, C p^3) in ``out_dtype``
    (default x.dtype; e.g. fp32 volume -> bf16 tokens in one pass), N = (D/s)(H/s)(W/s),
    tokens in raster order (depth slowest), each window flattened (channel, d, h, w).
    ``impl``: "auto" (Triton where it runs, else the torch implementation: ``blocked_unfold3d``
    for patch == stride, pad 0, else ``layout.unfold3d``), "triton" or "torch"; see
    ``prdit_fast.ops.dispatch``. Differentiable (the gradient comes back in x.dtype).
    """
    if x.dim() != 5:
        raise ValueError(f"unfold3d expects a volume (B, C, D, H, W), got shape {tuple(x.shape)}")
    _validate(tuple(x.shape[2:]), patch, stride, pad)
    B, C = x.shape[:2]
    extent = 1 + sum((n - 1) * s for n, s in zip(x.shape[1:], x.stride()[1:]))
    out_dtype = out_dtype or x.dtype
    limits = _kernel_limits((x.dtype, out_dtype), B, extent, _grid_counts(tuple(x.shape[2:]), stride) * C * patch**3)
    blocked = patch == stride and pad == 0
    if limits is None and blocked and impl == "auto":
        limits = "the windows tile without overlap (patch == stride, pad 0): a blocked copy, no kernel needed"
    if resolve("unfold3d", impl, [x], limits) == TRITON:
        return _Unfold3dFunction.apply(x, patch, stride, pad, out_dtype)
    if blocked:
        return blocked_unfold3d(x, patch, out_dtype)
    return layout.unfold3d(x, patch, stride, pad).to(out_dtype)


def fold3d(
    tokens: torch.Tensor,
    size: int | Sequence[int],
    patch: int,
    stride: int,
    pad: int,
    reduce: str = "sum",
    *,
    out_dtype: torch.dtype | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """The adjoint of ``unfold3d``: overlap-add of the windows, padding folded back.

    tokens: (B, N, C p^3) -> (B, C, D, H, W) in ``out_dtype`` (default tokens.dtype),
    summed in fp32 and rounded once; ``size`` is S or (D, H, W). reduce="sum" is the exact adjoint (the gradient of
    unfold3d); reduce="mean" divides each voxel by its number of contributions, so it
    inverts unfold3d. ``impl`` as in ``unfold3d``. Differentiable.
    """
    size = _as_size(size)
    _validate(size, patch, stride, pad)
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    N = _grid_counts(size, stride)
    if tokens.dim() != 3 or tokens.shape[1] != N or tokens.shape[2] % patch**3 or tokens.shape[2] == 0:
        raise ValueError(
            f"fold3d of a {size} volume with patch {patch}, stride {stride} expects tokens "
            f"(B, {N}, C*{patch ** 3}), got shape {tuple(tokens.shape)}"
        )
    C = tokens.shape[2] // patch**3
    out_dtype = out_dtype or tokens.dtype
    volume = C * size[0] * size[1] * size[2]
    limits = _kernel_limits((tokens.dtype, out_dtype), tokens.shape[0], volume, N * tokens.shape[2])
    if limits is None and _most_contributions(size[2], patch, stride, pad) > _FOLD_W_SLOTS:
        limits = f"more than {_FOLD_W_SLOTS} windows overlap along the width (the kernel unrolls that many)"
    if resolve("fold3d", impl, [tokens], limits) == TRITON:
        return _Fold3dFunction.apply(tokens, size, patch, stride, pad, reduce == "mean", out_dtype)
    return fold3d_reference(tokens, size, patch, stride, pad, reduce, out_dtype=out_dtype)


def fold3d_reference(
    tokens: torch.Tensor,
    size: int | Sequence[int],
    patch: int,
    stride: int,
    pad: int,
    reduce: str = "sum",
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain-torch fold3d: unfolding a volume of voxel indices with ``layout.unfold3d``
    says where each token entry came from; a scatter-add (fp32) puts it back.
    Same shapes and dtypes as ``fold3d``; differentiable."""
    D, H, W = _as_size(size)
    B, _, width = tokens.shape
    C = width // patch**3
    numel = C * D * H * W
    # float64 holds voxel indices exactly (reflect padding has no integer kernel on every device)
    voxel = torch.arange(numel, device=tokens.device, dtype=torch.float64).view(1, C, D, H, W)
    source = layout.unfold3d(voxel, patch, stride, pad).long().reshape(-1)
    out = torch.zeros((B, numel), device=tokens.device, dtype=torch.float32)
    out = out.scatter_add(1, source.expand(B, -1), tokens.reshape(B, -1).float())
    if reduce == "mean":
        out = out / torch.bincount(source, minlength=numel).float()
    return out.view(B, C, D, H, W).to(out_dtype or tokens.dtype)
