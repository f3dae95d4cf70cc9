"""Training with flow matching (spec section 14): the official keys (training.amp,
training.grad_accum_steps, model.grad_checkpoint), the loss going down, and exact resume
with gradient accumulation. Tiny shapes: 16^3, XS variants."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from prdit_fast.checkpoint import load_checkpoint, read_checkpoint
from prdit_fast.cli import main
from prdit_fast.flow_matching import FlowMatching
from prdit_fast.models import create_model, variant_config
from prdit_fast.phantom import PhantomDataset
from prdit_fast.training import ConfigError, Trainer, latest_checkpoint, resolve_config, train
from test_training import _all_tensors, tiny_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def fm_config(out: Path, name: str, steps: int, **sections) -> dict:
    config = tiny_config(out, name, steps, **sections)
    config["model"].update({"in_channels": 1, "out_channels": 1})
    return config


@pytest.mark.parametrize("name", ["lidc_fm_stage1_256.yaml", "lidc_fm_stage2_256.yaml"])
def test_shipped_fm_configs_resolve_without_warnings(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = resolve_config(yaml.safe_load((CONFIGS / name).read_text()))
    model, tr = cfg.model, cfg.training
    assert model.out_channels == 1 and model.grad_checkpoint is True
    assert tr.amp is True and tr.grad_accum_steps == 4
    variant = variant_config(model.name, cfg.data.image_size, out_channels=model.out_channels)
    assert variant.process == "flow_matching" and variant.stride == 16
    assert variant.name == ("PRDiT-B/16/12-s16" if "stage2" in name else "PRDiT-B/16/0-s16")


def test_former_key_names_are_read_as_the_official_ones():
    cfg = resolve_config(tiny_config(Path("unused"), "PRDiT-XS/10/0", 1,
                                     training={"bf16": True, "grad_checkpointing": True}))
    assert cfg.training.amp is True and cfg.model.grad_checkpoint is True
    assert "bf16" not in cfg.to_dict()["training"] and "grad_checkpointing" not in cfg.to_dict()["training"]
    with pytest.raises(ConfigError, match="training.bf16 .* is the former name of training.amp"):
        resolve_config(tiny_config(Path("unused"), "PRDiT-XS/10/0", 1, training={"bf16": True, "amp": False}))
    with pytest.raises(ConfigError, match="training.grad_accum_steps"):
        resolve_config(tiny_config(Path("unused"), "PRDiT-XS/10/0", 1, training={"grad_accum_steps": 0}))
    with pytest.raises(ConfigError, match="model.out_channels 3 must be 2 \\* in_channels = 2 .* or in_channels = 1"):
        resolve_config(tiny_config(Path("unused"), "PRDiT-XS/10/0", 1, model={"out_channels": 3}))


def _fixed_fm_loss(model: torch.nn.Module) -> float:
    """Flow-matching loss on a fixed batch, t and noise: comparable across models."""
    g = torch.Generator().manual_seed(123)
    size = model.config.input_size
    x = torch.stack([PhantomDataset(size, 4, 99)[i] for i in range(4)]).repeat(2, 1, 1, 1, 1)
    t = torch.linspace(0.05, 0.95, 8)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        return FlowMatching().training_losses(model, x, t=t, noise=noise)["loss"].mean().item()


def test_fm_training_with_amp_and_accumulation_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    initial = _fixed_fm_loss(create_model("PRDiT-XS/4/0", 16, out_channels=1))  # a fresh model predicts 0
    config = fm_config(tmp_path / "run", "PRDiT-XS/4/0", 8, data={"phantom_length": 8},
                       training={"grad_accum_steps": 2, "amp": True, "learning_rate": 3e-3})
    trainer = Trainer(config)
    assert isinstance(trainer.diffusion, FlowMatching) and trainer.samples_per_step == 4
    ckpt = trainer.run()
    model = load_checkpoint(ckpt, ema=False)
    assert model.config.process == "flow_matching" and model.config.out_channels == 1
    trained = _fixed_fm_loss(model)
    print(f"fixed-batch flow-matching loss: fresh {initial:.4f}, trained {trained:.4f}")
    assert trained < 0.8 * initial, (initial, trained)
    raw = read_checkpoint(ckpt)
    assert raw["data_position"] == 8 * 4  # 8 optimizer steps of 2 micro-batches of 2
    assert raw["config"]["model"]["out_channels"] == 1 and raw["config"]["training"]["grad_accum_steps"] == 2


def test_fm_resume_with_accumulation_is_bit_exact(tmp_path):
    # stage 2 shape (a DiT block, activation checkpointing) with the velocity head;
    # phantom_length 3 and micro-batches of 2: epochs end inside micro-batches
    sections = dict(data={"phantom_length": 3}, model={"grad_checkpoint": True},
                    training={"grad_accum_steps": 2})
    straight = train(fm_config(tmp_path / "a", "PRDiT-XS/10/1", 4, **sections), from_scratch=True)
    config_file = tmp_path / "b.yaml"
    config_file.write_text(yaml.safe_dump(fm_config(tmp_path / "b", "PRDiT-XS/10/1", 4, **sections)))
    assert main(["train", "--config", str(config_file), "--from-scratch", "training.total_steps=2"]) == 0
    assert read_checkpoint(latest_checkpoint(tmp_path / "b" / "checkpoints"))["data_position"] == 8
    assert main(["train", "--config", str(config_file), "--resume"]) == 0
    resumed = latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert resumed.name == "0000004.pt" and read_checkpoint(resumed)["data_position"] == 16
    a, b = _all_tensors(straight), _all_tensors(resumed)
    assert set(a) == set(b) and len(a) > 50
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    weight = a["model.fine.final_layer.linear.weight"]
    assert weight.shape[0] == 8**3 and not torch.equal(weight, torch.zeros_like(weight))  # velocity head, trained

    ian = tiny_config(tmp_path / "b", "PRDiT-XS/10/1", 6, **sections)  # same network, the IaN head
    with pytest.raises(ValueError, match="cannot resume .*flow matching.*IaN"):
        Trainer(ian, resume=True)


def test_accumulated_step_equals_one_step_on_the_whole_batch(tmp_path):
    """Two micro-batches of 2 with accumulation give the gradient of one batch of 4 when
    t and noise are the same: the loss is averaged, not summed."""
    trainer = Trainer(fm_config(tmp_path / "r", "PRDiT-XS/4/0", 1, training={"grad_accum_steps": 2}))
    for p in trainer.model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(4, 1, 16, 16, 16)
    t, z = torch.rand(4), torch.randn(4, 1, 16, 16, 16)

    def grads(batches):
        trainer.model.zero_grad()
        for rows in batches:
            loss = FlowMatching().training_losses(trainer.net, x[rows], t[rows], z[rows])["loss"].mean()
            (loss / len(batches)).backward()
        return [p.grad.clone() for p in trainer.trainable]

    whole, split = grads([slice(0, 4)]), grads([slice(0, 2), slice(2, 4)])
    for g1, g2 in zip(whole, split):
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-7)


def test_eval_sample_sheet_of_a_flow_matching_model():
    """logging.eval_every draws samples with the run's process: for flow matching the
    final state of the solver (there is no clean prediction), one row per sample."""
    from prdit_fast.monitor import sample_sheet

    model = create_model("PRDiT-XS/4/0", 8, out_channels=1).eval()
    sheet = sample_sheet(model, FlowMatching(), count=3, steps=2, device=torch.device("cpu"))
    assert sheet.shape == (3 * 8, 3 * 8) and 0.0 <= sheet.min() and sheet.max() <= 1.0
