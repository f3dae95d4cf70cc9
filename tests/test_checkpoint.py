"""Checkpoint files: our two formats round-trip exactly, official-format dicts load with
EMA selection and DDP prefixes, and every kind of wrong file fails with a message that
names the problem."""
import json

import pytest
import torch

from prdit_fast.checkpoint import (
    CheckpointError,
    copy_matching_weights,
    infer_architecture,
    load_checkpoint,
    model_from_config,
    read_checkpoint,
    read_training_checkpoint,
    save_checkpoint,
    save_official_checkpoint,
    save_training_checkpoint,
)
from prdit_fast.testing import randomized_model
from prdit_fast.models import create_model
from conftest import requires_cuda

S = 16


def randomized(name: str, seed: int) -> torch.nn.Module:
    return randomized_model(name, S, seed=seed, std=0.05)


@pytest.fixture(scope="module")
def model():
    return randomized("XS/10/1", 1)


@pytest.fixture(scope="module")
def probe():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 1, S, S, S, generator=g), torch.tensor([17, 640])


def outputs(model, probe):
    with torch.no_grad():
        return model(*probe)


# --------------------------------------------------------------------------- our formats
@pytest.mark.parametrize("name", ["ckpt.pt", "ckpt.safetensors"])
def test_save_then_load_gives_identical_outputs(tmp_path, model, probe, name):
    ema = randomized("XS/10/1", 2)
    path = save_checkpoint(tmp_path / name, model, ema_model=ema, extra={"step": 12, "note": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left
    loaded = load_checkpoint(path, ema=False)
    assert loaded.config == model.config
    assert torch.equal(outputs(loaded, probe), outputs(model, probe))
    loaded_ema = load_checkpoint(path)  # ema=True is the default
    assert loaded_ema.checkpoint_weights == "ema"
    assert torch.equal(outputs(loaded_ema, probe), outputs(ema, probe))
    raw = read_checkpoint(path)
    assert raw["format"] == "prdit_fast" and raw["version"] == 1
    assert raw["config"] == model.config.to_dict() and json.dumps(raw["config"])
    assert raw["extra"] == {"step": 12, "note": "x"}


def test_torch_format_keeps_tensor_extras_and_loads_weights_only(tmp_path, model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    extra = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "steps": [1, 2.5, None]}
    path = save_checkpoint(tmp_path / "resume.pt", model, extra=extra)
    raw = torch.load(path, weights_only=True)  # what read_checkpoint does; must not need unpickling of objects
    assert torch.equal(raw["extra"]["rng"], extra["rng"])
    assert raw["extra"]["optimizer"]["param_groups"][0]["lr"] == 1e-4
    assert raw["extra"]["steps"] == [1, 2.5, None]
    assert "ema" not in raw


def test_extras_that_would_not_load_back_are_refused_before_writing(tmp_path, model):
    with pytest.raises(TypeError, match=r"extra\['when'\] is a object"):
        save_checkpoint(tmp_path / "a.pt", model, extra={"when": object()})
    with pytest.raises(ValueError, match="JSON-serializable"):
        save_checkpoint(tmp_path / "a.safetensors", model, extra={"t": torch.ones(1)})
    assert list(tmp_path.iterdir()) == []


def test_config_is_json_and_builds_the_same_architecture(model):
    rebuilt = model_from_config(json.loads(json.dumps(model.config.to_dict())))
    assert rebuilt.config == model.config
    official = model_from_config({"model": {"name": "PRDiT-XS/10/1", "in_channels": 1}, "data": {"image_size": S}})
    assert official.config == model.config


# --------------------------------------------------------------------------- official format
def official_dict(model, ema, prefix="module."):
    return {
        "model": {prefix + k: v for k, v in model.state_dict().items()},
        "ema": {prefix + k: v for k, v in ema.state_dict().items()},
        "config": {"model": {"name": "PRDiT-XS/10/1", "in_channels": 1}, "data": {"image_size": S}},
        "epoch": 3,
        "train_steps": 1234,
        "optimizer": {"state": {}, "param_groups": [{"lr": 8e-5, "params": [0, 1]}]},
    }


def test_official_checkpoint_with_ddp_prefixes_loads_ema_or_model(tmp_path, model, probe):
    ema = randomized("XS/10/1", 3)
    path = tmp_path / "official.pt"
    torch.save(official_dict(model, ema), path)
    as_ema = load_checkpoint(path)
    assert as_ema.config.name == "PRDiT-XS/10/1" and as_ema.config.input_size == S
    assert torch.equal(outputs(as_ema, probe), outputs(ema, probe))
    as_model = load_checkpoint(path, ema=False)
    assert torch.equal(outputs(as_model, probe), outputs(model, probe))
    assert not torch.equal(outputs(as_model, probe), outputs(as_ema, probe))


def test_official_checkpoint_without_ema_falls_back_to_model(tmp_path, model, probe):
    ckpt = official_dict(model, model, prefix="")
    del ckpt["ema"]
    torch.save(ckpt, tmp_path / "no_ema.pt")
    loaded = load_checkpoint(tmp_path / "no_ema.pt")
    assert loaded.checkpoint_weights == "model"
    assert torch.equal(outputs(loaded, probe), outputs(model, probe))


def test_input_size_overrides_the_trained_size(tmp_path, model):
    torch.save(official_dict(model, model), tmp_path / "o.pt")
    loaded = load_checkpoint(tmp_path / "o.pt", input_size=24)
    assert loaded.config.input_size == 24
    assert loaded(torch.randn(1, 1, 24, 24, 24), torch.tensor([5])).shape == (1, 2, 24, 24, 24)


# --------------------------------------------------------------------------- bare state dicts
def test_bare_state_dict_needs_variant_and_input_size(tmp_path, model, probe):
    path = tmp_path / "bare.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"no model config \(a bare state dict.*variant=.*input_size=.*look like PRDiT-XS/10/1"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="input_size="):
        load_checkpoint(path, variant="PRDiT-XS/10/1")
    loaded = load_checkpoint(path, variant="XS/10/1", input_size=S)
    assert torch.equal(outputs(loaded, probe), outputs(model, probe))


def test_bare_safetensors_state_dict_loads(tmp_path, model, probe):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    loaded = load_checkpoint(tmp_path / "bare.safetensors", variant="PRDiT-XS/10/1", input_size=S)
    assert torch.equal(outputs(loaded, probe), outputs(model, probe))


# --------------------------------------------------------------------------- wrong files
@pytest.mark.parametrize(
    "requested, looks",
    [("PRDiT-XS/10/2", "depth 1"), ("PRDiT-S/10/1", "hidden 192"), ("PRDiT-XS/12/1", "patch 10"), ("PRDiT-XS/10/0", "depth 1")],
)
def test_state_dict_of_another_variant_is_named(tmp_path, model, requested, looks):
    path = tmp_path / "bare.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=rf"weights of PRDiT-XS/10/1 \(.*{looks}.*asks for {requested}"):
        load_checkpoint(path, variant=requested, input_size=S)


def test_variant_that_disagrees_with_the_config_is_refused(tmp_path, model):
    path = save_checkpoint(tmp_path / "c.pt", model)
    with pytest.raises(CheckpointError, match=r"holds a PRDiT-XS/10/1 checkpoint .* variant='PRDiT-B/12/4'"):
        load_checkpoint(path, variant="PRDiT-B/12/4")
    assert load_checkpoint(path, variant="XS/10/1").config.name == "PRDiT-XS/10/1"  # short name, same variant


def test_official_config_that_disagrees_with_its_weights_is_refused(tmp_path, model):
    ckpt = official_dict(model, model)
    ckpt["config"]["model"]["name"] = "PRDiT-XS/10/4"
    torch.save(ckpt, tmp_path / "lying.pt")
    with pytest.raises(CheckpointError, match=r"weights of PRDiT-XS/10/1 .*highest block fine.blocks.0.*PRDiT-XS/10/4"):
        load_checkpoint(tmp_path / "lying.pt")


@pytest.mark.parametrize("name", ["t.pt", "t.safetensors"])
def test_truncated_file_is_reported(tmp_path, model, name):
    path = save_checkpoint(tmp_path / name, model)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(path)


def test_missing_and_unexpected_keys_are_listed(tmp_path, model):
    state = dict(model.state_dict())
    del state["fine.blocks.0.attn.qkv.bias"], state["fine.final_layer.linear.bias"]
    state["fine.extra.weight"] = torch.ones(2)
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"2 missing: fine.blocks.0.attn.qkv.bias, fine.final_layer.linear.bias; "
                                              r"1 unexpected: fine.extra.weight"):
        load_checkpoint(tmp_path / "partial.pt", variant="XS/10/1", input_size=S)


def test_pickled_objects_are_refused(tmp_path, model):
    import argparse

    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(tmp_path / "unsafe.pt")


def test_not_a_checkpoint_and_missing_file(tmp_path):
    torch.save({"epoch": 3, "notes": "hello"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a PRDiT checkpoint.*'epoch'"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


def test_unknown_backend_is_rejected(tmp_path, model):
    path = save_checkpoint(tmp_path / "c.pt", model)
    with pytest.raises(ValueError, match="backend must be one of"):
        load_checkpoint(path, backend="turbo")
    with pytest.raises(ValueError, match="apply to backend='fast' only"):
        load_checkpoint(path, dtype=torch.bfloat16)


def test_fast_backend_wraps_the_loaded_weights(tmp_path, model, probe):
    pytest.importorskip("prdit_fast.fast")
    path = save_checkpoint(tmp_path / "c.pt", model)
    fast = load_checkpoint(path, backend="fast", dtype=torch.float32, impl="torch")
    assert set(fast.state_dict()) == set(model.state_dict())
    want = outputs(model, probe)
    # fp32 everywhere, only the summation order differs
    torch.testing.assert_close(outputs(fast, probe), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@requires_cuda
def test_map_location_cuda_builds_the_model_on_the_gpu(tmp_path, model, probe):
    path = save_checkpoint(tmp_path / "c.pt", model, ema_model=model)
    gpu = load_checkpoint(path, map_location="cuda")
    assert all(p.is_cuda for p in gpu.parameters()) and gpu.fine.pos_embed.is_cuda
    x, t = probe
    with torch.no_grad():
        got = gpu(x.cuda(), t.cuda()).cpu()
    want = outputs(model, probe)
    # fp32 on both devices (TF32 matmul is off by default): summation order only
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@requires_cuda
def test_fast_backend_in_bf16_on_the_gpu(tmp_path, model, probe):
    path = save_checkpoint(tmp_path / "c.pt", model)
    fast = load_checkpoint(path, map_location="cuda", backend="fast", dtype=torch.bfloat16)
    x, t = probe
    with torch.no_grad():
        got = fast(x.cuda(), t.cuda()).float().cpu()
    want = outputs(model, probe)
    # bf16 GEMM inputs: prdit_fast.fast documents ~1e-2 relative RMS error, tests allow 3e-2
    assert ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item() < 3e-2


# --------------------------------------------------------------------------- helpers
def test_infer_architecture_reads_depth_patch_hidden_channels():
    arch = infer_architecture(create_model("XS/12/2", S, in_channels=2).state_dict())
    assert (arch["name"], arch["hidden"], arch["patch"], arch["depth"], arch["in_channels"]) == ("PRDiT-XS/12/2", 192, 12, 2, 2)
    assert infer_architecture({"foo": torch.ones(1)}) is None


def test_copy_matching_weights_starts_stage_two_from_stage_one(model):
    stage1 = randomized("XS/10/0", 4)
    stage2 = create_model("XS/10/1", S)
    copied = copy_matching_weights(stage2, {"module." + k: v for k, v in stage1.state_dict().items()})
    assert set(copied) == set(stage1.state_dict())
    for k, v in stage1.state_dict().items():
        assert torch.equal(stage2.state_dict()[k], v)
    assert not any(p.requires_grad for p in stage2.coarse_parameters())


# --------------------------------------------------------------------------- official layout, resume state
def test_save_official_checkpoint_writes_the_official_layout(tmp_path, model, probe):
    ema = randomized("XS/10/1", 3)
    config = {"model": {"name": "PRDiT-XS/10/1", "in_channels": 1}, "data": {"image_size": S}}
    path = save_official_checkpoint(tmp_path / "official.pt", model, ema, config, train_steps=7, epoch=1)
    raw = read_checkpoint(path)
    assert set(raw) == {"model", "ema", "config", "train_steps", "epoch"} and raw["train_steps"] == 7
    loaded = load_checkpoint(path)  # the EMA, strictly, from the official config
    assert loaded.checkpoint_weights == "ema" and torch.equal(outputs(loaded, probe), outputs(ema, probe))
    with pytest.raises(TypeError, match="extra\\['note'\\]"):
        save_official_checkpoint(tmp_path / "bad.pt", model, ema, config, note=object())
    assert not (tmp_path / "bad.pt").exists()


def test_read_training_checkpoint_needs_the_resume_state(tmp_path, model):
    config = {"model": {"name": "PRDiT-XS/10/1"}, "data": {"image_size": S}}
    official = save_official_checkpoint(tmp_path / "official.pt", model, model, config)
    with pytest.raises(CheckpointError, match="not a training checkpoint .*lacks optimizer"):
        read_training_checkpoint(official)
    optimizer = torch.optim.AdamW(model.parameters()).state_dict()
    path = save_training_checkpoint(tmp_path / "0000003.pt", model, model, optimizer, config, train_steps=3, epoch=0,
                                    data_position=6, world_size=1, rng=[])
    state = read_training_checkpoint(path)
    assert (state.train_steps, state.data_position, state.rng) == (3, 6, [])
    assert state.model.keys() == model.state_dict().keys()
