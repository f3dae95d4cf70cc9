"""Training: configs, two stages on the phantom, exact resume, and a 2-process gloo run.

Shapes are tiny (16^3 volumes, XS models with p = 10) so the whole file runs in about a
minute of CPU time; the GPU-only test at the end checks bf16 + the fast backend.
"""
from __future__ import annotations

import hashlib
import json
import math
import socket
from pathlib import Path

import pytest
import torch
import yaml
from conftest import requires_cuda

from prdit_fast.checkpoint import load_checkpoint, read_checkpoint
from prdit_fast.cli import main
from prdit_fast.diffusion import IaNDiffusion
from prdit_fast.models import create_model, variant_config
from prdit_fast.phantom import PhantomDataset
from prdit_fast.training import (
    StreamSampler,
    Trainer,
    apply_overrides,
    enable_activation_checkpointing,
    latest_checkpoint,
    resolve_config,
    train,
)

SIZE = 16
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def tiny_config(out: Path, name: str, steps: int, **sections) -> dict:
    config = {
        "data": {"image_size": SIZE, "num_workers": 0, "phantom_length": 5},
        "model": {"name": name},
        "training": {"batch_size": 2, "learning_rate": 1e-3, "total_steps": steps, "log_every": 1,
                     "ckpt_every": 1000, "seed": 0, "ema_decay": 0.9, "device": "cpu"},
        "output": {"results_dir": str(out)},
    }
    for section, values in sections.items():
        config[section].update(values)
    return config


# ----------------------------------------------------------------------------- config
def test_official_style_config_resolves():
    official = {  # the official configs/local/lidc.yaml, image_size given on the command line
        "data": {"train_list": "lidc_data/train.txt", "val_list": "lidc_data/val.txt", "task": "lidc",
                 "num_workers": 4, "val_frac": 0.1, "augment": False, "normalize": True},
        "model": {"name": "PRDiT-B/12/0", "num_classes": 1, "in_channels": 1, "out_channels": 2,
                  "pretrained_path": "", "checkpoint": "", "flash_attn": True},
        "training": {"batch_size": 64, "learning_rate": "1e-4", "epochs": 6000, "seed": 42,
                     "weight_decay": 0.0, "gradient_clip": 1.0, "compile_model": True, "compile_mode": "default"},
        "output": {"results_dir": "results", "checkpoint_dir": "checkpoints"},
        "logging": {"log_every": 400, "ckpt_every": 1000, "eval_every": 1000},
        "wandb": {"project": "", "entity": "", "tags": "", "enable": False},
    }
    with pytest.raises(ValueError, match="data.image_size"):
        resolve_config(official)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # official keys are known: no warning
        cfg = resolve_config(apply_overrides(official, ["data.image_size=128"]))
    assert cfg.training.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert cfg.logging.log_every == 400 and cfg.logging.ckpt_every == 1000
    assert "log_every" not in cfg.to_dict()["training"]  # config.yaml lists it once, where it is read
    assert cfg.training.ema_decay == 0.9999 and cfg.model.pretrained_path is None
    assert cfg.data.path is None and cfg.model.backend == "reference"
    assert cfg.data.augment is False and cfg.to_dict()["data"]["augment"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # data.augment is implemented: no "not implemented" warning
        flipping = resolve_config(apply_overrides(official, ["data.image_size=128", "data.augment=true"]))
    assert flipping.data.augment is True and resolve_config(flipping.to_dict()).data.augment is True
    with pytest.raises(ValueError, match="data.augment must be true or false"):
        resolve_config(apply_overrides(official, ["data.image_size=128", "data.augment=0.5"]))

    with pytest.warns(UserWarning, match="unknown config key training.lerning_rate"):
        resolve_config(apply_overrides(official, ["data.image_size=128", "training.lerning_rate=3"]))
    with pytest.raises(ValueError, match="out_channels"):
        resolve_config(apply_overrides(official, ["data.image_size=128", "model.out_channels=3"]))
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides(official, ["batch_size=3"])


@pytest.mark.parametrize("name", ["phantom_tiny.yaml", "lidc_stage1_128.yaml", "lidc_stage2_128.yaml"])
def test_shipped_configs(name, recwarn):
    cfg = resolve_config(yaml.safe_load((CONFIGS / name).read_text()))
    assert not [w for w in recwarn if "unknown config key" in str(w.message)]
    variant_config(cfg.model.name, cfg.data.image_size)  # a valid variant / size
    if "lidc" in name:
        assert cfg.data.image_size == 128 and cfg.training.batch_size == 64
        stage2 = "stage2" in name
        assert cfg.training.learning_rate == (8e-5 if stage2 else 1e-4)
        assert cfg.training.total_steps == (130_000 if stage2 else 104_000)
        assert (cfg.model.pretrained_path is not None) == stage2


def test_stream_sampler_shards_and_resumes():
    full = StreamSampler(5, 4, 0, 1, seed=3, position=0)
    stream = [i for _, i in zip(range(20), full)]
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))  # epochs
    ranks = [StreamSampler(5, 4, r, 2, seed=3, position=0) for r in range(2)]
    per_rank = [[i for _, i in zip(range(10), s)] for s in ranks]
    interleaved = [x for step in range(5) for r in range(2) for x in per_rank[r][2 * step:2 * step + 2]]
    assert interleaved == stream[:20]
    resumed = StreamSampler(5, 4, 0, 1, seed=3, position=8)
    assert [i for _, i in zip(range(12), resumed)] == stream[8:20]


def test_flip_bits_shard_resume_and_leave_the_order_alone():
    draws = lambda s, n: [d for _, d in zip(range(n), s.draws())]  # noqa: E731
    full = draws(StreamSampler(5, 4, 0, 1, seed=3, position=0, augment=True), 20)
    assert [i for i, _ in full] == [i for i, _ in draws(StreamSampler(5, 4, 0, 1, seed=3, position=0), 20)]
    assert not any(f for _, f in draws(StreamSampler(5, 4, 0, 1, seed=3, position=0), 20))  # off: no flips
    per_rank = [draws(StreamSampler(5, 4, r, 2, seed=3, position=0, augment=True), 10) for r in range(2)]
    assert [x for step in range(5) for r in range(2) for x in per_rank[r][2 * step:2 * step + 2]] == full
    assert draws(StreamSampler(5, 4, 0, 1, seed=3, position=8, augment=True), 12) == full[8:20]
    # p = 0.5 per sample: the deterministic stream of 3 seeds x 2000 positions flips about half,
    # differently per epoch and per seed
    streams = [[f for _, f in draws(StreamSampler(100, 8, 0, 1, seed=seed, position=0, augment=True), 2000)]
               for seed in range(3)]
    for flips in streams:
        assert 900 <= sum(flips) <= 1100, sum(flips)
        assert flips[:100] != flips[100:200]
    assert streams[0] != streams[1]


# ----------------------------------------------------------------------------- two stages
def _fixed_eval_loss(model: torch.nn.Module) -> float:
    """Loss on a fixed batch, fixed t and fixed noise: comparable across models."""
    g = torch.Generator().manual_seed(123)
    size = model.config.input_size
    x = torch.stack([PhantomDataset(size, 4, 99)[i] for i in range(4)]).repeat(2, 1, 1, 1, 1)
    t = torch.tensor([50, 150, 300, 450, 600, 750, 850, 950])
    noise = 0.5 * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        return IaNDiffusion().training_losses(model, x, t=t, noise=noise)["loss"].mean().item()


STAGES_SIZE = 32  # the phantom size for the two-stage check


def test_stage1_then_stage2_lower_the_loss(tmp_path):
    torch.manual_seed(0)
    initial = _fixed_eval_loss(create_model("PRDiT-XS/10/0", STAGES_SIZE))  # a fresh model predicts 0

    ckpt1 = train(tiny_config(tmp_path / "s1", "PRDiT-XS/10/0", 15,
                              data={"phantom_length": 16, "image_size": STAGES_SIZE}))
    stage1 = load_checkpoint(ckpt1, ema=False)
    loss1 = _fixed_eval_loss(stage1)
    # measured 0.41 vs 0.91 at 32^3: a wide margin over run-to-run float differences
    assert loss1 < 0.6 * initial, (initial, loss1)
    logged = [json.loads(line)["loss"] for line in (tmp_path / "s1" / "log.jsonl").read_text().splitlines()]
    assert len(logged) == 15 and sum(logged[-5:]) < sum(logged[:5])

    # stage 2 starts as exactly the stage-1 network (the transformer's output is zero-initialized)
    config2 = tiny_config(tmp_path / "s2", "PRDiT-XS/10/1", 20, data={"phantom_length": 16, "image_size": STAGES_SIZE},
                          model={"pretrained_path": str(ckpt1)}, training={"learning_rate": 1e-4})
    start = Trainer(config2)
    assert _fixed_eval_loss(start.model) == pytest.approx(loss1, rel=1e-6)
    fine_head_init = start.model.t_embedder.fine_head.weight.detach().clone()
    ckpt2 = start.run()
    stage2 = load_checkpoint(ckpt2, ema=False)
    loss2 = _fixed_eval_loss(stage2)
    print(f"fixed-batch loss: fresh {initial:.4f}, stage 1 {loss1:.4f}, stage 2 {loss2:.4f}")
    assert loss2 < 0.99 * loss1, (loss1, loss2)  # measured 0.37 vs 0.41

    s1, s2 = stage1.state_dict(), stage2.state_dict()
    coarse = [k for k in s1 if k.startswith(("coarse.", "t_embedder.mlp.", "t_embedder.coarse_head."))]
    assert coarse and all(torch.equal(s1[k], s2[k]) for k in coarse)  # frozen
    assert not torch.equal(s2["t_embedder.fine_head.weight"], fine_head_init)

    raw = read_checkpoint(ckpt2)  # the official layout (spec section 13)
    assert {"model", "ema", "config", "train_steps", "epoch", "optimizer"} <= set(raw)
    assert raw["train_steps"] == 20 and raw["config"]["model"]["name"] == "PRDiT-XS/10/1"
    assert raw["config"]["data"]["image_size"] == STAGES_SIZE


def test_wrong_pretrained_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "stage1.pt"  # p = 12: another token width than the p = 10 model below
    torch.save({"model": create_model("PRDiT-XS/12/0", SIZE).state_dict()}, ckpt)
    with pytest.raises(ValueError, match="does not provide the coarse path"):
        Trainer(tiny_config(tmp_path / "b", "PRDiT-XS/10/1", 1, model={"pretrained_path": str(ckpt)}))


# ----------------------------------------------------------------------------- exact resume
def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = read_checkpoint(path)
    out = {f"model.{k}": v for k, v in ckpt["model"].items()}
    out.update({f"ema.{k}": v for k, v in ckpt["ema"].items()})
    for pid, state in ckpt["optimizer"]["state"].items():
        out.update({f"opt.{pid}.{k}": v for k, v in state.items()})
    return out


def test_resume_is_bit_exact(tmp_path):
    # phantom_length 3 with batch 2: the run crosses epoch boundaries mid-batch; data.augment
    # flips samples before and after the interruption (a function of the stream position)
    data = {"phantom_length": 3, "augment": True}
    drawn = [flip for _, (_, flip) in zip(range(8), StreamSampler(3, 2, 0, 1, 0, 0, augment=True).draws())]
    assert any(drawn[:4]) and any(drawn[4:]) and not all(drawn)  # 4 steps x batch 2: flips on both sides
    straight = train(tiny_config(tmp_path / "a", "PRDiT-XS/10/1", 4, data=data), from_scratch=True)
    # the interrupted run goes through the CLI: YAML config + overrides, then --resume
    config_file = tmp_path / "b.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(tmp_path / "b", "PRDiT-XS/10/1", 4, data=data)))
    assert main(["train", "--config", str(config_file), "--from-scratch", "training.total_steps=2"]) == 0
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "0000002.pt"
    assert main(["train", "--config", str(config_file), "--resume"]) == 0
    resumed = latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert resumed.name == "0000004.pt"
    a, b = _all_tensors(straight), _all_tensors(resumed)
    assert set(a) == set(b) and len(a) > 100
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    # and training moved the weights (the comparison is not vacuous)
    assert not torch.equal(a["model.fine.final_layer.linear.weight"], torch.zeros_like(a["model.fine.final_layer.linear.weight"]))
    assert read_checkpoint(resumed)["data_position"] == 8

    with pytest.raises(ValueError, match="cannot resume"):
        Trainer(tiny_config(tmp_path / "b", "PRDiT-XS/10/2", 6), resume=True)


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(1)
    ref = create_model("PRDiT-XS/10/1", SIZE)
    for p in ref.parameters():  # fresh weights give zero outputs; randomize to compare gradients
        torch.nn.init.normal_(p, std=0.05)
    ref.freeze_coarse_path()
    import copy

    ckpt = copy.deepcopy(ref)
    assert enable_activation_checkpointing(ckpt) == 1  # one DiT block (the coarse path is frozen)
    x = torch.randn(2, 1, SIZE, SIZE, SIZE)
    t = torch.tensor([10, 900])
    for m in (ref, ckpt):
        m(x, t).square().mean().backward()
    for (n, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


# ----------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, config: dict, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = Trainer(config, from_scratch=True)
        trainer.run()
        digest = hashlib.sha256()
        for module in (trainer.model, trainer.ema):
            for k, v in module.state_dict().items():
                digest.update(k.encode())
                digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        Path(out, f"rank{rank}.txt").write_text(digest.hexdigest())
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_keeps_replicas_identical(tmp_path):
    config = tiny_config(tmp_path / "run", "PRDiT-XS/10/1", 2, training={"batch_size": 4}, data={"augment": True})
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), config, str(tmp_path)), nprocs=2, join=True)
    hashes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert hashes[0] == hashes[1]
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoints" / "0000002.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["noise"], ckpt["rng"][1]["noise"])  # independent noise per rank
    assert ckpt["data_position"] == 8


# ----------------------------------------------------------------------------- GPU
@requires_cuda
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_gpu_bf16_training_runs(tmp_path, backend):
    config = tiny_config(tmp_path, "PRDiT-XS/12/2", 20, data={"image_size": 32, "phantom_length": 8},
                         model={"backend": backend},
                         training={"bf16": True, "grad_checkpointing": backend == "reference", "learning_rate": 3e-4,
                                   "device": "cuda"})
    ckpt = train(config, from_scratch=True)
    logged = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(logged) == 20 and all(math.isfinite(v) for v in logged)
    model = load_checkpoint(ckpt)
    assert all(torch.isfinite(p).all() for p in model.parameters())
