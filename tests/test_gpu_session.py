"""``benchmarks/gpu_session.sh``'s CPU dry run (every stage at tiny size), so that a GPU
session, with its 15 minutes of device time, cannot be the first to find an error in it;
and the pieces of ``benchmarks/bench_sampling.py`` that need no run (labels, ratios).

The dry run takes ~1-4 minutes on two busy cores (one module fixture, run once); its
figures are CPU figures and nothing here asserts a speed.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks import bench_sampling

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STAGES = ["native", "tests", "profile", "baselines", "fp8", "swiglu", "epilogue", "memory"]
OUT_FILES = {"session.log", "tests.log", "profile.md", "profile.json", "results.json", "summary.md"}


def _session(out: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("STAGES", "PYTEST_ARGS", "SESSION_BUDGET_S")}
    environ.update(DRY_RUN="1", OUT=str(out), **env)
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_out")
    done = _session(out)
    return done, out, json.loads((out / "results.json").read_text())


def test_dry_run_runs_every_stage_in_order_and_prints_the_summary(dry_run):
    done, out, result = dry_run
    assert done.returncode == 0, done.stdout + done.stderr
    assert result["dry_run"] is True and "DRY RUN" in result["label"]
    assert [s["stage"] for s in result["stages"]] == STAGES
    for stage in result["stages"]:
        expected = "skipped" if stage["stage"] in ("native", "swiglu", "memory") else "ok"  # GPU-only stages
        assert stage["status"].startswith(expected), stage
    summary = (out / "summary.md").read_text()
    for heading in ("| stage | status | s | cap s |", "## Baselines", "## One fast step", "## fp8", "## epilogue"):
        assert heading in summary
    assert summary.strip().splitlines()[-1] in done.stdout  # printed last, for the run tool's output tail


def test_dry_run_writes_at_most_eight_plain_files(dry_run):
    _, out, _ = dry_run
    names = {p.name for p in out.iterdir()}
    assert names == OUT_FILES and len(names) <= 8, names
    assert all(p.is_file() for p in out.iterdir())


def test_dry_run_baseline_rows_are_labelled(dry_run):
    _, _, result = dry_run
    rows = {r["row"]: r for r in result["baselines"]["rows"]}
    assert list(rows) == ["fast-graph", "official", "reference-bf16", "reference-tf32", "fast-eager", "compile"]
    for name in ("fast-graph", "reference-tf32", "compile"):  # GPU-only rows say why they did not run
        assert rows[name]["status"].startswith("skipped: "), rows[name]
    for name in ("official", "reference-bf16", "fast-eager"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["step_ms"] > 0 and r["forward_ms"] > 0 and r["mfu"] > 0
        assert r["whole_s_1"] > 0 and r["whole_s_2"] > 0  # the initial noise is inside these
        assert r["x_official"] == pytest.approx(rows["official"]["step_ms"] / r["step_ms"])
    # the official path's attention runs through SDPA: on the CPU, its flash kernel
    assert rows["official"]["attention"] == "flash"
    assert rows["official"]["rel_rms_error"] == 0.0
    assert rows["fast-eager"]["attention"].startswith("math")
    assert rows["reference-bf16"]["rel_rms_error"] < 2e-2


def test_stage_caps_and_the_session_budget(tmp_path):
    # the tests stage gets a 1 s cap and is cut off; the profile stage then has under
    # MIN_STAGE_S of the budget left and is skipped: both recorded, the report still written
    done = _session(tmp_path, STAGES="tests profile", TESTS_CAP_S="1", SESSION_BUDGET_S="24", MIN_STAGE_S="12")
    assert done.returncode == 0, done.stdout + done.stderr
    stages = json.loads((tmp_path / "results.json").read_text())["stages"]
    assert stages[0] == {"stage": "tests", "status": "cut off at its 1s cap", "seconds": stages[0]["seconds"],
                         "cap_s": 1}
    assert stages[1]["stage"] == "profile" and "left of the 24s session budget" in stages[1]["status"]


def test_attention_labels():
    sampling = bench_sampling
    label = sampling.short_attention_label
    assert label("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "flash"
    assert label("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "mem-efficient"
    assert label("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "cudnn"
    assert label("aten::_scaled_dot_product_flash_attention_for_cpu") == "flash"
    assert sampling.attention_label([], depth=4) == "materialized (no attention kernel)"
    assert sampling.attention_label(["fmha_x", "flash_fwd_y"], depth=4) == "flash+mem-efficient"
    assert sampling.attention_label([], depth=0) == "none (depth 0)"
    assert sampling.attention_label([], depth=4, graphs=True) == "none seen (CUDA graph replay)"


def test_ratios_are_within_the_run_and_skip_failed_rows():
    sampling = bench_sampling
    rows = [{"row": "official", "status": "ok", "step_ms": 80.0}, {"row": "compile", "status": "ok", "step_ms": 10.0},
            {"row": "fast-graph", "status": "ok", "step_ms": 5.0}, {"row": "reference-tf32", "status": "OOM"}]
    sampling._add_ratios(rows)
    assert rows[2]["x_official"] == 16.0 and rows[2]["x_compile"] == 2.0
    assert rows[1]["x_compile"] == 1.0 and "x_official" not in rows[3]
    with pytest.raises(ValueError, match="unknown row"):
        sampling.baseline_rows(rows=("fastest",), device="cpu")
    with pytest.raises(ValueError, match="increasing"):
        sampling.baseline_rows(step_counts=(1000, 100), device="cpu")


def test_dry_run_fp8_and_epilogue_stages(dry_run):
    _, _, result = dry_run
    fp8 = result["fp8"]
    assert [s["dtype"] for s in fp8["steps"]] == ["bf16", "fp8"]
    assert {g["gemm"] for g in fp8["gemms"]} >= {"qkv", "proj", "fc1", "fc2", "final"}
    (volume,) = fp8["accuracy"]["per_volume"]  # one whole sample in each dtype from the same key
    assert 0 < volume["rmse_hu"] < 2000 and volume["psnr_hu_db"] > 0
    for row in result["epilogue"]["rows"]:  # the interpreter's fp32 epilogue GEMM agrees with the composition
        assert row["x_rel_rms"] < 1e-5 and row["y_rel_rms"] < 1e-5, row


def test_opt_in_stages_are_named_in_the_summary(tmp_path):
    """fm / sr / guided / metrics rows stay whole in results.json; summary.md names the stage."""
    from benchmarks import gpu_session_report as report

    for stage, name in (("fm", "fm.json"), ("metrics", "metrics.json")):
        (tmp_path / name).write_text(json.dumps({"rows": [{"row": "ours", "ms": 1.0}]}))
    (tmp_path / "stages.jsonl").write_text(
        '{"stage": "fm", "status": "ok", "seconds": 3, "cap_s": 240}\n'
        '{"stage": "metrics", "status": "ok", "seconds": 4, "cap_s": 240}\n')
    result = report.collect(tmp_path, commit="abc", dry_run=True)
    assert result["fm"]["rows"][0]["row"] == "ours" and "metrics" in result and "sr" not in result
    markdown = report.to_markdown(result)
    assert "## fm (benchmarks/bench_flow_matching.py)" in markdown
    assert "## metrics (benchmarks/bench_metrics.py)" in markdown and "## sr " not in markdown
