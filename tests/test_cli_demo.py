"""``prdit-fast info`` and ``prdit-fast demo --quick`` through the CLI entry point."""
import json

import nibabel as nib
import numpy as np
import pytest

from prdit_fast import cli
from prdit_fast.checkpoint import load_checkpoint
from prdit_fast.flops import flops_per_step
from prdit_fast.models import variant_config


def test_info_prints_parameters_and_gflop(capsys):
    assert cli.main(["info", "--variant", "PRDiT-B/12/4", "--size", "128"]) == 0
    out = capsys.readouterr().out
    assert "PRDiT-B/12/4 at 128^3: 93,228,992 parameters" in out
    assert "679.5 GFLOP per step per volume" in out
    assert "backends:" in out and "ops with impl='auto' on " in out


def test_info_json(capsys):
    assert cli.main(["info", "--variant", "XS/10/1", "--size", "32", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = info["model"]
    assert model["variant"] == "PRDiT-XS/10/1" and model["parameters"] == 15_367_400
    assert model["gflop_per_step"] == pytest.approx(flops_per_step(variant_config("XS/10/1", 32)) / 1e9)
    assert model["tokens"] == 64 and len(info["variants"]) == 163  # 160 standard + 2 stride-16 + XS/4/0
    assert info["environment"]["backends"]["reference"] is True


def test_info_rejects_an_unknown_variant(capsys):
    assert cli.main(["info", "--variant", "PRDiT-B/13/4"]) == 2
    assert "unknown PRDiT variant" in capsys.readouterr().err


def test_demo_quick_writes_volumes_previews_and_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "checkpoint.pt", "phantom_example.nii.gz", "phantom_example.png", "quality.json",
        "sample_000.nii.gz", "sample_000.png", "sample_001.nii.gz", "sample_001.png",
    ]
    for name in ("sample_000.nii.gz", "sample_001.nii.gz", "phantom_example.nii.gz"):
        image = nib.load(str(out / name))
        assert image.shape == (16, 16, 16) and image.header.get_zooms() == (1.0, 1.0, 1.0)
        data = np.asarray(image.dataobj)
        assert data.min() >= -1000 and data.max() <= 1000  # HU of the [-1, 1] model range
    model = load_checkpoint(out / "checkpoint.pt")
    assert model.config.name == "PRDiT-XS/10/1" and model.config.input_size == 16
    assert str(out / "sample_000.nii.gz") in printed and "stage 2" in printed
    quality = json.loads((out / "quality.json").read_text())
    assert set(quality["seam_ratio_vs_phantom"]) == {"depth", "height", "width"} and quality["samples"] == 2
    assert quality["stage1_steps"] == 2 and "seam ratio / phantom's" in printed and "HU histogram distance" in printed


def test_demo_interrupted_leaves_only_complete_files(tmp_path, monkeypatch, capsys):
    from prdit_fast.commands import demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "train_stage", interrupted)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 130
    assert sorted(p.name for p in out.iterdir()) == ["phantom_example.nii.gz", "phantom_example.png"]
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [("--size", "20", "--size must be a multiple of 8"),
                                                  ("--steps", "0", "--steps must be >= 1"),
                                                  ("--stage2-steps", "0", "--stage2-steps must be >= 1")])
def test_demo_rejects_bad_options(tmp_path, capsys, flag, value, message):
    assert cli.main(["demo", "--out", str(tmp_path / "d"), flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
