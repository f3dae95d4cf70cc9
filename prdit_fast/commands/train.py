"""`prdit-fast train`: two-stage training with EMA, exact resume, multi-GPU (torchrun)."""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (the official configs work unchanged)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue the run in output.results_dir from its latest readable checkpoint, or from "
                             "the checkpoint of that run named (e.g. RUN/checkpoints/latest or 0001000.pt); "
                             "without it, a results folder holding checkpoints is refused")
    parser.add_argument("--from-scratch", action="store_true",
                        help="allow stage 2 (depth > 0) without model.pretrained_path")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. data.image_size=128 training.batch_size=8 data.path=prep/")
    parser.epilog = (
        "Multi-GPU: torchrun --nproc_per_node=8 -m prdit_fast.cli train --config FILE. "
        "training.batch_size is the global batch, split evenly over the ranks."
    )


def run(args: argparse.Namespace) -> int:
    from ..training import apply_overrides, load_config, train

    rank = int(os.environ.get("RANK", 0))
    overrides = list(args.overrides)
    if isinstance(args.resume, str) and "=" in args.resume:  # `--resume key=value`: an override, not a checkpoint
        overrides.insert(0, args.resume)
        args.resume = True
    config = apply_overrides(load_config(args.config), overrides)
    path = train(config, resume=args.resume, from_scratch=args.from_scratch)
    if rank == 0:
        print(path)
    return 0
