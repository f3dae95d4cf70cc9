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
    # the same real files and weights: the cached real features are reused
    assert _evaluate(folders, "--out", str(tmp_path / "again.json"), "--cache-dir", str(tmp_path / "cache")) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["real_cache"] == "hit" and again["fid"] == pytest.approx(report["fid"], rel=1e-12)


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
