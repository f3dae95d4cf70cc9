"""`prdit-fast preprocess`: DICOM / NIfTI / npz volumes -> the paper's preprocessing."""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="DICOM series folders (files *.dcm or of any name with the DICM mark), NIfTI "
                             "(.nii/.nii.gz) or RAD-ChestCT .npz files, or folders searched recursively for them")
    parser.add_argument("--out", required=True,
                        help="output folder: one .npy per volume, its <name>.json (what undoes the preprocessing: "
                             "source affine, crop / pad, HU range) and manifest.json")
    parser.add_argument("--dataset", required=True, choices=["lidc", "rad"],
                        help="lidc: 1 mm cubic resampling, percentile clip, min-max; rad: clip [-1000, 1000] HU")
    parser.add_argument("--size", type=int, default=256, help="output cube edge (default 256, as the paper)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                        help="storage type of the [0, 1] volumes (default float16: half the disk, ~2 HU steps)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="parallel processes (default: min(8, CPUs)); 1 runs in this process")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data.preprocess import preprocess_volumes
    from ..data.readers import find_volumes

    try:
        sources = find_volumes(args.inputs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not sources:
        print("error: no volumes found in the inputs", file=sys.stderr)
        return 2
    try:
        manifest = preprocess_volumes(
            sources, args.out, args.dataset, size=args.size, dtype=args.dtype, workers=args.workers,
            progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr),
        )
    except ValueError as e:  # settings that contradict an earlier run in --out, bad --size
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for v in manifest["volumes"]:
        counts[v["status"]] = counts.get(v["status"], 0) + 1
    print(f"{args.out}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 1 if counts.get("failed") else 0
