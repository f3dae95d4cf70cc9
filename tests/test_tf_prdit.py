"""The TF-PRDiT reconstruction prior (spec section 15): the RMSNorm variant of PRDiT.

Same state-dict names and shapes as PRDiT, other normalizations: the four modulated norms
are parameter-free RMSNorms (eps 1e-5) and every adaLN modulation of the local denoiser
and the blocks ends with an RMSNorm over its whole output. An official-format checkpoint
of the variant, built here, must load as the RMS network and match an implementation
written in this file from the spec alone; loading it as the other norm must fail.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from prdit_fast.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from prdit_fast.diffusion import IaNDiffusion, default_noise_std
from prdit_fast.models import create_model, positional_encoding, timestep_features, unfold3d, unpatchify

SIZE = 16
VARIANT = "DiT-XS/10/1"


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5 if p.dim() == 2 else 0.1)
    return model.eval()


# --------------------------------------------------------------------------- #
# An independent TF-PRDiT forward from the state dict (spec sections 2-6 and 15)
# --------------------------------------------------------------------------- #
def rms(x, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def linear(sd, name, x):
    return x @ sd[name + ".weight"].T + (sd[name + ".bias"] if name + ".bias" in sd else 0)


def tf_prdit_forward(sd, x, t, hidden=192, heads=6, patch=10, stride=8):
    B, S = x.shape[0], x.shape[-1]
    pad = (patch - stride) // 2
    tokens = unfold3d(x, patch, stride, pad)  # (B, N, D)
    c = F.silu(linear(sd, "t_embedder.mlp.0", timestep_features(t)))
    # local denoiser
    p = "coarse.mlp_denoise."
    mods = rms(linear(sd, p + "adaLN_modulation.1", F.silu(linear(sd, "t_embedder.coarse_head", c))))
    sh1, sc1, sh2, sc2, sh3, sc3 = (m[:, None] for m in mods.chunk(6, dim=1))

    def swiglu(name, z):
        h = F.silu(linear(sd, name + ".fc1_g", z)) * linear(sd, name + ".fc1_x", z)
        h = F.layer_norm(h, h.shape[-1:], sd[name + ".norm.weight"], sd[name + ".norm.bias"], 1e-5)
        return linear(sd, name + ".fc2", h)

    h = swiglu(p + "mlp1", rms(tokens) * (1 + sc1) + sh1)
    h = swiglu(p + "mlp2", rms(h) * (1 + sc2) + sh2)
    coarse = linear(sd, p + "linear_final", (h + tokens) * (1 + sc3) + sh3)
    # transformer
    cf = F.silu(linear(sd, "t_embedder.fine_head", c))
    e = linear(sd, "fine.patch_embedder.fc2", F.gelu(linear(sd, "fine.patch_embedder.fc1", tokens), approximate="tanh"))
    e = e + tokens @ sd["fine.patch_embedder.skip.weight"].T
    z = F.layer_norm(e, (hidden,), sd["fine.patch_embedder.norm.weight"], sd["fine.patch_embedder.norm.bias"], 1e-5)
    z = z + positional_encoding(S // stride, hidden)
    i = 0
    while f"fine.blocks.{i}.attn.qkv.weight" in sd:
        b = f"fine.blocks.{i}."
        shm, scm, gm, shf, scf, gf = (m[:, None] for m in rms(linear(sd, b + "adaLN_modulation.1", cf)).chunk(6, 1))
        a = rms(z) * (1 + scm) + shm
        q, k, v = linear(sd, b + "attn.qkv", a).reshape(B, -1, 3, heads, hidden // heads).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hidden // heads), dim=-1)
        z = z + gm * linear(sd, b + "attn.proj", (w @ v).transpose(1, 2).reshape(B, -1, hidden))
        m = rms(z) * (1 + scf) + shf
        z = z + gf * linear(sd, b + "mlp.fc2", F.gelu(linear(sd, b + "mlp.fc1", m), approximate="tanh"))
        i += 1
    shift, scale = (m[:, None] for m in linear(sd, "fine.final_layer.adaLN_modulation.1", cf).chunk(2, 1))
    fine = linear(sd, "fine.final_layer.linear", F.layer_norm(z, (hidden,), eps=1e-6) * (1 + scale) + shift)
    return unpatchify(coarse + fine, S, stride, 2)


def official_checkpoint(path, name=VARIANT, seed=0):
    """A dict laid out as the official code saves it (spec section 13)."""
    model = randomized(create_model(name, SIZE), seed)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({
        "model": {"module." + k: v for k, v in sd.items()}, "ema": sd,
        "config": {"model": {"name": name, "in_channels": 1}, "data": {"image_size": SIZE}},
        "epoch": 3, "train_steps": 100,
    }, path)
    return sd


# --------------------------------------------------------------------------- #
def test_dit_names_and_norm_argument_select_rms():
    by_name = create_model(VARIANT, SIZE)
    by_arg = create_model("PRDiT-XS/10/1", SIZE, norm="rms")
    plain = create_model("PRDiT-XS/10/1", SIZE)
    assert by_name.config.norm == by_arg.config.norm == "rms" and plain.config.norm == "layer"
    assert by_name.config.name == by_arg.config.name == "DiT-XS/10/1"
    assert isinstance(by_name.fine.blocks[0].norm1, torch.nn.RMSNorm)
    assert isinstance(by_name.coarse.mlp_denoise.adaLN_modulation[-1], torch.nn.RMSNorm)
    # the variant is invisible in the state dict: that is why the config must carry it
    assert {k: v.shape for k, v in by_name.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match="norm must be one of"):
        create_model("PRDiT-XS/10/1", SIZE, norm="batch")


def test_official_tf_checkpoint_loads_as_rms_and_matches_independent_forward(tmp_path):
    path = tmp_path / "tf_prdit.pt"
    sd = official_checkpoint(path)
    model = load_checkpoint(path)
    assert model.config.norm == "rms" and model.config.name == VARIANT
    assert model.noise_std == 1.0 == default_noise_std("rms")
    x = torch.randn(2, 1, SIZE, SIZE, SIZE)
    t = torch.tensor([999, 40])
    with torch.no_grad():
        got = model(x, t)
        want = tf_prdit_forward(sd, x, t)
        # the same weights in PRDiT's LayerNorm network compute something else entirely
        as_layer = create_model("PRDiT-XS/10/1", SIZE)
        as_layer.load_state_dict(sd)
        wrong = as_layer.eval()(x, t)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (wrong - want).abs().max() > 100 * (got - want).abs().max() + 1e-3


def test_loading_as_the_other_norm_is_an_error(tmp_path):
    official = tmp_path / "tf_prdit.pt"
    sd = official_checkpoint(official)
    with pytest.raises(CheckpointError, match="DiT-XS/10/1 checkpoint.*PRDiT-XS/10/1"):
        load_checkpoint(official, variant="PRDiT-XS/10/1")
    with pytest.raises(CheckpointError, match="norm='rms'.*norm='layer' was requested"):
        load_checkpoint(official, norm="layer")
    # our own format records the norm
    ours = save_checkpoint(tmp_path / "ours.pt", load_checkpoint(official))
    assert read_checkpoint(ours)["config"]["norm"] == "rms"
    with pytest.raises(CheckpointError, match="norm='layer' was requested"):
        load_checkpoint(ours, norm="layer")
    plain = save_checkpoint(tmp_path / "plain.safetensors", randomized(create_model("PRDiT-XS/10/1", SIZE)))
    with pytest.raises(CheckpointError, match="PRDiT-XS/10/1 checkpoint.*DiT-XS/10/1"):
        load_checkpoint(plain, variant="DiT-XS/10/1")
    # a bare state dict: the variant name (or norm=) says which network it is
    bare = tmp_path / "bare.pt"
    torch.save(sd, bare)
    assert load_checkpoint(bare, variant=VARIANT, input_size=SIZE).config.norm == "rms"
    assert load_checkpoint(bare, variant="XS/10/1", input_size=SIZE, norm="rms").config.name == VARIANT


def test_stage2_from_stage1_of_the_other_norm_is_an_error(tmp_path):
    from prdit_fast.training import load_pretrained

    stage1 = tmp_path / "stage1.pt"
    official_checkpoint(stage1, name="DiT-XS/10/0")
    with pytest.raises(ValueError, match="norm"):
        load_pretrained(create_model("PRDiT-XS/10/1", SIZE), stage1)
    assert load_pretrained(create_model("DiT-XS/10/1", SIZE), stage1)


def test_noise_std_is_recorded_and_restored(tmp_path):
    rms_model = randomized(create_model(VARIANT, SIZE))
    for name in ("a.pt", "a.safetensors"):
        path = save_checkpoint(tmp_path / name, rms_model)
        assert load_checkpoint(path).noise_std == 1.0
        path = save_checkpoint(tmp_path / name, rms_model, noise_std=0.7)
        assert load_checkpoint(path).noise_std == 0.7
    layer = save_checkpoint(tmp_path / "b.pt", randomized(create_model("PRDiT-XS/10/1", SIZE)))
    assert read_checkpoint(layer)["diffusion"] == {"noise_std": 0.5}
    assert load_checkpoint(layer).noise_std == 0.5


def test_diffusion_for_a_loaded_model_uses_its_noise_std(tmp_path):
    from prdit_fast.diffusion import diffusion_for
    from prdit_fast.engine import Sampler
    from prdit_fast.fast import accelerate

    path = save_checkpoint(tmp_path / "p.pt", randomized(create_model(VARIANT, SIZE)), noise_std=0.8)
    model = load_checkpoint(path)
    assert diffusion_for(model).noise_std == 0.8
    assert diffusion_for(accelerate(model, dtype=torch.float32)).noise_std == 0.8
    assert diffusion_for(create_model("PRDiT-XS/10/0", SIZE)).noise_std == 0.5  # no checkpoint: the norm's default
    assert Sampler(model, 1, 2, diffusion=diffusion_for(model)).describe()["noise_std"] == 0.8


def test_noise_std_scales_the_process():
    diffusion = IaNDiffusion(noise_std=1.0)
    noise = diffusion.initial_noise((4, 1, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    assert noise.std().item() == pytest.approx(1.0, rel=0.05)
    plan = diffusion.schedule(10, "pc", 2)
    half = IaNDiffusion().schedule(10, "pc", 2)
    assert all(a.sigma == pytest.approx(2 * b.sigma) for a, b in zip(plan, half))
    with pytest.raises(ValueError, match="noise_std"):
        IaNDiffusion(noise_std=0)
