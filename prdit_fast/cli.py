"""The ``prdit-fast`` command. Each subcommand lives in ``prdit_fast.commands.<name>``
with ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when used.

Failures are one ``error:`` line on stderr: status 2 for a bad argument or config value
(``prdit_fast.errors.UsageError``, argparse's own errors), 1 for a runtime failure;
``--debug`` (before or after the command name) shows the traceback instead.

Logging is configured here, once, for every command: the ``prdit_fast`` loggers print
their info messages (progress notes, the engine's choices, warnings) to stderr;
``--quiet`` keeps warnings and errors only, ``--verbose`` adds debug messages. Ranks
other than 0 of a multi-process run print warnings only.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .errors import UsageError

COMMANDS = {
    "info": "variants, parameter counts, GFLOP per step, devices and backends",
    "demo": "train a small model on the synthetic chest-CT phantom, sample, write NIfTI + PNG",
    "sample": "sample N volumes from a checkpoint to NIfTI / npy (resumable)",
    "features": "transformer token features of many volumes (the official encode mode), resumable",
    "preprocess": "DICOM / NIfTI / npz volumes -> the paper's 1 mm, 256^3 preprocessing",
    "train": "two-stage training with EMA, exact resume, multi-GPU",
    "cache": "build a training config's data cache (volumes pooled to image_size in one memory-mapped file)",
    "plot": "loss and throughput curves (PNG) of a training run from its log",
    "evaluate": "3D FID, MMD and MS-SSIM of sampled volumes against real ones (MedicalNet features)",
    "bench": "end-to-end benchmark: GPU-hours and memory for every backend",
    "reconstruct": "a CT volume from a measurement (super-resolution, infill, deblur, X-rays), prior-guided",
    "export": "a checkpoint (official .pt or ours) -> a model folder (config.json + model.safetensors)",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: MESSAGE (see PROG --help)``, status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def configure_logging(quiet: bool = False, verbose: bool = False) -> None:
    """The ``prdit_fast`` loggers to stderr: INFO (default), WARNING (``quiet`` or a rank
    other than 0), DEBUG (``verbose``). Calling it again replaces the earlier handler."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    if int(os.environ.get("RANK", "0")) != 0 and not verbose:
        level = max(level, logging.WARNING)
    logger = logging.getLogger("prdit_fast")
    for handler in [h for h in logger.handlers if getattr(h, "_prdit_cli", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    handler._prdit_cli = True
    logger.addHandler(handler)
    logger.setLevel(level)


def _add_common(parser: argparse.ArgumentParser, default=None) -> None:
    """--debug / --quiet / --verbose, accepted before and after the command name."""
    extra = {} if default is None else {"default": default}
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure", **extra)
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", "-q", action="store_true", help="print warnings and errors only", **extra)
    verbosity.add_argument("--verbose", "-v", action="store_true", help="also print debug messages", **extra)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="prdit-fast", description="PRDiT: 3D CT diffusion, fast.")
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module that runs
            module = importlib.import_module(f"prdit_fast.commands.{name}")
            module.add_arguments(p)
            _add_common(p, default=argparse.SUPPRESS)
            p.set_defaults(_module=module)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.quiet and args.verbose:  # one before the command name, one after
        parser.error("argument --quiet/-q: not allowed with argument --verbose/-v")
    configure_logging(quiet=args.quiet, verbose=args.verbose)
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
