"""The fused sampler update (spec section 7) and the counter-based noise it draws.

One kernel per denoising step reads the model's output tokens (B, N, s^3 2C) (plus an
optional ``residual`` token tensor, summed in fp32 as in ``unpatchify``) and the state
x (B, C, S, S, S) fp32, and writes

    x0_hat = the clean prediction (token channels C..2C-1), eps_hat = channels 0..C-1
    f      = sin_i * x0_hat - cos_i * eps_hat
    x_pred = x - move * f
    x_next = a * x_pred + sigma * z          z ~ N(0, I) drawn only where sigma != 0

The step scalars come from a device table (steps, 5) fp32 of rows
[sin_i, cos_i, move, a, sigma] (``prdit_fast.schedules.build_step_table``)
indexed by a device step counter, so the launch reads nothing on the host and one CUDA
graph replays every step. There is no corrector flag column: rows without a corrector
are a = 1, sigma = 0, which is the Euler step, and a row with sigma == 0 draws no noise.
A counter outside [0, steps) cannot raise without a host sync; the kernel then writes
NaN everywhere instead of reading past the table.

Noise (docs: notes/philox.md): volume b has the 64-bit Philox key keys[b] =
``sample_key(run_seed, index)``; voxel v (linear index of (channel, d, h, w)) at counter
``step`` is Triton's ``tl.randn(key, v + (step << 32))`` (Philox4x32-10, Box-Muller on
the first two words). The starting noise is counter 0 (``initial_noise``); the corrector
of step n (n = 0 for the first model call) uses counter n + 1, and so does the noise of
flow-matching step n (``step_noise``, the counter read on the device). A volume's noise thus
depends on its key alone, not on the batch size or its position in the batch.
``philox_normal`` is the same generator in plain torch (int64 arithmetic masked to 32
bits, any device): the test oracle and the CPU path.

Advancing the counter: ``advance=True`` queues ``step_index.add_(1)`` after the update
kernel on the same stream (so it cannot race the kernel's read, and it is capturable);
callers that own the counter leave it False.

Inference only: no autograd.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import layout
from ..schedules import NOISE_STD
from .common import triton_importable
from .dispatch import TRITON, resolve
from .sr_assemble import check_base, sr_assemble_reference

_MASK32 = 0xFFFFFFFF
# Philox4x32 constants (Salmon et al. 2011), as in triton.language.random
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUNDS = 10
# Triton's uint32 -> uniform scale: the largest float with (2^31 - 1) * scale < 1
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586
_TABLE_COLUMNS = 5
_CHUNK = 2**20  # counters per pass of philox_normal
_INT32_LIMIT = 2**31
_MAX_GRID_Y = 65535
UPDATE_BLOCK = 1024  # voxels per program of the update, 4 warps
# with the base's trilinear gather: half the voxels per thread keeps its index math in
# registers without starving occupancy (benchmarks/check_sm90.py reports both)
SR_UPDATE_BLOCK = 512

if triton_importable():
    import triton
    import triton.language as tl

    from .sr_assemble import upsampled_base
    from .token_cubes import cube_token_offset

    @triton.jit
    def step_row(TABLE, STEP, num_steps, WIDTH: tl.constexpr):
        """(the device step counter n, a pointer to row n of a (num_steps, WIDTH) table, n is
        in range): outside [0, num_steps) the pointer is row 0 and the caller loads it with
        mask=valid, other=NaN, so a bad counter writes NaN instead of reading past the table."""
        step = tl.load(STEP).to(tl.int64)
        valid = (step >= 0) & (step < num_steps)
        return step, TABLE + tl.where(valid, step, 0) * WIDTH, valid

    @triton.jit
    def _sampler_update_kernel(
        TOK, RES, BASE, X, X_OUT, X0_OUT, TABLE, STEP, KEYS, num_steps,
        C: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr, HAS_BASE: tl.constexpr, S_LO: tl.constexpr, SCALE: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        VOLUME: tl.constexpr = S * S * S
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        b = tl.program_id(1).to(tl.int64)
        ok = m < VOLUME
        step, row, valid = step_row(TABLE, STEP, num_steps, 5)
        nan = float("nan")
        sin_i = tl.load(row + 0, mask=valid, other=nan)
        cos_i = tl.load(row + 1, mask=valid, other=nan)
        move = tl.load(row + 2, mask=valid, other=nan)
        a = tl.load(row + 3, mask=valid, other=nan)
        sigma = tl.load(row + 4, mask=valid, other=nan)
        tok_offset = b * (VOLUME * 2 * C) + cube_token_offset(m, S, STRIDE, 2 * C)
        for c in tl.static_range(C):
            eps_hat = tl.load(TOK + tok_offset + c, mask=ok).to(tl.float32)
            x0_hat = tl.load(TOK + tok_offset + C + c, mask=ok).to(tl.float32)
            if HAS_RESIDUAL:
                eps_hat += tl.load(RES + tok_offset + c, mask=ok).to(tl.float32)
                x0_hat += tl.load(RES + tok_offset + C + c, mask=ok).to(tl.float32)
            if HAS_BASE:  # PRDiT-SR: the base's low-resolution prediction, upsampled here
                eps_up, x0_up = upsampled_base(BASE, b, c, m, ok, S, S_LO, SCALE, C)
                eps_hat += eps_up
                x0_hat += x0_up
            voxel = c * VOLUME + m  # (channel, d, h, w) index: the Philox counter
            x = tl.load(X + b * (VOLUME * C) + voxel, mask=ok)
            f = sin_i * x0_hat - cos_i * eps_hat
            x_next = a * (x - move * f)
            if sigma != 0.0:
                key = tl.load(KEYS + b)
                z = tl.randn(key, voxel.to(tl.int64) + ((step + 1) << 32))
                x_next = x_next + sigma * z
            tl.store(X_OUT + b * (VOLUME * C) + voxel, x_next, mask=ok)
            tl.store(X0_OUT + b * (VOLUME * C) + voxel, x0_hat.to(X0_OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _step_noise_kernel(KEYS, STEP, OUT, numel, BLOCK: tl.constexpr):
        # N(0, I) at Philox counter STEP + 1, the counter read on the device
        v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        b = tl.program_id(1).to(tl.int64)
        ok = v < numel
        key = tl.load(KEYS + b)
        counter = tl.load(STEP).to(tl.int64) + 1
        z = tl.randn(key, v.to(tl.int64) + (counter << 32))
        tl.store(OUT + b * numel + v, z, mask=ok)

    # the counter must stay a runtime value: Triton would turn a 1 into a constexpr
    @triton.jit(do_not_specialize=["step"])
    def _normal_kernel(KEYS, OUT, numel, step, scale, BLOCK: tl.constexpr):
        v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        b = tl.program_id(1).to(tl.int64)
        ok = v < numel
        key = tl.load(KEYS + b)
        z = tl.randn(key, v.to(tl.int64) + (step.to(tl.int64) << 32))
        tl.store(OUT + b * numel + v, scale * z, mask=ok)


# --------------------------------------------------------------------------- #
# Keys and the plain-torch Philox
# --------------------------------------------------------------------------- #
def sample_key(run_seed: int, index: int) -> int:
    """The Philox key of volume ``index`` of run ``run_seed``: (run_seed << 32) | index,
    both in [0, 2^32), returned as a signed int64 value (two's complement) so that it
    fits a torch.int64 tensor."""
    for name, value in (("run_seed", run_seed), ("index", index)):
        if not isinstance(value, int) or not 0 <= value <= _MASK32:
            raise ValueError(f"{name} must be an integer in [0, 2^32), got {value!r}")
    key = (run_seed << 32) | index
    return key - (1 << 64) if key >= 1 << 63 else key


def _mul_hi_lo(constant: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of constant * x (both uint32), without int64 overflow:
    the constant is split into 16-bit halves so every partial product stays below 2^49."""
    upper = (constant >> 16) * x
    lower = (constant & 0xFFFF) * x
    carry = upper + (lower >> 16)
    return carry >> 16, ((carry & 0xFFFF) << 16) | (lower & 0xFFFF)


def philox4x32(keys: torch.Tensor, counter0: torch.Tensor, counter1: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 with key (keys & 0xFFFFFFFF, keys >> 32) and counter (counter0, counter1, 0, 0).

    keys: (B,) int64; counter0: (M,) int64 in [0, 2^32) -> four (B, M) int64 tensors
    holding uint32 words; identical to ``tl.randint4x(key, counter0 + (counter1 << 32))``.
    """
    k0 = (keys & _MASK32).view(-1, 1)
    k1 = ((keys >> 32) & _MASK32).view(-1, 1)
    c0 = counter0.view(1, -1).expand(k0.shape[0], -1)
    c1 = torch.full_like(c0, counter1 & _MASK32)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(words: torch.Tensor) -> torch.Tensor:
    """Triton's uint32 -> [0, 1) fp32: as int32, negatives mirrored to -x - 1, times the scale."""
    signed = torch.where(words >= 1 << 31, words - (1 << 32), words)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def philox_normal(keys: torch.Tensor, step: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise of counter ``step`` for each key: (B,) int64 -> (B, *shape) fp32
    on keys' device, element v (row-major index in ``shape``) = ``tl.randn(key, v + (step << 32))``."""
    keys = torch.as_tensor(keys, dtype=torch.int64).reshape(-1)
    if not isinstance(step, int) or not 0 <= step <= _MASK32:
        raise ValueError(f"step must be an integer counter in [0, 2^32), got {step!r}")
    shape = tuple(int(n) for n in shape)
    numel = 1
    for n in shape:
        numel *= n
    if numel > _MASK32 + 1:
        raise ValueError(f"a volume of {numel} voxels exceeds the 2^32 Philox counters of one step")
    z = torch.empty((keys.shape[0], numel), device=keys.device, dtype=torch.float32)
    for start in range(0, numel, _CHUNK):  # bounds the int64 temporaries
        voxel = torch.arange(start, min(start + _CHUNK, numel), device=keys.device, dtype=torch.int64)
        r0, r1, _, _ = philox4x32(keys, voxel, step)
        u1 = torch.clamp_min(_uniform(r0), 1.0e-7)
        u2 = _uniform(r1)
        radius = torch.sqrt(-2.0 * torch.log(u1))
        z[:, start : start + voxel.numel()] = radius * torch.cos(u2 * torch.tensor(_TWO_PI, dtype=torch.float32))
    return z.view(keys.shape[0], *shape)


def initial_noise(keys: torch.Tensor, shape: Sequence[int], impl: str = "auto", std: float = NOISE_STD) -> torch.Tensor:
    """The sampler's start x_T = std N(0, I) from Philox counter 0 (IaN: std 0.5; flow
    matching: 1): (B,) int64 keys -> (B, *shape) fp32 on keys' device.

    ``impl``: "auto" (one Triton launch where it runs, else ``philox_normal``),
    "triton" or "torch". Both draw the same numbers (up to an ulp of log / cos). The
    kernel matters on a GPU: ``philox_normal`` makes hundreds of int64 elementwise passes
    over the volumes (ten Philox rounds, each of ~25 ops), more memory traffic than a
    model step, and the engine draws x_T at every ``sample()`` call.
    """
    keys = torch.as_tensor(keys, dtype=torch.int64).reshape(-1)
    numel = math.prod(int(n) for n in shape)
    limits = None
    if numel >= _INT32_LIMIT:
        limits = "a volume of 2^31 voxels or more (the kernel indexes a volume with int32)"
    elif keys.shape[0] > _MAX_GRID_Y:
        limits = f"{keys.shape[0]} keys exceed {_MAX_GRID_Y}"
    if resolve("initial_noise", impl, [keys], limits) != TRITON:
        return std * philox_normal(keys, 0, shape)
    out = torch.empty((keys.shape[0], *shape), device=keys.device, dtype=torch.float32)
    if out.numel():
        block = 1024
        _normal_kernel[(triton.cdiv(numel, block), keys.shape[0])](keys, out, numel, 0, std, BLOCK=block)
    return out


def step_noise(keys: torch.Tensor, step_index: torch.Tensor, shape: Sequence[int], impl: str = "auto") -> torch.Tensor:
    """N(0, I) noise of step ``step_index`` (Philox counter step_index + 1, as the corrector
    of ``sampler_update``) for each key, the counter read on the device: the per-step
    noise of the flow-matching solvers pc / pc_heun in the CUDA-graph engine.

    keys: (B,) int64 (``sample_key``); step_index: one-element int32/int64 tensor on the
    keys' device; returns (B, *shape) fp32. ``impl``: "auto", "triton" or "torch"
    (``philox_normal``, which reads the counter on the host: a sync).
    """
    keys = keys.reshape(-1)
    if keys.dtype != torch.int64:
        raise ValueError(f"keys must be int64 (sample_key), got {keys.dtype}")
    if step_index.numel() != 1 or step_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"step_index must be a one-element int32/int64 tensor, got {step_index.dtype} {tuple(step_index.shape)}"
        )
    if step_index.device != keys.device:
        raise ValueError(f"keys ({keys.device}) and step_index ({step_index.device}) must be on one device")
    shape = tuple(int(n) for n in shape)
    numel = math.prod(shape)
    limits = None
    if numel >= _INT32_LIMIT:
        limits = "a volume of 2^31 voxels or more (the kernel indexes a volume with int32)"
    elif keys.shape[0] > _MAX_GRID_Y:
        limits = f"{keys.shape[0]} keys exceed {_MAX_GRID_Y}"
    if resolve("step_noise", impl, [keys, step_index], limits) != TRITON:
        return philox_normal(keys, int(step_index.reshape(-1)[0].item()) + 1, shape)
    out = torch.empty((keys.shape[0], *shape), device=keys.device, dtype=torch.float32)
    if out.numel():
        block = 1024
        _step_noise_kernel[(triton.cdiv(numel, block), keys.shape[0])](keys, step_index, out, numel, BLOCK=block)
    return out


# --------------------------------------------------------------------------- #
# The update
# --------------------------------------------------------------------------- #
def check_state(x: torch.Tensor, stride: int, step_index: torch.Tensor) -> None:
    """ValueError unless x is an fp32 (B, C, S, S, S) volume that ``stride`` tiles and
    step_index a one-element integer counter: what every per-step update takes."""
    if x.dim() != 5 or x.dtype != torch.float32 or not (x.shape[2] == x.shape[3] == x.shape[4]):
        raise ValueError(f"x must be an fp32 volume (B, C, S, S, S), got {x.dtype} {tuple(x.shape)}")
    layout.validate_tiling(x.shape[2], stride, stride, 0)
    if step_index.numel() != 1 or step_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"step_index must be a one-element int32/int64 tensor, got {step_index.dtype} {tuple(step_index.shape)}"
        )


def _check(tokens, x, table, step_index, keys, stride, residual, x_out, x0_out, base=None):
    """Validate shapes, dtypes and devices (nothing is read from the device)."""
    check_state(x, stride, step_index)
    B, C, S = x.shape[:3]
    if base is not None:
        check_base(base, S, stride)
        if base.shape[:2] != (B, 2 * C) or base.dtype != torch.float32:
            raise ValueError(f"base must be the fp32 (B, 2C, S_lo^3) = ({B}, {2 * C}, ...) prediction, got "
                             f"{base.dtype} {tuple(base.shape)}")
    expected = (B, (S // stride) ** 3, stride**3 * 2 * C)
    if tokens.dim() != 3 or tuple(tokens.shape) != expected:
        raise ValueError(
            f"tokens must be (B, (S/s)^3, s^3 2C) = {expected} for x {tuple(x.shape)} and stride {stride}, "
            f"got {tuple(tokens.shape)}"
        )
    if residual is not None and residual.shape != tokens.shape:
        raise ValueError(f"residual must have the tokens' shape {tuple(tokens.shape)}, got {tuple(residual.shape)}")
    if table.dim() != 2 or table.shape[1] != _TABLE_COLUMNS or table.dtype != torch.float32 or table.shape[0] < 1:
        raise ValueError(f"table must be (steps, 5) fp32 from build_step_table, got {table.dtype} {tuple(table.shape)}")
    if keys.shape != (B,) or keys.dtype != torch.int64:
        raise ValueError(f"keys must be ({B},) int64 (sample_key), got {keys.dtype} {tuple(keys.shape)}")
    for name, out in (("x_out", x_out), ("x0_out", x0_out)):
        if out is not None and (out.shape != x.shape or not out.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous tensor of shape {tuple(x.shape)}")
    if x_out is not None and x_out.dtype != torch.float32:
        raise ValueError(f"x_out must be fp32, got {x_out.dtype}")
    devices = {t.device for t in (tokens, x, table, step_index, keys, residual, x_out, x0_out, base) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def sampler_update(
    tokens: torch.Tensor,
    x: torch.Tensor,
    table: torch.Tensor,
    step_index: torch.Tensor,
    keys: torch.Tensor,
    *,
    stride: int = layout.STRIDE,
    residual: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    x_out: torch.Tensor | None = None,
    x0_out: torch.Tensor | None = None,
    advance: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampler step from the model's output tokens, fused with the corrector noise.

    tokens (and residual): (B, (S/s)^3, s^3 2C), channels [eps_hat, x0_hat], any float dtype;
    base (PRDiT-SR): the base's [eps_lo, x0_lo] (B, 2C, S_lo^3) fp32, upsampled inside the
    update (eps nearest, x0 trilinear, ``sr.upsample_prediction``) and added to the tokens;
    x: (B, C, S, S, S) fp32; table: (steps, 5) fp32 (``build_step_table``); step_index:
    one-element int32/int64 device tensor, the step n (never read on the host); keys: (B,)
    int64. Writes x_next into ``x_out`` (default: a new tensor; ``x_out=x`` updates in
    place) and x0_hat into ``x0_out`` (default: a new fp32 tensor). ``advance`` adds 1 to
    step_index afterwards. Returns (x_next, x0_hat). ``impl``: "auto", "triton" or
    "torch" (``sampler_update_reference``, which reads the step on the host). No autograd.
    """
    _check(tokens, x, table, step_index, keys, stride, residual, x_out, x0_out, base)
    B, C, S = x.shape[:3]
    operands = [t for t in (tokens, x, table, step_index, keys, residual, base) if t is not None]
    limits = None
    if B > _MAX_GRID_Y:
        limits = f"batch {B} exceeds {_MAX_GRID_Y}"
    elif 2 * C * S**3 >= _INT32_LIMIT:
        limits = "one sample spans 2^31 elements or more (the kernel indexes a sample with int32)"
    if resolve("sampler_update", impl, operands, limits) != TRITON:
        return sampler_update_reference(
            tokens, x, table, step_index, keys, stride=stride, residual=residual, base=base,
            x_out=x_out, x0_out=x0_out, advance=advance,
        )
    x_out = torch.empty_like(x) if x_out is None else x_out
    x0_out = torch.empty_like(x) if x0_out is None else x0_out
    tokens = tokens.contiguous()
    residual = residual.contiguous() if residual is not None else None
    block = UPDATE_BLOCK if base is None else SR_UPDATE_BLOCK
    grid = (triton.cdiv(S**3, block), B)
    # fixed configuration, no autotuning: autotuning would run the in-place update
    # several times and cannot happen inside CUDA graph capture
    lo = base.shape[-1] if base is not None else S
    _sampler_update_kernel[grid](
        tokens, residual if residual is not None else tokens, base.contiguous() if base is not None else x,
        x.contiguous(), x_out, x0_out, table, step_index, keys, table.shape[0],
        C=C, S=S, STRIDE=stride, HAS_RESIDUAL=residual is not None, HAS_BASE=base is not None, S_LO=lo,
        SCALE=lo / S, BLOCK_M=block, num_warps=4,
    )
    if advance:
        step_index.add_(1)
    return x_out, x0_out


@torch.no_grad()
def sampler_update_reference(
    tokens: torch.Tensor,
    x: torch.Tensor,
    table: torch.Tensor,
    step_index: torch.Tensor,
    keys: torch.Tensor,
    *,
    stride: int = layout.STRIDE,
    residual: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    x_out: torch.Tensor | None = None,
    x0_out: torch.Tensor | None = None,
    advance: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sampler_update`` in plain torch (``layout.unpatchify`` + ``sr_assemble_reference``
    + ``philox_normal``); same arguments and results, but it reads the step index on the
    host (a sync) and raises ValueError when it is outside the table."""
    _check(tokens, x, table, step_index, keys, stride, residual, x_out, x0_out, base)
    C, S = x.shape[1], x.shape[2]
    step = int(step_index.reshape(-1)[0].item())
    if not 0 <= step < table.shape[0]:
        raise ValueError(f"step index {step} is outside the step table of {table.shape[0]} rows")
    total = tokens.float() if residual is None else tokens.float() + residual.float()
    out = layout.unpatchify(total, S, stride, 2 * C)
    if base is not None:
        out = out + sr_assemble_reference(base, S, stride)
    eps_hat, x0_hat = out[:, :C], out[:, C:]
    sin_i, cos_i, move, a, sigma = table[step].unbind()
    x_next = a * (x - move * (sin_i * x0_hat - cos_i * eps_hat))
    if sigma.item() != 0.0:
        x_next = x_next + sigma * philox_normal(keys, step + 1, x.shape[1:]).to(x.device)
    x_out = x_next if x_out is None else x_out.copy_(x_next)
    x0_out = x0_hat.contiguous() if x0_out is None else x0_out.copy_(x0_hat)
    if advance:
        step_index.add_(1)
    return x_out, x0_out
