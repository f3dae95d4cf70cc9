"""``prdit-fast features``: features equal to the reference's encode mode, files and
manifest, resume after a kill to the same bytes, another run refused.

A randomized PRDiT-XS/10/8 at S = 16 saved with ``save_checkpoint``; 3 preprocessed
volumes ([0, 1] .npy), batch size 2 (an odd last group).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from prdit_fast.checkpoint import save_checkpoint
from prdit_fast.cli import main
from prdit_fast.commands import features as features_cmd
from prdit_fast.models import create_model
from prdit_fast.testing import randomize_, rel_max

SIZE = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    torch.manual_seed(0)
    model = randomize_(create_model("PRDiT-XS/10/8", SIZE), std=0.05).eval()
    ckpt = save_checkpoint(root / "tiny.pt", model, ema_model=model)
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        np.save(data / f"{name}.npy", rng.random((SIZE, SIZE, SIZE), dtype=np.float32))
    return model, ckpt, data


def argv(ckpt, data, out, *extra: str) -> list[str]:
    return ["features", str(data), "--ckpt", str(ckpt), "--out", str(out), "--batch-size", "2", "--device", "cpu",
            *extra]


def parse(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    features_cmd.add_arguments(parser)
    return parser.parse_args(args[1:])


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_features_equal_the_encode_mode(setup, tmp_path, backend):
    model, ckpt, data = setup
    out = tmp_path / "feats"
    assert main(argv(ckpt, data, out, "--backend", backend, "--dtype", "fp32", "--blocks", "5,2")) == 0
    files = sorted(p.name for p in out.glob("features_*"))
    assert files == ["features_a.npy", "features_b.npy", "features_c.npy"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["blocks"] == [5, 2] and manifest["t"] == 50
    assert [v["file"] for v in manifest["volumes"]] == files
    for name in ("a", "b", "c"):
        x = torch.from_numpy(np.load(data / f"{name}.npy") * 2 - 1)[None, None]
        with torch.no_grad():
            encoded = model(x, mode="encode")[0]
            block2 = model.extract_transformer_hidden_features(x, 50, capture_layers=2)["block_2"][0]
        stored = np.load(out / f"features_{name}.npy")
        assert stored.shape == (2, (SIZE // 8) ** 3, 192) and stored.dtype == np.float32
        assert rel_max(torch.from_numpy(stored[0]), encoded) < 1e-4
        assert rel_max(torch.from_numpy(stored[1]), block2) < 1e-4


def test_safetensors_format(setup, tmp_path):
    from safetensors.torch import load_file

    model, ckpt, data = setup
    out = tmp_path / "st"
    assert main(argv(ckpt, data, out, "--format", "safetensors", "--t", "7")) == 0
    tensors = load_file(str(out / "features_b.safetensors"))
    x = torch.from_numpy(np.load(data / "b.npy") * 2 - 1)[None, None]
    with torch.no_grad():
        expected = model(x, 7, mode="encode")[0]
    assert set(tensors) == {"block_5"} and rel_max(tensors["block_5"], expected) < 1e-5


class Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_bytes_and_other_runs_are_refused(setup, tmp_path, capsys):
    _, ckpt, data = setup
    whole, out = tmp_path / "whole", tmp_path / "resumed"
    assert main(argv(ckpt, data, whole)) == 0

    def kill_after_first(index, path):
        raise Killed(index)

    with pytest.raises(Killed):
        features_cmd.run(parse(argv(ckpt, data, out)), on_volume=kill_after_first)
    assert sorted(p.name for p in out.glob("features_*")) == ["features_a.npy"]
    assert not list(out.glob(".features_*"))  # no half-written leftovers
    assert main(argv(ckpt, data, out)) == 0
    for name in ("a", "b", "c"):
        assert (out / f"features_{name}.npy").read_bytes() == (whole / f"features_{name}.npy").read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    # the second invocation redid the whole first group (a and b: fixed groups), then c
    assert summary["runs"][-1]["volumes_written"] == 2 and summary["runs"][-1]["volumes_skipped"] == 1
    capsys.readouterr()
    assert main(argv(ckpt, data, out, "--blocks", "4")) == 2
    assert "another run" in capsys.readouterr().err


def test_bad_arguments(setup, tmp_path, capsys):
    _, ckpt, data = setup
    assert main(argv(ckpt, data, tmp_path / "x", "--blocks", "8")) == 2
    assert "valid range [0, 8)" in capsys.readouterr().err
    assert main(argv(ckpt, data, tmp_path / "y", "--blocks", "five")) == 2
    assert "--blocks" in capsys.readouterr().err
    assert main(argv(ckpt, tmp_path / "missing", tmp_path / "z")) == 2
    assert "missing" in capsys.readouterr().err
