"""PRDiT-SR (spec section 8): the reference wrapper, its cost, and its checkpoints.

Tiny shapes: a PRDiT-XS/10/1 base at 16^3 refined to 32^3 by a head of hidden 64,
patch 10, stride 8, pad 1 (token width 1000, 64 tokens).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_

from prdit_fast import IaNDiffusion, create_model, create_sr_model, load_checkpoint, save_checkpoint
from prdit_fast.checkpoint import CheckpointError, model_from_config, official_sr_config
from prdit_fast.flops import flops_breakdown, flops_per_step
from prdit_fast.models import count_parameters, unfold3d, unpatchify
from prdit_fast.layout import upsample_prediction
from prdit_fast.sr import PRDiTSR, SRConfig

BASE, LO, HI = "PRDiT-XS/10/1", 16, 32
HEAD = {"hidden": 64, "patch": 10, "stride": 8, "pad": 1}


def tiny_sr(randomize: bool = True) -> PRDiTSR:
    model = create_sr_model(create_model(BASE, LO), HI, **HEAD)
    return randomize_(model) if randomize else model


def test_official_size_parameters_and_flops():
    with torch.device("meta"):
        model = create_sr_model(create_model("PRDiT-B/12/4", 128), 256)
    head = sum(p.numel() for p in model.head_parameters())
    assert round(count_parameters(model) / 1e6, 1) == 132.4  # spec section 8 / issue 16
    assert round(head / 1e6, 1) == 39.2
    assert count_parameters(model) - head == count_parameters(model.base) == 93_228_992
    parts = flops_breakdown(model.config)
    base = sum(v for k, v in parts.items() if k.startswith("base."))
    sr = sum(v for k, v in parts.items() if k.startswith("sr."))
    assert round(base / 1e9) == 680 and round(sr / 1e9) == 1290
    assert round(flops_per_step(model.config) / 1e9) == 1970
    cfg = model.config
    assert (cfg.num_tokens, cfg.token_dim, cfg.out_token_dim, cfg.factor) == (32768, 1728, 1024, 2)


def test_state_dict_layout_is_the_official_one():
    keys = list(tiny_sr(randomize=False).state_dict())
    base = [k for k in keys if k.startswith("base.")]
    head = [k for k in keys if not k.startswith("base.")]
    assert set(base) == {"base." + k for k in create_model(BASE, LO).state_dict()}
    assert sorted(head) == sorted(
        [f"t_embedder_sr.{m}.{p}" for m in ("mlp.0", "coarse_head") for p in ("weight", "bias")]
        + ["sr.mlp_denoise." + k for k in create_model("PRDiT-XS/10/0", HI).coarse.mlp_denoise.state_dict()]
    )


def test_fresh_wrapper_outputs_exactly_the_upsampled_base_prediction():
    model = create_sr_model(randomize_(create_model(BASE, LO)), HI, **HEAD)
    denoiser = model.sr.mlp_denoise
    assert not denoiser.adaLN_modulation[1].weight.any() and not denoiser.linear_final.weight.any()
    assert all(not p.requires_grad for p in model.base.parameters())  # stage 3a by default
    x, t = torch.randn(2, 1, HI, HI, HI), torch.tensor([3, 870])
    with torch.no_grad():
        out = model(x, t)
        base_out = model.base(x[..., ::2, ::2, ::2], t)
    eps_up = base_out[:, :1].repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    x0_up = F.interpolate(base_out[:, 1:], scale_factor=2, mode="trilinear", align_corners=False)
    assert out.shape == (2, 2, HI, HI, HI)
    assert torch.equal(out, torch.cat([eps_up, x0_up], 1))


def test_forward_is_the_spec_composition():
    model = tiny_sr()
    cfg = model.config
    x, t = torch.randn(2, 1, HI, HI, HI), torch.tensor([0, 999])
    with torch.no_grad():
        out, base_out = model(x, t, return_base=True)
        c = model.t_embedder_sr.coarse_head(model.t_embedder_sr(t))
        local = unpatchify(model.sr.mlp_denoise(unfold3d(x, 10, 8, 1), c), HI, 8, 2)
        want = local + upsample_prediction(model.base(x[..., ::2, ::2, ::2], t), HI, 1)
    assert torch.equal(base_out, model.base(x[..., ::2, ::2, ::2], t).detach())
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert cfg.name == "PRDiT-SR(PRDiT-XS/10/1)" and cfg.depth == 1 and cfg.in_channels == 1


def test_ian_loss_and_samplers_run_unchanged_at_the_target_size():
    model = tiny_sr().eval()
    diffusion = IaNDiffusion()
    losses = diffusion.training_losses(model, torch.rand(2, 1, HI, HI, HI) * 2 - 1)
    assert losses["loss"].shape == (2,) and torch.isfinite(losses["loss"]).all()
    for sampler in ("cold", "pc"):
        x, x0 = diffusion.sample(model, diffusion.initial_noise((1, 1, HI, HI, HI)), steps=2, sampler=sampler)
        assert x.shape == x0.shape == (1, 1, HI, HI, HI) and torch.isfinite(x).all()


def test_bad_geometries_are_refused():
    base = create_model(BASE, LO)
    with pytest.raises(ValueError, match="multiple"):
        create_sr_model(base, 24)
    with pytest.raises(ValueError, match="multiple"):
        create_sr_model(base, LO)
    with pytest.raises(ValueError, match="2\\*pad"):
        create_sr_model(base, HI, patch=12, stride=8, pad=1)
    with pytest.raises(TypeError, match="reference PRDiT"):
        create_sr_model(torch.nn.Linear(2, 2), HI)
    with pytest.raises(ValueError, match="expects volumes of shape"):
        tiny_sr()(torch.randn(1, 1, LO, LO, LO), torch.tensor([1]))


# ----------------------------------------------------------------------------- checkpoints
def _outputs(model: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, HI, HI, HI, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([10, 500]))


def test_official_stage3_checkpoint_loads_strict_and_matches(tmp_path):
    trained, ema = tiny_sr(), tiny_sr()
    config = official_sr_config(trained.config, base_checkpoint="results/stage2/checkpoints/0130000.pt")
    config["sr_model"]["resume_checkpoint"] = None
    config["training"] = {"learning_rate": 1e-4, "fine_tune_lr": 1e-6, "batch_size": 8}
    assert config["data"] == {"image_size": HI, "base_image_size": LO}
    assert config["base_model"]["name"] == BASE and config["base_model"]["out_channels"] == 2
    assert config["sr_model"] == {"hidden_size": 64, "patch_size": 10, "stride": 8, "padding": 1, "resume_checkpoint": None}
    path = tmp_path / "stage3a.pt"
    torch.save({
        "model": {"module." + k: v for k, v in trained.state_dict().items()},  # DDP prefix
        "ema": ema.state_dict(), "config": config, "epoch": 3, "train_steps": 1200,
    }, path)
    loaded = load_checkpoint(path)
    assert isinstance(loaded, PRDiTSR) and loaded.checkpoint_weights == "ema"
    assert loaded.config == ema.config and not loaded.training
    torch.testing.assert_close(_outputs(loaded), _outputs(ema.eval()), rtol=0, atol=0)
    trained_loaded = load_checkpoint(path, ema=False, variant=BASE)
    torch.testing.assert_close(_outputs(trained_loaded), _outputs(trained.eval()), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="variant='PRDiT-XS/10/2'"):
        load_checkpoint(path, variant="PRDiT-XS/10/2")
    # the weights do not depend on the size: a 64^3 target gets a 32^3 base
    bigger = load_checkpoint(path, input_size=64)
    assert (bigger.config.input_size, bigger.config.base.input_size) == (64, 32)
    # the defaults of sr_model (768/12/8/2) apply when the section omits them
    defaults = model_from_config({"data": {"image_size": 64, "base_image_size": 32},
                                  "base_model": {"name": "PRDiT-XS/12/0"}})
    assert (defaults.config.hidden, defaults.config.patch, defaults.config.stride, defaults.config.pad) == (768, 12, 8, 2)


def test_official_checkpoint_with_another_base_is_refused(tmp_path):
    config = official_sr_config(tiny_sr(randomize=False).config)
    config["base_model"]["name"] = "PRDiT-XS/10/2"
    path = tmp_path / "wrong.pt"
    torch.save({"model": tiny_sr().state_dict(), "config": config}, path)
    with pytest.raises(CheckpointError, match="depth 1"):
        load_checkpoint(path)
    config["base_model"]["out_channels"] = 1
    torch.save({"model": tiny_sr().state_dict(), "config": config}, path)
    with pytest.raises(CheckpointError, match="IaN base"):
        load_checkpoint(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_our_format_round_trips(tmp_path, suffix):
    model, ema = tiny_sr(), tiny_sr()
    path = save_checkpoint(tmp_path / f"sr{suffix}", model, ema_model=ema, extra={"note": "stage 3a"})
    loaded = load_checkpoint(path)
    assert isinstance(loaded, PRDiTSR) and loaded.config == model.config
    torch.testing.assert_close(_outputs(loaded), _outputs(ema.eval()), rtol=0, atol=0)
    assert SRConfig.from_dict(model.config.to_dict()) == model.config


def test_bare_state_dict_needs_base_variant_and_target_size(tmp_path):
    model = tiny_sr()
    path = tmp_path / "bare.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="BASE variant"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, variant=BASE, input_size=HI)
    assert loaded.config == model.config
    torch.testing.assert_close(_outputs(loaded), _outputs(model.eval()), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="PRDiT-XS/10/1"):
        load_checkpoint(path, variant="PRDiT-S/10/1", input_size=HI)


def test_info_describes_the_wrapper(capsys):
    import json

    from prdit_fast import cli

    assert cli.main(["info", "--variant", "PRDiT-B/12/4", "--size", "128", "--sr-size", "256", "--json"]) == 0
    sr = json.loads(capsys.readouterr().out)["sr"]
    assert sr["parameters"] == 132_385_152 and sr["head_parameters"] == 39_156_160
    assert round(sr["gflop_per_step"]) == 1970 and round(sr["gflop_base"]) == 680 and round(sr["gflop_head"]) == 1290
    assert sr["head"]["tokens"] == 32768 and sr["head"]["token_dim"] == 1728
    assert cli.main(["info", "--variant", "PRDiT-B/12/4", "--size", "128", "--sr-size", "200"]) == 2
    assert "multiple" in capsys.readouterr().err


def test_info_describes_an_sr_checkpoint(tmp_path, capsys):
    import json

    from prdit_fast import cli

    model = tiny_sr(randomize=False)
    path = save_checkpoint(tmp_path / "sr.pt", model)
    assert cli.main(["info", "--ckpt", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["variant"] == BASE and out["model"]["input_size"] == LO  # the base
    sr = out["sr"]
    assert sr["variant"] == f"PRDiT-SR({BASE})" and (sr["base_input_size"], sr["input_size"]) == (LO, HI)
    assert sr["parameters"] == count_parameters(model)
    assert sr["gflop_per_step"] * 1e9 == pytest.approx(flops_per_step(model.config))
