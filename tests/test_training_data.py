"""Training's data path and run hygiene: the cache built on first use gives the direct
read's first-step loss, the on-device path the loader path's losses exactly, the data wait
is logged (and warned about), a user dataset trains, retention keeps what it says,
``latest`` resolves for stage 2 and --resume, a too-slow EMA is warned about, and
data.augment flips the training batches (along LIDC's superior-inferior axis), never the
validation volumes.
Official-layout 32^3 files pooled to 16^3, PRDiT-XS, a few CPU steps."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch

from prdit_fast.checkpoint import LATEST, checkpoints_newest_first, resolve_checkpoint
from prdit_fast.cli import main
from prdit_fast.data.feed import cores_per_rank
from prdit_fast.training import StreamSampler, Trainer, train
from prdit_fast.training.retention import checkpoints_to_remove, ema_decay_at, ema_warning, steps_to_keep

from test_official_layouts import lidc_root


def _config(run: Path, train_list: Path | None, steps: int = 2, **sections) -> dict:
    config = {
        "data": {"image_size": 16, "num_workers": 0, **({"train_list": str(train_list)} if train_list else {})},
        "model": {"name": "PRDiT-XS/10/0"},
        "training": {"batch_size": 2, "learning_rate": 1e-3, "total_steps": steps, "device": "cpu", "seed": 0,
                     "ema_warmup": True},
        "logging": {"log_every": 1, "ckpt_every": 1000, "tensorboard": False},
        "output": {"results_dir": str(run)},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lidc")
    files = lidc_root(folder, cases=3)
    (folder / "train.txt").write_text("\n".join(map(str, files)) + "\n")
    return folder / "train.txt"


def test_cache_on_first_use_same_losses_and_data_wait_logged(tmp_path, split, caplog, monkeypatch):
    def raise_workers_once(self, wait, rate):  # as a waiting step would: the loader restarts with 1 worker
        grow, self.workers = self.workers == 0, 1
        return grow

    with caplog.at_level(logging.INFO, logger="prdit_fast"):
        with monkeypatch.context() as m:
            m.setattr(Trainer, "_more_workers", raise_workers_once)
            train(_config(tmp_path / "resized", split, data={"cache_dir": str(tmp_path / "c2")}))
        train(_config(tmp_path / "direct", split, data={"cache": False}))
        train(_config(tmp_path / "exact", split, data={"cache_dtype": "float32", "cache_dir": str(tmp_path / "c")}))
        train(_config(tmp_path / "half", split, data={"cache_dir": str(tmp_path / "c")}))
        train(_config(tmp_path / "device", split, data={"cache_dir": str(tmp_path / "c"), "on_device": True}))
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("cache: building") for m in messages) == 3  # c2 (float16); c: float32, float16
    assert any(m.startswith(f"data: train cache {tmp_path / 'c'}") for m in messages)  # where it lives is said
    assert any(m.startswith("data: the cached set on cpu (data.on_device: true)") for m in messages)
    runs = ("direct", "exact", "half", "device", "resized")
    losses = {run: [r["loss"] for r in _records(tmp_path / run)] for run in runs}
    assert losses["resized"] == losses["half"]  # a loader restarted at the stream position: the same order
    assert losses["exact"] == losses["direct"]  # float32 cache: the same samples in the same order
    assert losses["half"][0] == pytest.approx(losses["direct"][0], rel=1e-3)  # float16: within its rounding
    assert losses["device"] == losses["half"]  # on the device: the loader path's batches, bit for bit
    for record in _records(tmp_path / "half"):
        assert record["data_wait_ms"] >= 0 and 0 <= record["data_wait_pct"] <= 100
    assert any("data wait" in m and "ms (" in m for m in messages)


class _SlowVolumes(torch.utils.data.Dataset):
    """A user dataset (dict items, as MONAI gives) that takes 0.2 s per item."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        time.sleep(0.2)
        return {"image": torch.full((1, 16, 16, 16), index / 4 - 0.5)}


def test_user_dataset_trains_and_a_slow_one_is_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="prdit_fast"):
        path = train(_config(tmp_path / "run", None), dataset=_SlowVolumes())
    assert path.name == "0000002.pt"
    messages = [r.getMessage() for r in caplog.records]
    assert any("data: a user dataset (_SlowVolumes), 4 volumes" in m for m in messages)
    warned = [m for m in messages if m.startswith("the step waits for data")]
    assert warned and "loader workers" in warned[0], messages
    assert _records(tmp_path / "run")[0]["data_wait_pct"] > 5  # the first batch is read while the step waits
    # past the first window, a waiting rank raises its workers to what the read time needs
    trainer = Trainer(_config(tmp_path / "sized", None), dataset=_SlowVolumes())
    trainer.read_ms, trainer.step = 200.0, 5
    assert trainer._more_workers({"data_wait_pct": 60.0}, 2.0)  # 5 samples/s unhindered x 0.2 s x 1.25 -> 2
    assert trainer.workers == min(2, cores_per_rank())
    assert not trainer._more_workers({"data_wait_pct": 4.0}, 2.0)  # under 5%: as is
    trainer.step = 1
    assert not trainer._more_workers({"data_wait_pct": 90.0}, 9.0)  # the first window holds the first read
    with pytest.raises(ValueError, match="training needs \\(1, 16, 16, 16\\)"):
        train(_config(tmp_path / "bad", None), dataset=[torch.zeros(1, 8, 8, 8)])


def test_retention_latest_and_stage2_from_latest(tmp_path, split, capsys):
    run = tmp_path / "stage1"
    config = _config(run, split, steps=7, training={"keep_last": 2, "keep_every": 3},
                     logging={"ckpt_every": 1})
    train(config)
    kept = sorted(p.name for p in checkpoints_newest_first(run / "checkpoints"))
    assert kept == ["0000003.pt", "0000006.pt", "0000007.pt"]  # every 3rd + the last 2
    latest = run / "checkpoints" / LATEST
    assert latest.is_symlink() and resolve_checkpoint(latest).name == "0000007.pt"
    assert resolve_checkpoint(run) == resolve_checkpoint(run / "checkpoints" / "latest") == run / "checkpoints" / "0000007.pt"
    assert torch.load(latest, weights_only=True)["train_steps"] == 7
    # stage 2 starts from `latest`; --resume accepts it; the saved config names log_every once
    stage2 = _config(tmp_path / "stage2", split, steps=1, model={"name": "PRDiT-XS/10/1",
                                                                 "pretrained_path": str(run / "checkpoints" / "latest")})
    assert train(stage2).name == "0000001.pt"
    yaml_text = (run / "config.yaml").read_text()
    assert yaml_text.count("log_every") == 1 and yaml_text.count("ckpt_every") == 1
    assert main(["--quiet", "train", "--config", str(run / "config.yaml"), "--resume", str(latest),
                 "training.total_steps=8"]) == 0
    assert capsys.readouterr().out.strip().endswith("0000008.pt")
    assert resolve_checkpoint(latest).name == "0000008.pt"
    with pytest.raises(FileNotFoundError, match="no <step>.pt checkpoint"):
        resolve_checkpoint(tmp_path / "stage2" / "nothing" / "latest")


def test_retention_rules_and_best_checkpoint():
    assert steps_to_keep([1, 2, 3, 4, 5, 6], None, None) == {1, 2, 3, 4, 5, 6}  # default: keep all
    assert steps_to_keep([1, 2, 3, 4, 5, 6], 2, None) == {5, 6}
    assert steps_to_keep([1, 2, 3, 4, 5, 6], 1, 2, protected=[3]) == {2, 3, 4, 6}
    gone = checkpoints_to_remove([Path(f"c/{s:07d}.pt") for s in (10, 20, 30)], 1, None)
    assert [p.name for p in gone] == ["0000010.pt", "0000020.pt"]


def test_best_ema_checkpoint_is_kept(tmp_path, split):
    run = tmp_path / "run"
    config = _config(run, split, steps=4, training={"keep_last": 1}, logging={"ckpt_every": 1, "eval_every": 1,
                                                                                "eval_samples": 0})
    config["data"]["val_list"] = str(split)
    trainer = Trainer(config)
    trainer.run()
    best = trainer.best_val[1]
    kept = sorted(int(p.stem) for p in checkpoints_newest_first(run / "checkpoints"))
    assert kept == sorted({best, 4}), (kept, trainer.best_val)
    losses = [r["val_loss"] for r in _records(run) if "val_loss" in r]
    assert min(losses) == trainer.best_val[0] and len(losses) == 4


def test_ema_warning_and_warm_up(tmp_path):
    assert "leaves 98.5% of the initial weights" in ema_warning(0.9999, 150, warmup=False)
    assert ema_warning(0.9999, 150, warmup=True) is None and ema_warning(0.99, 1000, warmup=False) is None
    assert ema_decay_at(0.9999, 0, True) == pytest.approx(0.1) and ema_decay_at(0.9999, 10**6, True) == 0.9999
    assert ema_decay_at(0.9999, 0, False) == 0.9999
    phantom = {"data": {"image_size": 16, "dataset": "phantom", "phantom_length": 2}}
    with pytest.warns(UserWarning, match="training.ema_decay 0.9999 over 1 steps leaves 100.0%"):
        Trainer(_config(tmp_path / "a", None, steps=1, training={"ema_warmup": False}, **phantom))
    trainer = Trainer(_config(tmp_path / "b", None, steps=1, **phantom))  # warm-up on: no warning
    before = [p.detach().clone() for p in trainer.ema_params]
    trainer.run()
    for init, ema, model in zip(before, trainer.ema_params, trainer.trainable):
        torch.testing.assert_close(ema, init.lerp(model.detach(), 0.9))  # decay 0.1 at the first step


def test_augment_flips_training_batches_never_validation(tmp_path, split, caplog):
    config = _config(tmp_path / "run", split, data={"augment": True}, logging={"eval_every": 1, "eval_samples": 0})
    config["data"]["val_list"] = str(split)
    trainer = Trainer(config)
    seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}
    losses = trainer.diffusion.training_losses

    def recorded(model, x, **kwargs):  # what each loss sees: the training net's batches, the EMA's validation
        seen["val" if model is trainer.ema else "train"].append(x.clone())
        return losses(model, x, **kwargs)

    trainer.diffusion.training_losses = recorded
    with caplog.at_level(logging.INFO, logger="prdit_fast"):
        trainer.run()
    said = [r.getMessage() for r in caplog.records if "data.augment on" in r.getMessage()]
    assert len(said) == 1 and "p = 0.5 along d (superior-inferior)" in said[0], said
    draws = [d for _, d in zip(range(4), StreamSampler(3, 2, 0, 1, 0, 0, augment=True).draws())]  # 2 steps x 2
    assert 0 < sum(flip for _, flip in draws) < 4, draws
    expected = [torch.flip(trainer.dataset[i], [-3]) if flip else trainer.dataset[i] for i, flip in draws]
    assert torch.equal(torch.cat(seen["train"]), torch.stack(expected))
    volumes = torch.stack([trainer.val_set[i] for i in range(len(trainer.val_set))])
    assert len(seen["val"]) == 4 and all(torch.equal(torch.cat(seen["val"][k:k + 2]), volumes) for k in (0, 2))
