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
  whose nonzero voxels are known. They are put back into the result unchanged.
* ``deblur``: a 3D Gaussian blur (``--blur-kernel`` 5, ``--blur-sigma`` 2); ``--input``
  is the blurred S^3 volume.
* ``xray``: ``--views`` digitally reconstructed radiographs (DiffDRR, an optional extra);
  ``--input`` is the S^3 CT whose radiographs are simulated as the measurement.

Units. The measurement is mapped into the model's intensities by the checkpoint's
recorded recipe (``prdit_fast.data.recipes.measurement_ranges``): HU through the
recipe's window (the per-volume LIDC recipe: the input's own window), or values already
normalized, declared by ``--input-units unit01|unit11`` or recognised from a
``prdit-fast preprocess`` sidecar next to an ``.npy``. Input that cannot fit (normalized
values taken as HU, values outside the declared range, a recipe that cannot map HU) is
refused. The result is written back in the input's units: HU where the recipe and the
input allow (for a preprocessed input: through its sidecar's HU window), else the
normalized units; the residual and the errors against ``--truth`` are reported in them.

Geometry. Volumes are read with their affine (NIfTI, DICOM series, a preprocessed
``.npy`` through its sidecar; a bare ``.npy`` is taken on the model's grid, or at
``--spacing``); their voxel size must match the model's (times ``--scale`` for a
low-resolution input) within 10%. The result carries the input's affine (origin and
direction), on the finer grid for super-resolution: fine voxel j lies at low-resolution
index (j - (scale - 1) / 2) / scale, the sampling points of ``align_corners=False``. It is
written in the input file's axis order, so it overlays the input in any viewer.

Guidance strength. The official rho acts on ``A^T r / ||r||``, whose per-voxel size
falls as 1 / sqrt(M) with the M measured values, so the official rho over-pulls small
volumes. ``--guidance-parametrization per-voxel`` scales rho by sqrt(M / M_official)
(``prdit_fast.measurements.effective_guidance_scale``); the default (auto) keeps the
official one for the official settings at the official size (128^3, 4x for
super-resolution) and for X-rays. When the final data residual is above a model-free
estimate's (trilinear upsampling of y; y itself for deblurring) a warning says so.

Defaults are the official task settings (``prdit_fast.measurements.TASK_SETTINGS``);
``--k``, ``--guidance-scale``, ``--guidance-decay``, ``--guidance-cutoff``,
``--noise-weight`` override them (``--guidance-scale 0`` is unguided sampling from the
same noise). The output folder is claimed first (``prdit_fast.run_claims``). NaN or Inf
in the prior's weights, the measurement or the result is an error naming it, and
nothing is written. Written to DIR: ``reconstruction.nii.gz``, ``reconstruction.png``
(mid-slices), ``summary.json`` (settings, units, geometry, residuals).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prdit_fast.checkpoint import checkpoint_process, checkpoint_volume_metadata
from prdit_fast.errors import UsageError
from prdit_fast.data.recipes import INPUT_UNITS, ValueRange
from prdit_fast.measurements import (
    BLUR_KERNEL, BLUR_SIGMA, GUIDANCE_PARAMETRIZATIONS, GUIDANCE_TASKS, SR_SCALE, TASK_SETTINGS,
)
from prdit_fast.run_claims import check_out_folder, claim_run_folder

_DTYPES = ("auto", "bf16", "fp16", "fp32")
_OUTPUTS = ("reconstruction.*", "summary.json")
_SPACING_TOLERANCE = 0.1  # relative: an input voxel size within 10% of the model's is taken as the model's

log = logging.getLogger("prdit_fast")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="the prior: a PRDiT / TF-PRDiT checkpoint")
    parser.add_argument("--task", required=True, choices=GUIDANCE_TASKS, help="the inverse problem")
    parser.add_argument("--input", required=True,
                        help="the measurement: a NIfTI file, a DICOM series folder, or an .npy (a preprocessed one "
                             "with its sidecar .json)")
    parser.add_argument("--input-units", choices=INPUT_UNITS, default="auto",
                        help="hu: CT numbers, mapped by the prior's recipe; unit01 / unit11: already the model's "
                             "normalized intensities; auto (default): a preprocessed .npy's sidecar, else HU")
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
    parser.add_argument("--truth", help="the true volume, in the input's units and on the output's grid: report the "
                                        "reconstruction's error against it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the starting and corrector noise (default 0)")
    parser.add_argument("--spacing", type=float,
                        help="voxel size in mm of an .npy input without a sidecar (default: the prior's voxel size, "
                             "times --scale for super-resolution)")
    parser.add_argument("--guidance-parametrization", choices=GUIDANCE_PARAMETRIZATIONS, default="auto",
                        help="official: rho as the official code applies it; per-voxel: rho scaled by "
                             "sqrt(M / M_official) for M measured values, the same pull per voxel at any size; "
                             "auto (default): official at the official settings and size (128^3), else per-voxel")
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


@dataclass
class Measurement:
    """A volume read for reconstruct: canonical (d, h, w) values in its file's units, its
    affine (voxel (d, h, w) -> scanner RAS+ mm; None for a bare .npy), the file's axis
    codes (None for .npy) and the preprocessing sidecar of an .npy (or None)."""

    values: np.ndarray
    affine: np.ndarray | None
    axcodes: tuple[str, str, str] | None
    sidecar: dict | None


def read_measurement(path: str, what: str) -> Measurement:
    """Read ``path`` (NIfTI, DICOM folder, .npy with or without sidecar); NaN or Inf
    values are a usage error naming the file and the count."""
    from prdit_fast.data.preprocess import read_sidecar, sidecar_path
    from prdit_fast.data.readers import VolumeReadError, read_volume_affine
    from prdit_fast.orientation import CANONICAL_AXCODES, axcodes_of
    from prdit_fast.volumes import as_volume_array

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {path!r} does not exist")
    axcodes = sidecar = affine = None
    try:
        if p.name.endswith(".npy"):
            values = as_volume_array(np.load(p, allow_pickle=False))
            if sidecar_path(p).is_file():
                sidecar = read_sidecar(p)
                affine = np.asarray(sidecar["affine"], dtype=np.float64)
        else:
            values, affine = read_volume_affine(p)
            if p.name.endswith((".nii", ".nii.gz")):
                import nibabel as nib

                axcodes = axcodes_of(nib.load(str(p)).affine)
            else:
                axcodes = tuple(reversed(CANONICAL_AXCODES))  # written as our NIfTI layout
    except (ValueError, VolumeReadError) as e:
        raise UsageError(f"{what} {path}: {e}") from e
    bad = ~np.isfinite(values)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise UsageError(f"{what} {path} has {int(bad.sum())} NaN or Inf voxel(s) (the first at (d, h, w) = {first}); "
                         f"nothing was run")
    return Measurement(np.asarray(values, dtype=np.float32), affine, axcodes, sidecar)


def _mm(spacing) -> str:
    return "x".join(f"{float(v):.3g}" for v in spacing)


def measurement_affine(measured: Measurement, metadata, factor: int, spacing: float | None, what: str) -> np.ndarray:
    """The affine of ``measured``, checked against the prior's voxel size (times ``factor``
    for a low-resolution input); a bare .npy gets ``spacing`` or the prior's voxel size,
    origin 0."""
    from prdit_fast.orientation import canonical_affine, voxel_sizes

    voxel = metadata.get("voxel_size_mm") if metadata else None
    want = None if voxel is None else np.asarray(voxel, dtype=np.float64) * factor
    if measured.affine is None:
        given = [spacing] * 3 if spacing is not None else (want if want is not None else [1.0] * 3)
        log.info("%s has no geometry (.npy): taken as %s mm voxels with the origin at voxel 0", what, _mm(given))
        return canonical_affine(tuple(given))
    if spacing is not None:
        raise UsageError(f"--spacing is for an .npy input without a sidecar; {what} carries its own geometry")
    have = voxel_sizes(measured.affine)
    if want is None:
        log.warning("the checkpoint records no voxel size: %s is taken at its own %s mm voxels", what, _mm(have))
    elif np.any(np.abs(have - want) > _SPACING_TOLERANCE * want):
        raise UsageError(
            f"{what} has {_mm(have)} mm voxels (d, h, w); this prior's are {_mm(voxel)} mm"
            f"{f' (x {factor} for a low-resolution input)' if factor > 1 else ''}: resample it to {_mm(want)} mm "
            f"(prdit-fast preprocess) first"
        )
    return measured.affine


def super_resolution_affine(affine: np.ndarray, scale: int) -> np.ndarray:
    """The affine of the grid ``scale`` times finer than ``affine``'s, as trilinear
    downsampling with ``align_corners=False`` relates them: fine voxel j has low-resolution
    index (j - (scale - 1) / 2) / scale."""
    fine = np.diag([1.0 / scale] * 3 + [1.0])
    fine[:3, 3] = -(scale - 1) / (2.0 * scale)
    return np.asarray(affine, dtype=np.float64) @ fine


@dataclass
class Task:
    """An inverse problem in the model's space: operator, observation y (1, ...), the
    input's value ranges (in, out), the output grid's affine, the output file's axis
    codes, the known voxels (infill) and the measured-value count M."""

    op: torch.nn.Module
    y: torch.Tensor
    ranges: tuple[ValueRange, ValueRange]
    affine: np.ndarray
    axcodes: tuple[str, str, str] | None
    mask: torch.Tensor | None
    measured_values: int


def build_task(args: argparse.Namespace, size: int, metadata) -> Task:
    """``args.task`` for a prior of edge ``size`` whose checkpoint ``volume`` section is
    ``metadata``; usage errors for input that cannot fit."""
    from prdit_fast.data.recipes import measurement_ranges
    from prdit_fast.measurements import Downsample, GaussianBlur, Mask, XrayProjection
    from prdit_fast.orientation import voxel_sizes

    measured = read_measurement(args.input, "--input")
    edge = measured.values.shape
    factor = 1
    if args.task == "super-resolution":
        if args.scale < 1 or size % args.scale:
            raise UsageError(f"--scale {args.scale} must be >= 1 and divide the prior's volume edge {size}")
        if edge != (size // args.scale,) * 3:
            raise UsageError(
                f"--input has shape {edge}; super-resolution by {args.scale} with a {size}^3 prior needs a "
                f"{size // args.scale}^3 low-resolution volume"
            )
        factor = args.scale
    elif edge != (size,) * 3:
        raise UsageError(f"--input has shape {edge}; task {args.task} with a {size}^3 prior needs a {size}^3 volume")
    ranges = measurement_ranges(metadata, measured.values, args.input_units, measured.sidecar, "--input")
    affine = measurement_affine(measured, metadata, factor, args.spacing, "--input")
    y = torch.from_numpy(ranges[0].to_model(measured.values))[None, None]
    if args.task == "super-resolution":
        return Task(Downsample(args.scale), y, ranges, super_resolution_affine(affine, args.scale), measured.axcodes,
                    None, y.numel())
    if args.task == "infill":
        if args.mask is None:
            raise UsageError("--task infill needs --mask (a volume whose nonzero voxels are the known ones)")
        mask = torch.from_numpy(read_measurement(args.mask, "--mask").values != 0)
        if tuple(mask.shape) != (size,) * 3:
            raise UsageError(f"--mask has shape {tuple(mask.shape)}; it must match the {size}^3 volume")
        op = Mask(mask)
        return Task(op, op(y), ranges, affine, measured.axcodes, mask, int(mask.sum()))
    if args.task == "deblur":
        try:
            op = GaussianBlur(args.blur_kernel, args.blur_sigma)
        except ValueError as e:
            raise UsageError(f"--blur-kernel / --blur-sigma: {e}") from e
        return Task(op, y, ranges, affine, measured.axcodes, None, y.numel())
    if args.views < 1:
        raise UsageError(f"--views must be >= 1, got {args.views}")
    spacing = voxel_sizes(affine)
    if np.ptp(spacing) > 1e-3 * spacing.max():
        raise UsageError(f"--input has {_mm(spacing)} mm voxels; the X-ray projector takes isotropic voxels")
    try:
        op = XrayProjection(args.views, volume_size=size, spacing=float(spacing[0]))
    except ImportError as e:
        raise UsageError(str(e)) from e
    with torch.no_grad():
        y_xray = op(y)
    return Task(op, y_xray, ranges, affine, measured.axcodes, None, y_xray.numel())


def baseline_estimate(task: str, y: torch.Tensor, scale: int) -> tuple[str, torch.Tensor] | None:
    """A model-free estimate from y and what it is, against which the guided result's data
    residual is judged: trilinear upsampling (super-resolution), y itself (deblurring);
    None for infill (its known voxels are restored) and X-rays."""
    if task == "super-resolution":
        return "trilinear upsampling of the input", torch.nn.functional.interpolate(
            y, scale_factor=scale, mode="trilinear", align_corners=False)
    if task == "deblur":
        return "the blurred input itself", y
    return None


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
    if args.spacing is not None and not args.spacing > 0:
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
            "spacing": args.spacing, "input_units": args.input_units,
            "guidance_parametrization": args.guidance_parametrization}


def _first_non_finite(model: torch.nn.Module) -> str | None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def _reconstruct(args: argparse.Namespace, out: Path, settings: dict) -> int:
    """The claimed part of ``run``: nothing is written unless every check passes."""
    from tqdm.auto import tqdm

    from prdit_fast.atomic import write_json
    from prdit_fast.commands.sample import build_model
    from prdit_fast.devices import resolve_device
    from prdit_fast.diffusion import diffusion_for
    from prdit_fast.engine import GuidedSampler, keys_for
    from prdit_fast.measurements import data_consistency, effective_guidance_scale, guidance_parametrization
    from prdit_fast.orientation import voxel_sizes
    from prdit_fast.sample_runs import network_summary
    from prdit_fast.volumes import save_nifti, save_slices_png

    device = resolve_device(args.device)
    metadata = checkpoint_volume_metadata(args.ckpt)
    model, dtype, backend = build_model(args, device)
    broken = _first_non_finite(model)
    if broken is not None:
        raise RuntimeError(f"the prior's weights hold NaN or Inf ({broken} in {args.ckpt}); nothing was run or written")
    diffusion = diffusion_for(model)
    cfg = model.config
    task = build_task(args, cfg.input_size, metadata)
    into, back = task.ranges
    truth = None
    if args.truth:
        truth_values = read_measurement(args.truth, "--truth").values
        if truth_values.shape != (cfg.input_size,) * 3:
            raise UsageError(f"--truth has shape {truth_values.shape}; the prior makes {cfg.input_size}^3 volumes")
        truth = torch.from_numpy(into.to_model(truth_values))[None, None].to(device)
    parametrization = guidance_parametrization(args.task, cfg.input_size, args.scale, args.guidance_parametrization)
    applied = dict(settings, guidance_scale=effective_guidance_scale(
        settings["guidance_scale"], args.task, task.measured_values, parametrization))
    if applied["guidance_scale"] != settings["guidance_scale"]:
        log.info("guidance: rho %g per voxel-normalized (%d measured values) -> %.4g applied", settings["guidance_scale"],
                 task.measured_values, applied["guidance_scale"])

    engine = GuidedSampler(
        model, task.op, batch_size=1, steps=args.steps, dtype=None if backend == "fast" else dtype,
        cuda_graph=not args.no_cuda_graph, diffusion=diffusion, **applied,
    )
    y = task.y.to(device)
    bar = tqdm(total=args.steps, unit="step", desc=f"{args.task} ({backend}, {engine.describe()['dtype']})")
    started = time.perf_counter()
    _, x0_hat = engine.sample(keys_for(args.seed, [0]), y, callback=lambda _: bar.update(1))
    bar.close()
    seconds = time.perf_counter() - started
    bad = int((~torch.isfinite(x0_hat)).sum())
    if bad:
        raise RuntimeError(f"the reconstruction has {bad} NaN or Inf voxel(s) (the prior's weights, the measurement "
                           f"or --dtype {args.dtype}); nothing was written")

    op = task.op.to(device)
    result = x0_hat.clamp(-1.0, 1.0)  # the recipe's range: what is written
    with torch.no_grad():
        residual_before = data_consistency(op, result, y).item()
        if task.mask is not None:  # infill: the known voxels as measured
            result = torch.where(task.mask.to(device), y, result)  # y holds the measured values there
        residual = data_consistency(op, result, y).item()
        y_norm = torch.linalg.vector_norm(y).item()
        baseline = baseline_estimate(args.task, y, args.scale)
        baseline_residual = None if baseline is None else data_consistency(op, baseline[1], y).item()
    scale_units = back.per_model_unit
    units = back.units
    volume = back.from_model(result[0, 0].cpu().numpy())
    spacing = voxel_sizes(task.affine)
    description = f"{args.task} reconstruction (PRDiT prior); {units}; {_mm(spacing)} mm"[:80]
    summary = {
        "checkpoint": str(args.ckpt), **network_summary(model),
        "noise_std": diffusion.noise_std, "task": args.task, "input": str(args.input), "steps": args.steps,
        "seed": args.seed, **settings, "guidance_parametrization": parametrization,
        "guidance_scale_applied": applied["guidance_scale"], "measured_values": task.measured_values,
        "engine": engine.describe(), "seconds": round(seconds, 3),
        "units": units, "input_units": into.units, "value_range": [back.lo, back.hi],
        "affine": np.round(task.affine, 6).tolist(), "voxel_size_mm": np.round(spacing, 6).tolist(),
        "residual": residual * scale_units, "relative_residual": residual / max(y_norm, 1e-12),
        "residual_units": units,
    }
    lines = [
        _summary_line(f"data-consistency ||A(x) - y||_2 ({units})", summary["residual"]),
        _summary_line("relative to ||y||_2", summary["relative_residual"]),
    ]
    if task.mask is not None:
        summary["residual_before_restoring_known_voxels"] = residual_before * scale_units
    if baseline is not None:
        summary["baseline"] = {"estimate": baseline[0], "residual": baseline_residual * scale_units}
        lines.append(_summary_line(f"  {baseline[0]} ({units})", baseline_residual * scale_units))
        if residual > baseline_residual:
            log.warning(
                "the reconstruction fits the measurement worse than %s (residual %.4g vs %.4g %s): the guidance is "
                "off for this size or prior; try --guidance-parametrization per-voxel or a smaller --guidance-scale",
                baseline[0], residual * scale_units, baseline_residual * scale_units, units)
            summary["warning"] = f"data residual above that of {baseline[0]}"
    if truth is not None:
        error = result - truth
        rmse = float(error.pow(2).mean().sqrt()) * scale_units
        summary["rmse_vs_truth"] = rmse
        summary["psnr_db_vs_truth"] = float(10 * torch.log10(4.0 / error.pow(2).mean().clamp_min(1e-20)))
        lines += [_summary_line(f"RMSE vs --truth ({units})", rmse),
                  _summary_line("PSNR vs --truth (dB)", summary["psnr_db_vs_truth"])]
    json.dumps(summary, allow_nan=False)  # every number is finite: a check, before anything is written
    windows = ("lung", "mediastinal") if units == "HU" else ((back.lo, back.hi),)
    save_slices_png(out / "reconstruction.png", volume, windows=windows)
    save_nifti(out / "reconstruction.nii.gz", volume, dtype="int16" if units == "HU" else "float32",
               description=description, affine=task.affine, axcodes=task.axcodes)
    write_json(out / "summary.json", summary)
    print(f"wrote {out / 'reconstruction.nii.gz'} ({seconds:.1f} s, {args.steps} steps, guidance_scale "
          f"{settings['guidance_scale']:g}, {parametrization})")
    print("\n".join(lines))
    return 0
