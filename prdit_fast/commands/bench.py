"""``prdit-fast bench``: the end-to-end benchmark of every backend in one run.

    prdit-fast bench                       # full: B/12/{0,4,12} at 64^3, 128^3, 256^3 (GPU)
    prdit-fast bench --quick               # GPU: 64^3 and 128^3; CPU: B/12/0 and B/12/4 at 16^3
    prdit-fast bench --variants B/12/4 --sizes 128 --batch 1 4 --backends eager-fp32 fast fast-cudagraph
    prdit-fast bench data                  # data sources: samples/s per core, cores per GPU (prdit_fast.bench.data)

Writes ``OUT/<device-slug>-<YYYY-MM-DD>/bench.{json,md,png}`` (see ``prdit_fast.bench``);
OUT defaults to a folder outside any source tree (``default_out``), so a run from a
checkout leaves the checkout clean.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from prdit_fast.bench import SETUP_NAMES, BenchOptions, run_benchmark


def default_out() -> str:
    """``$XDG_DATA_HOME/prdit_fast/bench`` (``~/.local/share/prdit_fast/bench``)."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(data_home) / "prdit_fast" / "bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("section", nargs="?", choices=("model", "data"), default="model",
                        help="model (default): sampling and training of every backend; data: how fast each data "
                             "source (official nii.gz / npz, .npy, the training cache) feeds training")
    parser.add_argument("--quick", action="store_true",
                        help="fewer sizes and reps, torch.compile in default mode; on CPU B/12/0 and B/12/4 at "
                             "16^3 with the CPU backends (well under 3 minutes on 2 cores)")
    parser.add_argument("--out", help="results root; files go to OUT/<device-slug>-<date>/ (default: "
                                      "$XDG_DATA_HOME/prdit_fast/bench, i.e. ~/.local/share/prdit_fast/bench; "
                                      "benchmarks/results to commit them)")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="variants such as PRDiT-B/12/4 or B/12/4 (default: B/12/0 B/12/4 B/12/12)")
    parser.add_argument("--sizes", nargs="+", type=int, metavar="S", help="volume edges (default: 64 128 256)")
    parser.add_argument("--batch", nargs="+", type=int, metavar="B",
                        help="batch sizes per cell (default: 4 at 128^3 scaled by volume, max 16; 1 at 256^3; 1 on CPU)")
    parser.add_argument("--backends", nargs="+", metavar="NAME", choices=SETUP_NAMES,
                        help=f"backends to run (default: all that exist here): {', '.join(SETUP_NAMES)}; "
                             f"eager-fp32 always runs as the reference")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune",
                                                   "max-autotune-no-cudagraphs"),
                        help="torch.compile mode (default: max-autotune; default with --quick)")
    parser.add_argument("--steps-per-rep", type=int, help="sampler steps per timed rep (default: 10; 4 quick; 1 CPU)")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step measurements")
    parser.add_argument("--no-capacity", action="store_true", help="skip the largest-batch search")
    parser.add_argument("--capacity-seconds", type=float,
                        help="time bound of the largest-batch search per backend and edge (default: 60; 20 quick)")
    parser.add_argument("--capacity-variant", help="variant of the largest-batch search (default: the deepest one)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="cells not started within this many seconds are recorded as skipped")
    parser.add_argument("--tag", help="name the files bench-TAG.{json,md,png}, so runs split by hand keep apart")
    data = parser.add_argument_group("bench data")
    data.add_argument("--volumes", type=int, default=3, help="synthetic volumes per source (default 3)")
    data.add_argument("--gpu-rate", nargs="+", metavar="S=RATE",
                      help="training samples/s of one GPU at edge S, for cores per GPU when no GPU is here "
                           "(e.g. 128=121); name where it comes from with --gpu-rate-source")
    data.add_argument("--gpu-rate-source", help="where the --gpu-rate figures were measured (quoted in the report)")
    data.add_argument("--work-dir", help="folder for the synthetic sources (default: the system temp folder)")


def command_line(args: argparse.Namespace) -> list[str]:
    """An equivalent ``prdit-fast bench ...`` command for the report, rebuilt from the parsed
    options (the process's own argv may be a test runner's)."""
    argv = ["prdit-fast", "bench"] + (["data"] if getattr(args, "section", "model") == "data" else [])
    for name, value in vars(args).items():
        if name in ("command", "_module", "section") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag] + [str(v) for v in value]
        else:
            argv += [flag, str(value)]
    return argv


def _gpu_rates(items: list[str] | None) -> dict[int, float]:
    rates = {}
    for item in items or []:
        size, sep, rate = item.partition("=")
        try:
            rates[int(size)] = float(rate)
        except ValueError:
            raise ValueError(f"--gpu-rate {item!r} must look like S=RATE, e.g. 128=121") from None
        if not sep or rates[int(size)] <= 0:
            raise ValueError(f"--gpu-rate {item!r} must look like S=RATE with RATE > 0, e.g. 128=121")
    return rates


def run_data(args: argparse.Namespace) -> int:
    from prdit_fast.bench.cells import variant_name
    from prdit_fast.bench.data import run_data_benchmark
    from prdit_fast.devices import resolve_device

    rates = _gpu_rates(args.gpu_rate)
    if rates and not args.gpu_rate_source:
        raise ValueError("--gpu-rate needs --gpu-rate-source: say where the GPU figure was measured")
    _, report = run_data_benchmark(
        args.out or default_out(), tuple(args.sizes or (128, 256)), args.volumes, rates, args.gpu_rate_source,
        variant_name((args.variants or ["B/12/4"])[0]), resolve_device(args.device), args.work_dir, args.tag,
        command_line(args), log=lambda line: print(line, flush=True))
    print(report)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.section == "data":
        try:
            return run_data(args)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    opts = BenchOptions(
        out=args.out or default_out(),
        quick=args.quick,
        variants=tuple(args.variants) if args.variants else None,
        sizes=tuple(args.sizes) if args.sizes else None,
        batches=tuple(args.batch) if args.batch else None,
        backends=tuple(args.backends) if args.backends else None,
        device=args.device,
        compile_mode=args.compile_mode,
        steps_per_rep=args.steps_per_rep,
        train=not args.no_train,
        capacity=not args.no_capacity,
        capacity_seconds=args.capacity_seconds,
        capacity_variant=args.capacity_variant,
        time_budget_s=args.time_budget,
        tag=args.tag,
        argv=command_line(args),
    )
    try:
        run_benchmark(opts, log=lambda line: print(line, flush=True))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
