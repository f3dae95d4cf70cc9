"""Evaluation as in the paper (spec section 10): 3D FID and MMD on MedicalNet 3D ResNet-50
features, MS-SSIM diversity, the W-Score (a trained critic's Wasserstein estimate against a
reference model), plus bootstrap intervals, a cached real side and reports.

    from prdit_fast.metrics import evaluate
    result = evaluate(real, fake, "resnet_50.pth")   # volumes (N, 1, S, S, S) in [-1, 1]
    result["fid_x1e3"], result["mmd"], result["ms_ssim"]

Needs scipy (``pip install prdit_fast[eval]``); MONAI is the MS-SSIM reference the tests
compare against.
"""
from .distances import bootstrap_intervals, fid, frechet_distance, gaussian_fit, mmd
from .evaluate import (
    FeatureEvaluator,
    IntensityRangeError,
    check_intensity_ranges,
    evaluate,
    markdown_report,
    write_report,
)
from .medicalnet import MedicalNetError, MedicalNetResNet50, features, load_medicalnet, network_digest
from .ms_ssim import ms_ssim_diversity, ms_ssim_pairs
from .wasserstein import WCritic, wscore, wscore_transform

__all__ = [
    "FeatureEvaluator",
    "IntensityRangeError",
    "MedicalNetError",
    "MedicalNetResNet50",
    "WCritic",
    "bootstrap_intervals",
    "check_intensity_ranges",
    "evaluate",
    "features",
    "fid",
    "frechet_distance",
    "gaussian_fit",
    "load_medicalnet",
    "markdown_report",
    "mmd",
    "ms_ssim_diversity",
    "ms_ssim_pairs",
    "network_digest",
    "write_report",
    "wscore",
    "wscore_transform",
]
