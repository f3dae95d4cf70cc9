"""``prdit-fast bench``: the quick CPU run end to end, and the projection arithmetic.

The end-to-end test runs the real command once (module fixture, ~20-60 s on 2 cores) and
checks the three files and the CPU labelling; the arithmetic tests feed made-up numbers
to the formulas, so they test arithmetic only, never a measured figure.
"""
import contextlib
import datetime
import io
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import requires_cuda

from prdit_fast import bench
from prdit_fast.cli import main
from prdit_fast.testing import randomized_model

# --------------------------------------------------------------------------- #
# End to end on the CPU
# --------------------------------------------------------------------------- #


# The end-to-end run names XS variants (without and with a transformer, as the --quick CPU
# defaults B/12/0 and B/12/4 are): the same cells and files in a fraction of the time;
# test_quick_cpu_defaults checks what --quick picks on its own.
VARIANTS = ("PRDiT-XS/10/0", "PRDiT-XS/10/1")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["bench", "--quick", "--device", "cpu", "--variants", *VARIANTS, "--out", str(out)])
    folders = [p for p in out.iterdir() if p.is_dir()]
    return rc, out, folders, stdout.getvalue().splitlines()


def test_quick_cpu_defaults():
    opts = bench.BenchOptions(quick=True)
    opts.resolve(torch.device("cpu"))
    assert opts.variants == ("PRDiT-B/12/0", "PRDiT-B/12/4") and opts.sizes == (16,)
    assert opts.steps_per_rep == 1 and opts.compile_mode == "default" and opts.backends == bench.SETUP_NAMES


def test_quick_cpu_run_writes_json_markdown_png(quick_run):
    rc, out, folders, lines = quick_run
    assert rc == 0
    assert len(folders) == 1
    folder = folders[0]
    assert folder.name.startswith("cpu-")
    assert folder.name.endswith(datetime.date.today().isoformat())
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (folder / name).stat().st_size > 0
    assert (folder / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"
    # one progress line per cell: 2 variants x 1 edge x 1 batch x 2 CPU backends
    assert sum(line.startswith("[") for line in lines) == 4


def test_quick_cpu_json_is_labelled_cpu_with_required_keys(quick_run):
    folder = quick_run[2][0]
    result = json.loads((folder / "bench.json").read_text())
    assert result["device_type"] == "cpu"
    assert "CPU" in result["label"]
    assert result["device"]["type"] == "cpu" and result["device"]["name"]
    for key in ("python", "torch", "triton", "cuda", "driver"):
        assert key in result["versions"]
    assert result["versions"]["torch"] == torch.__version__
    assert result["git_commit"]
    datetime.datetime.fromisoformat(result["date"])
    assert result["command"].startswith("prdit-fast bench") and "--quick" in result["command"]
    assert result["peaks"]["matmul"]["tflops"] > 0 and result["peaks"]["copy"]["gbps"] > 0

    status = {b["name"]: b for b in result["backends"]}
    assert set(status) == set(bench.SETUP_NAMES)
    assert status["eager-fp32"]["status"] == status["bf16-autocast"]["status"] == "run"
    for skipped in ("tf32", "compile", "fast", "fast-cudagraph"):
        assert status[skipped]["status"] == "skipped" and status[skipped]["reason"]

    rows = result["rows"]
    assert {(r["variant"], r["backend"]) for r in rows} == {
        (v, b) for v in VARIANTS for b in ("eager-fp32", "bf16-autocast")
    }
    for r in rows:
        assert r["device_type"] == "cpu"
        assert r["sample_status"] == "ok" and r["train_status"] == "ok", r
        assert r["sample_step_ms"] > 0 and r["train_samples_per_s"] > 0
        assert r["sample_peak_memory_gib"] is None  # no device memory counter on CPU
        assert math.isclose(r["volumes_per_hour"], bench.volumes_per_hour(r["sample_step_ms"], r["batch"]))
        assert r["sample_speedup"] > 0 and r["train_speedup"] > 0
        if r["backend"] == "eager-fp32":
            assert r["sample_speedup"] == r["train_speedup"] == 1.0
    by_key = {(r["variant"], r["backend"]): r for r in rows}
    fast, ref = by_key[("PRDiT-XS/10/1", "bf16-autocast")], by_key[("PRDiT-XS/10/1", "eager-fp32")]
    assert math.isclose(fast["sample_speedup"], ref["sample_step_ms"] / fast["sample_step_ms"])

    # a CPU run projects no GPU-hours, per row or for the paper's recipe
    assert result["projections"] == [] and not any("sample_1000_volumes_gpu_hours" in r for r in rows)
    assert any("no GPU-hour projections" in n for n in result["notes"])
    assert result["capacity"] == [] and "CPU" in result["capacity_note"]


def test_quick_cpu_markdown_carries_the_cpu_label(quick_run):
    text = (quick_run[2][0] / "bench.md").read_text()
    first = text.splitlines()[0]
    assert first.startswith("# ") and "CPU results" in first and "not GPU figures" in first
    assert "CPU-hour" not in text and "None: a CPU run projects no GPU-hours." in text
    assert "| PRDiT-XS/10/1 | 16 | bf16-autocast |" in text
    assert "1.00x" in text  # the reference's own ratio column
    assert "`fast`:" in text  # skipped backends are listed with their reason


# --------------------------------------------------------------------------- #
# Arithmetic on made-up numbers (not measurements)
# --------------------------------------------------------------------------- #
def test_training_gpu_hours_arithmetic():
    # 104k steps x 64 samples at 64 samples/s = 104k s
    assert math.isclose(bench.training_gpu_hours(104_000, 64.0), 104_000 / 3600)
    assert math.isclose(bench.training_gpu_hours(130_000, 32.0, global_batch=64), 130_000 * 2 / 3600)
    with pytest.raises(ValueError, match="samples_per_s"):
        bench.training_gpu_hours(10, 0.0)


def test_sampling_gpu_hours_and_volumes_per_hour_arithmetic():
    # 1000 volumes in batches of 10 = 100 batches x 1000 steps x 36 ms = 3600 s
    assert math.isclose(bench.sampling_gpu_hours(1000, 1000, 36.0, 10), 1.0)
    # a partial last batch costs a full batch: 1001 volumes = 101 batches
    assert math.isclose(bench.sampling_gpu_hours(1001, 1000, 36.0, 10), 1.01)
    # 4 volumes per 1000 steps of 100 ms = 4 volumes per 100 s
    assert math.isclose(bench.volumes_per_hour(100.0, 4), 144.0)
    assert math.isclose(bench.volumes_per_hour(100.0, 4, steps=100), 1440.0)
    with pytest.raises(ValueError):
        bench.sampling_gpu_hours(10, 10, 0.0, 1)
    # 100 GFLOP x 5 items/s on a 1 TFLOP/s peak = 50%
    assert math.isclose(bench.model_flops_utilization(100e9, 5.0, 1.0), 0.5)


def _row(variant, size, backend, ms=None, sps=None, batch=2):
    return {"variant": variant, "size": size, "batch": batch, "backend": backend,
            "sample_step_ms": ms, "train_samples_per_s": sps}


def test_projection_and_ratio_arithmetic_on_made_up_rows():
    rows = [
        _row("PRDiT-B/12/0", 128, "eager-fp32", ms=100.0, sps=2.0),
        _row("PRDiT-B/12/4", 128, "eager-fp32", ms=400.0, sps=1.0),
        _row("PRDiT-B/12/0", 128, "fast", ms=25.0, sps=8.0),
        _row("PRDiT-B/12/4", 128, "fast", ms=50.0, sps=4.0),
        _row("PRDiT-B/12/4", 64, "fast", ms=5.0, sps=40.0),  # 128 is preferred over 64
    ]
    flops = {("PRDiT-B/12/4", 128): {"forward": 1e12, "train": 3e12}}
    bench.add_derived(rows, flops, peak_tflops=100.0)
    fast4 = rows[3]
    assert math.isclose(fast4["sample_speedup"], 8.0) and math.isclose(fast4["train_speedup"], 4.0)
    # 1 TFLOP x (2 volumes / 0.05 s) = 40 TFLOP/s of 100
    assert math.isclose(fast4["sample_mfu"], 0.4) and math.isclose(fast4["train_mfu"], 0.12)
    assert rows[4]["sample_speedup"] is None  # no reference at 64^3

    proj = {p["backend"]: p for p in bench.projections(rows, ("eager-fp32", "fast"))}
    ref, fast = proj["eager-fp32"], proj["fast"]
    assert ref["training_size"] == fast["training_size"] == 128
    expected_ref = 104_000 * 64 / 2.0 / 3600 + 130_000 * 64 / 1.0 / 3600
    assert math.isclose(ref["training_gpu_hours"], expected_ref)
    assert math.isclose(fast["training_gpu_hours"], expected_ref / 4)
    assert math.isclose(fast["training_speedup"], 4.0)
    s = fast["sampling_1000_volumes"]["PRDiT-B/12/4"]
    assert s["size"] == 128 and math.isclose(s["gpu_hours"], 500 * 1000 * 0.05 / 3600)
    assert math.isclose(s["speedup"], 8.0)


def test_projection_is_never_extrapolated_from_another_edge():
    rows = [_row("PRDiT-B/12/0", 32, "eager-fp32", 1.0, 1.0), _row("PRDiT-B/12/4", 32, "eager-fp32", 1.0, 1.0),
            _row("PRDiT-B/12/12", 128, "eager-fp32", 1.0, 1.0)]
    (p,) = bench.projections(rows, ("eager-fp32",))  # both training stages measured at 32^3 only
    assert "training_gpu_hours" not in p and "128^3" in p["training_note"]
    assert p["sampling_1000_volumes"].keys() == {"PRDiT-B/12/12"}  # B/12/4 sampled at 32^3 only: none
    assert p["sampling_1000_volumes"]["PRDiT-B/12/12"]["size"] == 128


def test_capacity_summary_picks_the_largest_edge_that_fits():
    cap = [{"backend": "fast", "size": 64, "max_batch": 40}, {"backend": "fast", "size": 128, "max_batch": 5},
           {"backend": "fast", "size": 256, "max_batch": 0}, {"backend": "eager-fp32", "size": 64, "max_batch": 3}]
    summary = bench.capacity_summary(cap)
    assert summary["fast"]["size"] == 128 and summary["fast"]["max_batch"] == 5
    assert summary["eager-fp32"]["size"] == 64


def test_training_flop_count_has_backward_only_where_it_trains():
    # spec section 11: 161 GFLOP forward for B/12/0 at 128^3; a full backward doubles it
    f0 = bench.step_flops("PRDiT-B/12/0", 128)
    assert abs(f0["forward"] / 1e9 - 161.3) < 0.1
    assert 2.9 < f0["train"] / f0["forward"] < 3.1
    # at depth 4 the frozen coarse path has no backward
    f4 = bench.step_flops("PRDiT-B/12/4", 64)
    assert f4["train"] / f4["forward"] < 2.9


def test_largest_fitting_search_on_a_made_up_memory_limit():
    calls = []

    def fits(n):
        calls.append(n)
        return n <= 37

    assert bench.largest_fitting(fits, cap=4096, budget_s=60) == (37, 38, None)
    assert calls[:7] == [1, 2, 4, 8, 16, 32, 64]  # doubling, then bisection between 32 and 64
    assert len(calls) <= 7 + 5
    assert bench.largest_fitting(lambda n: True, cap=100, budget_s=60) == (100, None, "batch cap 100")
    assert bench.largest_fitting(lambda n: False, cap=100, budget_s=60) == (0, 1, None)
    lo, hi, bounded = bench.largest_fitting(lambda n: True, cap=4096, budget_s=-1)
    assert (lo, hi) == (1, None) and bounded.startswith("time")


def _cpu_options(**kw):
    opts = bench.BenchOptions(variants=("XS/12/0",), sizes=(16,), batches=(1,), **kw)
    opts.resolve(torch.device("cpu"))
    return opts


def test_an_oom_is_recorded_per_cell_and_the_run_goes_on(monkeypatch):
    def oom(self, batch, steps):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 48.00 GiB")

    monkeypatch.setattr(bench.PreparedSetup, "sampling_run", oom)
    base = randomized_model("XS/12/0", 16)
    timing = {"warmup": 1, "min_reps": 1, "max_reps": 1, "budget_s": 0.0}
    row = bench.bench_cell(base, bench.SETUPS[0], 1, torch.device("cpu"), _cpu_options(train=False), timing)
    assert row["sample_status"] == "OOM" and "sample_step_ms" not in row
    assert row["train_status"] == "skipped (--no-train)"

    def broken(self, batch, steps):
        raise ValueError("kernel exploded")

    monkeypatch.setattr(bench.PreparedSetup, "sampling_run", broken)
    row = bench.bench_cell(base, bench.SETUPS[0], 1, torch.device("cpu"), _cpu_options(), timing)
    assert row["sample_status"] == "ValueError: kernel exploded"
    assert row["train_status"] == "ok" and row["train_samples_per_s"] > 0  # training still measured


def test_capacity_search_runs_real_trials_within_its_time_bound():
    base = randomized_model("XS/12/0", 16)
    c = bench.capacity_search(base, bench.SETUPS[0], torch.device("cpu"), budget_s=-1)
    # one real trial at batch 1 fits, then the (negative) time bound stops the search
    assert c["max_batch"] == 1 and c["tried"] == {"1": True}
    assert c["status"] == "ok" and c["bounded_by"].startswith("time")


def test_options_reject_bad_input_with_what_is_valid():
    with pytest.raises(ValueError, match="valid"):
        bench.BenchOptions(backends=("warp-drive",)).resolve(torch.device("cpu"))
    with pytest.raises(ValueError, match="multiple of stride"):
        bench.BenchOptions(sizes=(20,)).resolve(torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown PRDiT variant"):
        bench.BenchOptions(variants=("B/13/4",)).resolve(torch.device("cpu"))
    opts = bench.BenchOptions(backends=("fast",))
    opts.resolve(torch.device("cpu"))
    assert opts.backends == ("eager-fp32", "fast")  # the reference always runs first


def test_slug_names_the_device():
    assert bench.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.device_slug(torch.device("cpu")).startswith("cpu-")


# --------------------------------------------------------------------------- #
# GPU (the lead's GPU run)
# --------------------------------------------------------------------------- #
@requires_cuda
def test_gpu_small_run_every_backend(tmp_path):
    # torch.compile is left to the full run: its compile time would dominate this test
    backends = ("eager-fp32", "tf32", "bf16-autocast", "fast", "fast-cudagraph")
    opts = bench.BenchOptions(out=str(tmp_path), quick=True, variants=("XS/12/4",), sizes=(32,), batches=(2,),
                              backends=backends, capacity_seconds=10.0, tag="gputest")
    result, paths = bench.run_benchmark(opts, log=lambda line: None)
    assert paths["json"].name == "bench-gputest.json"
    assert result["device_type"] == "cuda" and "GPU" in paths["markdown"].read_text().splitlines()[0]
    assert paths["png"].stat().st_size > 0
    ran = [b["name"] for b in result["backends"] if b["status"] == "run"]
    assert set(ran) == set(backends), result["backends"]
    for r in result["rows"]:
        assert r["sample_status"] == "ok", r
        assert r["sample_peak_memory_gib"] > 0 and r["sample_speedup"] > 0
        if r["backend"] != "fast-cudagraph":
            assert r["train_status"] == "ok", r
    assert {c["backend"] for c in result["capacity"]} == set(ran)
    assert all(c["max_batch"] >= 1 for c in result["capacity"]), result["capacity"]


def test_default_output_is_outside_the_source_tree(tmp_path, monkeypatch):
    from prdit_fast.commands import bench as bench_cmd

    seen = {}
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setattr(bench_cmd, "run_benchmark", lambda opts, log: seen.setdefault("out", opts.out))
    assert main(["bench", "--quick", "--device", "cpu"]) == 0
    assert seen["out"] == str(tmp_path / "data" / "prdit_fast" / "bench")
    monkeypatch.delenv("XDG_DATA_HOME")
    repo = Path(bench.__file__).resolve().parents[2]
    assert repo not in Path(bench_cmd.default_out()).resolve().parents
