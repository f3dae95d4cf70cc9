"""The official configs train unchanged on data laid out as the official preprocessing
writes it (tiny: 32^3 files pooled to 16^3, PRDiT-XS, one step), and data that cannot be
found is an error naming it; the phantom only when asked for or when no data is named."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from prdit_fast.cli import main
from prdit_fast.data.dataset import VolumeDataset, build_dataset, read_list
from prdit_fast.phantom import PhantomDataset

nib = pytest.importorskip("nibabel")

EDGE = 32
# The official configs/local/{lidc,rad}.yaml, verbatim apart from the comments.
OFFICIAL_LOCAL = """
data:
  train_list: "{prefix}_data/train.txt"
  val_list: "{prefix}_data/val.txt"
  task: "{task}"
  num_workers: 4
  val_frac: 0.1
  augment: False
  normalize: True
model:
  name: "PRDiT-B/12/0"
  num_classes: 1
  in_channels: 1
  out_channels: 2
  pretrained_path: ""
  checkpoint: ""
  flash_attn: True
training:
  batch_size: 64
  learning_rate: 1e-4
  epochs: 6000
  seed: 42
  weight_decay: 0.0
  gradient_clip: 1.0
  compile_model: True
  compile_mode: "default"
output:
  results_dir: "results"
  checkpoint_dir: "checkpoints"
logging:
  log_every: 400
  ckpt_every: 1000
  eval_every: 1000
wandb:
  project: ""
  entity: ""
  tags: ""
  enable: False
"""
# what a user sets on the command line for a tiny CPU run (the official configs leave image_size out)
TINY = ["data.image_size=16", "model.name=PRDiT-XS/10/0", "training.batch_size=2", "training.total_steps=1",
        "data.num_workers=0", "training.device=cpu"]


def _unit_volume(rng) -> np.ndarray:
    v = rng.uniform(0.0, 1.0, (EDGE,) * 3)
    v.flat[0], v.flat[1] = 0.0, 1.0  # min-max normalized, as the official scripts leave it
    return v


def lidc_root(tmp_path: Path, cases: int = 3) -> list[Path]:
    """root/LIDC-IDRI-000N/<series>/processed.nii.gz: float64 in [0, 1], identity affine
    (what scripts/preproc_lidc-idri.py writes)."""
    rng = np.random.default_rng(0)
    paths = []
    for n in range(1, cases + 1):
        folder = tmp_path / "LIDC-IDRI" / f"LIDC-IDRI-{n:04d}" / "1.3.6.1.4.1.14519"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(_unit_volume(rng), np.eye(4)), str(folder / "processed.nii.gz"))
        paths.append(folder / "processed.nii.gz")
    return paths


def rad_root(tmp_path: Path, cases: int = 3) -> list[Path]:
    """A flat folder of trnNNNNN.npz with keys ct, volume, source_file, original_shape
    (what scripts/preproc_rad_chestct.py writes)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "rad_chestct"
    root.mkdir()
    paths = []
    for n in range(1, cases + 1):
        v = _unit_volume(rng).astype(np.float32)
        path = root / f"trn{n:05d}.npz"
        np.savez_compressed(path, ct=v, volume=v, source_file=str(path), original_shape=np.array([40, 36, 36]))
        paths.append(path)
    return paths


def write_splits(folder: Path, train: list[str], val: list[str]) -> None:
    folder.mkdir()
    (folder / "train.txt").write_text("\n".join(train) + "\n")
    (folder / "val.txt").write_text("\n".join(val) + "\n")


def test_official_lidc_config_trains_unchanged(tmp_path, monkeypatch, caplog):
    paths = lidc_root(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_splits(tmp_path / "lidc_data", [str(p.resolve()) for p in paths[:2]], [str(paths[2].resolve())])
    (tmp_path / "lidc.yaml").write_text(OFFICIAL_LOCAL.format(prefix="lidc", task="lidc"))
    with caplog.at_level(logging.INFO, logger="prdit_fast"):
        assert main(["train", "--config", "lidc.yaml", *TINY]) == 0
    first = [r.getMessage() for r in caplog.records if r.name == "prdit_fast.train"][:3]
    assert any("data: 2 volumes from lidc_data/train.txt" in m for m in first), first
    ckpt = torch.load(tmp_path / "results" / "checkpoints" / "0000001.pt", weights_only=True)
    volume = ckpt["config"]["volume"]
    assert volume["voxel_size_mm"] == [2.0, 2.0, 2.0]  # 1 mm x 32 / 16
    assert volume["intensity"] == "lidc" and volume["axes"] == "IPL"


def test_official_rad_config_trains_unchanged(tmp_path, monkeypatch):
    paths = rad_root(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_splits(tmp_path / "rad_data", [p.name for p in paths[:2]], [paths[2].name])  # relative to data.path
    (tmp_path / "rad.yaml").write_text(OFFICIAL_LOCAL.format(prefix="rad", task="rad_chestct"))
    assert main(["train", "--config", "rad.yaml", *TINY, f"data.path={paths[0].parent}"]) == 0
    ckpt = torch.load(tmp_path / "results" / "checkpoints" / "0000001.pt", weights_only=True)
    assert ckpt["config"]["volume"]["intensity"] == "official-rad"
    assert ckpt["config"]["volume"]["voxel_size_mm"] is None  # the official .npz records no spacing


def test_nifti_and_npz_items_match_the_stored_values(tmp_path):
    lidc = lidc_root(tmp_path, cases=1)[0]
    rad = rad_root(tmp_path, cases=1)[0]
    item = VolumeDataset([lidc], 16)[0]
    stored = np.asarray(nib.load(str(lidc)).dataobj)  # LAS (dicom2nifti) under an identity affine
    canonical = stored.transpose(2, 1, 0)[::-1, ::-1, :]  # -> (I, P, L)
    pooled = canonical.reshape(16, 2, 16, 2, 16, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(item[0].numpy(), pooled * 2 - 1, atol=1e-6)
    item = VolumeDataset([rad], 16)[0]
    with np.load(rad) as archive:
        pooled = archive["volume"].reshape(16, 2, 16, 2, 16, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(item[0].numpy(), pooled * 2 - 1, atol=1e-6)


def test_missing_data_is_named(tmp_path, capsys):
    paths = lidc_root(tmp_path, cases=2)
    split = tmp_path / "train.txt"
    split.write_text(f"{paths[0]}\nLIDC-IDRI-0009/processed.nii.gz\n")
    with pytest.raises(FileNotFoundError, match=r"train.txt line 2: volume LIDC-IDRI-0009/processed.nii.gz not found"):
        read_list(split, tmp_path / "LIDC-IDRI")
    config = tmp_path / "c.yaml"
    config.write_text(OFFICIAL_LOCAL.format(prefix="lidc", task="lidc"))
    assert main(["train", "--config", str(config), *TINY, f"data.train_list={tmp_path / 'nothere.txt'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothere.txt" in err[0]


def test_phantom_only_when_asked_or_nothing_named(tmp_path, caplog):
    data = {"image_size": 16, "phantom_length": 2}
    assert isinstance(build_dataset({**data, "dataset": "phantom"}), PhantomDataset)
    assert isinstance(build_dataset({**data, "path": ""}), PhantomDataset)
    paths = lidc_root(tmp_path, cases=1)
    assert isinstance(build_dataset({**data, "path": str(tmp_path / "LIDC-IDRI")}), VolumeDataset)
    with pytest.raises(ValueError, match="data.dataset is 'phantom' but data.path"):
        build_dataset({**data, "dataset": "phantom", "path": str(paths[0].parent)})
    config = tmp_path / "c.yaml"
    config.write_text("data: {image_size: 16, path: '', num_workers: 0, phantom_length: 2}\n"
                      "model: {name: PRDiT-XS/10/0}\n"
                      f"training: {{batch_size: 2, learning_rate: 1e-3, total_steps: 1, device: cpu}}\n"
                      f"output: {{results_dir: {tmp_path / 'run'}}}\n")
    with caplog.at_level(logging.INFO, logger="prdit_fast"):
        assert main(["train", "--config", str(config)]) == 0
    first = [r.getMessage() for r in caplog.records if r.name == "prdit_fast.train"][:2]
    assert any("synthetic phantom" in m and "names no data" in m for m in first), first
