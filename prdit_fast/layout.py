"""The token layout of PRDiT volumes in plain torch (spec sections 1, 3, 6 and 8): the lowest
layer of the package, imported by the reference network (``models``), the fast ops
(``ops``), the SR wrapper and the sampling engine alike. It imports only torch.

    unfold3d          volume (B, C, S, S, S) -> overlapping windows (B, N, C p^3)
    unpatchify        output tokens (B, N, s^3 Cout) -> volume (B, Cout, S, S, S)
    volume_to_tokens  the inverse of unpatchify
    modulate          the per-sample affine x (1 + scale) + shift of adaLN
    downsample_nearest / upsample_prediction   between the SR base's grid and the target's

Every fast kernel in ``prdit_fast.ops`` is tested against these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STRIDE = 8  # the output cube edge s of the standard variants (spec section 1)
PATCHES = (10, 12, 14, 16)  # the standard window edges p


def validate_tiling(input_size: int, patch: int, stride: int, pad: int) -> None:
    """Raise ValueError unless windows of ``patch`` at ``stride`` over the volume
    reflect-padded by ``pad`` give exactly ``input_size / stride`` windows per axis,
    i.e. the input and output token grids agree (spec section 1)."""
    hint = (
        f"PRDiT needs a patch p >= stride s with pad = (p - s) / 2 (standard: s = {STRIDE}, "
        f"p in {', '.join(map(str, PATCHES))}; the '-s16' variants: p = s = 16, pad 0), and a "
        f"volume edge S divisible by s with S > pad (e.g. 32, 64, 128, 256)"
    )
    if stride < 1 or patch < stride:
        raise ValueError(f"patch {patch} / stride {stride} do not tile: {hint}")
    if 2 * pad != patch - stride:
        raise ValueError(
            f"patch {patch}, stride {stride}, pad {pad} do not tile: 2*pad must equal "
            f"patch - stride = {patch - stride}. {hint}"
        )
    if input_size <= 0 or input_size % stride:
        raise ValueError(f"volume edge {input_size} is not a multiple of stride {stride}. {hint}")
    if pad >= input_size:
        raise ValueError(f"reflect padding {pad} needs a volume edge > {pad}, got {input_size}. {hint}")


def unfold3d(x: torch.Tensor, patch: int, stride: int, pad: int) -> torch.Tensor:
    """Overlapping windows of a reflect-padded volume.

    x: (B, C, S, S, S) -> (B, N, C p^3); tokens in raster order (depth slowest),
    each window flattened as (channel, d, h, w).
    """
    B, C = x.shape[:2]
    xp = F.pad(x, (pad,) * 6, mode="reflect")
    w = xp.unfold(2, patch, stride).unfold(3, patch, stride).unfold(4, patch, stride)
    gd, gh, gw = w.shape[2:5]  # w: (B, C, gd, gh, gw, p, p, p)
    return w.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(B, gd * gh * gw, C * patch**3)


def unpatchify(tokens: torch.Tensor, size: int, stride: int, channels: int) -> torch.Tensor:
    """Non-overlapping s^3 cubes, each laid out (d, h, w, channel) channel fastest.

    tokens: (B, N, s^3 Cout) -> (B, Cout, S, S, S)
    """
    B = tokens.shape[0]
    g = size // stride
    x = tokens.reshape(B, g, g, g, stride, stride, stride, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, Cout, gd, sd, gh, sh, gw, sw)
    return x.reshape(B, channels, size, size, size)


def volume_to_tokens(volume: torch.Tensor, stride: int) -> torch.Tensor:
    """The inverse of ``unpatchify``: output cubes back to tokens.

    volume: (B, Cout, S, S, S) -> (B, (S/s)^3, s^3 Cout), each token's cube laid out
    (d, h, w, channel) channel fastest, tokens in raster order. The fused sampler update
    reads tokens; the reference network returns volumes.
    """
    B, C, S = volume.shape[0], volume.shape[1], volume.shape[-1]
    g = S // stride
    v = volume.reshape(B, C, g, stride, g, stride, g, stride)
    return v.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, g**3, stride**3 * C)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-sample affine: x (B, N, D), shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def downsample_nearest(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest downsample by an integer factor: the voxels at multiples of ``factor``
    (what ``F.interpolate(mode="nearest")`` picks). A strided VIEW, not a copy."""
    return x[..., ::factor, ::factor, ::factor]


def upsample_prediction(base_out: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """(B, 2C, S_lo^3) -> (B, 2C, S_hi^3): eps_hat nearest (each voxel repeated, keeping the
    noise statistics), x0_hat trilinear with align_corners=False (smooth anatomy)."""
    eps = F.interpolate(base_out[:, :channels], size=(size,) * 3, mode="nearest")
    x0 = F.interpolate(base_out[:, channels:], size=(size,) * 3, mode="trilinear", align_corners=False)
    return torch.cat([eps, x0], dim=1)
