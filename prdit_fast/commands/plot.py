"""``prdit-fast plot RUN``: loss and throughput curves of a training run (PNG) from its
``RUN/log.jsonl``: ``RUN/loss.png`` (training loss per logging window, validation loss
where ``logging.eval_every`` recorded one) and ``RUN/throughput.png`` (samples per
second). A run resumed several times is one curve: records are ordered by step and a
step logged twice keeps its last record."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..atomic import atomic_path
from ..errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a training run folder (output.results_dir) holding log.jsonl")
    parser.add_argument("--out", help="folder for the PNGs (default: RUN)")


def read_log(path: Path) -> list[dict]:
    """The records of a ``log.jsonl``, by step, the last record of a step kept; a line
    cut short by a kill is skipped."""
    by_key: dict[tuple[int, str], dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = "val" if "val_loss" in record else "train"
        by_key[(int(record["step"]), kind)] = record
    return [by_key[k] for k in sorted(by_key)]


def _figure(series: dict[str, tuple[list[int], list[float]]], ylabel: str, log_y: bool) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (steps, values) in series.items():
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    log_file = run_dir / "log.jsonl"
    if not log_file.is_file():
        raise UsageError(f"RUN {run_dir}: no log.jsonl (is it a training run's output.results_dir?)")
    records = read_log(log_file)
    train = [r for r in records if "loss" in r]
    if not train:
        raise UsageError(f"{log_file} holds no training records yet")
    val = [r for r in records if "val_loss" in r]
    loss = {"training loss": ([r["step"] for r in train], [r["loss"] for r in train])}
    if val:
        loss["validation loss (EMA)"] = ([r["step"] for r in val], [r["val_loss"] for r in val])
    throughput = {"samples / s": ([r["step"] for r in train], [r["samples_per_s"] for r in train])}
    out = Path(args.out) if args.out else run_dir
    written = []
    for name, series, ylabel, log_y in (("loss.png", loss, "loss", True),
                                        ("throughput.png", throughput, "samples per second", False)):
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(_figure(series, ylabel, log_y))
        written.append(out / name)
    print("\n".join(map(str, written)))
    return 0
