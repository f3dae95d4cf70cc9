"""The ``prdit-fast`` command. Each subcommand lives in ``prdit_fast.commands.<name>``
with ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when used."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "info": "variants, parameter counts, GFLOP per step, devices and backends",
    "demo": "train a small model on the synthetic chest-CT phantom, sample, write NIfTI + PNG",
    "sample": "sample N volumes from a checkpoint to NIfTI / npy (resumable)",
    "preprocess": "DICOM / NIfTI / npz volumes -> the paper's 1 mm, 256^3 preprocessing",
    "train": "two-stage training with EMA, exact resume, multi-GPU",
    "bench": "end-to-end benchmark: GPU-hours and memory for every backend",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prdit-fast", description="PRDiT: 3D CT diffusion, fast.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module that runs
            module = importlib.import_module(f"prdit_fast.commands.{name}")
            module.add_arguments(p)
            p.set_defaults(_module=module)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
