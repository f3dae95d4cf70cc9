"""Merge what the stages of ``benchmarks/gpu_session.sh`` wrote into ``$OUT``, and check the
session's targets.

    python -m benchmarks.gpu_session_report --work WORK --out OUT [--commit C] [--resume R] [--quiet]
    python -m benchmarks.gpu_session_report --done-stages R      # the stages R finished ("ok")

Reads from WORK: ``stages.jsonl`` (one line per stage: status, seconds, cap), and each
stage's own JSON where it ran (``fm.json``, ``fm_compile.json``, ``guided.json``,
``baselines.json``, ``profile/profile-*.{json,md}``, ``sr.json``, ``fp8.json``,
``metrics.json``, ``features.json``, ``swiglu.json``, ``epilogue.json``, ``memory.json``
from pytest-benchmark) and the tests stage's log (``OUT/tests.log``: the failing tests by
name). ``--resume R`` (an earlier run's results.json, or its folder) carries that run's
finished stages and their results into this one, each marked with where it came from.
Writes to OUT, atomically: ``results.json`` (the environment, the stages, every stage's
result and the targets), ``summary.md`` (the tables; each target met or its gap),
``profile.md`` and ``profile.json``; prints ``summary.md`` unless ``--quiet``. Run after
every stage, so a session cut off later keeps what it measured.
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

SCHEMA = "prdit-fast-gpu-session/2"
STAGE_FILES = {"fm": "fm.json", "fm_compile": "fm_compile.json", "guided": "guided.json",
               "baselines": "baselines.json", "sr": "sr.json", "fp8": "fp8.json", "metrics": "metrics.json",
               "features": "features.json", "swiglu": "swiglu.json", "epilogue": "epilogue.json",
               "memory": "memory.json"}
# stages whose rows results.json keeps whole; summary.md only names them
WHOLE_ROWS_ONLY = {"sr": "benchmarks/bench_sampling.py --sr-size", "metrics": "benchmarks/bench_metrics.py",
                   "features": "benchmarks/bench_features.py"}
RESUMED = "done in an earlier run"


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _resume_file(path: Path) -> Path:
    return path / "results.json" if path.is_dir() else path


def done_stages(previous: dict[str, Any]) -> list[str]:
    """The stages an earlier run's results finished: status "ok", or carried as done."""
    if previous.get("schema") not in (SCHEMA, "prdit-fast-gpu-session/1"):
        raise ValueError(f"not a gpu_session results.json (schema {previous.get('schema')!r})")
    return [s["stage"] for s in previous.get("stages", []) if s["status"] == "ok" or s["status"].startswith(RESUMED)]


def _failed_tests(log: Path) -> dict[str, Any] | None:
    """The tests stage's outcome from pytest's log: the failing tests by name and the last line."""
    if not log.is_file():
        return None
    lines = log.read_text(errors="replace").splitlines()
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    summary = next((line.strip("= ") for line in reversed(lines) if line.strip()), "")
    return {"failed": failed, "summary": summary}


def collect(work: Path, commit: str, dry_run: bool, out: Path | None = None,
            resume: Path | None = None) -> dict[str, Any]:
    """Everything the session measured so far (and, with ``resume``, what an earlier run finished), as one dict."""
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
    if out is not None and any(s["stage"] == "tests" for s in stages):
        result["tests"] = _failed_tests(out / "tests.log")
    if resume is not None:
        _carry(result, _load(_resume_file(resume)) or {}, str(resume))
    result["targets"] = targets(result)
    return result


def _carry(result: dict[str, Any], previous: dict[str, Any], source: str) -> None:
    """Stages ``previous`` finished and this run did not run again: their entries and results."""
    ran = {s["stage"] for s in result["stages"]}
    origin = f"{RESUMED} ({source}: commit {previous.get('git_commit')}, {previous.get('date')}, " \
             f"{previous.get('device', {}).get('name')})"
    carried = []
    for stage in done_stages(previous):
        if stage in ran:
            continue
        entry = next(s for s in previous["stages"] if s["stage"] == stage)
        status = entry["status"] if entry["status"].startswith(RESUMED) else origin
        carried.append(dict(entry, status=status))
        for key in (stage, "profile" if stage == "profile" else None):
            if key and key in previous:
                result[key] = previous[key]
    result["stages"] = carried + result["stages"]


# --------------------------------------------------------------------------- targets
def _ok_rows(data: dict[str, Any] | None, key: str = "rows") -> list[dict[str, Any]]:
    return [r for r in (data or {}).get(key, []) if r.get("status", "ok") == "ok"]


def _target(name: str, value: float | None, goal: float, at_most: bool, unit: str = "") -> dict[str, Any]:
    if value is None:
        return {"target": name, "goal": goal, "value": None, "verdict": "not measured"}
    met = value <= goal if at_most else value >= goal
    gap = (value / goal if at_most else goal / value) if value else float("inf")
    verdict = "met" if met else f"gap: {value:.3g}{unit} vs {'<=' if at_most else '>='} {goal:g}{unit} ({gap:.2f}x off)"
    return {"target": name, "goal": goal, "value": value, "verdict": verdict}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 27's targets, each with its measured value and "met", "gap: ..." or "not measured".
    Ratios come from one stage's rows (one run on one machine)."""
    out = []
    fm = {(r["row"], r.get("batch")): r for r in _ok_rows(result.get("fm"), "sampling")}
    fmc = {(r["row"], r.get("batch")): r for r in _ok_rows(result.get("fm_compile"), "sampling")}
    for batch in (1, 2):
        graph = fm.get(("fast-graph", batch), {})
        out.append(_target(f"B/16/12-s16 256^3, 100 Euler steps, batch {batch}: ours (graphs) s/volume",
                           graph.get("s_per_volume"), 0.5, True, " s"))
        out.append(_target(f"B/16/12-s16 batch {batch}: ours (graphs) vs official (step time)",
                           graph.get("x_official"), 4.0, False, "x"))
        out.append(_target(f"B/16/12-s16 batch {batch}: ours (graphs) vs compile max-autotune (step time)",
                           fmc.get(("fast-graph", batch), {}).get("x_compile"), 1.5, False, "x"))
    guided = {r["row"]: r for r in _ok_rows(result.get("guided"))}
    out.append(_target("TF-PRDiT B/12/12 128^3: guided SR step / unguided step",
                       guided.get("guided-sr", {}).get("x_unguided"), 1.15, True, "x"))
    base = {r["row"]: r for r in _ok_rows(result.get("baselines"))}.get("fast-graph", {})
    out.append(_target("B/12/4 128^3 batch 4: ours (graphs) ms/step", base.get("step_ms"), 5.0, True, " ms"))
    out.append(_target("B/12/4: ours (graphs) vs compile max-autotune", base.get("x_compile"), 1.5, False, "x"))
    out.append(_target("B/12/4: ours (graphs) vs official", base.get("x_official"), 8.0, False, "x"))
    return out


def _fm_lines(data: dict[str, Any]) -> list[str]:
    s = data["settings"]
    lines = [f"{s['variant']} at {s['size']}^3, {s['steps']} {s['solver']} steps, [{data['label']}]; bf16 matmul peak "
             f"{data['peak']['tflops']:.4g} TFLOP/s measured in this run; ratios within this stage, same batch", "",
             f"weights: {data.get('weights', {}).get('source', 'not recorded')}", "",
             "| row | batch | attention | graph | forward ms | step ms | whole s | s/volume | peak GiB | MFU "
             "| x official | x compile | rel err |", "|" + " --- |" * 13]
    for r in data.get("sampling", []):
        if r.get("status") != "ok":
            lines.append(f"| {r['row']} | {r.get('batch')} | {r.get('status')} |" + " |" * 10)
            continue

        def f(key: str, fmt: str) -> str:
            return fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else "–"

        lines.append(f"| {r['row']} | {r['batch']} | {r.get('attention')} | {'yes' if r.get('cuda_graph') else 'no'} | "
                     f"{f('forward_ms', '{:.3f}')} | {f('step_ms', '{:.3f}')} | {f('whole_s', '{:.3f}')} | "
                     f"{f('s_per_volume', '{:.3f}')} | {f('peak_memory_gib', '{:.2f}')} | {f('mfu', '{:.1%}')} | "
                     f"{f('x_official', '{:.2f}')} | {f('x_compile', '{:.2f}')} | {f('rel_rms_error', '{:.2e}')} |")
    return lines


def _guided_lines(data: dict[str, Any]) -> list[str]:
    lines = [f"{data.get('variant')} at {data.get('size')}^3, batch 1, {data.get('dtype')}", "",
             "| row | step ms | x unguided | graph | whole reconstruction s |", "| --- | ---: | ---: | --- | ---: |"]
    for r in data.get("rows", []):
        whole = next((f"{v:.3f} ({k.split('_')[-1]} steps)" for k, v in r.items() if k.startswith("whole_s_")), "–")
        lines.append(f"| {r['row']} | {r['step_ms']:.3f} | {r['x_unguided']:.3f} | {r.get('cuda_graph')} | {whole} |")
    return lines


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
             f"Commit OUT's files as benchmarks/results/{bench.slugify(result['device']['name'])}-"
             f"{str(result['date'])[:10]}/; the next run resumes with RESUME=<that folder>.", "",
             "| stage | status | s | cap s |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['cap_s']} |" for s in result["stages"]]
    lines += ["", "## Targets (issue 27)", "", "| target | goal | measured | verdict |", "| --- | ---: | ---: | --- |"]
    for t in result.get("targets", []):
        value = "–" if t["value"] is None else f"{t['value']:.4g}"
        lines.append(f"| {t['target']} | {t['goal']:g} | {value} | {t['verdict']} |")
    tests = result.get("tests")
    if tests:
        lines += ["", f"## CUDA tests: {tests['summary']}", ""]
        lines += [f"- FAILED {name}" for name in tests["failed"]] or ["no failures"]
    for stage, title in (("fm", "The released 256^3 model (benchmarks/bench_flow_matching.py)"),
                         ("fm_compile", "The 256^3 model vs torch.compile max-autotune (bench_flow_matching.py)")):
        if stage in result:
            lines += ["", f"## {title}", ""] + _fm_lines(result[stage])
    if "guided" in result:
        lines += ["", "## Guided reconstruction (benchmarks/bench_guided.py)", ""] + _guided_lines(result["guided"])
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
    for stage, script in WHOLE_ROWS_ONLY.items():
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
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--dry-run", default="0", choices=("0", "1"))
    parser.add_argument("--resume", type=Path, help="an earlier run's results.json (or its folder) to carry over")
    parser.add_argument("--done-stages", type=Path, metavar="RESULTS",
                        help="print the stages RESULTS finished, space-separated, and exit")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.done_stages is not None:
        previous = _load(_resume_file(args.done_stages))
        if previous is None:
            parser.error(f"cannot read {_resume_file(args.done_stages)} as JSON")
        print(" ".join(done_stages(previous)))
        return 0
    if args.work is None or args.out is None:
        parser.error("--work and --out are required (or --done-stages)")
    result = collect(args.work, args.commit, args.dry_run == "1", out=args.out, resume=args.resume)
    summary = write(result, args.work, args.out)
    if not args.quiet:
        print(summary.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
