"""``prdit-fast reconstruct``: super-resolution of a phantom from its 4x downsampled copy
with a tiny TF-PRDiT prior on the CPU: files written, residual and error vs the true
volume reported, guidance lowers the data-consistency residual against unguided sampling
from the same noise, and bad input is a one-line usage error.

The prior is a DiT-XS/10/0 whose weights are set so that x0_hat = x_t (the local
denoiser's residual path passes each token through, and linear_final picks the centre
s^3 voxels of its window): a network with no knowledge of CT, but one whose prediction
moves with x, so the guidance's effect is deterministic and large."""
import json

import pytest
import torch

from prdit_fast.checkpoint import save_checkpoint
from prdit_fast.cli import main
from prdit_fast.measurements import Downsample
from prdit_fast.models import create_model
from prdit_fast.phantom import chest_phantom, hu_to_unit, unit_to_hu
from prdit_fast.volumes import save_nifti

SIZE = 16
STEPS = 8


def pass_through_prior() -> torch.nn.Module:
    """DiT-XS/10/0 with x0_hat = x_t and eps_hat = 0 (a fresh model predicts 0: spec section 12)."""
    model = create_model("DiT-XS/10/0", SIZE)
    cfg = model.config
    p, s, pad = cfg.patch, cfg.stride, cfg.pad
    weight = torch.zeros(s**3 * 2, p**3)
    for a in range(s):
        for b in range(s):
            for c in range(s):
                out = ((a * s + b) * s + c) * 2 + 1  # (d, h, w, channel), channel 1 = x0_hat
                weight[out, ((pad + a) * p + pad + b) * p + pad + c] = 1.0
    with torch.no_grad():
        model.coarse.mlp_denoise.linear_final.weight.copy_(weight)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reconstruct")
    ckpt = save_checkpoint(root / "prior.pt", pass_through_prior())
    truth_hu = chest_phantom(SIZE, seed=0)
    low = Downsample(4)(torch.from_numpy(hu_to_unit(truth_hu))[None, None].float())[0, 0]
    save_nifti(root / "truth.nii.gz", truth_hu, dtype="float32")
    save_nifti(root / "low_res.nii.gz", unit_to_hu(low.numpy()), spacing=(4.0, 4.0, 4.0), dtype="float32")
    return root, ckpt


def reconstruct(root, ckpt, out, *extra):
    return main([
        "reconstruct", "--ckpt", str(ckpt), "--task", "super-resolution", "--input", str(root / "low_res.nii.gz"),
        "--truth", str(root / "truth.nii.gz"), "--steps", str(STEPS), "--out", str(root / out), *extra,
    ])


def test_super_resolution_guided_vs_unguided(files, capsys):
    root, ckpt = files
    assert reconstruct(root, ckpt, "guided") == 0
    printed = capsys.readouterr().out
    assert "data-consistency ||A(x) - y||_2" in printed and "RMSE vs --truth (HU)" in printed
    assert reconstruct(root, ckpt, "unguided", "--guidance-scale", "0") == 0
    guided = json.loads((root / "guided" / "summary.json").read_text())
    unguided = json.loads((root / "unguided" / "summary.json").read_text())
    for name in ("reconstruction.nii.gz", "reconstruction.png"):
        assert (root / "guided" / name).stat().st_size > 0
    # official super-resolution settings, the checkpoint's noise scale and norm
    assert (guided["k"], guided["guidance_scale"], guided["guidance_cutoff"], guided["noise_weight"]) == (2, 20.0, 100, 0.9)
    assert guided["norm"] == "rms" and guided["noise_std"] == 1.0 and unguided["guidance_scale"] == 0.0
    assert guided["residual"] < 0.5 * unguided["residual"], (guided["residual"], unguided["residual"])
    assert guided["rmse_hu_vs_truth"] < unguided["rmse_hu_vs_truth"]


def test_usage_errors(files, capsys):
    root, ckpt = files
    assert main(["reconstruct", "--ckpt", str(ckpt), "--task", "super-resolution", "--input",
                 str(root / "truth.nii.gz"), "--out", str(root / "bad")]) == 2
    assert "needs a 4^3 low-resolution volume" in capsys.readouterr().err
    assert main(["reconstruct", "--ckpt", str(ckpt), "--task", "infill", "--input", str(root / "truth.nii.gz"),
                 "--out", str(root / "bad")]) == 2
    assert "needs --mask" in capsys.readouterr().err
    assert reconstruct(root, ckpt, "bad", "--guidance-decay", "cosine", "--noise-weight", "-1") == 2
    assert "noise_weight" in capsys.readouterr().err


def test_out_is_claimed_and_checked_before_any_work(files, capsys):
    root, ckpt = files
    assert reconstruct(root, ckpt, "claimed") == 0
    before = (root / "claimed" / "reconstruction.nii.gz").read_bytes()
    capsys.readouterr()
    assert reconstruct(root, ckpt, "claimed", "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "another run (seed 0 (folder) vs 1)" in err and err.count("\n") == 1
    assert (root / "claimed" / "reconstruction.nii.gz").read_bytes() == before
    (root / "a_file").write_text("x")
    assert reconstruct(root, ckpt, "a_file") == 2  # refused before the model runs
    err = capsys.readouterr().err
    assert "--out" in err and "is a file" in err
