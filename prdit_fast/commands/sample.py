"""``prdit-fast sample``: N volumes from a checkpoint to NIfTI (HU, 1 mm) or npy, resumable.

Volume i of a run is a pure function of (checkpoint, --steps/--sampler/--k, --seed, i):
its starting and corrector noise come from the Philox key ``sample_key(seed, i)``. Each
finished volume is written atomically as ``sample_{i:06d}.nii.gz`` (or ``.npy``), with a
PNG of its three mid-slices written just before it, so a killed run restarted with the
same arguments skips every volume already on disk and ends with the same files.

The saved volume is the sampler's final state x (spec section 7: the sampler returns x
and the last x0_hat; ``--save x0_hat`` writes the network's clean prediction at t = 0
instead), converted from [-1, 1] to Hounsfield units.

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

from prdit_fast.devices import resolve_device
from prdit_fast.diffusion import IaNDiffusion

log = logging.getLogger("prdit_fast")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint file (official .pt, prdit_fast, or a bare state dict)")
    parser.add_argument("--num", type=int, required=True, help="number of volumes N in the run")
    parser.add_argument("--batch-size", type=int, default=1, help="volumes per batch (default 1)")
    parser.add_argument("--steps", type=int, default=100, help="model evaluations per volume (default 100)")
    parser.add_argument("--sampler", choices=("pc", "cold"), default="pc", help="hot predictor-corrector or cold Euler")
    parser.add_argument("--k", type=int, default=2, help="predictor step of the pc sampler (paper: 2)")
    parser.add_argument("--seed", type=int, default=0, help="run seed in [0, 2^32); volume i uses key (seed, i)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--backend", choices=("auto", "fast", "reference"), default="auto",
        help="fast (Triton/CUDA kernels) or reference (plain PyTorch); auto: fast on CUDA when installed",
    )
    parser.add_argument(
        "--dtype", choices=("auto", *_DTYPES), default="auto",
        help="compute dtype; auto: bf16 on CUDA, fp32 on CPU (the sampler state is always fp32)",
    )
    parser.add_argument("--format", choices=("nii.gz", "npy"), default="nii.gz", help="file format of the volumes")
    parser.add_argument("--save", choices=("x", "x0_hat"), default="x", help="final sampler state (default) or last x0_hat")
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
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if args.num > 2**32:
        raise ValueError(f"--num must be <= 2^32 (the volume index is the low half of the Philox key), got {args.num}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2^32) (the high half of the Philox key), got {args.seed}")
    IaNDiffusion().schedule(args.steps, args.sampler, args.k)  # ValueError for bad steps / sampler / k
    if not Path(args.ckpt).is_file():
        raise ValueError(f"--ckpt {args.ckpt!r} is not a file")




def _fast_available() -> bool:
    try:
        import prdit_fast.fast  # noqa: F401
    except ImportError:
        return False
    return True


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, torch.dtype, str]:
    """Load the checkpoint onto ``device`` and wrap it in the chosen backend.

    Returns (model, compute dtype, backend name)."""
    from prdit_fast.checkpoint import load_checkpoint

    backend = args.backend
    if backend == "auto":
        backend = "fast" if device.type == "cuda" and _fast_available() else "reference"
    dtype = _DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_checkpoint(
        args.ckpt, ema=not args.no_ema, map_location=device, variant=args.variant, input_size=args.size,
    )
    if backend == "fast":
        if not _fast_available():
            raise ValueError("--backend fast needs prdit_fast.fast (Triton); use --backend reference")
        from prdit_fast.fast import accelerate

        return accelerate(model, dtype=dtype), dtype, backend
    return model, dtype, backend


def _write_volume(path: Path, volume_hu: np.ndarray, fmt: str, png: bool) -> None:
    """PNG first, volume last: the volume file is what marks index i as done."""
    from prdit_fast.atomic import atomic_path

    if png:
        from prdit_fast.volumes import save_slices_png

        save_slices_png(path.with_name(path.name.split(".")[0] + ".png"), volume_hu)
    if fmt == "nii.gz":
        from prdit_fast.volumes import save_nifti

        save_nifti(path, volume_hu, spacing=(1.0, 1.0, 1.0))
    else:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, volume_hu)


def _to_hu(volume: torch.Tensor) -> np.ndarray:
    """(C, S, S, S) in [-1, 1] -> float32 HU array, (S, S, S) for one channel."""
    from prdit_fast.phantom import unit_to_hu

    v = volume[0] if volume.shape[0] == 1 else volume
    return np.asarray(unit_to_hu(v.float().cpu()), dtype=np.float32)


def _write_json(path: Path, data: dict) -> None:
    from prdit_fast.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def run(args: argparse.Namespace, on_volume: Callable[[int, Path], None] | None = None) -> int:
    """Sample the missing volumes of this rank, then print and write the summary.

    ``on_volume(index, path)`` runs after each volume is on disk."""
    from tqdm.auto import tqdm

    from prdit_fast.engine import Sampler, keys_for

    _validate(args)
    rank, world, local_rank = _distributed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = args.png if args.png is not None else args.format == "nii.gz"
    mine = range(rank, args.num, world)
    todo = [i for i in mine if not volume_path(out, i, args.format).exists()]
    skipped = len(mine) - len(todo)
    if skipped:
        log.info("rank %d: %d of its %d volumes already on disk; sampling %d", rank, skipped, len(mine), len(todo))

    device = resolve_device(args.device, local_rank)
    summary: dict = {
        "checkpoint": str(args.ckpt), "num": args.num, "rank": rank, "world_size": world,
        "seed": args.seed, "format": args.format, "saved": args.save,
        "volumes_written": 0, "volumes_skipped": skipped,
    }
    if todo:
        model, dtype, backend = build_model(args, device)
        engine = Sampler(
            model, batch_size=min(args.batch_size, len(todo)), steps=args.steps, sampler=args.sampler,
            k=args.k, dtype=None if backend == "fast" else dtype, cuda_graph=not args.no_cuda_graph,
        )
        summary.update(engine.describe())
        summary["variant"] = model.config.name
        summary["size"] = model.config.input_size
        if device.type == "cuda":
            summary["gpu"] = torch.cuda.get_device_name(device)
            torch.cuda.reset_peak_memory_stats(device)
        bar = tqdm(total=len(todo), unit="vol", desc=f"sampling (rank {rank})", position=rank, dynamic_ncols=True)
        started = time.perf_counter()
        done = 0
        for start in range(0, len(todo), engine.batch_size):
            batch = todo[start:start + engine.batch_size]
            x, x0_hat = engine.sample(keys_for(args.seed, batch))
            result = (x if args.save == "x" else x0_hat).cpu()
            for j, index in enumerate(batch):
                path = volume_path(out, index, args.format)
                _write_volume(path, _to_hu(result[j]), args.format, png)
                done += 1
                per_volume = (time.perf_counter() - started) / done
                bar.set_postfix(
                    vol_per_h=f"{3600 / per_volume:.1f}", gpu_h_for_N=f"{args.num * per_volume / 3600:.2f}"
                )
                bar.update(1)
                if on_volume is not None:
                    on_volume(index, path)
        bar.close()
        elapsed = time.perf_counter() - started
        per_volume = elapsed / done
        summary.update({
            "volumes_written": done,
            "seconds": round(elapsed, 3),
            "seconds_per_volume": round(per_volume, 4),
            "volumes_per_hour": round(3600 / per_volume, 2),
            "projected_gpu_hours_for_num": round(args.num * per_volume / 3600, 4),
            "peak_gpu_memory_gib": (
                round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None
            ),
        })
    name = "summary.json" if world == 1 else f"summary_rank{rank}.json"
    _write_json(out / name, summary)
    print(json.dumps(summary, indent=2))
    return 0
