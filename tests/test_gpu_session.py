"""``benchmarks/gpu_session.sh``'s CPU dry run (every stage at tiny size), so that a GPU
session, with its 15 minutes of device time, cannot be the first to find an error in it;
its resume from an earlier run's results, the CUDA-only test selection, the targets'
verdicts, and the pieces of ``benchmarks/bench_sampling.py`` that need no run (labels, ratios).

The dry run takes ~2-6 minutes on two busy cores (one module fixture, run once); its
figures are CPU figures and nothing here asserts a speed. Its sr and features stages run
the tiny configurations those benchmarks are checked in (their rows are asserted here, not
run a second time in-process).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_sampling

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STAGES = ["tests", "fm", "guided", "fm_compile", "baselines", "profile", "sr", "fp8", "metrics", "features"]
OUT_FILES = {"session.log", "tests.log", "profile.md", "profile.json", "results.json", "summary.md"}


def _session(out: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("STAGES", "PYTEST_ARGS", "SESSION_BUDGET_S", "RESUME")}
    environ.update({"DRY_RUN": "1", "OUT": str(out), "SESSION_BUDGET_S": "3000", **env})
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=1800)


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
    features = (ROOT / "benchmarks" / "bench_features.py").is_file()  # engineer dropin's, when landed
    for stage in result["stages"]:
        expected = "skipped" if stage["stage"] == "features" and not features else "ok"
        assert stage["status"].startswith(expected), stage
    summary = (out / "summary.md").read_text()
    for heading in ("| stage | status | s | cap s |", "## Targets (issue 27)", "## CUDA tests", "## The released 256^3",
                    "## Guided reconstruction", "## Baselines", "## One fast step", "## fp8", "## sr ", "## metrics "):
        assert heading in summary, heading
    assert summary.strip().splitlines()[-1] in done.stdout  # printed last, for the run tool's output tail


def test_dry_run_writes_at_most_eight_plain_files(dry_run):
    _, out, _ = dry_run
    names = {p.name for p in out.iterdir()}
    assert names == OUT_FILES and len(names) <= 8, names
    assert all(p.is_file() for p in out.iterdir())


def test_dry_run_tests_stage_selects_only_cuda_tests(dry_run):
    _, _, result = dry_run
    # the dry run's selection: one file's CUDA tests, skipped on the CPU, the rest deselected
    assert result["tests"]["failed"] == [] and "skipped" in result["tests"]["summary"]
    assert "deselected" in result["tests"]["summary"]


def test_dry_run_fm_rows_at_both_batch_sizes(dry_run):
    _, _, result = dry_run
    rows = {(r["row"], r["batch"]): r for r in result["fm"]["sampling"]}
    assert list(rows) == [(name, b) for b in (1, 2) for name in ("official", "reference-bf16", "fast-eager",
                                                                   "fast-graph")]
    for batch in (1, 2):
        for name in ("official", "reference-bf16", "fast-eager"):
            r = rows[name, batch]
            assert r["status"] == "ok" and r["whole_s"] > 0 and r["attention"], r
        assert rows["fast-graph", batch]["status"].startswith("skipped: ")
    compiled = [(r["row"], r["status"][:8]) for r in result["fm_compile"]["sampling"]]
    assert compiled == [("fast-graph", "skipped:"), ("fast-graph", "skipped:"), ("compile", "skipped:"),
                        ("compile", "skipped:")]


def test_dry_run_guided_and_targets(dry_run):
    _, _, result = dry_run
    guided = {r["row"]: r for r in result["guided"]["rows"]}
    assert guided["guided-sr"]["whole_s_2"] > 0  # the whole reconstruction, end to end
    verdicts = {t["target"]: t["verdict"] for t in result["targets"]}
    assert len(verdicts) == 10
    ratio = next(t for t in result["targets"] if t["target"].startswith("TF-PRDiT"))
    assert ratio["value"] == guided["guided-sr"]["x_unguided"]
    assert ratio["verdict"] == "met" or ratio["verdict"].startswith("gap: ")
    # CUDA-graph rows do not run on the CPU: their targets are not measured, never "met"
    assert all(v == "not measured" for k, v in verdicts.items() if "ours (graphs)" in k)


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
        assert r["whole_s_1"] > 0  # the initial noise is inside
        assert r["x_official"] == pytest.approx(rows["official"]["step_ms"] / r["step_ms"])
    # the official path's attention runs through SDPA: on the CPU, its flash kernel
    assert rows["official"]["attention"] == "flash"
    assert rows["official"]["rel_rms_error"] == 0.0
    assert rows["fast-eager"]["attention"].startswith("math")
    assert rows["reference-bf16"]["rel_rms_error"] < 2e-2


def test_resume_skips_finished_stages_and_carries_their_results(dry_run, tmp_path):
    _, out, first = dry_run
    previous = tmp_path / "committed" / "results.json"  # as committed under benchmarks/results/<device>-<date>/
    previous.parent.mkdir()
    previous.write_text((out / "results.json").read_text())
    resumed = tmp_path / "next"
    done = _session(resumed, STAGES="tests fm guided", RESUME=str(previous.parent))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fm: done in the resumed run, not run again" in done.stdout
    result = json.loads((resumed / "results.json").read_text())
    from benchmarks import gpu_session_report as report

    # every stage the first run finished is carried (none ran again), with its results
    assert [s["stage"] for s in result["stages"]] == report.done_stages(first)
    assert {"tests", "fm", "guided", "baselines"} <= set(report.done_stages(first))
    assert all(s["status"].startswith("done in an earlier run") for s in result["stages"])
    assert result["fm"] == first["fm"] and result["guided"] == first["guided"]
    assert result["targets"] == first["targets"]
    # a stage that ended otherwise runs again: the first run's features stage was skipped
    assert "features" not in report.done_stages(first) or (ROOT / "benchmarks" / "bench_features.py").is_file()


def test_a_failing_test_is_named_and_later_stages_still_run(tmp_path):
    failing = tmp_path / "cases" / "test_broken.py"
    failing.parent.mkdir()
    failing.write_text("def test_passes():\n    assert True\n\n\ndef test_breaks():\n    assert 1 == 2\n")
    out = tmp_path / "out"
    done = _session(out, STAGES="tests epilogue", PYTEST_ARGS=str(failing))  # epilogue: a later stage, seconds
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "results.json").read_text())
    assert result["stages"][0]["status"] == "failed (exit 1)"
    assert result["stages"][1]["stage"] == "epilogue" and result["stages"][1]["status"] == "ok", result["stages"]
    (name,) = result["tests"]["failed"]  # pytest names it relative to the checkout
    assert name.endswith("cases/test_broken.py::test_breaks"), name
    assert f"FAILED {name}" in (out / "summary.md").read_text()


def test_cuda_only_selects_the_tests_that_skip_without_a_gpu():
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "--cuda-only",
                           "tests/test_ops_flow_update.py", "tests/test_flow_matching_engine.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    selected = sorted(line for line in done.stdout.splitlines() if "::" in line)
    assert selected and all("gpu" in line for line in selected), done.stdout
    assert "tests/test_ops_flow_update.py::test_gpu_bf16_tokens_at_the_released_geometry" in selected
    assert not any("test_kernel_matches_reference" in line for line in selected)


def test_targets_state_met_gap_or_not_measured():
    from benchmarks import gpu_session_report as report

    result = {"fm": {"sampling": [
        {"row": "fast-graph", "batch": 1, "status": "ok", "s_per_volume": 0.4, "x_official": 3.0},
        {"row": "fast-graph", "batch": 2, "status": "OOM"}]},
        "baselines": {"rows": [{"row": "fast-graph", "status": "ok", "step_ms": 6.0, "x_compile": 1.5,
                                "x_official": 9.0}]}}
    got = {t["target"]: t["verdict"] for t in report.targets(result)}
    assert got["B/16/12-s16 256^3, 100 Euler steps, batch 1: ours (graphs) s/volume"] == "met"
    assert got["B/16/12-s16 batch 1: ours (graphs) vs official (step time)"] == "gap: 3x vs >= 4x (1.33x off)"
    assert got["B/16/12-s16 256^3, 100 Euler steps, batch 2: ours (graphs) s/volume"] == "not measured"
    assert got["B/12/4 128^3 batch 4: ours (graphs) ms/step"] == "gap: 6 ms vs <= 5 ms (1.20x off)"
    assert got["B/12/4: ours (graphs) vs compile max-autotune"] == "met"  # the goal itself counts as met
    assert got["TF-PRDiT B/12/12 128^3: guided SR step / unguided step"] == "not measured"


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


def test_dry_run_sr_rows_sample_the_wrapper(dry_run):
    """The sr stage (benchmarks/bench_sampling.py --sr-size, PRDiT-XS/10/1 8 -> 16): the
    official loop and the fast backend both sample the PRDiT-SR wrapper, the fast one
    agreeing with the reference (CPU figures: structure, not performance)."""
    from prdit_fast import create_model
    from prdit_fast.flops import flops_per_step

    _, _, result = dry_run
    sr = result["sr"]
    assert sr["settings"]["variant"] == "PRDiT-SR(PRDiT-XS/10/1)" and sr["settings"]["size"] == 16
    assert sr["flop_per_step"] == flops_per_step(bench_sampling.randomized_sr_model(create_model("PRDiT-XS/10/1", 8),
                                                                                    16).config)
    rows = {r["row"]: r for r in sr["rows"]}
    assert rows["official"]["status"] == "ok" and rows["fast-eager"]["status"] == "ok", rows
    assert rows["fast-eager"]["whole_s_1"] > 0 and rows["fast-eager"]["rel_rms_error"] < 1e-4


def test_dry_run_features_rows(dry_run):
    """The features stage (benchmarks/bench_features.py, PRDiT-XS/10/8 at 16^3) runs every row
    (CPU: the structure of the result and the rows' agreement, not figures); the fast features
    at batch 3 are checked in tests/test_interface.py."""
    from benchmarks import bench_features

    _, _, result = dry_run
    features = result["features"]
    assert features["label"] == "CPU results (not GPU figures)" and features["block"] == 5
    rows = {r["row"]: r for r in features["rows"]}
    assert list(rows) == list(bench_features.ROWS)
    assert rows["compile"]["status"].startswith("skipped")
    for name in ("official", "reference-bf16", "fast"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["shape"] == [1, 8, 192] and row["ms_per_batch"] > 0 and row["volumes_per_s"] > 0
        assert row["x_official"] > 0 and row["attention"]
    assert rows["fast"]["compute_dtype"] == "float32"
    assert rows["fast"]["max_abs_err"] < 1e-4  # fp32 on the CPU: only summation order differs
    assert rows["reference-bf16"]["max_abs_err"] < 0.5  # bf16 autocast against fp32


def test_dry_run_metrics_feature_rows(dry_run):
    """The metrics stage (benchmarks/bench_metrics.py, 2 + 2 volumes at 16^3, no MS-SSIM)
    reports every feature timing; tests/test_bench_metrics.py runs the MS-SSIM rows."""
    _, _, result = dry_run
    metrics = result["metrics"]
    for key in ("features_real_fp32", "features_fake_fp32", "features_fake_bf16", "fid_factors", "mmd", "bootstrap"):
        assert metrics["seconds"][key] > 0, key
    assert metrics["official_seconds"]["features_2n_extrapolated"] > 0
    assert 0 <= metrics["bf16_feature_max_error_relative_to_max"] < 0.1
    assert metrics["wscore"]["seeds"] == 1 and metrics["wscore"]["step_ms"] > 0


def test_dry_run_fp8_stage(dry_run):
    _, _, result = dry_run
    fp8 = result["fp8"]
    assert [s["dtype"] for s in fp8["steps"]] == ["bf16", "fp8"]
    assert {g["gemm"] for g in fp8["gemms"]} >= {"qkv", "proj", "fc1", "fc2", "final"}
    (volume,) = fp8["accuracy"]["per_volume"]  # one whole sample in each dtype from the same key
    assert 0 < volume["rmse_hu"] < 2000 and volume["psnr_hu_db"] > 0


def test_epilogue_benchmark_by_name(tmp_path):
    """The epilogue stage (by name only): the interpreter's fp32 epilogue GEMM agrees with the composition."""
    from benchmarks import bench_ops_gated_residual_gemm

    out = tmp_path / "epilogue.json"
    assert bench_ops_gated_residual_gemm.main(["--device", "cpu", "--tiny", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows
    for row in rows:
        assert row["x_rel_rms"] < 1e-5 and row["y_rel_rms"] < 1e-5, row
