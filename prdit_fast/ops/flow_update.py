"""The fused flow-matching update (spec section 14): one pass from the network's velocity
tokens to the solver's next state.

One launch per network evaluation reads the velocity tokens (B, N, s^3 C) (plus an optional
``residual`` token tensor, summed in fp32 as in ``unpatchify``), the state ``x`` and, for
the multi-evaluation solvers, an accumulator ``acc`` (all (B, C, S, S, S) fp32), and writes

    out     = c_x * x + c_v * v + c_z * z        z ~ N(0, I) (Philox), only with ``keys``
    acc_out = acc + c_acc * v                    only with ``acc``

where v is the velocity at that voxel and [c_x, c_v, c_z, c_acc] is row n of a device table
(steps, 4) fp32 read at the device step counter n, so no launch reads the host and one CUDA
graph replays every step. ``prdit_fast.flow_matching.fused_stages`` gives each solver's
stages as such tables (Euler: one stage x <- x + dt v; Heun, rk4: an evaluation state and
an accumulator; pc: x <- alpha x + beta v + gamma z). The velocity volume never exists: the
tokens are read in place of ``unpatchify``'s output.

Noise is ``step_noise``'s: voxel v of volume b at Philox key keys[b], counter n + 1, drawn
only where c_z != 0. A counter outside [0, steps) writes NaN everywhere (no host sync can
raise), as ``sampler_update`` does. Inference only: no autograd.
"""
from __future__ import annotations

import torch

from .. import layout
from .common import triton_importable
from .dispatch import TRITON, resolve
from .sampling import check_state, philox_normal

_COLUMNS = 4  # c_x, c_v, c_z, c_acc
_INT32_LIMIT = 2**31
_MAX_GRID_Y = 65535

if triton_importable():
    import triton
    import triton.language as tl

    from .sampling import step_row
    from .token_cubes import cube_token_offset

    @triton.jit
    def _flow_update_kernel(
        TOK, RES, X, OUT, ACC, ACC_OUT, COEF, STEP, KEYS, num_steps,
        C: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr, HAS_ACC: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        VOLUME: tl.constexpr = S * S * S
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        b = tl.program_id(1).to(tl.int64)
        ok = m < VOLUME
        step, row, valid = step_row(COEF, STEP, num_steps, 4)
        nan = float("nan")
        c_x = tl.load(row + 0, mask=valid, other=nan)
        c_v = tl.load(row + 1, mask=valid, other=nan)
        c_z = tl.load(row + 2, mask=valid, other=nan)
        c_acc = tl.load(row + 3, mask=valid, other=nan)
        tok_offset = b * (VOLUME * C) + cube_token_offset(m, S, STRIDE, C)
        for c in tl.static_range(C):
            v = tl.load(TOK + tok_offset + c, mask=ok).to(tl.float32)
            if HAS_RESIDUAL:
                v += tl.load(RES + tok_offset + c, mask=ok).to(tl.float32)
            voxel = c * VOLUME + m  # (channel, d, h, w) index: the Philox counter
            at = b * (VOLUME * C) + voxel
            out = c_x * tl.load(X + at, mask=ok) + c_v * v
            if HAS_NOISE:
                if c_z != 0.0:
                    key = tl.load(KEYS + b)
                    out = out + c_z * tl.randn(key, voxel.to(tl.int64) + ((step + 1) << 32))
            if HAS_ACC:
                tl.store(ACC_OUT + at, tl.load(ACC + at, mask=ok) + c_acc * v, mask=ok)
            tl.store(OUT + at, out, mask=ok)


def _check(tokens, x, coef, step_index, stride, residual, out, acc, acc_out, keys):
    """Validate shapes, dtypes and devices (nothing is read from the device)."""
    check_state(x, stride, step_index)
    B, C, S = x.shape[:3]
    expected = (B, (S // stride) ** 3, stride**3 * C)
    if tokens.dim() != 3 or tuple(tokens.shape) != expected:
        raise ValueError(
            f"velocity tokens must be (B, (S/s)^3, s^3 C) = {expected} for x {tuple(x.shape)} and stride {stride}, "
            f"got {tuple(tokens.shape)}"
        )
    if residual is not None and residual.shape != tokens.shape:
        raise ValueError(f"residual must have the tokens' shape {tuple(tokens.shape)}, got {tuple(residual.shape)}")
    if coef.dim() != 2 or coef.shape[1] != _COLUMNS or coef.dtype != torch.float32 or coef.shape[0] < 1:
        raise ValueError(f"coef must be a (steps, 4) fp32 table (flow_matching.fused_stages), got "
                         f"{coef.dtype} {tuple(coef.shape)}")
    if (acc is None) != (acc_out is None):
        raise ValueError("acc and acc_out go together (acc_out=acc updates the accumulator in place)")
    for name, t in (("out", out), ("acc", acc), ("acc_out", acc_out)):
        if t is not None and (t.shape != x.shape or t.dtype != torch.float32 or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous fp32 tensor of shape {tuple(x.shape)}")
    if keys is not None and (keys.shape != (B,) or keys.dtype != torch.int64):
        raise ValueError(f"keys must be ({B},) int64 (sample_key), got {keys.dtype} {tuple(keys.shape)}")
    devices = {t.device for t in (tokens, x, coef, step_index, residual, out, acc, acc_out, keys) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def flow_update(
    tokens: torch.Tensor,
    x: torch.Tensor,
    coef: torch.Tensor,
    step_index: torch.Tensor,
    *,
    stride: int,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    acc: torch.Tensor | None = None,
    acc_out: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One fused flow-matching stage: ``out = c_x x + c_v v + c_z z``, ``acc_out = acc + c_acc v``.

    tokens (and residual): the velocity (B, (S/s)^3, s^3 C), any float dtype; x, acc:
    (B, C, S, S, S) fp32; coef: (steps, 4) fp32 rows [c_x, c_v, c_z, c_acc]; step_index:
    one-element int32/int64 device tensor (never read on the host); keys: (B,) int64
    Philox keys, or None for no noise (c_z is then ignored). ``out`` may be x and
    ``acc_out`` may be acc (in place: each voxel is read before it is written); defaults are
    new tensors. Returns (out, acc_out or None). ``impl``: "auto", "triton" or "torch"
    (``flow_update_reference``, which reads the step on the host). No autograd.
    """
    _check(tokens, x, coef, step_index, stride, residual, out, acc, acc_out, keys)
    B, C, S = x.shape[:3]
    operands = [t for t in (tokens, x, coef, step_index, residual, acc, keys) if t is not None]
    limits = None
    if B > _MAX_GRID_Y:
        limits = f"batch {B} exceeds {_MAX_GRID_Y}"
    elif C * S**3 >= _INT32_LIMIT:
        limits = "one sample spans 2^31 elements or more (the kernel indexes a sample with int32)"
    if resolve("flow_update", impl, operands, limits) != TRITON:
        return flow_update_reference(tokens, x, coef, step_index, stride=stride, residual=residual, out=out,
                                     acc=acc, acc_out=acc_out, keys=keys)
    out = torch.empty_like(x) if out is None else out
    tokens = tokens.contiguous()
    residual = residual.contiguous() if residual is not None else None
    block = 1024
    # fixed configuration: no autotuning (it would rerun an in-place update, and cannot
    # happen inside CUDA graph capture)
    _flow_update_kernel[(triton.cdiv(S**3, block), B)](
        tokens, residual if residual is not None else tokens, x.contiguous(), out,
        acc if acc is not None else x, acc_out if acc_out is not None else out, coef, step_index,
        keys if keys is not None else step_index, coef.shape[0],
        C=C, S=S, STRIDE=stride, HAS_RESIDUAL=residual is not None, HAS_ACC=acc is not None,
        HAS_NOISE=keys is not None, BLOCK_M=block, num_warps=4,
    )
    return out, acc_out


@torch.no_grad()
def flow_update_reference(
    tokens: torch.Tensor,
    x: torch.Tensor,
    coef: torch.Tensor,
    step_index: torch.Tensor,
    *,
    stride: int,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    acc: torch.Tensor | None = None,
    acc_out: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``flow_update`` in plain torch (``layout.unpatchify`` + ``philox_normal``); same
    arguments and results, but it reads the step on the host (a sync) and raises ValueError
    when it is outside the table."""
    _check(tokens, x, coef, step_index, stride, residual, out, acc, acc_out, keys)
    C, S = x.shape[1], x.shape[2]
    step = int(step_index.reshape(-1)[0].item())
    if not 0 <= step < coef.shape[0]:
        raise ValueError(f"step index {step} is outside the coefficient table of {coef.shape[0]} rows")
    total = tokens.float() if residual is None else tokens.float() + residual.float()
    v = layout.unpatchify(total, S, stride, C)
    c_x, c_v, c_z, c_acc = coef[step].unbind()
    result = c_x * x + c_v * v
    if keys is not None and c_z.item() != 0.0:
        result = result + c_z * philox_normal(keys, step + 1, x.shape[1:]).to(x.device)
    new_acc = None if acc is None else acc + c_acc * v
    out = result if out is None else out.copy_(result)
    if acc_out is not None:
        acc_out = acc_out.copy_(new_acc)
    return out, acc_out
