"""MS-SSIM diversity of a set of volumes: MONAI's ``MultiScaleSSIMMetric(spatial_dims=3,
data_range=1.0, kernel_size=3)`` averaged over pairs of distinct volumes (spec section 10).

The definition, per pair (x, y) and scale s = 0..4 (each scale average-pools both by 2):
mu = K * v, sigma = K * v^2 - mu^2, sigma_xy = K * (x y) - mu_x mu_y with K MONAI's
normalized 3^3 Gaussian (sigma 1.5, valid convolution); cs_s = mean((2 sigma_xy + c2) /
(sigma_x + sigma_y + c2)), and at the last scale ssim = mean((2 mu_x mu_y + c1) /
(mu_x^2 + mu_y^2 + c1) (2 sigma_xy + c2) / (sigma_x + sigma_y + c2)); c1 = (0.01 R)^2,
c2 = (0.03 R)^2, R = 1; MS-SSIM = prod_{s<4} relu(cs_s)^w_s * relu(ssim)^w_4.

The official scripts call the metric once per ordered pair, recomputing every volume's
mu and sigma at every scale each time. Here every volume's pyramid, mu and sigma are
computed once per scale; a pair then needs only its cross term K * (x_i x_j) and the
formula, which ``prdit_fast.ops.ms_ssim_cross`` fuses into one pass per pair and scale
(Triton: reads the two volumes and their four moment maps once, writes one partial sum
per block; torch: the product, a convolution and the map). The index is symmetric in x
and y, so each unordered pair is evaluated once: its mean over unordered pairs equals
MONAI's over ordered pairs.

Cost at 128^3 for all pairs of 1,000 volumes (499,500 pairs; an ESTIMATE from counts, not a
measurement): scale 0 dominates (126^3 = 2.0M window positions; the four coarser scales
add ~1/7). The fused kernel per pair at scale 0: 27 multiply-adds for the cross term and
~15 flops for the formula per position, ~84 MFLOP, and ~6 fp32 volume reads, ~50 MB from
memory (less when neighbouring pairs share a volume in L2). For all pairs: ~48 TFLOP of
fp32 (H100 ~50-60 TFLOP/s without tensor cores: ~1 s) and ~28 TB of traffic at worst
(H100 ~3 TB/s: ~10 s), so ~10-20 s bandwidth-bound, well under the 10-minute target. The
torch form writes and reads ~10 intermediate volumes per pair (~400 MB): ~200 TB, ~70 s at
full bandwidth, plus a single-channel cuDNN conv3d per pair whose speed is unknown. GPU
timing owed (benchmarks/bench_metrics.py).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
KERNEL_SIZE = 3
KERNEL_SIGMA = 1.5
DATA_RANGE = 1.0
K1, K2 = 0.01, 0.03


def gaussian_kernel(size: int = KERNEL_SIZE, sigma: float = KERNEL_SIGMA) -> torch.Tensor:
    """MONAI's 3D Gaussian: the outer product of three normalized 1D Gaussians -> (1, 1, k, k, k)."""
    offsets = torch.arange((1 - size) / 2, (1 + size) / 2, 1.0)
    g = torch.exp(-((offsets / sigma) ** 2) / 2)
    g = g / g.sum()
    return (g[:, None, None] * g[None, :, None] * g[None, None, :])[None, None]


def min_edge() -> int:
    """The smallest volume edge MONAI accepts: edge // (scales - 1)^2 must exceed kernel_size - 1."""
    return KERNEL_SIZE * (len(SCALE_WEIGHTS) - 1) ** 2


def all_pairs(n: int) -> torch.Tensor:
    """Every unordered pair (i < j) of n volumes -> (n (n - 1) / 2, 2) int64."""
    return torch.triu_indices(n, n, offset=1).T.contiguous()


@torch.no_grad()
def ms_ssim_pairs(
    volumes: torch.Tensor,
    pairs: torch.Tensor,
    pairs_per_call: int = 16,
    device: str | torch.device | None = None,
    progress: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """MS-SSIM of each pair: volumes (N, 1, S, S, S), pairs (P, 2) indices -> (P,) float32 (CPU).

    Everything runs on ``device`` (default: the volumes' device) in float32, as MONAI does.
    ``pairs_per_call`` pairs share one call (raise it on a large GPU); ``impl``: the cross
    term's implementation (``prdit_fast.ops.ms_ssim_cross``: "auto", "torch", "triton")."""
    from prdit_fast.devices import resolve_device
    from prdit_fast.ops.ms_ssim_cross import ms_ssim_cross

    volumes = torch.as_tensor(volumes)
    if volumes.ndim != 5 or volumes.shape[1] != 1 or len(set(volumes.shape[2:])) != 1:
        raise ValueError(f"volumes must be (N, 1, S, S, S), got {tuple(volumes.shape)}")
    if volumes.shape[-1] < min_edge():
        raise ValueError(f"MS-SSIM with kernel {KERNEL_SIZE} and {len(SCALE_WEIGHTS)} scales needs an edge of at least "
                         f"{min_edge()} voxels, got {volumes.shape[-1]}")
    pairs = torch.as_tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    if pairs.numel() and (pairs.min() < 0 or pairs.max() >= volumes.shape[0]):
        raise ValueError(f"pair indices must lie in [0, {volumes.shape[0]})")
    if pairs_per_call < 1:
        raise ValueError(f"pairs_per_call must be >= 1, got {pairs_per_call}")
    device = resolve_device(device) if device is not None else volumes.device
    x = volumes.to(device=device, dtype=torch.float32)
    kernel = gaussian_kernel().to(device)
    window = kernel.flatten()
    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    pairs_dev = pairs.to(device)
    per_scale = torch.empty(len(SCALE_WEIGHTS), pairs.shape[0], device=device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(SCALE_WEIGHTS) * pairs.shape[0], desc="MS-SSIM pairs", unit="pair", dynamic_ncols=True)
    last = len(SCALE_WEIGHTS) - 1
    for scale in range(len(SCALE_WEIGHTS)):
        mu = torch.cat([F.conv3d(chunk, kernel) for chunk in x.split(pairs_per_call)])
        sigma = torch.cat([F.conv3d(chunk * chunk, kernel) for chunk in x.split(pairs_per_call)]) - mu * mu
        for start in range(0, pairs.shape[0], pairs_per_call):
            chunk = pairs_dev[start:start + pairs_per_call]
            per_scale[scale, start:start + chunk.shape[0]] = ms_ssim_cross(
                x[:, 0], mu[:, 0], sigma[:, 0], chunk, window, c1, c2, scale == last, impl=impl)
            if bar is not None:
                bar.update(chunk.shape[0])
        if scale < last:
            x = F.avg_pool3d(x, kernel_size=2)
    if bar is not None:
        bar.close()
    weights = torch.tensor(SCALE_WEIGHTS, device=device)[:, None]
    return torch.prod(torch.relu(per_scale) ** weights, dim=0).cpu()


def ms_ssim_diversity(
    volumes: torch.Tensor,
    max_pairs: int | None = None,
    seed: int = 0,
    pairs_per_call: int = 16,
    device: str | torch.device | None = None,
    progress: bool = False,
    impl: str = "auto",
) -> tuple[float, int]:
    """Mean MS-SSIM over every unordered pair of distinct volumes (N, 1, S, S, S) in [-1, 1]
    -> (mean, pairs evaluated); lower means a more diverse set.

    ``max_pairs``: evaluate a uniform random subset of that many pairs (seeded) instead of
    all N (N - 1) / 2."""
    n = int(volumes.shape[0])
    if n < 2:
        raise ValueError(f"MS-SSIM diversity needs at least 2 volumes, got {n}")
    total = n * (n - 1) // 2
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    pairs = all_pairs(n)
    if max_pairs is not None and max_pairs < total:
        chosen = np.random.default_rng(seed).choice(total, size=max_pairs, replace=False)
        pairs = pairs[torch.as_tensor(np.sort(chosen))]
    values = ms_ssim_pairs(volumes, pairs, pairs_per_call=pairs_per_call, device=device, progress=progress, impl=impl)
    return float(values.double().mean()), int(pairs.shape[0])
