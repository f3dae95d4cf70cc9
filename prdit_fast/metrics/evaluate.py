"""``evaluate(real, fake, weights)``: 3D FID, MMD and MS-SSIM of a generated set against a
real one, with bootstrap intervals, a cached real side, and a JSON + Markdown report.

Inputs are volumes (N, 1, S, S, S) in [-1, 1] (tensors, arrays, or iterables of such
batches). The real set's features are cached in ``cache_dir`` under a key made of the
set's identity (``real_key``: the CLI passes a digest of the files' contents; a tensor or
array is hashed here), the network weights' digest, the edge and the feature dtype.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..atomic import atomic_path
from ..atomic import write_json
from .distances import bootstrap_intervals, fid, fid_via_factors, mmd, small_sample_warning
from .medicalnet import FEATURES, FeatureSet, MedicalNetResNet50, load_medicalnet, network_digest, scan
from .ms_ssim import min_edge, ms_ssim_diversity

# the official evaluation refuses two sets whose minima or maxima differ by more than this
RANGE_TOLERANCE = 0.1
# "sqrtm": scipy's matrix square root of S1 S2, as the official code (minutes for 2048-d on
# a CPU); "factors": the same trace from the QR factors of the centred features (seconds)
FID_METHODS = ("sqrtm", "factors")
CACHE_VERSION = 1
INTERVAL_METHOD = ("basic bootstrap interval of the bias-corrected estimate (bias = median bootstrap shift), "
                   "both sets' volumes resampled")
NOT_COMPARABLE = ("NOT COMPARABLE TO ANY PAPER: the feature network has random weights (--weights random); "
                  "these numbers only compare runs made with the same random network.")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def default_cache_dir() -> Path:
    """Where real-set features are cached unless told otherwise: $XDG_CACHE_HOME (or ~/.cache)/prdit_fast/real_features."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prdit_fast" / "real_features"


class IntensityRangeError(ValueError):
    """Two sets not on the same intensity scale (the official per-set range check)."""


def _range_cause(real: FeatureSet, fake: FeatureSet, tolerance: float) -> str:
    """Which set is narrower, at which end, and the usual reason."""
    narrow_real = real.low > fake.low + tolerance or real.high < fake.high - tolerance
    narrow_fake = fake.low > real.low + tolerance or fake.high < real.high - tolerance
    if narrow_real and not narrow_fake:
        return ("the real set spans less than the generated one (average-pooling real volumes to a lower edge "
                "smooths their extremes, or the generated volumes overshoot)")
    if narrow_fake and not narrow_real:
        return ("the generated set spans less than the real one (generated volumes dimmed or clipped, or read "
                "with another intensity window than the real ones)")
    return "the sets are shifted against each other (different intensity recipes)"


def check_intensity_ranges(real: FeatureSet, fake: FeatureSet, tolerance: float = RANGE_TOLERANCE) -> None:
    """Raise IntensityRangeError when the sets' minima or maxima differ by more than
    ``tolerance`` (the official check, 0.1) or a set leaves [-1, 1] by more than it. The
    message names both ranges and the likely cause."""
    for name, s in (("real", real), ("generated", fake)):
        if s.low < -1 - tolerance or s.high > 1 + tolerance:
            raise IntensityRangeError(
                f"the {name} volumes span [{s.low:.3g}, {s.high:.3g}], not [-1, 1]: map them to the model's scale "
                f"(e.g. HU -> prdit_fast.hu_to_unit, [0, 1] data -> 2 x - 1) before evaluating"
            )
    if abs(real.low - fake.low) > tolerance or abs(real.high - fake.high) > tolerance:
        raise IntensityRangeError(
            f"real volumes span [{real.low:.3g}, {real.high:.3g}] and generated ones [{fake.low:.3g}, {fake.high:.3g}]: "
            f"minima or maxima differ by more than {tolerance:g} (the official evaluation refuses this): "
            f"{_range_cause(real, fake, tolerance)}; map both sets to [-1, 1] with the same intensity recipe, or "
            f"accept the difference with a larger range tolerance (--range-tolerance)"
        )


def content_key(volumes: torch.Tensor | np.ndarray) -> str:
    """SHA-256 of a tensor's or array's shape and float32 values."""
    data = torch.as_tensor(volumes).detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(repr(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


class RealCache:
    """Real-set features on disk: ``<dir>/real-<sha256 of the key>.npz``, written atomically."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def path(self, real_key: str, weights_digest: str, dtype: torch.dtype) -> Path:
        key = json.dumps({"real": real_key, "weights": weights_digest, "dtype": _DTYPE_NAMES[dtype],
                          "version": CACHE_VERSION}, sort_keys=True)
        return self.directory / f"real-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"

    def load(self, path: Path) -> FeatureSet | None:
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as f:
            return FeatureSet(f["features"], float(f["low"]), float(f["high"]), int(f["size"]))

    def save(self, path: Path, entry: FeatureSet) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, features=entry.features, low=entry.low, high=entry.high, size=entry.size)


class FeatureEvaluator:
    """The feature network and the real set's features, kept for repeated scoring of
    generated sets (``evaluate`` and the training loop's periodic evaluation).

    ``real``: volumes (N, 1, S, S, S) in [-1, 1] or an iterable of batches; ``real_key``
    names it for the cache (default: a content hash for a tensor/array; an iterable
    without a key is not cached)."""

    def __init__(
        self,
        real,
        weights: str | os.PathLike | MedicalNetResNet50,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        cache_dir: str | os.PathLike | None = None,
        real_key: str | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
        fid_method: str = "sqrtm",
        range_tolerance: float = RANGE_TOLERANCE,
    ):
        from prdit_fast.devices import resolve_device

        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        if fid_method not in FID_METHODS:
            raise ValueError(f"fid_method must be one of {FID_METHODS}, got {fid_method!r}")
        self.fid_method = fid_method
        self.range_tolerance = range_tolerance
        self.device = resolve_device(device)
        self.batch_size, self.dtype, self.progress = batch_size, dtype, progress
        self.weights_path = None if isinstance(weights, MedicalNetResNet50) else str(weights)
        net = weights if isinstance(weights, MedicalNetResNet50) else load_medicalnet(weights)
        self.net = net.to(self.device).eval()
        self.weights_digest = network_digest(self.net)
        if real_key is None and isinstance(real, (torch.Tensor, np.ndarray)):
            real_key = content_key(real)
        self.cache_path = None
        self.cache_status = "off"
        started = time.perf_counter()
        cached = None
        if cache_dir is not None and real_key is not None:
            cache = RealCache(cache_dir)
            self.cache_path = cache.path(real_key, self.weights_digest, dtype)
            cached = cache.load(self.cache_path)
            self.cache_status = "hit" if cached is not None else "miss"
        elif cache_dir is not None and log is not None:
            log("real set given as an iterable without real_key: its features are not cached")
        if cached is None:
            cached, _ = scan(real, self.net, batch_size, self.device, dtype, progress=progress, desc="real features")
            if self.cache_path is not None:
                RealCache(cache_dir).save(self.cache_path, cached)
        self.real = cached
        self.real_seconds = time.perf_counter() - started

    def scan_fake(self, fake, keep: bool = False, check_ranges: bool = True) -> tuple[FeatureSet, torch.Tensor | None]:
        """Features (and with ``keep`` the volumes) of a generated set; ``check_ranges``: the
        official intensity-range check against the real set."""
        fake_set, kept = scan(fake, self.net, self.batch_size, self.device, self.dtype, keep=keep,
                              progress=self.progress, desc="generated features")
        if fake_set.size != self.real.size:
            raise ValueError(f"real volumes are {self.real.size}^3, generated ones {fake_set.size}^3: evaluate at one edge")
        if check_ranges:
            check_intensity_ranges(self.real, fake_set, self.range_tolerance)
        return fake_set, kept

    def distances(self, fake: FeatureSet) -> dict[str, float]:
        """FID (and x10^3), MMD and MMD^2 of ``fake`` against the real set."""
        if self.fid_method == "sqrtm":
            fid_value = fid(self.real.features, fake.features)
        else:
            fid_value = fid_via_factors(torch.as_tensor(self.real.features, device=self.device),
                                        torch.as_tensor(fake.features, device=self.device))
        mmd_value, mmd2 = mmd(self.real.features, fake.features)
        return {"fid": fid_value, "fid_x1e3": fid_value * 1e3, "mmd": mmd_value, "mmd2": mmd2}

    def score(self, fake) -> dict[str, float]:
        """FID / MMD of generated volumes (N, 1, S, S, S) in [-1, 1] against the real set."""
        fake_set, _ = self.scan_fake(fake)
        return self.distances(fake_set)


def versions() -> dict[str, str]:
    import scipy

    from prdit_fast import __version__

    out = {"prdit_fast": __version__, "torch": torch.__version__, "numpy": np.__version__,
           "scipy": scipy.__version__, "python": platform.python_version()}
    try:
        import monai

        out["monai"] = monai.__version__
    except ImportError:
        pass
    return out


def evaluate(
    real,
    fake,
    weights: str | os.PathLike | MedicalNetResNet50,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    ms_ssim: bool = True,
    ms_ssim_pairs: int | None = None,
    pairs_per_call: int = 16,
    bootstrap: int = 200,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    real_key: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    fid_method: str = "sqrtm",
    range_tolerance: float = RANGE_TOLERANCE,
    random_weights: bool = False,
) -> dict[str, Any]:
    """3D FID, MMD and MS-SSIM diversity of ``fake`` against ``real`` (spec section 10).

    real, fake: volumes (N, 1, S, S, S) in [-1, 1], tensors or arrays, or iterables of such
    batches. weights: MedicalNet's ``resnet_50.pth`` path or a loaded network.
    ms_ssim: compute the generated set's MS-SSIM diversity (needs an edge >= 48 and keeps the
    generated volumes in memory); ms_ssim_pairs: a seeded random subset of pairs instead
    of all. bootstrap: replicates for the 95% intervals of FID and MMD (0: none).
    fid_method: "sqrtm" (scipy, as the official code) or "factors" (the same distance from
    QR factors; agrees to ~1e-6 relative, seconds instead of minutes on a CPU).
    range_tolerance: the official range check's tolerance (0.1). random_weights: the
    network has random weights; the report then says first that its numbers compare with
    no paper.

    Returns a dict with ``fid``, ``fid_x1e3``, ``mmd``, ``mmd2``, ``ms_ssim`` (None when
    not computed, with ``ms_ssim_note``), ``n_real``, ``n_fake``, ``size``, the intervals,
    the weights' digest, the cache status, timings and versions."""
    evaluator = FeatureEvaluator(real, weights, batch_size, device, dtype, cache_dir, real_key, progress, log, fid_method,
                                 range_tolerance)
    started = time.perf_counter()
    fake_set, kept = evaluator.scan_fake(fake, keep=ms_ssim)
    seconds = {"real_features": evaluator.real_seconds, "fake_features": time.perf_counter() - started}
    started = time.perf_counter()
    result: dict[str, Any] = evaluator.distances(fake_set)
    seconds["fid_mmd"] = time.perf_counter() - started
    result.update({"n_real": evaluator.real.count, "n_fake": fake_set.count, "size": fake_set.size,
                   "random_weights": bool(random_weights), "warnings": []})
    small = small_sample_warning(evaluator.real.count, fake_set.count, FEATURES)
    if small is not None:
        result["warnings"].append(small)
        if log is not None:
            log(f"warning: {small}")
    if bootstrap:
        started = time.perf_counter()
        ci = bootstrap_intervals(evaluator.real.features, fake_set.features, bootstrap, seed, device=evaluator.device)
        seconds["bootstrap"] = time.perf_counter() - started
        result.update({"fid_ci95": ci["fid"], "fid_x1e3_ci95": [v * 1e3 for v in ci["fid"]], "mmd_ci95": ci["mmd"],
                       "fid_bias_corrected": ci["fid_bias_corrected"],
                       "fid_x1e3_bias_corrected": ci["fid_bias_corrected"] * 1e3,
                       "mmd_bias_corrected": ci["mmd_bias_corrected"], "bootstrap_replicates": bootstrap,
                       "interval_method": INTERVAL_METHOD})
    result["ms_ssim"], result["ms_ssim_pairs"] = None, 0
    if not ms_ssim:
        result["ms_ssim_note"] = "not requested"
    elif fake_set.size < min_edge():
        result["ms_ssim_note"] = f"MONAI's MS-SSIM (kernel 3, 5 scales) needs an edge >= {min_edge()}; got {fake_set.size}"
    elif fake_set.count < 2:
        result["ms_ssim_note"] = "needs at least 2 generated volumes"
    else:
        started = time.perf_counter()
        result["ms_ssim"], result["ms_ssim_pairs"] = ms_ssim_diversity(
            kept, ms_ssim_pairs, seed, pairs_per_call, evaluator.device, progress
        )
        seconds["ms_ssim"] = time.perf_counter() - started
    result.update({
        "weights": evaluator.weights_path,
        "weights_sha256": evaluator.weights_digest,
        "feature_dtype": _DTYPE_NAMES[dtype],
        "fid_method": fid_method,
        "real_range": [evaluator.real.low, evaluator.real.high],
        "fake_range": [fake_set.low, fake_set.high],
        "real_cache": evaluator.cache_status,
        "device": str(evaluator.device),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "versions": versions(),
    })
    if random_weights:  # first in the JSON too
        result = {"not_comparable": NOT_COMPARABLE, **result}
    return result


def _number(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _wscore_rows(w: dict[str, Any] | None) -> list[str]:
    """The W-Score's table rows and protocol note (none without a W-Score)."""
    if not w:
        return []
    ci = (f"; bias-corrected {w['ratio_bias_corrected']:.3f}, 95% CI {w['ratio_ci95'][0]:.3f} - {w['ratio_ci95'][1]:.3f}"
          if w.get("ratio_ci95") else "")
    spread = f", seed std {w['ratio_seed_std']:.3f}" if w.get("ratio_seed_std") is not None else ""
    p = w["protocol"]
    return [
        f"| W-Score W_fake / W_reference (1 = as close as the reference) | {w['ratio']:.3f}{ci}{spread} "
        f"({len(w['seeds'])} seed(s)) |",
        f"| W_fake, W_reference (critic units) | {w['w_fake']:.4g}, {w['w_reference']:.4g} |", "",
        f"W-Score as the authors' critic code (spec section 10): critic trained on {w['n_train']['real']} real vs "
        f"{w['n_train']['fake']} + {w['n_train']['reference']} generated volumes, lambda {p['lambda_gp']:g}, "
        f"{p['epochs']} epochs, checkpoint {p['checkpoint']}, split {p['split']}, {p['precision']}; read out on "
        f"{w['n_held_out']['real']} / {w['n_held_out']['fake']} / {w['n_held_out']['reference']} held-out volumes; "
        f"reference {w.get('reference', 'given')}. The interval resamples the held-out volumes.",
    ]


def markdown_report(result: dict[str, Any], title: str = "prdit_fast evaluation") -> str:
    """The result of ``evaluate`` as a short Markdown report."""
    def interval(name: str, digits: int) -> str:
        ci, corrected = result.get(f"{name}_ci95"), result.get(f"{name}_bias_corrected")
        if not ci:
            return ""
        return f"; bias-corrected {corrected:.{digits}f}, 95% CI {ci[0]:.{digits}f} - {ci[1]:.{digits}f}"

    ms = _number(result.get("ms_ssim"))
    ms += f" over {result['ms_ssim_pairs']:,} pairs" if result.get("ms_ssim") is not None else f" ({result.get('ms_ssim_note')})"
    lines = ([f"**{NOT_COMPARABLE}**", ""] if result.get("random_weights") else []) + [
        f"# {title}", "",
        f"{result['n_real']} real and {result['n_fake']} generated volumes at {result['size']}^3; MedicalNet 3D "
        f"ResNet-50 features ({result['feature_dtype']}), weights sha256 `{result['weights_sha256'][:16]}...`.", "",
        "| metric | value |", "| --- | --- |",
        f"| 3D FID x10^3 | {_number(result['fid_x1e3'], 3)}{interval('fid_x1e3', 3)} |",
        f"| 3D FID | {result['fid']:.6g} |",
        f"| MMD | {_number(result['mmd'])}{interval('mmd', 4)} |",
        f"| MMD^2 | {result['mmd2']:.6g} |",
        f"| MS-SSIM (diversity, lower = more diverse) | {ms} |",
        *_wscore_rows(result.get("wscore")), "",
        "FID and MMD as in the paper (spec section 10): FID between Gaussian fits of the features (the paper's "
        "tables print FID x10^3), biased RBF MMD with the bandwidth from the real set's median squared distance. "
        f"FID by {result['fid_method']}. The first number is the plug-in estimate, comparable with the paper; "
        f"plug-in FID and MMD are biased upward (more so for few volumes), so the interval is the "
        f"{result.get('interval_method', 'bootstrap interval')} ({result.get('bootstrap_replicates', 0)} replicates) "
        f"and brackets the bias-corrected estimate printed beside it. Lower is better for both.", "",
        *[f"Warning: {w}." for w in result.get("warnings", [])], *([""] if result.get("warnings") else []),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def markdown_report_path(path: str | os.PathLike) -> Path:
    """Where ``write_report`` puts the Markdown copy of the JSON report ``path``."""
    return Path(path).with_suffix(".md")


def write_report(result: dict[str, Any], path: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``result`` as JSON to ``path`` and as Markdown next to it (``.md``), atomically."""
    path = Path(path)
    markdown = markdown_report_path(path)
    write_json(path, result)
    with atomic_path(markdown) as tmp:
        tmp.write_text(markdown_report(result))
    return path, markdown
