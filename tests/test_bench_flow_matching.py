"""benchmarks/bench_flow_matching.py runs end to end on a tiny configuration (CPU: the
structure of the result, not figures; the GPU figures come from the GPU session)."""
from benchmarks import bench_flow_matching


def test_tiny_flow_matching_benchmark_runs_every_row():
    seen = []
    result = bench_flow_matching.run("PRDiT-XS/10/1", 16, batch_sizes=(1, 2), steps=2, train_batch=1, accum=2,
                                     device="cpu", training=True, on_row=lambda r: seen.append(len(r["sampling"])))
    assert result["label"] == "CPU results (not GPU figures)"
    order = [(r["row"], r["batch"]) for r in result["sampling"]]
    # every row at batch 1 then 2; compile (minutes of autotuning on a GPU) last
    assert order == [(name, b) for b in (1, 2) for name in ("official", "reference-bf16", "fast-eager", "fast-graph")] \
        + [("compile", 1), ("compile", 2)]
    assert seen[:10] == list(range(1, 11))  # partial results after every row
    sampling = {(r["row"], r["batch"]): r for r in result["sampling"]}
    for batch in (1, 2):
        assert sampling["compile", batch]["status"].startswith("skipped")
        assert sampling["fast-graph", batch]["status"].startswith("skipped")
        for name in ("official", "reference-bf16", "fast-eager"):
            row = sampling[name, batch]
            assert row["status"] == "ok", row
            assert row["forward_ms"] > 0 and row["step_ms"] > 0 and row["whole_s"] > 0 and row["mfu"] > 0
            assert row["s_per_volume"] == row["whole_s"] / batch and row["attention"]
        assert sampling["official", batch]["rel_rms_error"] == 0.0  # fp32 on the CPU: the truth itself
        assert sampling["fast-eager", batch]["rel_rms_error"] < 1e-5
        assert sampling["fast-eager", batch]["x_official"] == (
            sampling["official", batch]["step_ms"] / sampling["fast-eager", batch]["step_ms"])
    training = {r["row"]: r for r in result["training"]}
    assert all(r["status"] == "ok" for r in training.values()), training
    assert training["official"]["activation_checkpointed_blocks"] == 1  # the one trainable DiT block
    assert all(r["samples_per_s"] > 0 for r in training.values())
