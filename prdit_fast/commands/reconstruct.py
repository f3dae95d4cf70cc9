"""``prdit-fast reconstruct``: a CT volume from a measurement, guided by a frozen PRDiT prior.

    prdit-fast reconstruct --ckpt prior.pt --task super-resolution --input low_res.nii.gz --out DIR

The training-free reconstruction of spec section 15: the prior (any IaN checkpoint; the
TF-PRDiT ``DiT-...`` prior was trained for it) samples with the measurement-guided
predictor-corrector sampler (``prdit_fast.engine.GuidedSampler``), pulled toward the
observation ``y`` by the gradient of ``||A(x0_hat) - y||_2``. Tasks and their operator A
and input:

* ``super-resolution``: trilinear downsampling by ``--scale`` (4); ``--input`` is the
  low-resolution volume, (S / scale)^3 for a prior of edge S.
* ``infill``: the known voxels; ``--input`` is the S^3 volume, ``--mask`` an S^3 volume
  whose nonzero voxels are known.
* ``deblur``: a 3D Gaussian blur (``--blur-kernel`` 5, ``--blur-sigma`` 2); ``--input``
  is the blurred S^3 volume.
* ``xray``: ``--views`` digitally reconstructed radiographs (DiffDRR, an optional extra);
  ``--input`` is the S^3 CT whose radiographs are simulated as the measurement.

Defaults are the official task settings (``prdit_fast.measurements.TASK_SETTINGS``);
``--k``, ``--guidance-scale``, ``--guidance-decay``, ``--guidance-cutoff``,
``--noise-weight`` override them (``--guidance-scale 0`` is unguided sampling from the
same noise). Volumes are read in HU (NIfTI or .npy) and mapped to the model's [-1, 1]
with ``prdit_fast.phantom.hu_to_unit``. Written to DIR: ``reconstruction.nii.gz`` (HU)
and ``reconstruction.png`` (mid-slices), and ``summary.json`` with the settings and the
data-consistency residual ``||A(x) - y||_2`` (absolute and relative to ``||y||``), and,
with ``--truth``, the error against the true volume.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from prdit_fast.checkpoint import checkpoint_process
from prdit_fast.errors import UsageError
from prdit_fast.run_claims import check_out_folder, claim_run_folder
from prdit_fast.measurements import BLUR_KERNEL, BLUR_SIGMA, GUIDANCE_TASKS, SR_SCALE, TASK_SETTINGS

_DTYPES = ("auto", "bf16", "fp16", "fp32")
_OUTPUTS = ("reconstruction.*", "summary.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="the prior: a PRDiT / TF-PRDiT checkpoint")
    parser.add_argument("--task", required=True, choices=GUIDANCE_TASKS, help="the inverse problem")
    parser.add_argument("--input", required=True, help="the measurement as a volume in HU (.nii, .nii.gz or .npy)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--mask", help="infill: volume whose nonzero voxels are the known ones")
    parser.add_argument("--views", type=int, default=2, help="xray: number of views (1: 0 deg, 2: 0/90 deg, N: every 180/N deg)")
    parser.add_argument("--scale", type=int, default=SR_SCALE, help=f"super-resolution factor (default {SR_SCALE})")
    parser.add_argument("--blur-kernel", type=int, default=BLUR_KERNEL, help=f"deblur: kernel size (default {BLUR_KERNEL})")
    parser.add_argument("--blur-sigma", type=float, default=BLUR_SIGMA, help=f"deblur: sigma in voxels (default {BLUR_SIGMA})")
    parser.add_argument("--steps", type=int, default=1000, help="model evaluations (default 1000, as the official runs)")
    parser.add_argument("--k", type=int, help="predictor step (task default: xray 4, others 2)")
    parser.add_argument("--guidance-scale", type=float, help="rho (task default: xray 0.7, others 20); 0 = unguided")
    parser.add_argument("--guidance-decay", choices=("none", "cosine"), help="d(i) (task default: xray cosine)")
    parser.add_argument("--guidance-cutoff", type=int, help="no guidance at steps i <= cutoff (xray 20, others 100)")
    parser.add_argument("--noise-weight", type=float, help="w, the corrector noise weight (xray 0.95, others 0.9)")
    parser.add_argument("--truth", help="the true volume in HU: report the reconstruction's error against it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the starting and corrector noise (default 0)")
    parser.add_argument("--spacing", type=float, default=1.0, help="voxel size in mm of the written volume (default 1)")
    parser.add_argument("--backend", choices=("auto", "fast", "reference"), default="auto",
                        help="fast (Triton/CUDA kernels) or reference; auto: fast on CUDA when installed")
    parser.add_argument("--dtype", choices=_DTYPES, default="auto", help="compute dtype; auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--variant", help="variant name, e.g. DiT-B/12/12 (needed for bare state dicts)")
    parser.add_argument("--size", type=int, help="volume edge S (needed for bare state dicts)")
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights instead of the EMA copy")
    parser.add_argument("--device", help="torch device; default cuda when available, else cpu")
    parser.add_argument("--no-cuda-graph", action="store_true", help="run every step eagerly")


def task_settings(args: argparse.Namespace) -> dict:
    """The task's official settings with every override given on the command line."""
    settings = dict(TASK_SETTINGS[args.task])
    for key in settings:
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    return settings


def _load_hu(path: str, what: str) -> torch.Tensor:
    from prdit_fast.phantom import hu_to_unit
    from prdit_fast.volumes import load_volume

    if not Path(path).is_file():
        raise UsageError(f"{what} {path!r} is not a file")
    try:
        volume = load_volume(path)
    except ValueError as e:
        raise UsageError(f"{what} {path}: {e}") from e
    return torch.from_numpy(np.ascontiguousarray(hu_to_unit(volume)))[None, None].float()


def build_task(args: argparse.Namespace, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """(operator A, observation y (1, ...)) of ``args.task`` for a prior of edge ``size``."""
    from prdit_fast.measurements import Downsample, GaussianBlur, Mask, XrayProjection

    measured = _load_hu(args.input, "--input")
    edge = tuple(measured.shape[2:])
    if args.task == "super-resolution":
        if args.scale < 1 or size % args.scale:
            raise UsageError(f"--scale {args.scale} must be >= 1 and divide the prior's volume edge {size}")
        if edge != (size // args.scale,) * 3:
            raise UsageError(
                f"--input has shape {edge}; super-resolution by {args.scale} with a {size}^3 prior needs a "
                f"{size // args.scale}^3 low-resolution volume"
            )
        return Downsample(args.scale), measured
    if edge != (size,) * 3:
        raise UsageError(f"--input has shape {edge}; task {args.task} with a {size}^3 prior needs a {size}^3 volume")
    if args.task == "infill":
        if args.mask is None:
            raise UsageError("--task infill needs --mask (a volume whose nonzero voxels are the known ones)")
        from prdit_fast.volumes import load_volume

        mask = torch.from_numpy(np.ascontiguousarray(load_volume(args.mask)) != 0)
        if tuple(mask.shape) != (size,) * 3:
            raise UsageError(f"--mask has shape {tuple(mask.shape)}; it must match the {size}^3 volume")
        op = Mask(mask)
        return op, op(measured)
    if args.task == "deblur":
        try:
            return GaussianBlur(args.blur_kernel, args.blur_sigma), measured
        except ValueError as e:
            raise UsageError(f"--blur-kernel / --blur-sigma: {e}") from e
    if args.views < 1:
        raise UsageError(f"--views must be >= 1, got {args.views}")
    try:
        op = XrayProjection(args.views, volume_size=size, spacing=args.spacing)
    except ImportError as e:
        raise UsageError(str(e)) from e
    with torch.no_grad():
        return op, op(measured)


def _summary_line(name: str, value: float) -> str:
    return f"{name:<34}{value:.6g}"


def run(args: argparse.Namespace) -> int:
    from prdit_fast.diffusion import IaNDiffusion

    if not Path(args.ckpt).is_file():
        raise UsageError(f"--ckpt {args.ckpt!r} is not a file")
    if checkpoint_process(args.ckpt) == "flow_matching":
        raise UsageError(
            f"--ckpt {args.ckpt} holds a flow-matching model (velocity head); reconstruct guides the clean prediction "
            f"x0_hat of an IaN prior: give an IaN checkpoint (e.g. the TF-PRDiT DiT-B/12/12 prior)"
        )
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2^32), got {args.seed}")
    if not args.spacing > 0:
        raise UsageError(f"--spacing must be > 0 mm, got {args.spacing}")
    settings = task_settings(args)
    try:
        IaNDiffusion().guided_schedule(args.steps, **settings)
    except ValueError as e:
        raise UsageError(str(e)) from e
    out = check_out_folder(args.out)
    with claim_run_folder(out, _run_identity(args, settings), outputs=_OUTPUTS):
        return _reconstruct(args, out, settings)


def _run_identity(args: argparse.Namespace, settings: dict) -> dict:
    """What decides the reconstruction's bytes (``prdit_fast.run_claims``)."""
    from prdit_fast.sample_runs import file_sha256

    files = {name: file_sha256(path) for name, path in (("checkpoint", args.ckpt), ("input", args.input),
                                                         ("mask", args.mask), ("truth", args.truth))
             if path is not None and Path(path).is_file()}
    return {"command": "reconstruct", **{f"{k}_sha256": v for k, v in files.items()}, "task": args.task,
            "seed": args.seed, "steps": args.steps, **settings, "views": args.views, "scale": args.scale,
            "blur_kernel": args.blur_kernel, "blur_sigma": args.blur_sigma, "ema": not args.no_ema,
            "dtype": args.dtype, "backend": args.backend, "variant": args.variant, "size": args.size,
            "spacing": args.spacing}


def _reconstruct(args: argparse.Namespace, out: Path, settings: dict) -> int:
    """The claimed part of ``run``."""
    from tqdm.auto import tqdm

    from prdit_fast.commands.sample import build_model
    from prdit_fast.devices import resolve_device
    from prdit_fast.diffusion import diffusion_for
    from prdit_fast.engine import GuidedSampler, keys_for
    from prdit_fast.measurements import data_consistency
    from prdit_fast.phantom import unit_to_hu
    from prdit_fast.volumes import save_nifti, save_slices_png

    device = resolve_device(args.device)
    model, dtype, backend = build_model(args, device)
    diffusion = diffusion_for(model)
    cfg = model.config
    op, y = build_task(args, cfg.input_size)
    truth = _load_hu(args.truth, "--truth") if args.truth else None
    if truth is not None and tuple(truth.shape[2:]) != (cfg.input_size,) * 3:
        raise UsageError(f"--truth has shape {tuple(truth.shape[2:])}; the prior makes {cfg.input_size}^3 volumes")

    engine = GuidedSampler(
        model, op, batch_size=1, steps=args.steps, dtype=None if backend == "fast" else dtype,
        cuda_graph=not args.no_cuda_graph, diffusion=diffusion, **settings,
    )
    y = y.to(device)
    bar = tqdm(total=args.steps, unit="step", desc=f"{args.task} ({backend}, {engine.describe()['dtype']})")
    started = time.perf_counter()
    _, x0_hat = engine.sample(keys_for(args.seed, [0]), y, callback=lambda _: bar.update(1))
    bar.close()
    seconds = time.perf_counter() - started

    op = op.to(device)
    with torch.no_grad():
        residual = data_consistency(op, x0_hat, y).item()
        y_norm = torch.linalg.vector_norm(y).item()
    volume_hu = np.asarray(unit_to_hu(x0_hat[0, 0].cpu()), dtype=np.float32)
    spacing = (args.spacing,) * 3
    save_slices_png(out / "reconstruction.png", volume_hu)
    save_nifti(out / "reconstruction.nii.gz", volume_hu, spacing=spacing)
    summary = {
        "checkpoint": str(args.ckpt), "variant": cfg.name, "norm": cfg.norm, "size": cfg.input_size,
        "noise_std": diffusion.noise_std, "task": args.task, "input": str(args.input), "steps": args.steps,
        "seed": args.seed, **settings, "engine": engine.describe(), "seconds": round(seconds, 3),
        "residual": residual, "relative_residual": residual / max(y_norm, 1e-12),
    }
    lines = [
        _summary_line("data-consistency ||A(x) - y||_2", residual),
        _summary_line("relative to ||y||_2", summary["relative_residual"]),
    ]
    if truth is not None:
        truth = truth.to(device)
        error = x0_hat.clamp(-1.0, 1.0) - truth  # the written volume (clipped to the HU window) vs the truth
        rmse_hu = float(error.pow(2).mean().sqrt()) * 1000.0  # [-1, 1] spans 2000 HU
        summary["rmse_hu_vs_truth"] = rmse_hu
        summary["psnr_db_vs_truth"] = float(10 * torch.log10(4.0 / error.pow(2).mean()))  # peak-to-peak 2
        lines += [_summary_line("RMSE vs --truth (HU)", rmse_hu), _summary_line("PSNR vs --truth (dB)", summary["psnr_db_vs_truth"])]
    from prdit_fast.atomic import atomic_path

    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'reconstruction.nii.gz'} ({seconds:.1f} s, {args.steps} steps, guidance_scale "
          f"{settings['guidance_scale']:g})")
    print("\n".join(lines))
    return 0
