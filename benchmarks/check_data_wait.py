"""GPU check (issue 23): the data wait stays under 2% of the step time when training
PRDiT-B/12/4 at 128^3 from an official-layout folder (256^3 LIDC ``processed.nii.gz``),
on both data paths: the cached set on the device (``data.on_device: true``) and the
prefetching loader over the cache (``data.on_device: false``).

    python benchmarks/check_data_wait.py --out $OUT/data_wait.json            # GPU defaults
    python benchmarks/check_data_wait.py --variant PRDiT-XS/10/1 --size 16 --edge 32 --volumes 4 \\
        --steps 6 --batch 2 --device cpu --backend reference                  # CPU dry run

Each path is one ``prdit-fast train`` run (stage 2 from scratch, ``log_every`` 1); the mean
``data_wait_pct`` of the steps after ``--skip`` (compilation and the cache build stay out)
is compared with ``--limit`` (2%). The cache is built once (the first run) and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="PRDiT-B/12/4")
    parser.add_argument("--size", type=int, default=128, help="training edge")
    parser.add_argument("--edge", type=int, default=256, help="stored edge of the official files")
    parser.add_argument("--volumes", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of the mean")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="fast")
    parser.add_argument("--limit", type=float, default=2.0, help="largest mean data wait, percent of the step")
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from prdit_fast.atomic import write_json
    from prdit_fast.bench.data import make_sources

    result = {"settings": vars(args), "paths": {}}
    with tempfile.TemporaryDirectory(prefix="prdit-data-wait-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        files = make_sources(tmp / "src", args.edge, args.volumes, kinds=("official-lidc",))["official-lidc"]
        (tmp / "train.txt").write_text("\n".join(map(str, files)) + "\n")
        result["sources_s"] = time.perf_counter() - started
        for path, on_device in (("on_device", "true"), ("loader", "false")):
            run = tmp / path
            overrides = [
                f"data.train_list={tmp / 'train.txt'}", f"data.image_size={args.size}", f"data.num_workers={args.workers}",
                f"data.cache_dir={tmp / 'cache'}", f"data.on_device={on_device}", f"model.name={args.variant}",
                f"model.backend={args.backend}", f"training.batch_size={args.batch}", "training.learning_rate=1e-4",
                f"training.total_steps={args.steps}", f"training.device={args.device}", "training.amp=true",
                "training.ema_warmup=true", "logging.log_every=1", f"logging.ckpt_every={args.steps}",
                f"output.results_dir={run}",
            ]
            config = tmp / "config.yaml"
            config.write_text("{}\n")
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "prdit_fast.cli", "--quiet", "train", "--config", str(config),
                                   "--from-scratch", *overrides], env=env, capture_output=True, text=True)
            if done.returncode:
                result["paths"][path] = {"status": "failed", "error": done.stderr.strip().splitlines()[-1:]}
                continue
            records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            steps = [r for r in records if "data_wait_pct" in r][args.skip:]
            mean = sum(r["data_wait_pct"] for r in steps) / max(len(steps), 1)
            result["paths"][path] = {
                "status": "ok", "wall_s": time.perf_counter() - t0, "steps_measured": len(steps),
                "data_wait_pct_mean": mean, "data_wait_ms_mean": sum(r["data_wait_ms"] for r in steps) / max(len(steps), 1),
                "samples_per_s_mean": sum(r["samples_per_s"] for r in steps) / max(len(steps), 1),
                "passed": mean < args.limit,
            }
            print(f"{path:10s} data wait {mean:.2f}% of the step (limit {args.limit}%), "
                  f"{result['paths'][path]['samples_per_s_mean']:.1f} samples/s", flush=True)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
