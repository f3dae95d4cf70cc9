"""MS-SSIM's per-pair term at one scale, fused: for each pair (i, j) of volumes, the mean over
the valid 3^3 window positions of

    cs   = (2 sigma_xy + c2) / (sigma_i + sigma_j + c2),   sigma_xy = K * (x_i x_j) - mu_i mu_j
    (last scale) cs * (2 mu_i mu_j + c1) / (mu_i^2 + mu_j^2 + c1)

with K the 27-tap Gaussian window and mu = K * x, sigma = K * x^2 - mu^2 each volume's own
(computed once per volume by the caller). The torch form materializes x_i x_j, its
convolution and the map per pair (about ten full-volume tensors); the kernel reads the two
volumes' neighbourhoods and their four moment maps once and writes one partial sum per
block of window positions, so a pair costs ~6 volume reads.

    ms_ssim_cross(x, mu, sigma, pairs, window, c1, c2, last)  -> (P,) float32 means

x (N, D, H, W) fp32 contiguous; mu, sigma (N, D - 2, H - 2, W - 2) fp32; pairs (P, 2) int64;
window (27,) fp32 in (a, b, c) row-major order. Inference only: no autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import triton_importable
from .dispatch import TRITON, resolve

KERNEL_EDGE = 3
_BLOCK = 1024
_PAIRS_PER_LAUNCH = 4096  # bounds the partial-sum buffer: pairs x blocks fp32

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _ms_ssim_cross_kernel(X, MU, SIG, PAIRS, WIN, PARTIAL, c1, c2,
                              D: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                              LAST: tl.constexpr, BLOCK: tl.constexpr):
        OD: tl.constexpr = D - 2
        OH: tl.constexpr = H - 2
        OW: tl.constexpr = W - 2
        pair = tl.program_id(0)
        block = tl.program_id(1)
        i = tl.load(PAIRS + 2 * pair).to(tl.int64)
        j = tl.load(PAIRS + 2 * pair + 1).to(tl.int64)
        o = block * BLOCK + tl.arange(0, BLOCK)
        ok = o < OD * OH * OW
        d = o // (OH * OW)
        h = (o // OW) % OH
        w = o % OW
        base = d * (H * W) + h * W + w
        xi = X + i * (D * H * W)
        xj = X + j * (D * H * W)
        cross = tl.zeros([BLOCK], dtype=tl.float32)
        for a in tl.static_range(3):
            for b in tl.static_range(3):
                for c in tl.static_range(3):
                    k = a * 9 + b * 3 + c
                    off = base + (a * H * W + b * W + c)
                    u = tl.load(xi + off, mask=ok, other=0.0)
                    v = tl.load(xj + off, mask=ok, other=0.0)
                    cross += tl.load(WIN + k) * (u * v)
        mu_i = tl.load(MU + i * (OD * OH * OW) + o, mask=ok, other=0.0)
        mu_j = tl.load(MU + j * (OD * OH * OW) + o, mask=ok, other=0.0)
        s_i = tl.load(SIG + i * (OD * OH * OW) + o, mask=ok, other=0.0)
        s_j = tl.load(SIG + j * (OD * OH * OW) + o, mask=ok, other=0.0)
        value = (2 * (cross - mu_i * mu_j) + c2) / (s_i + s_j + c2)
        if LAST:
            value = value * (2 * mu_i * mu_j + c1) / (mu_i * mu_i + mu_j * mu_j + c1)
        value = tl.where(ok, value, 0.0)
        tl.store(PARTIAL + pair * tl.num_programs(1) + block, tl.sum(value, axis=0))


def ms_ssim_cross_reference(x, mu, sigma, pairs, window, c1: float, c2: float, last: bool) -> torch.Tensor:
    """The plain-torch form: the product, its convolution and the map, per pair."""
    kernel = window.view(1, 1, KERNEL_EDGE, KERNEL_EDGE, KERNEL_EDGE)
    i, j = pairs.unbind(1)
    mu_i, mu_j = mu[i, None], mu[j, None]
    sigma_xy = F.conv3d((x[i] * x[j])[:, None], kernel) - mu_i * mu_j
    value = (2 * sigma_xy + c2) / (sigma[i, None] + sigma[j, None] + c2)
    if last:
        value = ((2 * mu_i * mu_j + c1) / (mu_i * mu_i + mu_j * mu_j + c1)) * value
    return value.flatten(1).mean(1)


def _refusal(x: torch.Tensor) -> str | None:
    if x.dtype != torch.float32:
        return f"the kernel reads float32 volumes, got {x.dtype}"
    if x.shape[1] < KERNEL_EDGE or min(x.shape[1:]) < KERNEL_EDGE:
        return f"volumes of {tuple(x.shape[1:])} are smaller than the 3^3 window"
    return None


@torch.no_grad()
def ms_ssim_cross(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, pairs: torch.Tensor, window: torch.Tensor,
                  c1: float, c2: float, last: bool, impl: str = "auto") -> torch.Tensor:
    """Each pair's mean cs (and, ``last``, luminance x cs) at one scale -> (P,) float32."""
    if x.ndim != 4 or mu.shape != (x.shape[0], *(s - 2 for s in x.shape[1:])) or mu.shape != sigma.shape:
        raise ValueError(f"x must be (N, D, H, W) and mu, sigma (N, D-2, H-2, W-2); got {tuple(x.shape)}, "
                         f"{tuple(mu.shape)}, {tuple(sigma.shape)}")
    if window.numel() != KERNEL_EDGE ** 3:
        raise ValueError(f"window must hold {KERNEL_EDGE ** 3} weights, got {window.numel()}")
    chosen = resolve("ms_ssim_cross", impl, [x, mu, sigma], _refusal(x))
    if chosen != TRITON:
        return ms_ssim_cross_reference(x, mu, sigma, pairs, window, c1, c2, last)
    x, mu, sigma = x.contiguous(), mu.contiguous(), sigma.contiguous()
    window = window.to(device=x.device, dtype=torch.float32).contiguous().flatten()
    _, d, h, w = x.shape
    outputs = (d - 2) * (h - 2) * (w - 2)
    blocks = triton.cdiv(outputs, _BLOCK)
    means = []
    for chunk in pairs.to(device=x.device, dtype=torch.int64).split(_PAIRS_PER_LAUNCH):
        partial = torch.empty(chunk.shape[0], blocks, device=x.device, dtype=torch.float32)
        _ms_ssim_cross_kernel[(chunk.shape[0], blocks)](
            x, mu, sigma, chunk.contiguous(), window, partial, float(c1), float(c2),
            D=d, H=h, W=w, LAST=bool(last), BLOCK=_BLOCK,
        )
        means.append(partial.sum(1) / outputs)
    return torch.cat(means) if means else torch.empty(0, device=x.device)
