"""The released 256^3 line of work in the reference (spec section 14): '-s{stride}'
variant names and the official special variants, the flow-matching velocity head,
float time, the cost of PRDiT-B/16/12-s16, and official flow-matching checkpoints."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from prdit_fast import cli
from prdit_fast.checkpoint import CheckpointError, infer_architecture, load_checkpoint, save_checkpoint
from prdit_fast.flops import flops_per_step
from prdit_fast.models import (
    PRDiTConfig,
    canonical_name,
    count_parameters,
    create_model,
    list_models,
    parse_variant,
    timestep_features,
    variant_config,
)
from prdit_fast.testing import randomize_
from test_models import reference_forward


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    "name, canonical, patch, stride, pad",
    [
        ("PRDiT-B/16/0-s16", "PRDiT-B/16/0-s16", 16, 16, 0),
        ("B/16/12-s16", "PRDiT-B/16/12-s16", 16, 16, 0),
        ("PRDiT-XS/4/0", "PRDiT-XS/4/0", 4, 4, 0),
        ("XS/4/0-s4", "PRDiT-XS/4/0", 4, 4, 0),
        ("B/12/4-s8", "PRDiT-B/12/4", 12, 8, 2),  # the suffix of the default stride is dropped
        ("XS/12/1-s4", "PRDiT-XS/12/1-s4", 12, 4, 4),
    ],
)
def test_variant_names_with_a_stride_suffix(name, canonical, patch, stride, pad):
    v = parse_variant(name)
    assert (v.patch, v.stride, v.pad) == (patch, stride, pad)
    assert canonical_name(name) == canonical
    cfg = variant_config(name, 64)
    assert (cfg.patch, cfg.stride, cfg.pad, cfg.name) == (patch, stride, pad, canonical)
    assert cfg.num_tokens == (64 // stride) ** 3


def test_list_models_holds_the_released_and_special_variants():
    names = list_models()
    assert {"PRDiT-B/16/0-s16", "PRDiT-B/16/12-s16", "PRDiT-XS/4/0"} <= set(names)
    assert "PRDiT-XS/4/1" not in names
    for name in names:
        assert canonical_name(name) == name


def test_official_xs_4_1_is_refused_with_the_tiling_error():
    with pytest.raises(ValueError, match=r"PRDiT-XS/4/1 .*do not tile: 2\*pad must equal patch - stride"):
        create_model("PRDiT-XS/4/1", 32)


@pytest.mark.parametrize("name", ["B/12/4-s5", "B/12/4-s14", "B/16/4-s0", "B/16/4-16", "XS/4/2"])
def test_bad_stride_suffixes_are_unknown_variants(name):
    with pytest.raises(ValueError, match="unknown PRDiT variant"):
        parse_variant(name)


def test_the_s16_grid_at_256():
    cfg = variant_config("PRDiT-B/16/12-s16", 256, out_channels=1)
    assert (cfg.num_tokens, cfg.token_dim, cfg.out_token_dim, cfg.grid) == (4096, 4096, 4096, 16)
    assert (cfg.hidden, cfg.heads, cfg.depth, cfg.process) == (768, 12, 12, "flow_matching")


# --------------------------------------------------------------------------- heads and time
def test_out_channels_selects_the_head():
    assert variant_config("XS/10/0", 16).out_channels == 2
    assert variant_config("XS/10/0", 16).process == "ian"
    assert variant_config("XS/10/0", 16, in_channels=2, out_channels=4).process == "ian"
    fm = variant_config("XS/10/0", 16, in_channels=2, out_channels=2)
    assert (fm.out_channels, fm.out_token_dim, fm.process) == (2, 8**3 * 2, "flow_matching")
    with pytest.raises(ValueError, match="out_channels must be 2 \\* in_channels = 2 .* or in_channels = 1"):
        variant_config("XS/10/0", 16, out_channels=3)
    # configs saved before the field existed load as IaN
    old = {k: v for k, v in variant_config("XS/10/0", 16).to_dict().items() if k != "out_channels"}
    assert PRDiTConfig(**old).out_channels == 2


def test_float_time_features_are_those_of_1000_t():
    t = torch.tensor([0.0, 0.25, 0.7731, 1.0])
    got = timestep_features(1000 * t)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float64) / 128)
    args = (1000 * t).double()[:, None] * freqs
    want = torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # fp32 arguments up to 1000
    # integer-valued floats embed exactly as the integer IaN steps
    assert torch.equal(timestep_features(torch.tensor([0.0, 250.0, 999.0])), timestep_features(torch.tensor([0, 250, 999])))


# p = s, pad 0 as in the -s16 models; p 12 keeps the CPU cost of D = C p^3 small
@pytest.mark.parametrize("name, size", [("XS/12/0-s12", 24), ("XS/12/2-s12", 24), ("XS/4/0", 8)])
def test_velocity_head_forward_matches_the_spec_transcription(name, size):
    model = randomize_(create_model(name, size, out_channels=1), std=0.05)
    x = torch.randn(2, 1, size, size, size)
    t = torch.tensor([13.5, 871.25])  # 1000 t, continuous
    with torch.no_grad():
        got = model(x, t)
        want = reference_forward(model.state_dict(), model.config, x, t)
    assert got.shape == (2, 1, size, size, size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_velocity_head_state_dict_shapes():
    with torch.device("meta"):
        sd = create_model("XS/16/1-s16", 32, out_channels=1).state_dict()
    assert tuple(sd["t_embedder.coarse_head.weight"].shape) == (16**3, 192)
    assert tuple(sd["coarse.mlp_denoise.linear_final.weight"].shape) == (16**3, 16**3)
    assert tuple(sd["fine.final_layer.linear.weight"].shape) == (16**3, 192)


# --------------------------------------------------------------------------- cost of the released model
def test_released_model_parameters_and_flops():
    with torch.device("meta"):
        model = create_model("PRDiT-B/16/12-s16", 256, out_channels=1)
    assert count_parameters(model) == 372_075_776  # 372.1M
    assert round(flops_per_step(model.config) / 1e9) == 2451
    # a FLOP counter on the module itself, shapes only (meta tensors)
    with torch.device("meta"), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 1, 256, 256, 256), torch.empty(1))
    assert counter.get_total_flops() == flops_per_step(model.config)


def test_info_prints_the_released_model(capsys):
    argv = ["info", "--variant", "PRDiT-B/16/12-s16", "--size", "256", "--out-channels", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "PRDiT-B/16/12-s16 at 256^3: 372,075,776 parameters (372.1M), 2450.6 GFLOP per step per volume" in out
    assert "4096 tokens of width 4096 (p 16, stride 16, pad 0)" in out
    assert "process: flow matching" in out


# --------------------------------------------------------------------------- checkpoints
def official_fm_checkpoint(name: str, size: int, seed: int = 0) -> tuple[dict, torch.nn.Module]:
    """A dict as the official code saves it (spec sections 13, 14): DDP-prefixed weights,
    config.model.out_channels = 1, an optimizer entry."""
    torch.manual_seed(seed)
    net = randomize_(create_model(name, size, out_channels=1), std=0.05)
    ema = randomize_(create_model(name, size, out_channels=1), std=0.05)
    ckpt = {
        "model": {f"module.{k}": v for k, v in net.state_dict().items()},
        "ema": ema.state_dict(),
        "config": {
            "model": {"name": name, "in_channels": 1, "out_channels": 1, "grad_checkpoint": True},
            "data": {"image_size": size},
            "training": {"amp": True, "grad_accum_steps": 4},
        },
        "epoch": 3,
        "train_steps": 1200,
        "optimizer": {"state": {}, "param_groups": []},
    }
    return ckpt, ema


def test_official_flow_matching_checkpoint_loads_strictly(tmp_path):
    ckpt, ema = official_fm_checkpoint("PRDiT-XS/12/1-s12", 24)
    path = tmp_path / "official_fm.pt"
    torch.save(ckpt, path)
    model = load_checkpoint(path)
    assert model.config.name == "PRDiT-XS/12/1-s12" and model.config.process == "flow_matching"
    assert model.checkpoint_weights == "ema"
    x, t = torch.randn(2, 1, 24, 24, 24), torch.tensor([100.0, 640.5])
    with torch.no_grad():
        assert torch.equal(model(x, t), ema.eval()(x, t))
    # ours records the process and reads back the same network
    ours = save_checkpoint(tmp_path / "ours.pt", model)
    assert torch.load(ours, weights_only=True)["process"] == "flow_matching"
    again = load_checkpoint(ours)
    assert again.config == model.config
    with torch.no_grad():
        assert torch.equal(again(x, t), model(x, t))
    st = save_checkpoint(tmp_path / "ours.safetensors", model)
    assert load_checkpoint(st).config.process == "flow_matching"


def test_info_shows_the_process_of_a_checkpoint(tmp_path, capsys):
    ckpt, _ = official_fm_checkpoint("PRDiT-XS/4/0", 8)
    torch.save(ckpt, tmp_path / "fm.pt")
    assert cli.main(["info", "--ckpt", str(tmp_path / "fm.pt")]) == 0
    out = capsys.readouterr().out
    assert "PRDiT-XS/4/0 at 8^3" in out and "process: flow matching" in out
    assert cli.main(["info", "--ckpt", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_bare_fm_state_dict_is_recognized_by_its_head(tmp_path):
    with torch.device("meta"):
        arch = infer_architecture(create_model("B/16/12-s16", 256, out_channels=1).state_dict())
    assert (arch["name"], arch["stride"], arch["pad"], arch["out_channels"]) == ("PRDiT-B/16/12-s16", 16, 0, 1)
    net = create_model("XS/12/1-s12", 24, out_channels=1)
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    model = load_checkpoint(tmp_path / "bare.pt", variant="XS/12/1-s12", input_size=24)
    assert model.config.process == "flow_matching"
    with pytest.raises(CheckpointError, match="stride 12 .*Pass variant=.PRDiT-XS/12/1-s12."):
        load_checkpoint(tmp_path / "bare.pt", variant="XS/12/1", input_size=24)


def test_fm_weights_under_an_ian_config_are_refused(tmp_path):
    ckpt, _ = official_fm_checkpoint("PRDiT-XS/4/0", 8)
    del ckpt["config"]["model"]["out_channels"]  # the config now says IaN (2C)
    torch.save(ckpt, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="out_channels=1"):
        load_checkpoint(tmp_path / "mixed.pt")
