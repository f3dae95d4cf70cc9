"""benchmarks/bench_flow_matching.py runs end to end on a tiny configuration (CPU: the
structure of the result, not figures; the GPU figures come from the GPU session)."""
import pytest
import torch

from benchmarks import bench_flow_matching
from prdit_fast.checkpoint import save_official_checkpoint
from prdit_fast.models import create_model


def test_tiny_flow_matching_benchmark_runs_every_row():
    seen = []
    result = bench_flow_matching.run("PRDiT-XS/10/1", 16, batch_sizes=(1, 2), steps=2, train_batch=1, accum=2,
                                     device="cpu", training=True, on_row=lambda r: seen.append(len(r["sampling"])))
    assert result["label"] == "CPU results (not GPU figures)"
    assert result["weights"]["source"].startswith("random") and result["weights"]["checkpoint_weights"] == "ema"
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


def test_the_network_is_read_from_a_file_in_the_official_layout(tmp_path):
    """The rows run what load_checkpoint reads: the given file (its variant and size), and
    random weights go through the official layout first; an IaN file is refused."""
    cpu = torch.device("cpu")
    random_model, weights = bench_flow_matching.released_model("PRDiT-XS/10/1", 16, cpu)
    expected = bench_flow_matching.fm_model("PRDiT-XS/10/1", 16)
    assert all(torch.equal(a, b) for a, b in zip(random_model.state_dict().values(), expected.state_dict().values()))
    assert weights["checkpoint_weights"] == "ema"
    config = {"model": {"name": "PRDiT-XS/4/0", "in_channels": 1, "out_channels": 1}, "data": {"image_size": 8}}
    ema = bench_flow_matching.fm_model("PRDiT-XS/4/0", 8, std=0.3)
    path = save_official_checkpoint(tmp_path / "released.pt", create_model("PRDiT-XS/4/0", 8, out_channels=1), ema,
                                    config)
    model, weights = bench_flow_matching.released_model("PRDiT-B/16/12-s16", 256, cpu, checkpoint=str(path))
    assert (model.config.name, model.config.input_size) == ("PRDiT-XS/4/0", 8) and str(path) in weights["source"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ema.state_dict().values()))
    ian = dict(config, model={"name": "PRDiT-XS/4/0", "in_channels": 1, "out_channels": 2})
    save_official_checkpoint(tmp_path / "ian.pt", create_model("PRDiT-XS/4/0", 8), create_model("PRDiT-XS/4/0", 8), ian)
    with pytest.raises(ValueError, match="IaN network"):
        bench_flow_matching.released_model("PRDiT-XS/4/0", 8, cpu, checkpoint=str(tmp_path / "ian.pt"))
