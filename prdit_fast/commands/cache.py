"""`prdit-fast cache`: build a training config's data cache ahead of training
(``prdit_fast.data.cache``; training builds it on first use otherwise)."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the training config (YAML) whose data to cache")
    parser.add_argument("--split", choices=("train", "val", "all"), default="all",
                        help="which split to cache (default all: train, and val when data.val_list is set)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, as for train (e.g. data.image_size=128 data.cache_dir=/scratch/c)")


def run(args: argparse.Namespace) -> int:
    from ..data.cache import cached_split
    from ..data.dataset import data_files
    from ..data.recipes import volume_metadata
    from ..training import apply_overrides, load_config, resolve_config

    config = resolve_config(apply_overrides(load_config(args.config), args.overrides))
    data, channels = config.data.to_dict(), config.model.in_channels
    splits = ("train", "val") if args.split == "all" else (args.split,)
    built = 0
    for split in splits:
        files = data_files(data, split)
        if files is None:
            if args.split != "all" or split == "train":
                print(f"error: the config names no {split} volumes (data.path / data.{split}_list): nothing to cache",
                      file=sys.stderr)
                return 2
            continue
        recipe = volume_metadata(files, data)["intensity"]
        cached = cached_split(files, data, channels, recipe, split)
        print(f"{split}: {cached.path} ({len(cached)} volumes, {cached.dtype.name}, {cached.nbytes / 1e9:.2f} GB)")
        built += 1
    return 0 if built else 2
