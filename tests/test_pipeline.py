"""The Python pipeline in three lines (README "Python API") on a tiny local model folder,
model folders (save_pretrained, load_checkpoint, sample --ckpt), Hugging Face Hub ids from
a pre-populated cache with HF_HUB_OFFLINE=1 (no network), the exporter from official
``.pt`` files, and volumes placed like a preprocessed scan (``like=``)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

import prdit_fast  # noqa: E402
from prdit_fast.checkpoint import MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, load_checkpoint  # noqa: E402
from prdit_fast.cli import main  # noqa: E402
from prdit_fast.orientation import canonical_affine  # noqa: E402
from prdit_fast.testing import randomized_model  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
VARIANT, SIZE = "PRDiT-XS/10/0", 16
RAD_2MM = {"voxel_size_mm": [2.0, 2.0, 2.0], "intensity": "rad", "axes": "IPL", "source": "test"}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny"
    prdit_fast.Pipeline(randomized_model(VARIANT, SIZE, std=0.05), RAD_2MM, device="cpu").save_pretrained(folder)
    return folder


def test_readme_three_lines_on_a_local_model_folder(model_folder, tmp_path, monkeypatch):
    block = re.search(r"## Python API\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "Pipeline.from_pretrained(" in block and "pipe(num_volumes=4, steps=100, seed=0)" in block
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    # the README's own lines, on the tiny model folder and with 4 steps instead of 100 (CPU time)
    code = block.replace('"path/to/model"', repr(str(model_folder))).replace("steps=100", "steps=4")
    exec(code, scope)  # noqa: S102
    volumes = scope["volumes"]
    assert len(volumes) == 4
    for v in volumes:
        assert v.units == "HU" and v.shape == (SIZE,) * 3 and v.spacing == (2.0, 2.0, 2.0)
        np.testing.assert_array_equal(v.affine, canonical_affine((2.0, 2.0, 2.0)))
        assert np.isfinite(v.array).all() and -1000.0 <= v.array.min() <= v.array.max() <= 1000.0  # clamped
    assert not np.array_equal(volumes[0].array, volumes[1].array)
    written = nib.load(str(tmp_path / "sample_0.nii.gz"))  # the README's save line
    assert written.header.get_zooms() == (2.0, 2.0, 2.0) and written.get_data_dtype() == np.int16
    assert nib.aff2axcodes(written.affine) == ("L", "P", "I")
    assert written.header["descrip"].tobytes().startswith(b"HU")
    np.testing.assert_array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), np.rint(volumes[0].array))
    monai = pytest.importorskip("monai")
    meta = volumes[0].to_metatensor()
    assert isinstance(meta, monai.data.MetaTensor) and tuple(meta.shape) == (1, SIZE, SIZE, SIZE)
    np.testing.assert_allclose(meta.affine.numpy(), written.affine)


def test_model_folder_is_a_checkpoint_for_load_and_sample(model_folder, tmp_path):
    assert sorted(p.name for p in model_folder.iterdir()) == [MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE]
    config = json.loads((model_folder / MODEL_CONFIG_FILE).read_text())
    assert config["volume"] == RAD_2MM and config["process"] == "ian" and config["config"]["name"] == VARIANT
    loaded = load_checkpoint(model_folder)
    reference = randomized_model(VARIANT, SIZE, std=0.05)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)

    # the pipeline's volumes are the command's: same engine, keys and units
    pipe = prdit_fast.Pipeline.from_pretrained(model_folder, device="cpu")
    volumes = pipe(num_volumes=2, steps=3, seed=3, batch_size=2)
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(model_folder), "--num", "2", "--steps", "3", "--seed", "3",
                 "--batch-size", "2", "--out", str(out), "--device", "cpu", "--no-png"]) == 0
    for i, v in enumerate(volumes):
        written = prdit_fast.load_volume(out / f"sample_{i:06d}.nii.gz")
        np.testing.assert_array_equal(written, np.rint(v.array))
    assert json.loads((out / "summary.json").read_text())["runs"][0]["units"] == "HU"


def test_hub_id_from_a_prepopulated_cache_offline(model_folder, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--lab--prdit-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in (MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE):
        (snapshot / name).write_bytes((model_folder / name).read_bytes())
    pipe = prdit_fast.Pipeline.from_pretrained("lab/prdit-tiny", device="cpu", cache_dir=tmp_path / "hub")
    local = prdit_fast.Pipeline.from_pretrained(model_folder, device="cpu")
    np.testing.assert_array_equal(pipe(steps=3)[0].array, local(steps=3)[0].array)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        prdit_fast.Pipeline.from_pretrained(str(tmp_path / "missing" / "x.pt"))


def test_export_official_checkpoint_to_a_model_folder(tmp_path, capsys):
    trained, ema = randomized_model(VARIANT, SIZE, seed=1), randomized_model(VARIANT, SIZE, seed=2)
    official = tmp_path / "official.pt"
    torch.save({"model": {f"module.{k}": v for k, v in trained.state_dict().items()}, "ema": ema.state_dict(),
                "config": {"model": {"name": VARIANT}, "data": {"image_size": SIZE}}, "train_steps": 7}, official)
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(official), "--out", str(out), "--intensity", "lidc", "--voxel-size", "2"]) == 0
    loaded = load_checkpoint(out)
    for name, tensor in ema.state_dict().items():  # the EMA weights, what sampling uses
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    volume = json.loads((out / MODEL_CONFIG_FILE).read_text())["volume"]
    assert volume["intensity"] == "lidc" and volume["voxel_size_mm"] == [2.0, 2.0, 2.0]
    (v,) = prdit_fast.Pipeline.from_pretrained(out, device="cpu")(steps=2)
    assert v.units == "normalized [0, 1]" and 0.0 <= v.array.min() <= v.array.max() <= 1.0  # LIDC: not HU
    assert main(["export", "--ckpt", str(official), "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(official), "--out", str(tmp_path / "x"), "--intensity", "lidc"]) == 2


def test_volumes_like_a_preprocessed_scan(model_folder, tmp_path):
    """``like=`` a preprocessed volume: its HU range and its place in the scanner (an
    LPS NIfTI with 0.7 x 0.7 x 2.5 mm voxels and a nonzero origin)."""
    data = np.full((24, 24, 14), -1000.0, np.float32)
    data[8:16, 6:18, 4:10] = 300.0
    lps = np.diag([-0.7, -0.7, 2.5, 1.0])
    lps[:3, 3] = [40.0, -25.0, 100.0]
    nib.save(nib.Nifti1Image(data, lps), tmp_path / "scan.nii.gz")
    assert main(["preprocess", str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "pre"), "--dataset", "lidc",
                 "--size", str(SIZE), "--no-progress"]) == 0
    npy = tmp_path / "pre" / "scan.npy"
    sidecar = json.loads((tmp_path / "pre" / "scan.json").read_text())
    (v,) = prdit_fast.Pipeline.from_pretrained(model_folder, device="cpu")(steps=2, like=npy)
    assert v.units == "HU" and sidecar["hu_min"] <= v.array.min() <= v.array.max() <= sidecar["hu_max"]
    np.testing.assert_allclose(v.affine, sidecar["affine"])
    centre = nib.affines.apply_affine(v.affine, [(SIZE - 1) / 2] * 3)
    scan_centre = nib.affines.apply_affine(lps, (np.array(data.shape) - 1) / 2)
    assert np.abs(centre - scan_centre).max() <= 1.0  # within a voxel of the scan's centre (crop/pad rounding)
