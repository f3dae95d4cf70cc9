"""Evaluation speed: features + FID/MMD of N real and N generated volumes, all-pairs
MS-SSIM of N volumes, each beside the official scripts' way measured on a subset and
extrapolated per item in the same run. Also the bf16 features' error against fp32.

The official way: the feature network called one volume at a time in fp32, and MONAI's
``MultiScaleSSIMMetric`` called once per ordered pair (N (N - 1) calls). Ours: batched
features, each unordered pair once with every volume's pyramid computed once.

    # the GPU targets (issue 17): 1,000 + 1,000 volumes at 128^3
    python benchmarks/bench_metrics.py --num 1000 --size 128 --device cuda --out benchmarks/results/metrics.json
    # tiny, on a CPU (tests/test_bench_metrics.py)
    python benchmarks/bench_metrics.py --num 2 --size 48 --official-volumes 1 --official-pairs 1 --fid-methods factors

The volumes are smooth random fields in [-1, 1] (timing does not depend on content) and
the network has random weights unless ``--weights`` names MedicalNet's file.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prdit_fast.atomic import write_json
from prdit_fast.devices import resolve_device
from prdit_fast.metrics import MedicalNetResNet50, load_medicalnet, ms_ssim_diversity
from prdit_fast.metrics.distances import bootstrap_intervals, fid, fid_via_factors, mmd
from prdit_fast.metrics.medicalnet import FeatureSet, scan
from prdit_fast.metrics.ms_ssim import all_pairs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def smooth_volumes(count: int, size: int, seed: int, device: torch.device) -> torch.Tensor:
    """(count, 1, S, S, S) smooth random fields in [-1, 1] on ``device``, sharing a common
    component (as volumes of one anatomy do, so MS-SSIM is not 0)."""
    g = torch.Generator(device=device).manual_seed(seed)
    edge = max(size // 8, 2)

    def field() -> torch.Tensor:
        coarse = torch.randn(1, 1, edge, edge, edge, generator=g, device=device)
        return F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=False)

    common = field()
    out = [torch.tanh(common + 0.7 * field() + 0.1 * torch.randn((1, 1) + (size,) * 3, generator=g, device=device))
           for _ in range(count)]
    return torch.cat(out)


def timed(device: torch.device, fn):
    synchronize(device)
    started = time.perf_counter()
    value = fn()
    synchronize(device)
    return value, time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1000, help="real volumes, and generated volumes (default 1000)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=16, help="feature batch (ours)")
    parser.add_argument("--pairs-per-call", type=int, default=32, help="MS-SSIM pairs per call (ours)")
    parser.add_argument("--official-volumes", type=int, default=16, help="volumes timed the official way")
    parser.add_argument("--official-pairs", type=int, default=8, help="ordered pairs timed the official way (MONAI)")
    parser.add_argument("--fid-methods", nargs="+", choices=("sqrtm", "factors"), default=["sqrtm", "factors"])
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--weights", type=Path, default=None, help="MedicalNet's resnet_50.pth (default: random weights)")
    parser.add_argument("--no-ms-ssim", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    net = load_medicalnet(args.weights, map_location=device) if args.weights else MedicalNetResNet50().to(device).eval()
    real = smooth_volumes(args.num, args.size, 1, device)
    fake = smooth_volumes(args.num, args.size, 2, device)
    result: dict = {"num": args.num, "size": args.size, "device": str(device), "seconds": {}, "official_seconds": {}}
    seconds, official = result["seconds"], result["official_seconds"]

    # features: ours (batched, fp32 and bf16) and the official way (one volume per call, fp32)
    feats: dict[str, FeatureSet] = {}
    for name, volumes in (("real", real), ("fake", fake)):
        feats[name], seconds[f"features_{name}_fp32"] = timed(
            device, lambda v=volumes: scan(v, net, args.batch_size, device, torch.float32)[0])
    bf16, seconds["features_fake_bf16"] = timed(device, lambda: scan(fake, net, args.batch_size, device, torch.bfloat16)[0])
    error = np.abs(bf16.features - feats["fake"].features).max() / np.abs(feats["fake"].features).max()
    result["bf16_feature_max_error_relative_to_max"] = float(error)
    subset = fake[:args.official_volumes]
    _, t = timed(device, lambda: scan(subset, net, 1, device, torch.float32))
    official["features_per_volume"] = t / subset.shape[0]
    official["features_2n_extrapolated"] = official["features_per_volume"] * 2 * args.num

    for method in args.fid_methods:
        if method == "sqrtm":
            value, seconds["fid_sqrtm"] = timed(device, lambda: fid(feats["real"].features, feats["fake"].features))
        else:
            value, seconds["fid_factors"] = timed(device, lambda: fid_via_factors(
                torch.as_tensor(feats["real"].features, device=device), torch.as_tensor(feats["fake"].features, device=device)))
        result[f"fid_{method}"] = value
    bf16_fid = fid_via_factors(torch.as_tensor(feats["real"].features), torch.as_tensor(bf16.features))
    result["fid_factors_from_bf16_features"] = bf16_fid
    (result["mmd"], _), seconds["mmd"] = timed(device, lambda: mmd(feats["real"].features, feats["fake"].features))
    if args.bootstrap:
        _, seconds["bootstrap"] = timed(device, lambda: bootstrap_intervals(
            feats["real"].features, feats["fake"].features, args.bootstrap, device=device))
    seconds["features_and_fid_mmd"] = (seconds["features_real_fp32"] + seconds["features_fake_fp32"]
                                       + seconds[f"fid_{args.fid_methods[0]}"] + seconds["mmd"])

    if not args.no_ms_ssim:
        (result["ms_ssim"], result["ms_ssim_pairs"]), seconds["ms_ssim_all_pairs"] = timed(
            device, lambda: ms_ssim_diversity(fake, pairs_per_call=args.pairs_per_call, device=device))
        from monai.metrics import MultiScaleSSIMMetric

        metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=3)
        pairs = all_pairs(args.num)[:args.official_pairs].tolist()

        def official_pairs():
            for i, j in pairs:
                metric(fake[i:i + 1], fake[j:j + 1])
            metric.reset()

        _, t = timed(device, official_pairs)
        official["ms_ssim_per_ordered_pair"] = t / len(pairs)
        official["ms_ssim_all_ordered_pairs_extrapolated"] = official["ms_ssim_per_ordered_pair"] * args.num * (args.num - 1)

    result.update({
        "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "weights": str(args.weights) if args.weights else "random", "command": " ".join(sys.argv),
    })
    print(json.dumps(result, indent=2))
    if args.out is not None:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
