"""Weight-free quality numbers of generated volumes against fresh phantoms (the demo's
verdict, no MedicalNet needed). Volumes are HU arrays (N, S, S, S).

- Seam ratio per axis: the mean absolute voxel step across token boundaries (between
  voxel 8k - 1 and 8k for the stride-8 token grid) divided by the mean step elsewhere.
  A model that has not learned to join its tokens draws blocks: the ratio rises far
  above the phantom's own (which is ~1: anatomy does not know the grid). Reported as
  the samples' ratio over the phantoms' ratio, per axis (depth, height, width).
- HU histogram distance: the 1-Wasserstein distance between the samples' and the
  phantoms' voxel HU distributions in [-1000, 1000] HU (mean HU moved), from histograms.
- Volume fractions: body (> -950 HU: not air) and lung (-950 to -500 HU), mean per volume.
"""
from __future__ import annotations

from typing import Any

import numpy as np

AXES = ("depth", "height", "width")
BODY_HU = -950.0  # above: not air (the phantom's air is -1000 HU without noise)
LUNG_HU = (-950.0, -500.0)
HISTOGRAM_BINS = 200
HISTOGRAM_RANGE = (-1000.0, 1000.0)


def seam_ratios(volumes_hu: np.ndarray, period: int = 8) -> np.ndarray:
    """(N, S, S, S) -> (3,): mean |step| across ``period`` boundaries / mean |step| within, per axis."""
    volumes_hu = np.asarray(volumes_hu, dtype=np.float64)
    if volumes_hu.ndim != 4 or volumes_hu.shape[-1] <= period:
        raise ValueError(f"expected volumes (N, S, S, S) with S > {period}, got {volumes_hu.shape}")
    ratios = []
    for axis in (1, 2, 3):
        steps = np.abs(np.diff(volumes_hu, axis=axis))
        boundary = (np.arange(steps.shape[axis]) + 1) % period == 0  # the step from voxel 8k - 1 to 8k
        across = np.compress(boundary, steps, axis=axis).mean()
        within = np.compress(~boundary, steps, axis=axis).mean()
        ratios.append(across / within if within > 0 else np.inf)
    return np.array(ratios)


def hu_histogram(volumes_hu: np.ndarray) -> np.ndarray:
    """Normalized histogram of the voxels' HU, clipped to [-1000, 1000], in 200 bins."""
    clipped = np.clip(np.asarray(volumes_hu, dtype=np.float64), *HISTOGRAM_RANGE)
    counts, _ = np.histogram(clipped, bins=HISTOGRAM_BINS, range=HISTOGRAM_RANGE)
    return counts / counts.sum()


def histogram_distance(a_hu: np.ndarray, b_hu: np.ndarray) -> float:
    """1-Wasserstein distance in HU between the two sets' voxel HU distributions (histograms)."""
    width = (HISTOGRAM_RANGE[1] - HISTOGRAM_RANGE[0]) / HISTOGRAM_BINS
    return float(np.abs(np.cumsum(hu_histogram(a_hu)) - np.cumsum(hu_histogram(b_hu))).sum() * width)


def volume_fractions(volumes_hu: np.ndarray) -> dict[str, float]:
    """Mean fraction of each volume that is body (> -950 HU) and lung (-950 to -500 HU)."""
    v = np.asarray(volumes_hu)
    return {"body": float((v > BODY_HU).mean()), "lung": float(((v > LUNG_HU[0]) & (v <= LUNG_HU[1])).mean())}


def phantom_quality(samples_hu: np.ndarray, phantoms_hu: np.ndarray, period: int = 8) -> dict[str, Any]:
    """All of the module's numbers for ``samples_hu`` against ``phantoms_hu`` (both (N, S, S, S) HU)."""
    sample_seams, phantom_seams = seam_ratios(samples_hu, period), seam_ratios(phantoms_hu, period)
    return {
        "seam_ratio": dict(zip(AXES, sample_seams.tolist())),
        "phantom_seam_ratio": dict(zip(AXES, phantom_seams.tolist())),
        "seam_ratio_vs_phantom": dict(zip(AXES, (sample_seams / phantom_seams).tolist())),
        "hu_histogram_w1_hu": histogram_distance(samples_hu, phantoms_hu),
        "volume_fractions": volume_fractions(samples_hu),
        "phantom_volume_fractions": volume_fractions(phantoms_hu),
        "samples": int(np.asarray(samples_hu).shape[0]),
        "phantoms": int(np.asarray(phantoms_hu).shape[0]),
        "token_period": period,
    }


def format_quality(quality: dict[str, Any]) -> str:
    """A few printable lines of ``phantom_quality``'s result."""
    seams = quality["seam_ratio_vs_phantom"]
    fractions, reference = quality["volume_fractions"], quality["phantom_volume_fractions"]
    return "\n".join([
        f"quality against {quality['phantoms']} fresh phantoms ({quality['samples']} samples; 1.0 = like the phantom):",
        "  seam ratio / phantom's (depth, height, width): " + ", ".join(f"{seams[a]:.2f}" for a in AXES)
        + f"  (steps across {quality['token_period']}-voxel token boundaries vs within)",
        f"  HU histogram distance (W1): {quality['hu_histogram_w1_hu']:.1f} HU",
        f"  body fraction {fractions['body']:.3f} (phantoms {reference['body']:.3f}), "
        f"lung fraction {fractions['lung']:.3f} (phantoms {reference['lung']:.3f})",
    ])
