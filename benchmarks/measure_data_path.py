"""The same tiny training run fed from the official LIDC layout (256^3 ``processed.nii.gz``)
and from the same volumes already pooled to the training edge (``.npy``): time ratio and
first-step losses.

    python benchmarks/measure_data_path.py --volumes 4 --size 32 --steps 40 \\
        --out benchmarks/results/cpu-shared-2core-2026-12-07/data_path.json

Each run is one ``prdit-fast train`` process (PRDiT-XS/10/0, batch 2, ``log_every`` 1). The
official-layout run builds the training cache on first use (included in its time: each
volume read once) and trains from it; the pooled run reads its arrays directly
(``data.cache: false``), which is what training on pre-pooled data cost before the cache.
A third run repeats the official-layout one with the cache already built. Times are wall
and CPU (user + system of the child process: robust to other jobs on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _train(config: Path, run_dir: Path, overrides: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "prdit_fast.cli", "--quiet", "train", "--config", str(config),
                           f"output.results_dir={run_dir}", *overrides], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"train failed: {done.stderr.strip().splitlines()[-1:]}")
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "first_step_loss": losses[0]["loss"], "last_loss": losses[-1]["loss"],
            "data_wait_pct_mean": float(np.mean([r.get("data_wait_pct", float("nan")) for r in losses]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from prdit_fast.atomic import write_json
    from prdit_fast.bench.data import make_sources
    from prdit_fast.bench.environment import environment
    from prdit_fast.data.dataset import VolumeDataset

    import torch

    with tempfile.TemporaryDirectory(prefix="prdit-data-path-") as tmp:
        tmp = Path(tmp)
        lidc = make_sources(tmp / "src", 256, args.volumes, kinds=("official-lidc",))["official-lidc"]
        (tmp / "train.txt").write_text("\n".join(map(str, lidc)) + "\n")
        pooled = tmp / "pooled"
        pooled.mkdir()
        for n, item in enumerate(VolumeDataset(lidc, args.size)):
            np.save(pooled / f"volume_{n:04d}.npy", ((item.numpy() + 1) / 2)[0])  # [0, 1], as preprocessed
        config = tmp / "tiny.yaml"
        config.write_text(
            f"data: {{image_size: {args.size}, num_workers: {args.workers}, cache_dir: {tmp / 'cache'}}}\n"
            f"model: {{name: PRDiT-XS/10/0}}\n"
            f"training: {{batch_size: 2, learning_rate: 1.0e-4, total_steps: {args.steps}, device: cpu, seed: 0}}\n"
            f"logging: {{log_every: 1, ckpt_every: {args.steps}, tensorboard: false}}\n")
        runs = {
            "official_layout_first_use": _train(config, tmp / "run_lidc", [f"data.train_list={tmp / 'train.txt'}"]),
            "pooled_npy": _train(config, tmp / "run_npy", [f"data.path={pooled}", "data.cache=false"]),
            "official_layout_cache_built": _train(config, tmp / "run_lidc2", [f"data.train_list={tmp / 'train.txt'}"]),
        }
    base = runs["pooled_npy"]
    for name, r in runs.items():
        r["wall_ratio_to_pooled"] = r["wall_s"] / base["wall_s"]
        r["cpu_ratio_to_pooled"] = r["cpu_s"] / base["cpu_s"]
        print(f"{name:30s} wall {r['wall_s']:7.1f} s ({r['wall_ratio_to_pooled']:.2f}x)  cpu {r['cpu_s']:7.1f} s "
              f"({r['cpu_ratio_to_pooled']:.2f}x)  first loss {r['first_step_loss']:.6f}  "
              f"data wait {r['data_wait_pct_mean']:.1f}%")
    result = {"settings": vars(args), "environment": environment(torch.device("cpu"), sys.argv),
              "load_average": list(os.getloadavg()), "runs": runs, "method": __doc__}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
