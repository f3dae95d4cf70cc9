"""Jobs that never lose or mix work, and clear errors: killed preprocessing, run folders
that belong to one run, resume fallbacks, config checking, the CLI's error lines.

Tiny shapes: 16^3 volumes, PRDiT-XS/10/*, one or two steps."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_training import tiny_config as training_config

from prdit_fast.atomic import atomic_path
from prdit_fast.cli import main
from prdit_fast.data import preprocess_volumes
from prdit_fast.data.dataset import VolumeDataset
from prdit_fast.training import ConfigError, Trainer, latest_checkpoint, resolve_config, train

nib = pytest.importorskip("nibabel")
pytest.importorskip("scipy")

SIZE = 16


def tiny_config(out: Path, name: str = "PRDiT-XS/10/0", steps: int = 1, **sections) -> dict:
    """test_training's tiny phantom run, with a checkpoint every step."""
    training = {"ckpt_every": 1, **sections.pop("training", {})}
    data = {"phantom_length": 3, **sections.pop("data", {})}
    return training_config(out, name, steps, data=data, training=training, **sections)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# ----------------------------------------------------------------------------- killed preprocess
def _kill_during_write(target: str) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.zeros((SIZE,) * 3, np.float32))
        os._exit(9)  # as SIGKILL: no cleanup runs


def test_killed_preprocess_then_training_works(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        affine[:3, 3] = -8.0
        nib.save(nib.Nifti1Image(rng.uniform(-1000, 800, (SIZE,) * 3).astype(np.float32), affine), src / f"{name}.nii.gz")
    out = tmp_path / "prep"
    preprocess_volumes([src / "a.nii.gz"], out, "lidc", size=2 * SIZE, progress=False)
    # the run is killed while writing b.npy (the state a SIGKILL during np.save leaves)
    child = multiprocessing.get_context("fork").Process(target=_kill_during_write, args=(str(out / "b.npy"),))
    child.start()
    child.join()
    assert child.exitcode == 9 and len(list(out.glob(".b.npy.tmp-*"))) == 1
    assert [p.name for p in VolumeDataset(out, SIZE).files] == ["a.npy"]  # the leftover is no volume

    # training on the half-done folder works; the rerun of the preprocessing finishes and cleans up
    assert latest_checkpoint(Path(train(tiny_config(tmp_path / "run1", data={"path": str(out)}))).parent)
    messages = []
    manifest = preprocess_volumes([src / "a.nii.gz", src / "b.nii.gz"], out, "lidc", size=2 * SIZE, progress=False,
                                  log=messages.append)
    assert sorted(v["status"] for v in manifest["volumes"]) == ["exists", "ok"]
    assert any("removed 1 unfinished" in m for m in messages)
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.npy", "b.json", "b.npy", "manifest.json"]  # + sidecars
    assert manifest["spacing_mm"] == [1.0, 1.0, 1.0] and manifest["intensity"] == "lidc" and manifest["edge"] == 2 * SIZE
    ckpt = train(tiny_config(tmp_path / "run2", data={"path": str(out)}))
    saved = torch.load(ckpt, weights_only=True)
    assert saved["train_steps"] == 1
    # geometry and intensity travel with the model: 1 mm x 32 / 16 = 2 mm voxels, LIDC min-max
    assert saved["config"]["volume"]["voxel_size_mm"] == [2.0, 2.0, 2.0]
    assert saved["config"]["volume"]["intensity"] == "lidc"


def test_training_removes_a_killed_checkpoint_write(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run))
    stale = run / "checkpoints" / ".0000002.pt.tmp-abc123"
    stale.write_bytes(b"PK half a checkpoint")
    assert main(["train", "--config", str(write_config(tmp_path / "c.yaml", tiny_config(run, steps=2))), "--resume"]) == 0
    assert not stale.exists()
    assert latest_checkpoint(run / "checkpoints").name == "0000002.pt"


# ----------------------------------------------------------------------------- run folders
def test_train_refuses_a_folder_with_checkpoints_unless_resume(tmp_path, capsys):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(run))
    assert main(["train", "--config", str(config)]) == 0
    before = (run / "checkpoints" / "0000001.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--config", str(config), "training.seed=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--resume" in err[0] and "0000001.pt" in err[0]
    assert (run / "checkpoints" / "0000001.pt").read_bytes() == before  # nothing overwritten
    assert main(["train", "--config", str(config), "--resume", "training.total_steps=2"]) == 0
    assert latest_checkpoint(run / "checkpoints").name == "0000002.pt"


def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    run = tmp_path / "run"
    train(tiny_config(run, steps=2))
    (run / "checkpoints" / "0000002.pt").write_bytes(b"PK\x03\x04 truncated")
    with caplog.at_level(logging.WARNING, logger="prdit_fast.train"):
        trainer = Trainer(tiny_config(run, steps=3), resume=True)
    assert trainer.step == 1 and trainer.last_checkpoint.name == "0000001.pt"
    assert any("0000002.pt" in r.getMessage() and "previous" in r.getMessage() for r in caplog.records)


def test_learning_rate_change_on_resume_is_applied_and_logged(tmp_path, caplog):
    run = tmp_path / "run"
    train(tiny_config(run))
    with caplog.at_level(logging.INFO, logger="prdit_fast.train"):
        trainer = Trainer(tiny_config(run, steps=2, training={"learning_rate": 2.5e-4}), resume=True)
    assert {g["lr"] for g in trainer.optimizer.param_groups} == {2.5e-4}
    assert any("learning_rate changed from 0.001" in r.getMessage() for r in caplog.records)
    ckpt = trainer.run()
    saved = torch.load(ckpt, weights_only=True)
    assert saved["config"]["training"]["learning_rate"] == 2.5e-4
    assert {g["lr"] for g in saved["optimizer"]["param_groups"]} == {2.5e-4}


def test_stage2_without_stage1_weights_needs_from_scratch(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", "PRDiT-XS/10/1"))
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained_path" in err and "--from-scratch" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert main(["train", "--config", str(config), "--from-scratch"]) == 0


# ----------------------------------------------------------------------------- config checking
@pytest.mark.parametrize("override, key", [
    ("training.batch_size=two", "training.batch_size"),
    ("training.total_steps=-5", "training.total_steps"),
    ("training.gradient_clip=-1", "training.gradient_clip"),
    ("data.image_size=null", "data.image_size"),
    ("training.learning_rate=0", "training.learning_rate"),
    ("training.ema_decay=1.5", "training.ema_decay"),
    ("data.num_workers=1.5", "data.num_workers"),
    ("training.bf16=maybe", "training.bf16"),
])
def test_bad_config_values_are_one_error_line_naming_the_key(tmp_path, capsys, override, key):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    assert main(["train", "--config", str(config), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and key in err[0], err
    assert not (tmp_path / "run").exists()


def test_numeric_strings_are_parsed_and_checked():
    config = tiny_config(Path("unused"), training={"learning_rate": "1e-4", "batch_size": "4", "total_steps": 2.0})
    tr = resolve_config(config).training
    assert tr.learning_rate == 1e-4 and tr.batch_size == 4 and tr.total_steps == 2
    assert isinstance(tr.total_steps, int)
    with pytest.raises(ConfigError, match="training.total_steps"):
        Trainer(tiny_config(Path("unused"), training={"total_steps": 2.5}))


def test_errors_exit_codes_and_debug(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.yaml" in err[0]
    # argparse's own usage errors: one line too
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--num", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--ckpt" in err[0]
    # a runtime failure (data named but missing): exit 1, the file named
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", data={"path": str(tmp_path / "nodata")}))
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nodata" in err[0] and "Traceback" not in err[0]
    with pytest.raises(FileNotFoundError):
        main(["--debug", "train", "--config", str(config)])
