"""Distances between feature sets (spec section 10): 3D FID, MMD, and bootstrap intervals.

Features are float64 arrays (N, F), one row per volume.
"""
from __future__ import annotations

import numpy as np
import torch

SINGULAR_OFFSET = 1e-6  # added to both covariances' diagonals when sqrtm(S1 S2) fails


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be (N, F) features with N >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf")
    return x


def gaussian_fit(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) features -> (mean (F,), covariance (F, F) as np.cov: rows are observations, N - 1)."""
    feats = _as_features(feats, "features")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), the square root by ``scipy.linalg.sqrtm``;
    when it is not finite (a singular product) 1e-6 is added to both diagonals and it is
    recomputed. A complex result with a non-negligible imaginary diagonal is an error."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"means {mu1.shape}, {mu2.shape} and covariances {sigma1.shape}, {sigma2.shape} do not match")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * SINGULAR_OFFSET
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(np.diagonal(covmean).imag))
        if largest > 1e-3:
            raise ValueError(f"sqrt(S1 S2) has an imaginary diagonal component of {largest:.3g}: the covariances are "
                             f"numerically broken (too few volumes for the feature width?)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """3D FID between two feature sets (N, F), (M, F)."""
    return frechet_distance(*gaussian_fit(real), *gaussian_fit(fake))


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a_i - b_j|^2 for all i, j -> (N, M), float64, clamped at 0 against rounding."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp_min_(0.0).numpy()


def rbf_gamma(real_sq: np.ndarray) -> float:
    """gamma = 1 / (2 median |x_i - x_j|^2) over all ordered pairs of the real set, the zero
    diagonal included. The median is ``torch.median``'s, as the official code: for an even
    count the LOWER of the two middle values, not their mean (numpy's)."""
    flat = np.asarray(real_sq, dtype=np.float64).ravel()
    median = float(np.partition(flat, (flat.size - 1) // 2)[(flat.size - 1) // 2])
    if not median > 0:
        raise ValueError("the real features are all identical: the RBF bandwidth (median distance) is 0")
    return 1.0 / (2.0 * median)


def _mmd2_from(dxx: np.ndarray, dyy: np.ndarray, dxy: np.ndarray, gamma: float) -> float:
    return float(np.exp(-gamma * dxx).mean() + np.exp(-gamma * dyy).mean() - 2.0 * np.exp(-gamma * dxy).mean())


def mmd(real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    """Biased MMD with an RBF kernel exp(-gamma |u - v|^2), gamma from the real set's median
    squared distance -> (MMD = sqrt(max(MMD^2, 0)), MMD^2)."""
    real, fake = _as_features(real, "real features"), _as_features(fake, "fake features")
    dxx, dyy, dxy = squared_distances(real, real), squared_distances(fake, fake), squared_distances(real, fake)
    mmd2 = _mmd2_from(dxx, dyy, dxy, rbf_gamma(dxx))
    return float(np.sqrt(max(mmd2, 0.0))), mmd2


def _centred_r(feats: torch.Tensor) -> torch.Tensor:
    """R of the thin QR of the centred features: R^T R = (N - 1) cov."""
    return torch.linalg.qr(feats - feats.mean(0), mode="r")[1]


def fid_via_factors(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The same Frechet distance as ``fid``, computed without a d x d square root: with
    centred features A1, A2 and S_i = A_i^T A_i / (n_i - 1), the eigenvalues of S1 S2 are
    the squared singular values of A1 A2^T / sqrt((n1 - 1)(n2 - 1)), so Tr sqrt(S1 S2) is
    the nuclear norm of R1 R2^T / sqrt(...), R_i from the QR of A_i. Used for bootstrap
    replicates, where a 2048 x 2048 sqrtm per replicate would take minutes."""
    n1, n2 = real.shape[0], fake.shape[0]
    diff = real.mean(0) - fake.mean(0)
    r1, r2 = _centred_r(real), _centred_r(fake)
    trace_sqrt = torch.linalg.matrix_norm(r1 @ r2.T, ord="nuc") / np.sqrt((n1 - 1) * (n2 - 1))
    traces = (r1 * r1).sum() / (n1 - 1) + (r2 * r2).sum() / (n2 - 1)
    return float(diff @ diff + traces - 2.0 * trace_sqrt)


def bias_corrected_interval(estimate: float, replicates, level: float = 0.95,
                            floor: float | None = 0.0) -> tuple[float, list[float]]:
    """A plug-in estimate's bootstrap bias correction and interval -> (bias-corrected
    estimate, [low, high]).

    Plug-in FID and MMD are biased upwards, and a resample (repeated rows) more so: the
    replicates sit above the estimate, so a percentile interval can miss it entirely. The
    bias is estimated by the replicates' median shift, b = median(t*) - t; the estimate
    corrected for it is t - b, and the basic interval [2 t - q_high, 2 t - q_low] is the
    interval of that corrected quantity (it always contains it). ``floor`` clips all three
    for statistics that cannot go below it (distances: 0)."""
    values = np.asarray(replicates, dtype=np.float64)
    tail = (1.0 - level) / 2 * 100
    low_q, median, high_q = np.percentile(values, [tail, 50.0, 100 - tail])
    corrected, interval = 2 * estimate - median, [2 * estimate - high_q, 2 * estimate - low_q]
    if floor is not None:
        corrected, interval = max(corrected, floor), [max(v, floor) for v in interval]
    return float(corrected), [float(v) for v in interval]


def small_sample_warning(n_real: int, n_fake: int, dim: int) -> str | None:
    """A warning when a set has no more volumes than the features have dimensions: its
    covariance is then rank-deficient and FID carries a large, N-dependent bias."""
    n = min(n_real, n_fake)
    if n > dim:
        return None
    return (f"only {n} volumes for {dim}-d features: the covariances have rank < {dim}, so FID (and to a lesser "
            f"degree MMD) is biased upward by an amount that depends on N; compare numbers only at equal N and "
            f"prefer N > {dim}")


def bootstrap_intervals(
    real: np.ndarray, fake: np.ndarray, replicates: int = 200, seed: int = 0, level: float = 0.95,
    device: str | torch.device = "cpu",
) -> dict:
    """Bootstrap bias corrections and intervals of FID and MMD -> {"fid": [low, high],
    "mmd": [low, high], "fid_bias_corrected": float, "mmd_bias_corrected": float,
    "replicates": n, "level": level}.

    Each replicate resamples both sets' rows with replacement and recomputes the statistic
    (FID by ``fid_via_factors``); ``bias_corrected_interval`` turns the replicates into
    the bias-corrected estimate and its basic interval. The MMD's bandwidth stays the full
    real set's: a resample's repeated rows add zero distances that would shrink its median."""
    if replicates < 2:
        raise ValueError(f"bootstrap replicates must be >= 2, got {replicates}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    real, fake = _as_features(real, "real features"), _as_features(fake, "fake features")
    rng = np.random.default_rng(seed)
    dxx, dyy, dxy = squared_distances(real, real), squared_distances(fake, fake), squared_distances(real, fake)
    gamma = rbf_gamma(dxx)
    real_t = torch.as_tensor(real, device=device)
    fake_t = torch.as_tensor(fake, device=device)
    estimate_fid = fid_via_factors(real_t, fake_t)
    estimate_mmd = np.sqrt(max(_mmd2_from(dxx, dyy, dxy, gamma), 0.0))
    fids, mmds = [], []
    for _ in range(replicates):
        i = rng.integers(0, real.shape[0], real.shape[0])
        j = rng.integers(0, fake.shape[0], fake.shape[0])
        fids.append(fid_via_factors(real_t[torch.as_tensor(i, device=device)], fake_t[torch.as_tensor(j, device=device)]))
        mmd2 = _mmd2_from(dxx[np.ix_(i, i)], dyy[np.ix_(j, j)], dxy[np.ix_(i, j)], gamma)
        mmds.append(np.sqrt(max(mmd2, 0.0)))
    out: dict = {"replicates": replicates, "level": level}
    for name, estimate, values in (("fid", estimate_fid, fids), ("mmd", estimate_mmd, mmds)):
        out[f"{name}_bias_corrected"], out[name] = bias_corrected_interval(estimate, values, level)
    return out
