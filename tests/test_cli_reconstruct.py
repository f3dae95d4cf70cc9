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
    assert reconstruct(root, ckpt, "guided", "--guidance-parametrization", "official") == 0
    printed = capsys.readouterr().out
    assert "data-consistency ||A(x) - y||_2 (HU)" in printed and "RMSE vs --truth (HU)" in printed
    assert reconstruct(root, ckpt, "unguided", "--guidance-scale", "0") == 0
    guided = json.loads((root / "guided" / "summary.json").read_text())
    unguided = json.loads((root / "unguided" / "summary.json").read_text())
    for name in ("reconstruction.nii.gz", "reconstruction.png"):
        assert (root / "guided" / name).stat().st_size > 0
    # official super-resolution settings, the checkpoint's noise scale and norm
    assert (guided["k"], guided["guidance_scale"], guided["guidance_cutoff"], guided["noise_weight"]) == (2, 20.0, 100, 0.9)
    assert guided["norm"] == "rms" and guided["noise_std"] == 1.0 and unguided["guidance_scale"] == 0.0
    assert guided["residual"] < 0.9 * unguided["residual"], (guided["residual"], unguided["residual"])  # of the written (clipped) volumes
    assert guided["rmse_vs_truth"] < unguided["rmse_vs_truth"] and guided["units"] == "HU"
    assert guided["guidance_parametrization"] == "official" and guided["guidance_scale_applied"] == 20.0


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


# --- units and world geometry (issue 25) -------------------------------------------------
LPS_ZOOMS = (0.7, 0.7, 2.5)  # (x, y, z) of the file; (d, h, w) = (2.5, 0.7, 0.7) in our order
ORIGIN = (120.5, -80.25, -300.0)


def prior_with_metadata(path, volume: dict, weights: dict | None = None):
    """The official layout with a ``volume`` section (voxel size, recipe), the pass-through weights."""
    state = weights if weights is not None else pass_through_prior().state_dict()
    config = {"model": {"name": "DiT-XS/10/0", "in_channels": 1}, "data": {"image_size": SIZE}, "volume": volume}
    torch.save({"model": state, "ema": state, "config": config, "train_steps": 1, "epoch": 0}, path)
    return path


def lps_nifti(path, data_xyz, zooms=LPS_ZOOMS, origin=ORIGIN):
    """A NIfTI in LPS (x toward patient left, y posterior, z superior), anisotropic, nonzero origin."""
    import nibabel as nib
    import numpy as np

    affine = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])  # L and P are the negative RAS directions
    affine[:3, 3] = origin
    image = nib.Nifti1Image(np.asarray(data_xyz, dtype=np.float32), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))
    return path


def world_centre(image):
    import numpy as np

    return (image.affine @ np.array([*((np.array(image.shape[:3]) - 1) / 2), 1.0]))[:3]


def asymmetric_hu(edge: int):
    """Smooth HU with a different ramp along each axis: any flipped or swapped axis shows."""
    import numpy as np

    i, j, k = np.meshgrid(*[np.linspace(0, 1, edge)] * 3, indexing="ij")
    return (-800 + 900 * i + 500 * j**2 + 300 * k**3).astype(np.float32)


@pytest.mark.parametrize("task, edge, factor", [("deblur", SIZE, 1), ("super-resolution", SIZE // 2, 2)])
def test_output_overlays_an_lps_anisotropic_input(tmp_path, capsys, task, edge, factor):
    import nibabel as nib
    import numpy as np

    ckpt = prior_with_metadata(tmp_path / "prior.pt", {"voxel_size_mm": [2.5, 0.7, 0.7], "intensity": "phantom"})
    zooms = tuple(z * factor for z in LPS_ZOOMS)
    source = lps_nifti(tmp_path / "input.nii.gz", asymmetric_hu(edge), zooms=zooms)
    extra = ["--scale", "2"] if factor > 1 else []
    assert main(["reconstruct", "--ckpt", str(ckpt), "--task", task, "--input", str(source), "--steps", str(STEPS),
                 "--out", str(tmp_path / "out"), "--guidance-parametrization", "official", *extra]) == 0
    given, made = nib.load(str(source)), nib.load(str(tmp_path / "out" / "reconstruction.nii.gz"))
    assert nib.aff2axcodes(made.affine) == nib.aff2axcodes(given.affine) == ("L", "P", "S")
    assert made.shape == (SIZE,) * 3
    np.testing.assert_allclose(made.header.get_zooms(), LPS_ZOOMS, rtol=1e-6)
    # the same field of view: world centres agree (to far less than one voxel)
    assert np.abs(world_centre(made) - world_centre(given)).max() < 1e-4
    if factor == 1:
        np.testing.assert_allclose(made.affine, given.affine, atol=1e-5)  # voxel for voxel
    else:  # the grids share their outer edges: fine index -0.5 is low-resolution index -0.5
        edge = np.array([-0.5, -0.5, -0.5, 1.0])
        np.testing.assert_allclose((made.affine @ edge)[:3], (given.affine @ edge)[:3], atol=1e-5)
        centre_of_low_voxel_0 = made.affine @ np.array([0.5, 0.5, 0.5, 1.0])  # between fine voxels 0 and 1
        np.testing.assert_allclose(centre_of_low_voxel_0[:3], ORIGIN, atol=1e-5)
    descrip = made.header["descrip"].tobytes().decode()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "HU" in descrip and summary["units"] == "HU" and summary["voxel_size_mm"] == [2.5, 0.7, 0.7]
    assert made.get_data_dtype() == np.int16


def test_infill_restores_the_known_voxels_in_the_input_layout(tmp_path):
    """Content overlay: the known voxels come back unchanged, at the same file indices."""
    import nibabel as nib
    import numpy as np

    ckpt = prior_with_metadata(tmp_path / "prior.pt", {"voxel_size_mm": [2.5, 0.7, 0.7], "intensity": "phantom"})
    hu = np.round(asymmetric_hu(SIZE))
    source = lps_nifti(tmp_path / "input.nii.gz", hu)
    known = np.ones_like(hu)
    known[4:9, 5:7, 2:12] = 0
    mask = lps_nifti(tmp_path / "mask.nii.gz", known)
    assert main(["reconstruct", "--ckpt", str(ckpt), "--task", "infill", "--input", str(source), "--mask", str(mask),
                 "--steps", str(STEPS), "--out", str(tmp_path / "out")]) == 0
    made = nib.load(str(tmp_path / "out" / "reconstruction.nii.gz"))
    values = np.asarray(made.dataobj)
    np.testing.assert_array_equal(values[known == 1], hu[known == 1])
    assert not np.array_equal(values[known == 0], hu[known == 0])  # the unknown ones come from the prior
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["residual"] == 0 and summary["residual_before_restoring_known_voxels"] > 0


def test_spacing_that_does_not_fit_the_prior_is_refused(tmp_path, capsys):
    ckpt = prior_with_metadata(tmp_path / "prior.pt", {"voxel_size_mm": [2.0, 2.0, 2.0], "intensity": "phantom"})
    source = lps_nifti(tmp_path / "input.nii.gz", asymmetric_hu(SIZE))
    assert main(["reconstruct", "--ckpt", str(ckpt), "--task", "deblur", "--input", str(source),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "2.5x0.7x0.7 mm voxels" in err and "this prior's are 2x2x2 mm" in err and "resample" in err
    assert not list((tmp_path / "out").glob("reconstruction*"))


def test_normalized_input_must_be_declared_and_stays_normalized(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    ckpt = prior_with_metadata(tmp_path / "prior.pt", {"voxel_size_mm": [16.0] * 3, "intensity": "lidc"})
    unit = (asymmetric_hu(SIZE) + 1000) / 2000
    np.save(tmp_path / "unit.npy", unit)
    base = ["reconstruct", "--ckpt", str(ckpt), "--task", "deblur", "--input", str(tmp_path / "unit.npy"),
            "--steps", str(STEPS)]
    assert main([*base, "--out", str(tmp_path / "auto")]) == 2
    assert "not HU: declare" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "hu"), "--input-units", "hu"]) == 2
    assert "not a CT in HU" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "ok"), "--input-units", "unit01"]) == 0
    made = nib.load(str(tmp_path / "ok" / "reconstruction.nii.gz"))
    values = np.asarray(made.dataobj)
    assert made.get_data_dtype() == np.float32 and values.min() >= 0 and values.max() <= 1
    assert "normalized [0, 1]" in made.header["descrip"].tobytes().decode()
    assert json.loads((tmp_path / "ok" / "summary.json").read_text())["residual_units"] == "normalized [0, 1]"
    # the LIDC recipe is per volume: HU input maps back to HU through the input's own window
    np.save(tmp_path / "hu.npy", asymmetric_hu(SIZE))
    assert main([*base[:5], "--input", str(tmp_path / "hu.npy"), "--steps", str(STEPS), "--out", str(tmp_path / "lidc")]) == 0
    summary = json.loads((tmp_path / "lidc" / "summary.json").read_text())
    assert summary["units"] == "HU" and summary["value_range"][0] == pytest.approx(float(asymmetric_hu(SIZE).min()))


def test_nan_anywhere_is_an_error_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    import numpy as np

    volume = {"voxel_size_mm": [16.0] * 3, "intensity": "phantom"}
    weights = pass_through_prior().state_dict()
    weights["coarse.mlp_denoise.linear_final.bias"][3] = float("nan")
    nan_prior = prior_with_metadata(tmp_path / "nan.pt", volume, weights)
    good = prior_with_metadata(tmp_path / "good.pt", volume)
    hu = asymmetric_hu(SIZE)
    np.save(tmp_path / "y.npy", hu)
    hu[3, 4, 5] = np.nan
    np.save(tmp_path / "y_nan.npy", hu)

    def run(ckpt, source, out):
        return main(["reconstruct", "--ckpt", str(ckpt), "--task", "deblur", "--input", str(tmp_path / source),
                     "--steps", str(STEPS), "--out", str(tmp_path / out)])

    assert run(nan_prior, "y.npy", "weights") == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert "NaN or Inf" in line and "coarse.mlp_denoise.linear_final.bias" in line
    assert run(good, "y_nan.npy", "measurement") == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert "1 NaN or Inf voxel(s)" in line and "(3, 4, 5)" in line

    from prdit_fast.engine import GuidedSampler

    def nan_result(self, keys, y, callback=None):
        x = torch.full((1, 1, SIZE, SIZE, SIZE), float("nan"))
        return x, x

    monkeypatch.setattr(GuidedSampler, "sample", nan_result)
    assert run(good, "y.npy", "result") == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert f"{SIZE ** 3} NaN or Inf voxel(s)" in line and "nothing was written" in line
    for out in ("weights", "measurement", "result"):  # nothing, not even the claim: the folder is free again
        assert not [p.name for p in (tmp_path / out).iterdir() if not p.name.startswith(".")], out
    monkeypatch.undo()
    assert run(good, "y.npy", "result") == 0  # a failed run does not block the folder
    json.loads((tmp_path / "result" / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_preprocessed_input_comes_back_in_hu_and_scanner_space(tmp_path):
    """A `prdit-fast preprocess` .npy ([0, 1], its sidecar beside it) is recognised: the
    reconstruction is written in HU through the sidecar's window, where the source lay."""
    import nibabel as nib
    import numpy as np

    source = lps_nifti(tmp_path / "ct.nii.gz", asymmetric_hu(SIZE), zooms=(1.0, 1.0, 1.0))
    pre = tmp_path / "pre"
    assert main(["preprocess", str(source), "--out", str(pre), "--dataset", "lidc", "--size", str(SIZE),
                 "--dtype", "float32", "--no-progress"]) == 0
    (npy,) = pre.glob("*.npy")
    sidecar = json.loads(npy.with_suffix(".json").read_text())
    ckpt = prior_with_metadata(tmp_path / "prior.pt", {"voxel_size_mm": [1.0] * 3, "intensity": "lidc"})
    assert main(["reconstruct", "--ckpt", str(ckpt), "--task", "deblur", "--input", str(npy), "--steps", str(STEPS),
                 "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["input_units"] == "normalized [0, 1]" and summary["units"] == "HU"
    assert summary["value_range"] == [sidecar["hu_min"], sidecar["hu_max"]]
    made, given = nib.load(str(tmp_path / "out" / "reconstruction.nii.gz")), nib.load(str(source))
    assert np.abs(world_centre(made) - world_centre(given)).max() < 1.0  # within one (1 mm) voxel
    values = np.asarray(made.dataobj)
    assert made.get_data_dtype() == np.int16 and sidecar["hu_min"] <= values.min() <= values.max() <= sidecar["hu_max"] + 1
    # a sidecar of another recipe than the prior's is refused
    rad = prior_with_metadata(tmp_path / "rad.pt", {"voxel_size_mm": [1.0] * 3, "intensity": "rad"})
    assert main(["reconstruct", "--ckpt", str(rad), "--task", "deblur", "--input", str(npy),
                 "--out", str(tmp_path / "other")]) == 2
