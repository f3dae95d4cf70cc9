"""`prdit-fast train`: two-stage training with EMA, exact resume, multi-GPU (torchrun)."""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (the official configs work unchanged)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output.results_dir from its latest readable checkpoint "
                             "(without it, a results folder holding checkpoints is refused)")
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
    config = apply_overrides(load_config(args.config), args.overrides)
    path = train(config, resume=args.resume, from_scratch=args.from_scratch)
    if rank == 0:
        print(path)
    return 0
