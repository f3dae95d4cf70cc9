"""``prdit-fast sample``: N volumes from a checkpoint to NIfTI or npy, resumable.

Volume i of a run is a pure function of (checkpoint, --steps/--sampler/--k or
--steps/--solver/--eta/--err-target, --seed, i): its starting and corrector noise come
from the Philox key ``sample_key(seed, i)``. Each
finished volume is written atomically as ``sample_{i:06d}.nii.gz`` (or ``.npy``), with a
PNG of its three mid-slices written just before it. The folder belongs to one run and
volumes are sampled in fixed groups (``prdit_fast.sample_runs``), so a killed run
restarted with the same arguments samples only the missing groups and ends with the
same bytes; other arguments are refused.

The process follows the checkpoint (spec section 14): an IaN checkpoint samples with
``--sampler pc|cold`` (default pc, k = 2) and saves the network's clean prediction x0_hat
of the last step by default (spec section 7; ``--save x`` writes the sampler's final
state, which carries the last corrector's noise); a flow-matching checkpoint (velocity
head, e.g. the released PRDiT-B/16/12-s16) integrates with ``--solver``
euler|heun|rk4|pc|pc_heun (default 100 Euler steps, the official default; ``--eta`` and
``--err-target`` for pc / pc_heun) and saves the final state x, the only output it has.
The summary gives the network evaluations (NFE) per volume. Units and geometry come from the checkpoint
(``prdit_fast.data.recipes``): Hounsfield units where the training data's intensity
recipe is invertible (a fixed HU window: RAD-ChestCT, the phantom), else the model's
normalized [0, 1] intensities, said in the NIfTI header description and the summary;
the voxel size is the training data's. ``--like`` a preprocessed volume of the training
data writes HU through that volume's own intensity range (LIDC's min-max included) with
its scanner geometry (``prdit_fast.data.preprocess.to_scanner``). A volume with NaN or
Inf values is an error and is not written.

Multi-GPU: ``torchrun --nproc_per_node G -m prdit_fast.cli sample ...`` (or any launcher
that sets RANK / WORLD_SIZE / LOCAL_RANK): rank r samples the indices i with
i % WORLD_SIZE == r on cuda:LOCAL_RANK; the ranks never communicate. The closing summary
goes to DIR/summary.json (one process) or DIR/summary_rank{r}.json (several).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from prdit_fast.atomic import remove_stale_temps
from prdit_fast.data.recipes import OutputUnits, output_units
from prdit_fast.devices import resolve_device
from prdit_fast.diffusion import IaNDiffusion, diffusion_for
from prdit_fast.checkpoint import checkpoint_process, checkpoint_volume_metadata, is_model_folder
from prdit_fast.errors import UsageError
from prdit_fast.flow_matching import DEFAULT_SOLVER, SOLVERS, check_solver
from prdit_fast.data.preprocess import read_sidecar, sidecar_path
from prdit_fast.pipeline import DTYPES, output_volume, prepare_for_sampling
from prdit_fast.run_claims import check_out_folder, claim_run_folder
from prdit_fast.sample_runs import append_record, batch_groups, file_sha256, network_summary

log = logging.getLogger("prdit_fast")



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint file (official .pt, prdit_fast, or a bare state dict) or model folder")
    parser.add_argument("--num", type=int, required=True, help="number of volumes N in the run")
    parser.add_argument("--batch-size", type=int, default=1, help="volumes per batch (default 1)")
    parser.add_argument("--steps", type=int, default=100,
                        help="sampler steps per volume (default 100; IaN: one model evaluation each)")
    parser.add_argument("--sampler", choices=("pc", "cold"), default=None,
                        help="IaN checkpoints: hot predictor-corrector (default) or cold Euler")
    parser.add_argument("--k", type=int, default=None, help="IaN: predictor step of the pc sampler (default 2, the paper's)")
    parser.add_argument("--solver", choices=tuple(SOLVERS), default=None,
                        help=f"flow-matching checkpoints: the ODE / SDE solver (default {DEFAULT_SOLVER})")
    parser.add_argument("--eta", type=float, default=None,
                        help="flow matching, pc / pc_heun: noise weight in [0, 1] (default 0: Euler / Heun)")
    parser.add_argument("--err-target", type=float, default=None,
                        help="flow matching, pc_heun: the error target (> 0, default 1) gating the noise per sample")
    parser.add_argument("--seed", type=int, default=0, help="run seed in [0, 2^32); volume i uses key (seed, i)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--backend", choices=("auto", "fast", "reference"), default="auto",
        help="fast (Triton/CUDA kernels) or reference (plain PyTorch); auto: fast on CUDA when installed",
    )
    parser.add_argument(
        "--dtype", choices=("auto", *DTYPES), default="auto",
        help="compute dtype; auto: bf16 on CUDA, fp32 on CPU (the sampler state is always fp32)",
    )
    parser.add_argument("--format", choices=("nii.gz", "npy"), default="nii.gz", help="file format of the volumes")
    parser.add_argument("--save", choices=("x", "x0_hat"), default=None,
                        help="x0_hat: the clean prediction of the last step (IaN default); x: the final sampler "
                             "state (the only output of flow matching)")
    parser.add_argument("--like", metavar="PREPROCESSED",
                        help="a volume of the training data (its .npy from prdit-fast preprocess, or the sidecar .json "
                             "beside it): write HU through its intensity range, placed where that scan lies (affine "
                             "in the NIfTI header)")
    parser.add_argument("--variant", help="variant name, e.g. PRDiT-B/12/4 (needed for bare state dicts)")
    parser.add_argument("--size", type=int, help="volume edge S (needed for bare state dicts)")
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights instead of the EMA copy")
    parser.add_argument("--device", help="torch device; default cuda:LOCAL_RANK when CUDA is available, else cpu")
    parser.add_argument(
        "--png", action=argparse.BooleanOptionalAction, default=None,
        help="write a PNG of the mid-slices next to each volume (default: on for nii.gz)",
    )
    parser.add_argument("--no-cuda-graph", action="store_true", help="run every step eagerly")


def volume_path(out: Path, index: int, fmt: str) -> Path:
    return out / f"sample_{index:06d}.{fmt}"


def _distributed() -> tuple[int, int, int]:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world} are inconsistent: need 0 <= RANK < WORLD_SIZE")
    return rank, world, local


def _validate(args: argparse.Namespace) -> None:
    if args.num < 1:
        raise UsageError(f"--num must be >= 1, got {args.num}")
    if args.num > 2**32:
        raise UsageError(f"--num must be <= 2^32 (the volume index is the low half of the Philox key), got {args.num}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2^32) (the high half of the Philox key), got {args.seed}")
    if args.like is not None:
        try:
            read_sidecar(args.like)
        except ValueError as e:
            raise UsageError(f"--like: {e}") from e
    if not Path(args.ckpt).is_file() and not is_model_folder(args.ckpt):
        raise UsageError(f"--ckpt {args.ckpt!r} is neither a checkpoint file nor a model folder (with config.json)")


def sampling_options(args: argparse.Namespace, process: str | None) -> dict:
    """The sampler settings of the run for the checkpoint's ``process``, defaults filled
    in: ``sampler``, ``k``, ``eta``, ``err_target`` and ``save``. UsageError for a bad
    value or an option of the other process."""
    if process == "flow_matching":
        given = [flag for flag, value in (("--sampler", args.sampler), ("--k", args.k)) if value is not None]
        if given:
            raise UsageError(
                f"{' and '.join(given)} apply to IaN checkpoints; {args.ckpt} holds a flow-matching model: "
                f"use --solver {{{','.join(SOLVERS)}}} (with --eta / --err-target for pc, pc_heun)"
            )
        if args.save == "x0_hat":
            raise UsageError("--save x0_hat: a flow-matching model predicts a velocity, not a clean volume; use --save x")
        options = {
            "sampler": args.solver or DEFAULT_SOLVER, "k": None,
            "eta": 0.0 if args.eta is None else args.eta,
            "err_target": 1.0 if args.err_target is None else args.err_target, "save": "x",
        }
        try:
            check_solver(args.steps, options["sampler"], options["eta"], options["err_target"])
        except ValueError as e:
            raise UsageError(f"--steps / --solver / --eta / --err-target: {e}") from e
        return options
    given = [flag for flag, value in (("--solver", args.solver), ("--eta", args.eta), ("--err-target", args.err_target))
             if value is not None]
    if given:
        raise UsageError(
            f"{' and '.join(given)} apply to flow-matching checkpoints; {args.ckpt} holds an IaN model: use "
            f"--sampler {{pc,cold}} and --k"
        )
    options = {"sampler": args.sampler or "pc", "k": 2 if args.k is None else args.k, "save": args.save or "x0_hat"}
    try:
        IaNDiffusion().schedule(args.steps, options["sampler"], options["k"])
    except ValueError as e:
        raise UsageError(f"--steps / --sampler / --k: {e}") from e
    return options



def build_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, torch.dtype, str]:
    """Load the checkpoint (file or model folder) onto ``device`` and wrap it in the chosen
    backend (``prdit_fast.pipeline.prepare_for_sampling``, as the Python pipeline).

    Returns (model, compute dtype, backend name)."""
    from prdit_fast.checkpoint import load_checkpoint

    model = load_checkpoint(
        args.ckpt, ema=not args.no_ema, map_location=device, variant=args.variant, input_size=args.size,
    )
    return prepare_for_sampling(model, device, args.backend, args.dtype)


def _write_volume(path: Path, volume: torch.Tensor, units: OutputUnits, fmt: str, png: bool,
                  like: dict | None) -> None:
    """One model output (C, S, S, S) in [-1, 1] to disk in ``units`` (or in HU and the
    scanner space of the ``--like`` sidecar record). PNG first, volume last: the volume
    file is what marks index i as done."""
    from prdit_fast.atomic import atomic_path

    v = volume[0] if volume.shape[0] == 1 else volume
    result = output_volume(v.float().cpu().numpy(), units, like)
    if png:
        from prdit_fast.volumes import save_slices_png

        windows = ("lung", "mediastinal") if result.units == "HU" else ((0.0, 1.0),)
        save_slices_png(path.with_name(path.name.split(".")[0] + ".png"), result.array, windows=windows)
    if fmt == "nii.gz":
        result.save(path)
    else:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, result.array)


def _run_identity(args: argparse.Namespace, options: dict, world: int, batch_size: int) -> dict:
    """Everything that changes the bytes of a volume (``prdit_fast.sample_runs``)."""
    identity = {
        "checkpoint_sha256": file_sha256(args.ckpt), "num": args.num, "seed": args.seed, "steps": args.steps,
        "sampler": options["sampler"], "k": options["k"], "save": options["save"], "ema": not args.no_ema,
        "dtype": args.dtype, "backend": args.backend, "batch_size": batch_size, "world_size": world,
        "format": args.format, "variant": args.variant, "size": args.size, "cuda_graph": not args.no_cuda_graph,
    }
    if args.like is not None:  # the HU range and geometry come from the sidecar
        identity["like_sha256"] = file_sha256(sidecar_path(args.like) if args.like.endswith(".npy") else args.like)
    if "eta" in options:  # flow matching
        identity.update(eta=options["eta"], err_target=options["err_target"])
    return identity


def run(args: argparse.Namespace, on_volume: Callable[[int, Path], None] | None = None) -> int:
    """Sample the missing volumes of this rank, then print and write the summary.

    ``on_volume(index, path)`` runs after each volume is on disk. The folder is claimed
    (``prdit_fast.run_claims``) for the whole run."""
    _validate(args)
    out = check_out_folder(args.out)
    options = sampling_options(args, checkpoint_process(args.ckpt))
    rank, world, local_rank = _distributed()
    png = args.png if args.png is not None else args.format == "nii.gz"
    mine = list(range(rank, args.num, world))
    batch_size = min(args.batch_size, len(mine))
    identity = _run_identity(args, options, world, batch_size)
    with claim_run_folder(out, identity, outputs=("sample_*",), member=f"rank{rank}"):
        return _sample(args, out, options, identity, rank, world, local_rank, mine, batch_size, png, on_volume)


def _sample(args: argparse.Namespace, out: Path, options: dict, identity: dict, rank: int, world: int,
            local_rank: int, mine: list[int], batch_size: int, png: bool,
            on_volume: Callable[[int, Path], None] | None) -> int:
    """The claimed part of ``run``."""
    from tqdm.auto import tqdm

    from prdit_fast.engine import Sampler, keys_for

    remove_stale_temps(out, owned=lambda name: name.startswith("sample_") and int(name[7:13]) % world == rank)
    groups = [g for g in batch_groups(mine, batch_size)
              if not all(volume_path(out, i, args.format).exists() for i in g)]
    todo = [i for g in groups for i in g if not volume_path(out, i, args.format).exists()]
    skipped = len(mine) - len(todo)
    if skipped:
        log.info("rank %d: %d of its %d volumes already on disk; sampling %d", rank, skipped, len(mine), len(todo))

    device = resolve_device(args.device, local_rank)
    units = output_units(checkpoint_volume_metadata(args.ckpt))
    like = read_sidecar(args.like) if args.like is not None else None
    summary: dict = {
        "checkpoint": str(args.ckpt), "num": args.num, "rank": rank, "world_size": world,
        "seed": args.seed, "format": args.format, "saved": options["save"], "identity": identity, **units.summary,
        "volumes_written": 0, "volumes_skipped": skipped,
    }
    if like is not None:
        summary.update(units="HU", like=str(args.like), hu_range=[like["hu_min"], like["hu_max"]],
                       intensity_description=f"{like['intensity']} preprocessing of {like['source']} undone")
    if todo:
        model, dtype, backend = build_model(args, device)
        flow = {"eta": options["eta"], "err_target": options["err_target"]} if "eta" in options else {}
        engine = Sampler(
            model, batch_size=batch_size, steps=args.steps, sampler=options["sampler"], k=options["k"] or 2,
            dtype=None if backend == "fast" else dtype, cuda_graph=not args.no_cuda_graph, **flow,
            # IaN: the checkpoint's noise scale (1.0 for a TF-PRDiT prior)
            diffusion=None if flow else diffusion_for(model),
        )
        summary.update(engine.describe())
        summary.update(network_summary(model))
        if device.type == "cuda":
            summary["gpu"] = torch.cuda.get_device_name(device)
            torch.cuda.reset_peak_memory_stats(device)
        bar = tqdm(total=len(todo), unit="vol", desc=f"sampling (rank {rank})", position=rank, dynamic_ncols=True)
        started = time.perf_counter()
        done = 0
        try:
            for batch in groups:
                x, x0_hat = engine.sample(keys_for(args.seed, batch))
                result = (x if options["save"] == "x" else x0_hat).cpu()
                broken = [index for j, index in enumerate(batch) if not torch.isfinite(result[j]).all()]
                for j, index in enumerate(batch):
                    path = volume_path(out, index, args.format)
                    if path.exists() or index in broken:
                        continue
                    _write_volume(path, result[j], units, args.format, png, like)
                    done += 1
                    per_volume = (time.perf_counter() - started) / done
                    hours_for_num = f"{args.num * per_volume / 3600:.2f}"  # on this device type, not a GPU's
                    bar.set_postfix(vol_per_h=f"{3600 / per_volume:.1f}", **{f"{device.type}_h_for_N": hours_for_num})
                    bar.update(1)
                    if on_volume is not None:
                        on_volume(index, path)
                if broken:
                    raise RuntimeError(
                        f"volume {broken[0]} ({volume_path(out, broken[0], args.format).name}) has NaN or Inf values "
                        f"(the checkpoint's weights or --dtype {args.dtype}); nothing was written for "
                        f"{'it' if len(broken) == 1 else f'it and {len(broken) - 1} more'}"
                    )
        finally:
            bar.close()
        elapsed = time.perf_counter() - started
        per_volume = elapsed / max(done, 1)
        summary.update({
            "volumes_written": done,
            "seconds": round(elapsed, 3),
            "seconds_per_volume": round(per_volume, 4),
            "volumes_per_hour": round(3600 / per_volume, 2),
            f"projected_{device.type}_hours_for_num": round(args.num * per_volume / 3600, 4),
            "peak_gpu_memory_gib": (
                round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None
            ),
        })
    name = "summary.json" if world == 1 else f"summary_rank{rank}.json"
    append_record(out / name, summary)
    print(json.dumps(summary, indent=2))
    return 0
