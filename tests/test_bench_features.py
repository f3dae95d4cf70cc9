"""benchmarks/bench_features.py runs end to end on a tiny configuration (CPU: the structure
of the result and the rows' agreement, not figures; the GPU figure comes from the GPU session)."""
from benchmarks import bench_features


def test_tiny_features_benchmark_runs_every_row():
    result = bench_features.run("PRDiT-XS/10/8", 16, batch=3, device="cpu", budget_s=0.2)
    assert result["label"] == "CPU results (not GPU figures)" and result["block"] == 5
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == list(bench_features.ROWS)
    assert rows["compile"]["status"].startswith("skipped")
    for name in ("official", "reference-bf16", "fast"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["shape"] == [3, 8, 192] and row["ms_per_batch"] > 0 and row["volumes_per_s"] > 0
        assert row["x_official"] > 0 and row["attention"]
    assert rows["fast"]["compute_dtype"] == "float32"
    assert rows["fast"]["max_abs_err"] < 1e-4  # fp32 on the CPU: only summation order differs
    assert rows["reference-bf16"]["max_abs_err"] < 0.5  # bf16 autocast against fp32
