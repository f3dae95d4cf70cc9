"""``prdit-fast sample`` runs: one run per folder, every record kept, NaN refused, the
clean prediction by default, and the units and voxel size the checkpoint's training data
had. A randomized PRDiT-XS/10/0 at 16^3, 2 steps."""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import requires_cuda

from prdit_fast.cli import main
from prdit_fast.metrics.volume_sets import generated_window
from prdit_fast.models import create_model

SIZE = 16


def _weights(scale: float = 0.05) -> dict:
    torch.manual_seed(0)
    model = create_model("PRDiT-XS/10/0", SIZE)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model.state_dict()


def official_checkpoint(path, volume: dict | None = None, weights: dict | None = None):
    """The layout training writes (spec section 13), with the ``volume`` metadata or without."""
    state = weights if weights is not None else _weights()
    config = {"model": {"name": "PRDiT-XS/10/0", "in_channels": 1}, "data": {"image_size": SIZE}}
    if volume is not None:
        config["volume"] = volume
    torch.save({"model": state, "ema": state, "config": config, "train_steps": 1, "epoch": 0}, path)
    return path


def args(ckpt, out, *extra: str) -> list[str]:
    return ["sample", "--ckpt", str(ckpt), "--num", "2", "--batch-size", "2", "--steps", "2", "--seed", "5",
            "--out", str(out), "--device", "cpu", "--no-png", *extra]


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    return official_checkpoint(tmp_path_factory.mktemp("ckpt") / "plain.pt")


def test_a_folder_of_another_run_is_refused(plain_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(plain_ckpt, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(args(plain_ckpt, out, "--seed", "6")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "seed 5 (folder) vs 6" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    other = official_checkpoint(tmp_path / "other.pt", weights=_weights(0.04))
    assert main(args(other, out)) == 2
    assert "checkpoint_sha256" in capsys.readouterr().err
    identity = json.loads((out / "run.json").read_text())
    assert identity["seed"] == 5 and identity["steps"] == 2 and identity["sampler"] == "pc"
    assert identity["dtype"] == "auto" and len(identity["checkpoint_sha256"]) == 64
    # a rerun of the same run is welcome and its record is added, not replacing the first
    assert main(args(plain_ckpt, out)) == 0
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["volumes_written"] for r in runs] == [2, 0]


def test_volumes_from_an_unrecorded_run_are_refused(plain_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sample_000000.nii.gz").write_bytes(b"someone else's")
    assert main(args(plain_ckpt, out)) == 2
    assert "run.json" in capsys.readouterr().err


def test_nan_volume_is_an_error_and_not_written(tmp_path, capsys):
    weights = _weights()
    weights["coarse.mlp_denoise.linear_final.bias"] = torch.full_like(weights["coarse.mlp_denoise.linear_final.bias"],
                                                                      float("nan"))
    ckpt = official_checkpoint(tmp_path / "nan.pt", weights=weights)
    out = tmp_path / "out"
    assert main(args(ckpt, out, "--png")) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress bar
    assert len(err) == 1 and "sample_000000.nii.gz" in err[0] and "NaN" in err[0]
    assert not list(out.glob("sample_*"))
    # the failed run wrote nothing, so it does not keep the folder from a fixed run
    good = official_checkpoint(tmp_path / "good.pt")
    assert main(args(good, out, "--no-png")) == 0
    assert len(list(out.glob("sample_*"))) == 2


def test_two_runs_started_together_never_share_a_folder(plain_ckpt, tmp_path):
    """Two real ``prdit-fast sample`` processes of different seeds, started at once, into one new folder."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-m", "prdit_fast.cli", *args(plain_ckpt, out, "--seed", str(seed))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    winner = 1 if results[0][0] == 0 else 2
    loser_err = [line for line in results[1 if winner == 1 else 0][1].splitlines() if line.startswith("error:")]
    assert len(loser_err) == 1 and "another run" in loser_err[0], results
    assert json.loads((out / "run.json").read_text())["seed"] == winner
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["seed"] for r in runs] == [winner] and sorted(p.name for p in out.glob("sample_*")) == [
        "sample_000000.nii.gz", "sample_000001.nii.gz"]


def test_default_saves_the_clean_prediction(plain_ckpt, tmp_path):
    assert main(args(plain_ckpt, tmp_path / "default", "--format", "npy")) == 0
    assert main(args(plain_ckpt, tmp_path / "x", "--format", "npy", "--save", "x")) == 0
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())["runs"][-1]
    assert summary["saved"] == "x0_hat"
    # the summary describes the network that ran, from the network itself
    ran = create_model("PRDiT-XS/10/0", SIZE)
    assert (summary["variant"], summary["size"], summary["norm"], summary["process"]) == ("PRDiT-XS/10/0", SIZE,
                                                                                         "layer", "ian")
    assert summary["parameters"] == sum(p.numel() for p in ran.parameters())
    x0 = np.load(tmp_path / "default" / "sample_000000.npy")
    x = np.load(tmp_path / "x" / "sample_000000.npy")
    assert x0.shape == x.shape == (SIZE,) * 3 and not np.array_equal(x0, x)


@pytest.mark.parametrize("volume, units, dtype, zooms, descrip", [
    ({"voxel_size_mm": [2.0, 2.0, 2.0], "intensity": "lidc"}, "normalized", np.float32, (2.0, 2.0, 2.0), "not HU"),
    ({"voxel_size_mm": [1.6, 1.6, 1.6], "intensity": "rad"}, "HU", np.int16, (1.6, 1.6, 1.6), "HU"),
    ({"voxel_size_mm": None, "intensity": "official-rad"}, "normalized", np.float32, (1.0, 1.0, 1.0), "unknown"),
])
def test_units_and_voxel_size_come_from_the_checkpoint(tmp_path, volume, units, dtype, zooms, descrip):
    ckpt = official_checkpoint(tmp_path / "c.pt", volume={**volume, "axes": "IPL"})
    out = tmp_path / "out"
    assert main(args(ckpt, out)) == 0
    image = nib.load(out / "sample_000000.nii.gz")
    assert image.get_data_dtype() == dtype
    np.testing.assert_allclose(image.header.get_zooms()[:3], zooms, rtol=1e-6)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "I")
    assert descrip in image.header["descrip"].item().decode()
    data = np.asarray(image.dataobj, dtype=np.float32)
    if units == "normalized":
        assert 0.0 <= data.min() and data.max() <= 1.0
    else:
        assert -1000 <= data.min() and data.max() <= 1000
    summary = json.loads((out / "summary.json").read_text())["runs"][-1]
    assert summary["units"] == units and summary["intensity"] == volume["intensity"]
    # what `prdit-fast evaluate` reads back: the window the volumes were written through
    assert generated_window(out) == (None if units == "normalized" else (-1000.0, 1000.0))


def test_old_checkpoints_keep_hu_at_1mm_with_a_warning(plain_ckpt, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="prdit_fast.data"):
        assert main(args(plain_ckpt, tmp_path / "out")) == 0
    assert any("records no voxel size" in r.getMessage() for r in caplog.records)
    image = nib.load(tmp_path / "out" / "sample_000000.nii.gz")
    assert image.get_data_dtype() == np.int16 and image.header.get_zooms()[:3] == (1.0, 1.0, 1.0)


def test_sample_usage_errors_are_one_line_exit_2(plain_ckpt, tmp_path, capsys):
    for extra, word in ((("--num", "0"), "--num"), (("--k", "0"), "--k"), (("--seed", "-1"), "--seed")):
        assert main(args(plain_ckpt, tmp_path / "bad", *extra)) == 2  # the later option wins
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and word in err[0], err


@requires_cuda
def test_gpu_killed_run_resumes_byte_identical(plain_ckpt, tmp_path):
    """The fast backend with CUDA graphs: a run killed after its first volume and rerun ends
    with the bytes of an uninterrupted run."""
    from prdit_fast.commands import sample as sample_cmd

    class Killed(Exception):
        pass

    def kill(index, path):
        raise Killed

    argv = args(plain_ckpt, tmp_path / "killed", "--num", "5", "--png")
    argv[argv.index("--device") + 1] = "cuda"
    parser = argparse.ArgumentParser()
    sample_cmd.add_arguments(parser)
    with pytest.raises(Killed):
        sample_cmd.run(parser.parse_args(argv[1:]), on_volume=kill)
    assert main(argv) == 0
    straight = [a if a != str(tmp_path / "killed") else str(tmp_path / "straight") for a in argv]
    assert main(straight) == 0
    names = sorted(p.name for p in (tmp_path / "straight").glob("sample_*"))
    assert len(names) == 10
    for name in names:
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_info_messages_are_printed_and_quiet_hides_them(plain_ckpt, tmp_path, capsys):
    """The CLI configures logging for every command: sample's info lines reach stderr."""
    from prdit_fast.cli import configure_logging

    out = tmp_path / "out"
    assert main(args(plain_ckpt, out)) == 0
    capsys.readouterr()
    assert main(args(plain_ckpt, out)) == 0  # a rerun: every volume is on disk
    assert "INFO rank 0: 2 of its 2 volumes already on disk" in capsys.readouterr().err
    try:
        assert main(["--quiet", *args(plain_ckpt, out)]) == 0
        assert "already on disk" not in capsys.readouterr().err
        assert main([*args(plain_ckpt, out), "--verbose"]) == 0
        assert "INFO rank 0: 2 of its 2" in capsys.readouterr().err
        with pytest.raises(SystemExit) as exit_:
            main([*args(plain_ckpt, out), "--verbose", "--quiet"])
        assert exit_.value.code == 2
        assert "not allowed with argument --verbose" in capsys.readouterr().err
    finally:
        configure_logging()
