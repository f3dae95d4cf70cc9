"""The reference network against the spec (PRDIT.md sections 1-6, 11, 12): parameter
counts, layouts written out as plain loops and per-token formulas, a functional
transcription of the forward pass, FLOP counts, and the errors for bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from prdit_fast.flops import flops_breakdown, flops_per_step
from prdit_fast.models import (
    PRDiTConfig,
    create_model,
    parse_variant,
    positional_encoding,
    set_attention_form,
    timestep_features,
    unfold3d,
    unpatchify,
    variant_config,
)
from prdit_fast.testing import randomize_


# --------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    "name, params",
    [("PRDiT-B/12/0", 39_156_160), ("PRDiT-B/12/4", 93_228_992), ("PRDiT-B/12/12", 178_255_808)],
)
def test_parameter_counts_of_the_paper_models(name, params):
    with torch.device("meta"):  # the count does not depend on S or on allocating weights
        model = create_model(name, 128)
    assert sum(p.numel() for p in model.parameters()) == params


def test_parse_variant_accepts_short_and_long_names():
    assert parse_variant("PRDiT-B/12/4") == ("B", 12, 4, 8, 2, "layer")
    assert parse_variant("XS/10/0") == ("XS", 10, 0, 8, 1, "layer")
    assert parse_variant("DiT-B/12/12") == ("B", 12, 12, 8, 2, "rms")  # TF-PRDiT (spec section 15)
    cfg = variant_config("B/12/4", 128)
    assert (cfg.hidden, cfg.heads, cfg.depth, cfg.patch, cfg.pad, cfg.stride) == (768, 12, 4, 12, 2, 8)
    assert (cfg.token_dim, cfg.num_tokens, cfg.out_token_dim) == (1728, 4096, 1024)


# --------------------------------------------------------------------------- timestep features
def test_timestep_features_are_cosines_first():
    t = torch.tensor([0, 7, 999])
    got = timestep_features(t)
    assert got.shape == (3, 256)
    i = torch.arange(128, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000.0) * i / 128)
    for row, step in zip(got, t.tolist()):
        want = torch.cat([torch.cos(step * freqs), torch.sin(step * freqs)]).float()
        # fp32 arguments t f up to 999 carry ~6e-5 rounding
        torch.testing.assert_close(row, want, rtol=0, atol=1e-4)
    # t = 0: all cosines are 1 and all sines 0, which pins the order
    assert torch.equal(got[0, :128], torch.ones(128)) and torch.equal(got[0, 128:], torch.zeros(128))


# --------------------------------------------------------------------------- unfold
def reflect_index(i: int, size: int) -> int:
    """numpy/torch 'reflect': mirror without repeating the edge voxel."""
    if i < 0:
        return -i
    if i >= size:
        return 2 * (size - 1) - i
    return i


def unfold_loop(x: torch.Tensor, patch: int, stride: int, pad: int) -> torch.Tensor:
    """Spec 3 as plain loops: windows in raster order (depth slowest), each flattened (c, d, h, w)."""
    B, C, S = x.shape[0], x.shape[1], x.shape[-1]
    g = (S + 2 * pad - patch) // stride + 1
    tokens = torch.empty(B, g**3, C * patch**3, dtype=x.dtype)
    n = 0
    for gd in range(g):
        for gh in range(g):
            for gw in range(g):
                idx = [[reflect_index(o * stride - pad + k, S) for k in range(patch)] for o in (gd, gh, gw)]
                window = x[:, :, idx[0]][:, :, :, idx[1]][:, :, :, :, idx[2]]  # (B, C, p, p, p)
                tokens[:, n] = window.reshape(B, -1)
                n += 1
    return tokens


@pytest.mark.parametrize("patch", [10, 12])
@pytest.mark.parametrize("channels", [1, 2])
def test_unfold3d_matches_a_loop_over_windows(patch, channels):
    x = torch.randn(2, channels, 16, 16, 16)
    pad = (patch - 8) // 2
    got = unfold3d(x, patch, 8, pad)
    assert got.shape == (2, 8, channels * patch**3)
    assert torch.equal(got, unfold_loop(x, patch, 8, pad))


def test_unfold3d_reflects_without_repeating_the_edge():
    x = torch.arange(16.0).view(1, 1, 1, 1, 16).expand(1, 1, 16, 16, 16).contiguous()
    first = unfold3d(x, 12, 8, 2)[0, 0].view(12, 12, 12)
    assert first[0, 0, :4].tolist() == [2.0, 1.0, 0.0, 1.0]  # reflect, not symmetric [1, 0, 0, 1]


# --------------------------------------------------------------------------- positional encoding
def positional_formula(grid: int, hidden: int, token: int) -> torch.Tensor:
    """Spec 5, one token: (x, y, z) = (width, height, depth) coordinates (i + 0.5) / g."""
    d, rem = divmod(token, grid * grid)
    h, w = divmod(rem, grid)
    nf = hidden // 6
    freqs = [2 * math.pi * (0.95 * grid / 2) ** (k / (nf - 1)) for k in range(nf)]
    vec = []
    for coord in ((w + 0.5) / grid, (h + 0.5) / grid, (d + 0.5) / grid):
        vec += [math.sin(coord * f) for f in freqs] + [math.cos(coord * f) for f in freqs]
    vec += [0.0] * (hidden - 6 * nf)
    return torch.tensor(vec, dtype=torch.float32)


@pytest.mark.parametrize("grid, hidden", [(4, 192), (2, 1024), (3, 768)])
def test_positional_encoding_matches_the_per_token_formula(grid, hidden):
    pe = positional_encoding(grid, hidden)
    assert pe.shape == (grid**3, hidden)
    for token in range(grid**3):
        torch.testing.assert_close(pe[token], positional_formula(grid, hidden, token), rtol=0, atol=1e-5)
    if hidden % 6:
        assert torch.equal(pe[:, 6 * (hidden // 6):], torch.zeros(grid**3, hidden % 6))


def test_model_uses_the_positional_encoding_of_its_output_grid():
    model = create_model("XS/10/1", 24)
    torch.testing.assert_close(model.fine.pos_embed[0], positional_encoding(3, 192), rtol=0, atol=0)
    assert "fine.pos_embed" not in model.state_dict()


# --------------------------------------------------------------------------- output layout
def test_unpatchify_puts_channel_fastest_cubes_in_raster_order():
    s, g, cout = 2, 2, 4
    # each token entry encodes where it must land: token n, offset (sd, sh, sw), channel c
    tokens = torch.empty(1, g**3, s**3 * cout)
    for n in range(g**3):
        for sd in range(s):
            for sh in range(s):
                for sw in range(s):
                    for c in range(cout):
                        tokens[0, n, ((sd * s + sh) * s + sw) * cout + c] = n * 1000 + sd * 100 + sh * 10 + sw + c * 0.1
    vol = unpatchify(tokens, g * s, s, cout)
    assert vol.shape == (1, cout, g * s, g * s, g * s)
    for n in range(g**3):
        gd, gh, gw = n // (g * g), (n // g) % g, n % g
        for sd in range(s):
            for sh in range(s):
                for sw in range(s):
                    for c in range(cout):
                        got = vol[0, c, gd * s + sd, gh * s + sh, gw * s + sw].item()
                        assert got == pytest.approx(n * 1000 + sd * 100 + sh * 10 + sw + c * 0.1)


def test_model_output_is_eps_then_x0_with_channel_fastest_tokens():
    model = create_model("XS/10/0", 16)
    # linear_final = 0 weights + bias k: every token outputs (0, 1, ..., s^3 Cout - 1)
    with torch.no_grad():
        model.coarse.mlp_denoise.linear_final.bias.copy_(torch.arange(1024.0))
    out = model(torch.randn(1, 1, 16, 16, 16), torch.tensor([10]))
    assert out.shape == (1, 2, 16, 16, 16)
    for d, h, w in [(0, 0, 0), (0, 0, 1), (3, 5, 7), (9, 2, 14)]:
        k = ((d % 8) * 8 + h % 8) * 8 + w % 8  # position inside the 8^3 output cube
        assert out[0, 0, d, h, w].item() == 2 * k  # eps_hat: channel 0 of the (d, h, w, channel) layout
        assert out[0, 1, d, h, w].item() == 2 * k + 1  # x0_hat: channel 1


# --------------------------------------------------------------------------- forward pass, transcribed
def reference_forward(sd: dict, cfg: PRDiTConfig, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spec sections 2-6 written straight from the text against a state dict."""
    lin = lambda z, name: F.linear(z, sd[f"{name}.weight"], sd.get(f"{name}.bias"))  # noqa: E731
    mod = lambda z, sh, sc: z * (1 + sc[:, None]) + sh[:, None]  # noqa: E731
    D = cfg.token_dim
    tokens = unfold_loop(x, cfg.patch, cfg.stride, cfg.pad)
    c = F.silu(lin(timestep_features(t), "t_embedder.mlp.0"))
    c_coarse = lin(c, "t_embedder.coarse_head")
    L = "coarse.mlp_denoise"
    sh1, sc1, sh2, sc2, sh3, sc3 = lin(F.silu(c_coarse), f"{L}.adaLN_modulation.1").chunk(6, dim=1)

    def swiglu(z, name):
        hdn = F.silu(lin(z, f"{name}.fc1_g")) * lin(z, f"{name}.fc1_x")
        hdn = F.layer_norm(hdn, (D,), sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"], eps=1e-5)
        return lin(hdn, f"{name}.fc2")

    h = swiglu(mod(F.layer_norm(tokens, (D,), eps=1e-6), sh1, sc1), f"{L}.mlp1")
    h = swiglu(mod(F.layer_norm(h, (D,), eps=1e-6), sh2, sc2), f"{L}.mlp2")
    out = lin(mod(h + tokens, sh3, sc3), f"{L}.linear_final")
    if cfg.depth:
        H, heads = cfg.hidden, cfg.heads
        c_fine = lin(c, "t_embedder.fine_head")
        P = "fine.patch_embedder"
        e = lin(F.gelu(lin(tokens, f"{P}.fc1"), approximate="tanh"), f"{P}.fc2") + lin(tokens, f"{P}.skip")
        z = F.layer_norm(e, (H,), sd[f"{P}.norm.weight"], sd[f"{P}.norm.bias"], eps=1e-5)
        z = z + torch.stack([positional_formula(cfg.grid, H, n) for n in range(cfg.num_tokens)])
        for i in range(cfg.depth):
            b = f"fine.blocks.{i}"
            shm, scm, gm, shf, scf, gf = lin(F.silu(c_fine), f"{b}.adaLN_modulation.1").chunk(6, dim=1)
            a = mod(F.layer_norm(z, (H,), eps=1e-6), shm, scm)
            q, k, v = lin(a, f"{b}.attn.qkv").view(z.shape[0], -1, 3, heads, H // heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) * (H // heads) ** -0.5, dim=-1) @ v
            z = z + gm[:, None] * lin(att.transpose(1, 2).reshape(z.shape), f"{b}.attn.proj")
            m = mod(F.layer_norm(z, (H,), eps=1e-6), shf, scf)
            z = z + gf[:, None] * lin(F.gelu(lin(m, f"{b}.mlp.fc1"), approximate="tanh"), f"{b}.mlp.fc2")
        shift, scale = lin(F.silu(c_fine), "fine.final_layer.adaLN_modulation.1").chunk(2, dim=1)
        out = out + lin(mod(F.layer_norm(z, (H,), eps=1e-6), shift, scale), "fine.final_layer.linear")
    return unpatchify(out, cfg.input_size, cfg.stride, cfg.out_channels)


@pytest.mark.parametrize("name, channels", [("XS/10/0", 1), ("XS/10/2", 1), ("XS/10/1", 2)])
def test_forward_matches_the_spec_transcription(name, channels):
    model = randomize_(create_model(name, 16, in_channels=channels), std=0.05)
    x = torch.randn(2, channels, 16, 16, 16)
    t = torch.tensor([3, 870])
    with torch.no_grad():
        got = model(x, t)
        want = reference_forward(model.state_dict(), model.config, x, t)
    assert got.shape == (2, 2 * channels, 16, 16, 16)
    # fp32, different summation order: 1e-4 of the output scale
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# --------------------------------------------------------------------------- initialization, freezing
@pytest.mark.parametrize("name", ["XS/10/0", "XS/10/2"])
def test_fresh_model_predicts_exactly_zero(name):
    model = create_model(name, 16)
    out = model(torch.randn(2, 1, 16, 16, 16), torch.tensor([0, 999]))
    assert torch.equal(out, torch.zeros_like(out))


def test_stage_two_trains_only_fine_head_and_transformer():
    model = create_model("XS/10/2", 16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("fine.", "t_embedder.fine_head.")) for n in trainable)
    assert all(p.requires_grad for p in create_model("XS/10/0", 16).parameters())


# --------------------------------------------------------------------------- state dict names
def test_state_dict_uses_the_official_names_and_shapes():
    cfg = variant_config("XS/10/1", 16)
    sd = create_model("XS/10/1", 16).state_dict()
    D, H = cfg.token_dim, cfg.hidden
    expected_shapes = {
        "t_embedder.mlp.0.weight": (H, 256),
        "t_embedder.coarse_head.weight": (D, H),
        "t_embedder.fine_head.weight": (H, H),
        "coarse.mlp_denoise.mlp1.fc1_g.weight": (D, D),
        "coarse.mlp_denoise.mlp1.fc1_x.bias": (D,),
        "coarse.mlp_denoise.mlp1.norm.weight": (D,),
        "coarse.mlp_denoise.mlp2.fc2.weight": (D, D),
        "coarse.mlp_denoise.linear_final.weight": (8**3 * 2, D),
        "coarse.mlp_denoise.adaLN_modulation.1.weight": (6 * D, D),
        "coarse.mlp_denoise.adaLN_modulation.1.bias": (6 * D,),
        "fine.patch_embedder.fc1.weight": (4 * H, D),
        "fine.patch_embedder.fc2.weight": (H, 4 * H),
        "fine.patch_embedder.skip.weight": (H, D),
        "fine.patch_embedder.norm.bias": (H,),
        "fine.blocks.0.attn.qkv.weight": (3 * H, H),
        "fine.blocks.0.attn.proj.bias": (H,),
        "fine.blocks.0.mlp.fc1.weight": (4 * H, H),
        "fine.blocks.0.mlp.fc2.weight": (H, 4 * H),
        "fine.blocks.0.adaLN_modulation.1.weight": (6 * H, H),
        "fine.final_layer.adaLN_modulation.1.weight": (2 * H, H),
        "fine.final_layer.linear.weight": (8**3 * 2, H),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    for absent in ("fine.patch_embedder.skip.bias", "fine.pos_embed", "coarse.mlp_denoise.norm1.weight",
                   "fine.blocks.0.norm1.weight", "fine.final_layer.norm_final.weight"):
        assert absent not in sd
    stage1 = create_model("XS/10/0", 16).state_dict()
    assert not any(k.startswith(("fine.", "t_embedder.fine_head")) for k in stage1)
    assert set(stage1) < set(sd)


# --------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("name", ["XS/10/0", "XS/10/2"])
def test_flops_per_step_equals_a_flop_counter(name):
    # torch's FlopCounterMode has no formula for the CPU flash-SDPA kernel: count the
    # hand-written attention form (the same math) instead
    model = set_attention_form(create_model(name, 24), "handwritten")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 1, 24, 24, 24), torch.tensor([5]))
    assert flops_per_step(model.config) == counter.get_total_flops()


@pytest.mark.parametrize(
    "name, size, gflop, digits",
    [("B/12/0", 128, 161, 0), ("B/12/4", 64, 62.5, 1), ("B/12/4", 128, 680, 0), ("B/12/12", 128, 1556, 0)],
)
def test_flops_reproduce_the_spec_table(name, size, gflop, digits):
    got = flops_per_step(variant_config(name, size)) / 1e9
    assert abs(got - gflop) <= 0.5 * 10**-digits  # the table's rounding


def test_flops_breakdown_of_b_12_4_at_128():
    parts = {k: v / 1e9 for k, v in flops_breakdown(variant_config("B/12/4", 128)).items()}
    assert parts["local_denoiser"] == pytest.approx(161.3, abs=0.05)
    assert parts["patch_embedder"] == pytest.approx(73.7, abs=0.05)
    assert parts["blocks_attention"] / 4 == pytest.approx(51.5, abs=0.05)
    assert (parts["blocks_gemm"] + parts["blocks_attention"]) / 4 == pytest.approx(109.5, abs=0.05)
    assert parts["final_layer"] == pytest.approx(6.4, abs=0.05)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["PRDiT-Q/12/4", "B/13/4", "B/12/5", "B-12-4", ""])
def test_unknown_variant_names_list_the_valid_ones(name):
    with pytest.raises(ValueError, match=r"unknown PRDiT variant.*PRDiT-B/12/4"):
        create_model(name, 32)


def test_non_tiling_patch_stride_pad_is_rejected():
    with pytest.raises(ValueError, match=r"2\*pad must equal patch - stride"):
        PRDiTConfig(hidden=192, heads=6, depth=0, patch=12, input_size=32, pad=1)
    with pytest.raises(ValueError, match="do not tile"):
        PRDiTConfig(hidden=192, heads=6, depth=0, patch=6, input_size=32)


@pytest.mark.parametrize("size", [20, 0, -8])
def test_volume_edge_must_be_a_multiple_of_the_stride(size):
    with pytest.raises(ValueError, match="not a multiple of stride 8"):
        create_model("XS/10/0", size)


def test_wrong_volume_shape_is_rejected_with_the_expected_shape():
    model = create_model("XS/10/0", 16)
    with pytest.raises(ValueError, match=r"expects volumes of shape \(B, 1, 16, 16, 16\).*got \(1, 1, 24, 24, 24\)"):
        model(torch.randn(1, 1, 24, 24, 24), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"expects volumes of shape"):
        model(torch.randn(1, 16, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"expects volumes of shape"):
        model(torch.randn(1, 2, 16, 16, 16), torch.tensor([1]))


def test_wrong_timestep_shape_is_rejected():
    model = create_model("XS/10/0", 16)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        model(torch.randn(2, 1, 16, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"t must be a \(B,\) tensor, a 0-d tensor or a Python int"):
        model(torch.randn(1, 1, 16, 16, 16), torch.tensor([[1]]))  # a 0-d t is expanded (spec section 16)
