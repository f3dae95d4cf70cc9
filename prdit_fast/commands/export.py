"""``prdit-fast export``: a checkpoint file (the official release's ``.pt``, ours, or a bare
state dict) -> a model folder (``config.json`` + ``model.safetensors``) that
``prdit_fast.Pipeline.from_pretrained``, ``load_checkpoint`` and ``prdit-fast sample --ckpt``
read, and that can be uploaded to the Hugging Face Hub as it is."""
from __future__ import annotations

import argparse
from pathlib import Path

from prdit_fast.data.recipes import RECIPES
from prdit_fast.errors import UsageError
from prdit_fast.orientation import CANONICAL_AXCODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint file (official .pt, prdit_fast, or a bare state dict)")
    parser.add_argument("--out", required=True, help="the model folder to write (new, or empty)")
    parser.add_argument("--no-ema", action="store_true", help="export the trained weights instead of the EMA copy")
    parser.add_argument("--variant", help="variant name, e.g. PRDiT-B/12/4 (needed for bare state dicts)")
    parser.add_argument("--size", type=int, help="volume edge S (needed for bare state dicts)")
    parser.add_argument("--intensity", choices=sorted(RECIPES),
                        help="the training data's intensity recipe, recorded for sampling in HU (official "
                             "checkpoints record none: lidc for the LIDC-IDRI models, official-rad for RAD-ChestCT)")
    parser.add_argument("--voxel-size", type=float, nargs="+", metavar="MM",
                        help="the model's voxel size in mm (one value, or three along depth, height, width); "
                             "e.g. 2 for the official 128^3 LIDC models (256^3 at 1 mm, pooled)")


def volume_record(args: argparse.Namespace) -> dict | None:
    """The volume record the flags give, or None (keep the checkpoint's)."""
    if args.intensity is None and args.voxel_size is None:
        return None
    if args.intensity is None or args.voxel_size is None:
        raise UsageError("--intensity and --voxel-size go together: the record needs both (or neither, to keep the "
                         "checkpoint's)")
    voxel = args.voxel_size * 3 if len(args.voxel_size) == 1 else args.voxel_size
    if len(voxel) != 3 or min(voxel) <= 0:
        raise UsageError(f"--voxel-size takes one or three positive sizes in mm, got {args.voxel_size}")
    return {"voxel_size_mm": voxel, "intensity": args.intensity, "axes": "".join(CANONICAL_AXCODES),
            "source": f"prdit-fast export --intensity {args.intensity} --voxel-size {' '.join(map(str, voxel))}"}


def run(args: argparse.Namespace) -> int:
    from prdit_fast.pipeline import export_pretrained

    out = Path(args.out)
    if not Path(args.ckpt).exists():
        raise UsageError(f"--ckpt {args.ckpt}: no such file")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty folder; name a new folder")
    volume = volume_record(args)
    folder = export_pretrained(args.ckpt, out, ema=not args.no_ema, variant=args.variant, input_size=args.size,
                               volume=volume)
    print(f"wrote model folder {folder} (config.json, model.safetensors)")
    return 0
