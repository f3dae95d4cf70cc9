"""Evaluation speed: features + FID/MMD of N real and N generated volumes, all-pairs
MS-SSIM of N volumes, each beside the official scripts' way measured on a subset and
extrapolated per item in the same run. Also the bf16 features' error against fp32.

The official way: the feature network called one volume at a time in fp32, and MONAI's
``MultiScaleSSIMMetric`` called once per ordered pair (N (N - 1) calls). Ours: batched
features, each unordered pair once with every volume's pyramid computed once.

    # the GPU targets (issues 17, 24): 1,000 + 1,000 volumes at 128^3; all-pairs MS-SSIM <= 10 min;
    # the W-Score of 1,000 vs 1,000 (+ 1,000 reference) with 5 seeds (--wscore-full: the whole run)
    python benchmarks/bench_metrics.py --num 1000 --size 128 --device cuda --pairs-per-call 4096 \
        --wscore-seeds 5 --wscore-full --out benchmarks/results/metrics.json
    # tiny, on a CPU: the MS-SSIM rows at their smallest edge (tests/test_bench_metrics.py); the
    # feature rows run in benchmarks/gpu_session.sh's dry run (tests/test_gpu_session.py)
    python benchmarks/bench_metrics.py --num 2 --size 48 --no-features --official-pairs 1 --wscore-seeds 0

W-Score rows: one critic step of every seed at once (4 + 4 volumes each, ``time_call``) and
that step times the authors' step count (int(0.6 N) // 4 steps x 20 epochs), an
extrapolation labelled as such; ``--wscore-full`` also runs ``wscore`` on N real, N
generated and N reference volumes once (one long call: wall time, not ``time_call``'s
median). MS-SSIM rows: all pairs once with each cross-term implementation
(``time_call``, one rep after one warm-up call), torch on a subset of pairs and extrapolated.

The volumes are smooth random fields in [-1, 1] (timing does not depend on content) and
the network has random weights unless ``--weights`` names MedicalNet's file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prdit_fast.atomic import write_json
from prdit_fast.bench.timing import synchronize, time_call
from prdit_fast.devices import resolve_device
from prdit_fast.metrics import MedicalNetResNet50, load_medicalnet, ms_ssim_diversity
from prdit_fast.metrics.distances import bootstrap_intervals, fid, fid_via_factors, mmd
from prdit_fast.metrics.medicalnet import FeatureSet, scan
from prdit_fast.metrics.ms_ssim import all_pairs, ms_ssim_pairs
from prdit_fast.metrics.wasserstein import EDGE, WIDTHS, check_split, new_critics, train_step, wscore


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
    """(what ``fn`` returns, wall seconds) of one call, through ``prdit_fast.bench.time_call``."""
    timing = time_call(fn, device, warmup=0, min_reps=1, max_reps=1)
    return timing.result, timing.median_ms / 1e3


def wscore_rows(args, device: torch.device, real: torch.Tensor, fake: torch.Tensor) -> dict:
    """One concurrent critic step of ``--wscore-seeds`` seeds (time_call) and its extrapolation
    to the authors' protocol on --num volumes; with --wscore-full the whole run once."""
    seeds = list(range(42, 42 + args.wscore_seeds))
    edge, widths = args.wscore_edge, args.wscore_widths
    params = new_critics(seeds, edge, device, widths)
    for name, p in params.items():
        p.requires_grad_(not name.endswith(("weight_u", "weight_v")))
    optimizer = torch.optim.Adam([p for p in params.values() if p.requires_grad], lr=5e-5, betas=(0.0, 0.9),
                                 weight_decay=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    r = torch.rand(4, len(seeds), edge, edge, edge, generator=g, device=device) * 2 - 1
    f = torch.rand(4, len(seeds), edge, edge, edge, generator=g, device=device) * 2 - 1
    eta = torch.rand(4, len(seeds), generator=g, device=device)
    step = time_call(lambda: train_step(params, optimizer, r, f, eta, 30.0, 1.0, args.wscore_precision == "bf16"),
                     device, warmup=1, min_reps=2, max_reps=10, budget_s=2.0)
    out = {"seeds": len(seeds), "edge": edge, "widths": widths, "precision": args.wscore_precision,
           "step_ms": step.median_ms, "step_reps": step.reps}
    try:
        n_real_train = check_split(args.num, [args.num, args.num])[0]
        steps = n_real_train // 4 * 20
        out.update({"protocol_steps": steps, "train_seconds_extrapolated": step.median_ms / 1e3 * steps})
    except ValueError as e:
        out["protocol_steps"] = f"n/a: {e}"
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.wscore_full:
        reference = smooth_volumes(args.num, args.size, 3, device)
        started = time.perf_counter()
        full = wscore(real[:, 0], fake[:, 0], reference[:, 0], seeds=seeds, edge=edge, widths=widths, device=device,
                      precision=args.wscore_precision)
        synchronize(device)
        out["full_wall_seconds"] = time.perf_counter() - started
        out["full_seconds"] = full["seconds"]
        out["full_ratio_per_seed"] = full["ratio_per_seed"]
        out["full_ratio_seed_std"] = full["ratio_seed_std"]
    return out


def feature_rows(args, device: torch.device, real: torch.Tensor, fake: torch.Tensor, result: dict) -> None:
    """Features of ``real`` and ``fake`` (ours: batched, fp32 and bf16; the official way: one
    volume per call, fp32), the bf16 features' error, FID, MMD and the bootstrap, into ``result``."""
    seconds, official = result["seconds"], result["official_seconds"]
    torch.manual_seed(0)
    net = load_medicalnet(args.weights, map_location=device) if args.weights else MedicalNetResNet50().to(device).eval()
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
    parser.add_argument("--no-features", action="store_true", help="no feature rows (features, FID, MMD)")
    parser.add_argument("--no-ms-ssim", action="store_true")
    parser.add_argument("--torch-pairs", type=int, default=256,
                        help="pairs timed with the torch cross term, extrapolated to all pairs")
    parser.add_argument("--wscore-seeds", type=int, default=5, help="critics trained at once (0: no W-Score rows)")
    parser.add_argument("--wscore-edge", type=int, default=EDGE, help="critic input edge (the authors': 128)")
    parser.add_argument("--wscore-widths", type=int, nargs=4, default=list(WIDTHS),
                        help="critic channels (the authors': 64 128 256 256; smaller only for the CPU smoke test)")
    parser.add_argument("--wscore-precision", choices=("fp32", "tf32", "bf16"), default="tf32")
    parser.add_argument("--wscore-full", action="store_true",
                        help="also run the whole W-Score (N real, N generated, N reference; 20 epochs)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    real = smooth_volumes(args.num, args.size, 1, device)
    fake = smooth_volumes(args.num, args.size, 2, device)
    result: dict = {"num": args.num, "size": args.size, "device": str(device), "seconds": {}, "official_seconds": {}}
    seconds, official = result["seconds"], result["official_seconds"]

    if not args.no_features:
        feature_rows(args, device, real, fake, result)

    if not args.no_ms_ssim:
        (result["ms_ssim"], result["ms_ssim_pairs"]), seconds["ms_ssim_all_pairs"] = timed(
            device, lambda: ms_ssim_diversity(fake, pairs_per_call=args.pairs_per_call, device=device))
        result["ms_ssim_kernel_auto"] = "triton" if device.type == "cuda" else "default for this device"
        every = all_pairs(args.num)
        for impl, pairs in (("triton", every), ("torch", every[:args.torch_pairs])):
            if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                continue
            timing = time_call(lambda: ms_ssim_pairs(fake, pairs, args.pairs_per_call, device, impl=impl), device,
                               warmup=1, min_reps=1, max_reps=1)
            seconds[f"ms_ssim_{impl}_{pairs.shape[0]}_pairs"] = timing.median_ms / 1e3
            seconds[f"ms_ssim_{impl}_all_pairs_extrapolated"] = timing.median_ms / 1e3 * every.shape[0] / pairs.shape[0]
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

    if args.wscore_seeds:
        result["wscore"] = wscore_rows(args, device, real, fake)

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
