"""Training observability: validation loss and EMA sample images every
``logging.eval_every`` steps, TensorBoard event files (when installed), W&B refused
clearly when enabled but absent, and ``prdit-fast plot``. Phantom, 16^3, XS, 2 steps."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml
from PIL import Image

from prdit_fast.cli import main
from prdit_fast.training import train


def config(out, **logging_keys) -> dict:
    return {
        "data": {"image_size": 16, "num_workers": 0, "phantom_length": 3},
        "model": {"name": "PRDiT-XS/10/0"},
        "training": {"batch_size": 2, "learning_rate": 1e-3, "total_steps": 2, "log_every": 1, "ckpt_every": 2,
                     "seed": 0, "ema_decay": 0.9, "device": "cpu"},
        "logging": {"eval_every": 1, "eval_samples": 1, "eval_sample_steps": 2, **logging_keys},
        "output": {"results_dir": str(out)},
    }


def test_eval_every_logs_validation_loss_and_sample_images_then_plot(tmp_path):
    run = tmp_path / "run"
    train(config(run))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [1, 2] and all(r["val_loss"] > 0 for r in val)
    assert len([r for r in records if "loss" in r]) == 2
    for step in (1, 2):
        sheet = Image.open(run / "eval" / f"step_{step:07d}.png")
        assert sheet.size == (3 * 16, 16)  # axial, coronal, sagittal of one 16^3 sample
    if importlib.util.find_spec("tensorboard") is not None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard")).Reload()
        assert [e.step for e in events.Scalars("loss")] == [1, 2]
        assert [e.step for e in events.Scalars("val_loss")] == [1, 2]
        assert [e.step for e in events.Images("ema_samples")] == [1, 2]

    assert main(["plot", str(run)]) == 0
    for name in ("loss.png", "throughput.png"):
        image = Image.open(run / name)
        assert image.format == "PNG" and image.size[0] > 300


def test_validation_loss_is_at_fixed_noise(tmp_path):
    from prdit_fast.diffusion import IaNDiffusion
    from prdit_fast.models import create_model
    from prdit_fast.monitor import validation_loss
    from prdit_fast.phantom import PhantomDataset

    model = create_model("PRDiT-XS/10/0", 16)
    data = PhantomDataset(16, 3, seed=1)
    first = validation_loss(model, IaNDiffusion(), data, device=torch.device("cpu"), batch_size=2)
    again = validation_loss(model, IaNDiffusion(), data, device=torch.device("cpu"), batch_size=2)
    assert first == again > 0


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_enabled_but_missing_is_one_clear_error(tmp_path, capsys):
    cfg = config(tmp_path / "run")
    cfg["wandb"] = {"enable": True, "project": "p", "entity": "", "tags": ""}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--quiet", "train", "--config", str(tmp_path / "c.yaml")]) == 1  # info lines off
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wandb" in err[0]


def test_plot_without_a_log_is_a_usage_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "log.jsonl" in capsys.readouterr().err


def _fake_wandb(monkeypatch, calls: list):
    """A stand-in ``wandb`` module recording init / log / finish (the real package is an
    optional dependency); each init without an id makes a new run id."""
    import sys
    import types

    class Run:
        def __init__(self, run_id):
            self.id = run_id

        def log(self, values, step):
            calls.append(("log", step, sorted(values)))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run(kwargs.get("id") or f"run{sum(c[0] == 'init' for c in calls)}")

    fake = types.ModuleType("wandb")
    fake.init = init
    fake.Image = lambda picture: ("image", picture.shape)
    monkeypatch.setitem(sys.modules, "wandb", fake)


def test_wandb_section_enables_wandb(tmp_path, monkeypatch):
    """The official ``wandb:`` section drives wandb.init / log / finish."""
    calls = []
    _fake_wandb(monkeypatch, calls)
    cfg = config(tmp_path / "run", eval_every=2)
    cfg["wandb"] = {"enable": True, "project": "prdit", "entity": "lab", "tags": "lidc, s1"}
    train(cfg)
    init = calls[0][1]
    assert calls[0][0] == "init" and init["project"] == "prdit" and init["entity"] == "lab"
    assert init["tags"] == ["lidc", "s1"] and init["config"]["model"]["name"] == "PRDiT-XS/10/0"
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged if "loss" in c[2]] == [1, 2]
    assert any("val_loss" in c[2] for c in logged) and any("ema_samples" in c[2] for c in logged)
    assert calls[-1] == ("finish",)


def test_wandb_resume_continues_the_same_run(tmp_path, monkeypatch):
    """The W&B run id is saved in the run folder; ``--resume`` from a checkpoint passes it
    back to wandb.init (resume="allow"), so steps 3-4 land in the run of steps 1-2."""
    from prdit_fast.monitor import WANDB_RUN_FILE

    calls = []
    _fake_wandb(monkeypatch, calls)
    run = tmp_path / "run"
    cfg = config(run, eval_every=100)
    cfg["wandb"] = {"enable": True, "project": "prdit", "entity": "", "tags": ""}
    train(cfg)
    first = calls[0][1]
    assert first["id"] is None and first["resume"] == "allow"
    assert json.loads((run / WANDB_RUN_FILE).read_text()) == {"id": "run1"}

    calls.clear()
    cfg["training"]["total_steps"] = 4
    train(cfg, resume=True)
    resumed = calls[0][1]
    assert resumed["id"] == "run1" and resumed["resume"] == "allow"
    assert [c[1] for c in calls if c[0] == "log" and "loss" in c[2]] == [3, 4]
    assert json.loads((run / WANDB_RUN_FILE).read_text()) == {"id": "run1"}
