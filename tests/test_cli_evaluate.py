"""``prdit-fast evaluate`` on tiny folders, with random MedicalNet weights saved in its layout."""
import json

import numpy as np
import pytest
import torch

from prdit_fast import cli
from prdit_fast.metrics import MedicalNetResNet50
from prdit_fast.metrics.volume_sets import generated_window
from prdit_fast.phantom import PhantomDataset, unit_to_hu
from prdit_fast.volumes import save_nifti

SIZE = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in MedicalNetResNet50().state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(8, 2048, 1, 1, 1)
    torch.save({"state_dict": state}, root / "resnet_50.pth")
    real, fake = root / "real", root / "fake"
    real.mkdir()
    fake.mkdir()
    for i, volume in enumerate(PhantomDataset(SIZE, 3, seed=1)):  # preprocess output: [0, 1] float16 at 2 x SIZE
        unit = (volume[0].numpy() + 1) / 2
        np.save(real / f"case_{i}.npy", unit.repeat(2, 0).repeat(2, 1).repeat(2, 2).astype(np.float16))
    for i, volume in enumerate(PhantomDataset(SIZE, 3, seed=2)):  # sample output: HU NIfTI
        save_nifti(fake / f"sample_{i:06d}.nii.gz", unit_to_hu(volume[0]).numpy())
    return root


def _evaluate(root, *extra):
    return cli.main(["evaluate", "--real", str(root / "real"), "--fake", str(root / "fake"),
                     "--weights", str(root / "resnet_50.pth"), "--fid-method", "factors", "--bootstrap", "10",
                     "--no-progress", "--batch-size", "2", *extra])


def test_evaluate_writes_json_and_markdown_reports(folders, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert _evaluate(folders, "--out", str(out), "--cache-dir", str(tmp_path / "cache")) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["n_real"] == 3 and report["n_fake"] == 3 and report["size"] == SIZE  # real ones pooled from 2 x SIZE
    assert report["fid"] > 0 and report["mmd"] >= 0 and report["fid_x1e3"] == pytest.approx(report["fid"] * 1e3)
    assert report["fake_units"] == "HU" and report["real_cache"] == "miss" and report["fid_method"] == "factors"
    assert len(report["weights_sha256"]) == 64 and "torch" in report["versions"]
    markdown = out.with_suffix(".md").read_text()
    assert "3D FID x10^3" in markdown and report["weights_sha256"][:16] in markdown
    assert "3D FID x10^3" in printed and str(out) in printed
    assert report["identity"]["real"] == str((folders / "real").resolve()) and report["identity"]["bootstrap"] == 10
    # the same evaluation again at the same --out replaces its report; the cached real features are reused
    assert _evaluate(folders, "--out", str(out), "--cache-dir", str(tmp_path / "cache")) == 0
    again = json.loads(out.read_text())
    assert again["real_cache"] == "hit" and again["fid"] == pytest.approx(report["fid"], rel=1e-12)
    assert again["identity"] == report["identity"]  # replaced: real_cache was "miss" in the first report


def test_evaluate_refuses_wrong_weights_and_mismatched_ranges(folders, tmp_path, capsys):
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    code = cli.main(["evaluate", "--real", str(folders / "real"), "--fake", str(folders / "fake"),
                     "--weights", str(tmp_path / "bad.pth"), "--no-cache"])
    assert code == 2 and capsys.readouterr().err.startswith("error: ")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "summary.json").write_text(json.dumps({"runs": [{"units": "normalized"}]}))
    for i in range(2):  # [0, 1] files marked normalized but dimmed: the official range check fails
        save_nifti(tmp_path / "fake" / f"sample_{i:06d}.nii.gz", np.full((SIZE,) * 3, 0.25, np.float32), dtype="float32")
    assert generated_window(tmp_path / "fake") is None
    code = cli.main(["evaluate", "--real", str(folders / "real"), "--fake", str(tmp_path / "fake"),
                     "--weights", str(folders / "resnet_50.pth"), "--no-cache", "--no-progress", "--bootstrap", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "differ by more than 0.1" in err and "Traceback" not in err


def _fake_folder(tmp_path, volumes, name="fake", suffix=".nii.gz"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"runs": [{"units": "normalized"}]}))
    for i, volume in enumerate(volumes):
        path = folder / f"sample_{i:06d}{suffix}"
        if suffix == ".npy":
            np.save(path, volume)
        else:
            save_nifti(path, volume, dtype="float32")
    return folder


def _run(real, fake, *extra):
    return cli.main(["evaluate", "--real", str(real), "--fake", str(fake), "--no-cache", "--no-progress",
                     "--bootstrap", "0", "--no-ms-ssim", "--fid-method", "factors", "--batch-size", "2", *extra])


def test_evaluate_refuses_a_folder_mixing_nifti_and_npy(folders, tmp_path, capsys):
    fake = _fake_folder(tmp_path, [np.full((SIZE,) * 3, 0.5, np.float32)] * 2)
    np.save(fake / "sample_000009.npy", np.full((SIZE,) * 3, 0.5, np.float32))
    assert _run(folders / "real", fake, "--weights", str(folders / "resnet_50.pth")) == 2
    err = capsys.readouterr().err
    assert "mixes 2 sample_*.nii.gz and 1 sample_*.npy" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_evaluate_refuses_nan_and_inf_naming_the_file(folders, tmp_path, capsys, bad):
    good = np.full((SIZE,) * 3, 0.5, np.float32)
    broken = good.copy()
    broken[3, 4, 5] = bad  # +inf was clipped to the window's top before
    fake = _fake_folder(tmp_path, [good, broken, good], suffix=".npy")
    out = tmp_path / "report.json"
    assert _run(folders / "real", fake, "--weights", str(folders / "resnet_50.pth"), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "sample_000001.npy holds 1 NaN or inf voxels" in err and "Traceback" not in err
    assert not out.exists()


def test_evaluate_names_the_file_of_another_shape(folders, tmp_path, capsys):
    fake = _fake_folder(tmp_path, [np.full((SIZE,) * 3, 0.5, np.float32), np.full((SIZE, SIZE, 8), 0.5, np.float32)],
                        suffix=".npy")
    assert _run(folders / "real", fake, "--weights", str(folders / "resnet_50.pth")) == 2
    assert "sample_000001.npy: expected a cubic volume, got shape (16, 16, 8)" in capsys.readouterr().err


def test_evaluate_refuses_nan_weights_with_a_named_tensor(folders, tmp_path, capsys):
    state = torch.load(folders / "resnet_50.pth", weights_only=True)["state_dict"]
    torch.save({"state_dict": {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                               for k, v in state.items()}}, tmp_path / "nan.pth")
    assert _run(folders / "real", folders / "fake", "--weights", str(tmp_path / "nan.pth")) == 2
    err = capsys.readouterr().err
    assert "hold NaN or inf (bn1.bias" in err and "SVD" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("size, message", [(8, "--size 8: the generated volumes are 16^3"), (0, "--size must be >= 1")])
def test_evaluate_refuses_a_wrong_size_before_any_work(folders, tmp_path, capsys, size, message):
    weights = tmp_path / "not_read.pth"  # never opened: the size is checked first
    weights.write_bytes(b"x")
    assert _run(folders / "real", folders / "fake", "--weights", str(weights), "--size", str(size)) == 2
    assert message in capsys.readouterr().err


def test_range_check_names_both_ranges_and_the_cause_and_random_weights_say_first_they_compare_with_no_paper(
        folders, tmp_path, capsys):
    fake = _fake_folder(tmp_path, [np.full((SIZE,) * 3, 0.25, np.float32), np.full((SIZE,) * 3, 0.75, np.float32)])
    assert _run(folders / "real", fake, "--weights", str(folders / "resnet_50.pth")) == 2
    err = capsys.readouterr().err
    assert "real volumes span [-1, " in err and "generated ones [-0.5, 0.5]" in err
    assert "the generated set spans less than the real one" in err and "--range-tolerance" in err
    out = tmp_path / "random.json"
    assert _run(folders / "real", fake, "--weights", "random", "--range-tolerance", "2", "--out", str(out),
                "--bootstrap", "8") == 0
    assert capsys.readouterr().out.startswith("NOT COMPARABLE TO ANY PAPER")
    assert out.with_suffix(".md").read_text().splitlines()[0].startswith("**NOT COMPARABLE TO ANY PAPER")
    report = json.loads(out.read_text())
    assert next(iter(report)) == "not_comparable" and report["weights"] == "random"
    assert report["mmd_ci95"][0] <= report["mmd_bias_corrected"] <= report["mmd_ci95"][1]
    assert any("only 2 volumes for 2048-d features" in w for w in report["warnings"])
    assert "bias-corrected" in out.with_suffix(".md").read_text()


def test_evaluate_without_weights_offline_names_the_file_to_place(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _run(folders / "real", folders / "fake") == 2
    err = capsys.readouterr().err
    assert "resnet_50.pth is not cached and offline" in err and str(tmp_path / "hub") in err
    assert "--weights PATH" in err and len(err.strip().splitlines()) == 1


def test_evaluate_with_a_reference_adds_the_wscore_to_both_reports(tmp_path, monkeypatch, capsys):
    import functools

    from prdit_fast.metrics import wasserstein

    # the authors' critic at 128^3 is minutes on a CPU: the same code with 32^3 input and few channels
    monkeypatch.setattr(wasserstein, "wscore", functools.partial(wasserstein.wscore, edge=32, widths=(4, 8, 8, 8)))
    real = tmp_path / "real"
    real.mkdir()
    phantoms = [(v[0].numpy() + 1) / 2 for v in PhantomDataset(SIZE, 7, seed=3)]
    for i, unit in enumerate(phantoms):
        np.save(real / f"case_{i}.npy", unit.astype(np.float32))
    fake = _fake_folder(tmp_path, [(v[0].numpy() + 1) / 2 for v in PhantomDataset(SIZE, 7, seed=4)])
    reference = _fake_folder(tmp_path, [p[::-1].copy() for p in phantoms], name="reference")
    assert _run(real, fake, "--weights", "random", "--reference", str(tmp_path / "few"), "--out",
                str(tmp_path / "r.json")) == 2
    assert "--reference" in capsys.readouterr().err
    few = _fake_folder(tmp_path, phantoms[:1], name="few")
    assert _run(real, fake, "--weights", "random", "--reference", str(few), "--out", str(tmp_path / "r.json")) == 2
    assert "too few volumes for the W-Score split" in capsys.readouterr().err
    out = tmp_path / "w.json"
    assert _run(real, fake, "--weights", "random", "--reference", str(reference), "--out", str(out),
                "--wscore-epochs", "2", "--wscore-seeds", "1", "2", "--bootstrap", "20") == 0
    assert "W-Score" in capsys.readouterr().out
    w = json.loads(out.read_text())["wscore"]
    assert w["n_train"] == {"real": 4, "fake": 4, "reference": 4} and len(w["ratio_per_seed"]) == 2
    assert w["protocol"]["lambda_gp"] == 30.0 and w["reference"] == str(reference)
    assert "W-Score W_fake / W_reference" in out.with_suffix(".md").read_text()
