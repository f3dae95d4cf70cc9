"""``prdit-fast sample`` of a flow-matching checkpoint (spec section 14): every solver,
the defaults the checkpoint implies, the summary, and the errors for options of the
other process. A randomized PRDiT-XS/4/0 (p = s = 4, pad 0, velocity head) at 8^3."""
import json

import numpy as np
import pytest
import torch

from prdit_fast.checkpoint import checkpoint_process, save_checkpoint
from prdit_fast.cli import main
from prdit_fast.flow_matching import SOLVERS
from prdit_fast.models import create_model

SIZE = 8


@pytest.fixture(scope="module")
def fm_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("PRDiT-XS/4/0", SIZE, out_channels=1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "fm.pt", model, ema_model=model)


def sample_args(ckpt, out, *extra: str) -> list[str]:
    return ["sample", "--ckpt", str(ckpt), "--num", "2", "--batch-size", "2", "--steps", "3", "--seed", "1",
            "--out", str(out), "--device", "cpu", "--format", "npy", "--no-png", *extra]


def summary_of(out) -> dict:
    return json.loads((out / "summary.json").read_text())["runs"][-1]


def test_checkpoint_process_is_read_without_building_the_model(fm_ckpt, tmp_path):
    assert checkpoint_process(fm_ckpt) == "flow_matching"
    ian = save_checkpoint(tmp_path / "ian.pt", create_model("PRDiT-XS/4/0", SIZE))
    assert checkpoint_process(ian) == "ian"
    torch.save(create_model("PRDiT-XS/4/0", SIZE, out_channels=1).state_dict(), tmp_path / "bare.pt")
    assert checkpoint_process(tmp_path / "bare.pt") == "flow_matching"  # by the head's shape


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_solver_samples_a_tiny_fm_checkpoint(fm_ckpt, tmp_path, solver):
    out = tmp_path / solver
    extra = ["--solver", solver] + (["--eta", "0.5"] if solver in ("pc", "pc_heun") else [])
    assert main(sample_args(fm_ckpt, out, *extra)) == 0
    files = sorted(p.name for p in out.glob("sample_*.npy"))
    assert files == ["sample_000000.npy", "sample_000001.npy"]
    volumes = [np.load(out / f) for f in files]
    assert all(v.shape == (SIZE,) * 3 and np.isfinite(v).all() for v in volumes)
    assert not np.array_equal(volumes[0], volumes[1])  # two keys, two volumes
    summary = summary_of(out)
    assert summary["process"] == "flow_matching" and summary["sampler"] == solver
    assert summary["nfe"] == 3 * SOLVERS[solver] and summary["saved"] == "x"
    assert summary["volumes_written"] == 2 and summary["volumes_per_hour"] > 0
    assert "peak_gpu_memory_gib" in summary
    assert summary["eta"] == (0.5 if solver in ("pc", "pc_heun") else 0.0)


def test_fm_defaults_are_100_euler_steps(fm_ckpt, tmp_path):
    argv = ["sample", "--ckpt", str(fm_ckpt), "--num", "1", "--out", str(tmp_path / "d"), "--device", "cpu",
            "--format", "npy", "--no-png"]
    assert main(argv) == 0
    summary = summary_of(tmp_path / "d")
    assert (summary["sampler"], summary["steps"], summary["nfe"], summary["k"]) == ("euler", 100, 100, None)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sampler", "cold"], "--sampler apply to IaN checkpoints"),
        (["--k", "3"], "--k apply to IaN checkpoints"),
        (["--save", "x0_hat"], "predicts a velocity"),
        (["--solver", "pc", "--eta", "1.5"], r"eta must be a number in \[0, 1\]"),
        (["--solver", "euler", "--eta", "0.5"], "eta applies to the solvers"),
        (["--solver", "pc_heun", "--err-target", "0"], "err_target must be a number > 0"),
    ],
)
def test_fm_option_errors_are_usage_errors(fm_ckpt, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert main(sample_args(fm_ckpt, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and any(part in err[0] for part in message.split(r"\[")), err
    assert not out.exists()  # refused before the folder is claimed


def test_solver_options_on_an_ian_checkpoint_are_usage_errors(tmp_path, capsys):
    ian = save_checkpoint(tmp_path / "ian.pt", create_model("PRDiT-XS/4/0", SIZE))
    assert main(sample_args(ian, tmp_path / "o", "--solver", "heun")) == 2
    assert "apply to flow-matching checkpoints" in capsys.readouterr().err
