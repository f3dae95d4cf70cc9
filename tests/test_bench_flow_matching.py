"""benchmarks/bench_flow_matching.py runs end to end on a tiny configuration (CPU: the
structure of the result, not figures; the GPU figures come from the GPU session)."""
from benchmarks import bench_flow_matching


def test_tiny_flow_matching_benchmark_runs_every_row():
    result = bench_flow_matching.run("PRDiT-XS/10/1", 16, batch=1, steps=2,
                                     train_batch=1, accum=2, device="cpu")
    assert result["label"] == "CPU results (not GPU figures)"
    sampling = {r["row"]: r for r in result["sampling"]}
    assert set(sampling) == {"official", "reference-bf16", "compile", "fast-graph"}
    assert sampling["compile"]["status"].startswith("skipped") and sampling["fast-graph"]["status"].startswith("skipped")
    for name in ("official", "reference-bf16"):
        row = sampling[name]
        assert row["status"] == "ok", row
        assert row["forward_ms"] > 0 and row["step_ms"] > 0 and row["whole_s"] > 0 and row["mfu"] > 0
    assert sampling["reference-bf16"]["x_official"] > 0
    training = {r["row"]: r for r in result["training"]}
    assert all(r["status"] == "ok" for r in training.values()), training
    assert training["official"]["activation_checkpointed_blocks"] == 1  # the one trainable DiT block
    assert all(r["samples_per_s"] > 0 for r in training.values())
