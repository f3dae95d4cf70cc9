"""Merge what the stages of ``benchmarks/gpu_session.sh`` wrote into ``$OUT``.

    python -m benchmarks.gpu_session_report --work WORK --out OUT [--commit C] [--quiet]

Reads from WORK: ``stages.jsonl`` (one line per stage: status, seconds, cap), and each
stage's own JSON where it ran (``baselines.json``, ``profile/profile-*.{json,md}``,
``swiglu.json``, ``epilogue.json``, ``fp8.json``, ``memory.json`` from pytest-benchmark).
Writes to OUT, atomically: ``results.json`` (the environment, the stages and every stage's
result), ``summary.md`` (the tables), ``profile.md`` and ``profile.json``; prints
``summary.md`` unless ``--quiet``. Run after every stage, so a session cut off later keeps
what it measured.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_sampling import format_table as baselines_table
from prdit_fast import bench
from prdit_fast.atomic import atomic_path, write_json

SCHEMA = "prdit-fast-gpu-session/1"
STAGE_FILES = {"baselines": "baselines.json", "swiglu": "swiglu.json", "epilogue": "epilogue.json",
               "fp8": "fp8.json", "memory": "memory.json", "fm": "fm.json", "sr": "sr.json",
               "guided": "guided.json", "metrics": "metrics.json"}
# opt-in stages whose rows results.json keeps whole; summary.md only names them
OPT_IN_BENCHMARKS = {"fm": "benchmarks/bench_flow_matching.py", "sr": "benchmarks/bench_sampling.py --sr-size",
                     "guided": "benchmarks/bench_guided.py", "metrics": "benchmarks/bench_metrics.py"}


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(work: Path, commit: str, dry_run: bool) -> dict[str, Any]:
    """Everything the session measured so far, as one dict."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = bench.environment(device)
    if env["git_commit"] == "unknown":
        env["git_commit"] = commit  # the device gets the tree without .git: the caller names it
    stages_file = work / "stages.jsonl"
    stages = [json.loads(line) for line in stages_file.read_text().splitlines() if line.strip()] \
        if stages_file.is_file() else []
    result: dict[str, Any] = {"schema": SCHEMA, "dry_run": dry_run,
                              "label": "DRY RUN on the CPU: no GPU figures" if dry_run or device.type != "cuda"
                              else "GPU", **env, "stages": stages}
    for stage, name in STAGE_FILES.items():
        data = _load(work / name)
        if data is not None:
            result[stage] = data
    profiles = sorted((work / "profile").glob("profile-*.json")) if (work / "profile").is_dir() else []
    if profiles:
        result["profile"] = _load(profiles[0])
    return result


def _profile_lines(profile: dict[str, Any]) -> list[str]:
    s = profile["settings"]
    mfu = profile.get("mfu")
    lines = [f"{s['variant']} at {s['size']}^3, batch {s['batch']}, {s['dtype']}, no graph: wall "
             f"{profile['wall_ms_per_step']:.3f} ms per step, kernels {profile['kernel_ms_per_step']:.3f} ms, "
             f"host launch {profile['host_ms_per_step']:.3f} ms, {profile['launches_per_step']:.0f} launches"
             + (f", MFU {mfu:.1%}" if mfu is not None else "") + f"; attention {profile.get('attention_backend')}",
             "", "| category | ms per step | % of kernel time |", "| --- | ---: | ---: |"]
    lines += [f"| {c['category']} | {c['ms_per_step']:.4f} | {c['pct_of_kernels']:.1f} |"
              for c in profile["categories"][:8]]
    return lines


def _pytest_benchmark_lines(data: dict[str, Any]) -> list[str]:
    lines = ["| benchmark | median ms | GB/s | of copy | TFLOP/s | of peak |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})

        def f(key: str, fmt: str) -> str:
            return fmt.format(info[key]) if isinstance(info.get(key), (int, float)) else "–"

        lines.append(f"| {b['name']} | {b['stats']['median'] * 1e3:.4f} | {f('gbps', '{:.0f}')} | "
                     f"{f('fraction_of_copy_bandwidth', '{:.1%}')} | {f('tflops', '{:.1f}')} | "
                     f"{f('fraction_of_matmul_peak', '{:.1%}')} |")
    return lines


def _swiglu_lines(data: dict[str, Any]) -> list[str]:
    lines = ["| case | ms | TFLOP/s |", "| --- | ---: | ---: |"]
    for r in data.get("rows", []):
        name = r.get("name") or r.get("case") or r.get("impl") or "?"
        ms, tf = r.get("ms"), r.get("tflops")
        lines.append(f"| {name} | {ms if ms is None else f'{ms:.4f}'} | {tf if tf is None else f'{tf:.1f}'} |")
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    versions = result["versions"]
    lines = [f"# GPU session: {result['device']['name']} [{result['label']}]", "",
             f"commit {result['git_commit']}, {result['date']}; torch {versions['torch']}, CUDA {versions['cuda']}, "
             f"Triton {versions['triton']}, driver {versions['driver']}", "",
             "| stage | status | s | cap s |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['cap_s']} |" for s in result["stages"]]
    if "baselines" in result:
        lines += ["", "## Baselines (benchmarks/bench_sampling.py)", "", baselines_table(result["baselines"]).rstrip()]
    if "profile" in result:
        lines += ["", "## One fast step (benchmarks/profile_step.py; profile.md has every kernel)", ""]
        lines += _profile_lines(result["profile"])
    if "swiglu" in result:
        lines += ["", "## Local denoiser: fused vs cuBLAS-composed (benchmarks/bench_ops_swiglu.py)", ""]
        lines += _swiglu_lines(result["swiglu"])
    for stage in ("epilogue", "fp8"):
        if stage in result:
            lines += ["", f"## {stage} (benchmarks/bench_{'ops_epilogue' if stage == 'epilogue' else 'fp8'}.py)", ""]
            lines += result[stage].get("summary", ["(no summary)"])
    for stage, script in OPT_IN_BENCHMARKS.items():
        if stage in result:
            lines += ["", f"## {stage} ({script}): every row in results.json under \"{stage}\""]
    if "memory" in result:
        lines += ["", "## Memory-bound kernels (benchmarks/bench_ops_memory.py)", ""]
        lines += _pytest_benchmark_lines(result["memory"])
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], work: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(to_markdown(result))
    for suffix in ("md", "json"):
        found = sorted((work / "profile").glob(f"profile-*.{suffix}")) if (work / "profile").is_dir() else []
        if found:
            with atomic_path(out / f"profile.{suffix}") as tmp:
                shutil.copyfile(found[0], tmp)
    return out / "summary.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--dry-run", default="0", choices=("0", "1"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    summary = write(collect(args.work, args.commit, args.dry_run == "1"), args.work, args.out)
    if not args.quiet:
        print(summary.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
