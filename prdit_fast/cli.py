"""The ``prdit-fast`` command. Each subcommand lives in ``prdit_fast.commands.<name>``
with ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when used.

Failures are one ``error:`` line on stderr: status 2 for a bad argument or config value
(``prdit_fast.errors.UsageError``, argparse's own errors), 1 for a runtime failure;
``--debug`` (before or after the command name) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UsageError

COMMANDS = {
    "info": "variants, parameter counts, GFLOP per step, devices and backends",
    "demo": "train a small model on the synthetic chest-CT phantom, sample, write NIfTI + PNG",
    "sample": "sample N volumes from a checkpoint to NIfTI / npy (resumable)",
    "preprocess": "DICOM / NIfTI / npz volumes -> the paper's 1 mm, 256^3 preprocessing",
    "train": "two-stage training with EMA, exact resume, multi-GPU",
    "cache": "build a training config's data cache (volumes pooled to image_size in one memory-mapped file)",
    "plot": "loss and throughput curves (PNG) of a training run from its log",
    "evaluate": "3D FID, MMD and MS-SSIM of sampled volumes against real ones (MedicalNet features)",
    "bench": "end-to-end benchmark: GPU-hours and memory for every backend",
    "reconstruct": "a CT volume from a measurement (super-resolution, infill, deblur, X-rays), prior-guided",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: MESSAGE (see PROG --help)``, status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="prdit-fast", description="PRDiT: 3D CT diffusion, fast.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module that runs
            module = importlib.import_module(f"prdit_fast.commands.{name}")
            module.add_arguments(p)
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show the traceback of a failure")
            p.set_defaults(_module=module)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted; every finished file is complete (train continues with --resume, sample and "
              "preprocess with the same command)", file=sys.stderr)
        return 130
    except Exception as e:  # the one place failures become an exit status
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
