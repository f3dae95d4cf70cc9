"""Spec section 16, the official module's interface, on the reference PRDiT and on the
fast backend (fp32, Triton interpreter on the CPU), for the IaN, flow-matching and RMS
(TF-PRDiT) variants, with odd batch sizes.

The oracles are written from the spec: the encoder features are recomputed here from the
reference's submodules (unfold -> patch embedder + positions -> blocks with c_fine), not
through the code under test. fp32 tolerance as tests/test_fast.py: 1e-4 of the largest
magnitude (only summation order differs between the backends). The fast backend runs its
plain-torch op references (``impl="torch"``: the same data flow, cached weights and early
stop) except in ``test_fast_features_on_the_triton_kernels``, which runs the Triton kernels
under the interpreter (slow on the CPU, so once).
"""
from __future__ import annotations

import pytest
import torch

from prdit_fast.checkpoint import save_checkpoint
from prdit_fast.fast import accelerate
from prdit_fast.models import create_model, unfold3d, unpatchify
from prdit_fast.sr import create_sr_model, downsample_nearest, upsample_prediction
from prdit_fast.testing import randomize_, rel_max

FP32_TOL = 1e-4
S = 16
BACKENDS = ("reference", "fast")


def build(variant: str, backend: str, out_channels: int | None = None, impl: str = "torch"):
    torch.manual_seed(0)
    ref = randomize_(create_model(variant, S, out_channels=out_channels), std=0.05).eval()
    if backend == "reference":
        return ref, ref
    return ref, accelerate(ref, dtype=torch.float32, impl=impl)


def spec_features(ref, x: torch.Tensor, t: torch.Tensor, upto: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(patch embedding + positions, [state after block i for i <= upto]) from the spec, by hand."""
    cfg = ref.config
    tokens = unfold3d(x, cfg.patch, cfg.stride, cfg.pad)
    c_fine = ref.t_embedder.fine_head(ref.t_embedder(t))
    h = ref.fine.patch_embedder(tokens) + ref.fine.pos_embed
    embed, states = h, []
    for block in ref.fine.blocks[: upto + 1]:
        h = block(h, c_fine)
        states.append(h)
    return embed, states


@pytest.mark.parametrize("backend", BACKENDS)
def test_timestep_forms_and_y(backend):
    """t as a (B,) tensor, a 0-d tensor and a Python int give the same output; y is ignored;
    t None in denoise mode is a ValueError."""
    ref, model = build("PRDiT-XS/10/1", backend)
    x = torch.randn(3, 1, S, S, S)
    with torch.no_grad():
        full = ref(x, torch.full((3,), 321))
        for t in (torch.full((3,), 321), torch.tensor(321), 321):
            out = model(x, t, y=None)
            assert out.shape == (3, 2, S, S, S)
            assert rel_max(out, full) < FP32_TOL
        assert torch.equal(model(x, 321, y=torch.zeros(3, dtype=torch.long)), model(x, 321))
    with pytest.raises(ValueError, match="t is required"):
        model(x)
    with pytest.raises(ValueError, match="t is required"):
        model(x, None, y=None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_intermediate_and_modes(backend):
    ref, model = build("PRDiT-XS/10/1", backend)
    x, t = torch.randn(3, 1, S, S, S), torch.tensor([5, 500, 999])
    with torch.no_grad():
        out = ref(x, t)
        coarse, fine = model(x, t, return_intermediate=True)
        # the stage-1 part alone is the local denoiser's output, unpatchified
        cfg = ref.config
        c = ref.t_embedder(t)
        stage1 = unpatchify(ref.coarse.mlp_denoise(unfold3d(x, cfg.patch, cfg.stride, cfg.pad),
                                                   ref.t_embedder.coarse_head(c)), S, cfg.stride, 2)
    assert coarse.shape == fine.shape == out.shape
    assert rel_max(coarse, stage1) < FP32_TOL
    assert rel_max(coarse + fine, out) < FP32_TOL
    assert fine.abs().max() > 1e-3
    for mode in ("decode", "Denoise", None):
        with pytest.raises(ValueError, match="mode must be one of"):
            model(x, t, mode=mode)
    # depth 0: no residual part, the volume itself
    ref0, model0 = build("PRDiT-XS/10/0", backend)
    with torch.no_grad():
        assert torch.equal(model0(x, t, return_intermediate=True), model0(x, t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_encode_mode(backend):
    """Tokens after block 5 (B, N, hidden); t None means 50; depth < 6 is a RuntimeError."""
    ref, model = build("PRDiT-XS/10/8", backend)
    x = torch.randn(3, 1, S, S, S)
    with torch.no_grad():
        _, states = spec_features(ref, x, torch.full((3,), 50), upto=5)
        enc = model(x, mode="encode")
        assert enc.shape == (3, (S // 8) ** 3, 192)
        assert rel_max(enc, states[5]) < FP32_TOL
        _, states7 = spec_features(ref, x, torch.full((3,), 7), upto=5)
        for t in (7, torch.tensor(7), torch.full((3,), 7)):
            assert rel_max(model(x, t, y=None, mode="encode"), states7[5]) < FP32_TOL
    for shallow in ("PRDiT-XS/10/4", "PRDiT-XS/10/0"):
        _, small = build(shallow, backend)
        with pytest.raises(RuntimeError, match="depth >= 6"):
            small(x, mode="encode")
        with pytest.raises(RuntimeError, match="depth >= 6"):
            small.get_vlm_features(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_vlm_features(backend):
    ref, model = build("PRDiT-XS/10/8", backend)
    x = torch.randn(1, 1, S, S, S)
    with torch.no_grad():
        expected = model(x, 50, mode="encode")
    features = model.get_vlm_features(x)
    assert not features.requires_grad and torch.equal(features, expected)
    with_grad = model.get_vlm_features(x, timestep=50, no_grad=False)
    assert with_grad.requires_grad  # the transformer's parameters train
    assert rel_max(with_grad.detach(), expected) < FP32_TOL
    detached = model.get_vlm_features(x, timestep=50, no_grad=False, detach=True)
    assert not detached.requires_grad and rel_max(detached, expected) < FP32_TOL
    _, states = spec_features(ref, x, torch.tensor([300]), upto=5)
    assert rel_max(model.get_vlm_features(x, timestep=300), states[5].detach()) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_extract_transformer_hidden_features(backend):
    ref, model = build("PRDiT-XS/10/8", backend)
    x, t = torch.randn(3, 1, S, S, S), torch.tensor([0, 400, 999])
    with torch.no_grad():
        embed, states = spec_features(ref, x, t, upto=7)
        feats = model.extract_transformer_hidden_features(x, t, capture_layers=[6, 1, 6], include_patch_embed=True)
        assert set(feats) == {"patch_embed", "block_1", "block_6", "final"}
        assert rel_max(feats["patch_embed"], embed) < FP32_TOL
        assert rel_max(feats["block_1"], states[1]) < FP32_TOL
        assert rel_max(feats["block_6"], states[6]) < FP32_TOL
        assert rel_max(feats["final"], states[7]) < FP32_TOL
        default = model.extract_transformer_hidden_features(x, t, y=None)  # capture_layers None: depth // 2
        assert set(default) == {"block_4", "final"}
        assert rel_max(default["block_4"], states[4]) < FP32_TOL
        assert set(model.extract_transformer_hidden_features(x, 400, capture_layers=7)) == {"block_7", "final"}
    grads = model.extract_transformer_hidden_features(x, t, capture_layers=2)
    assert grads["block_2"].requires_grad
    assert not any(v.requires_grad for v in model.extract_transformer_hidden_features(x, t, detach=True).values())
    for bad in (8, -1, [0, 8]):
        with pytest.raises(ValueError, match=r"valid range \[0, 8\)"):
            model.extract_transformer_hidden_features(x, t, capture_layers=bad)
    _, flat = build("PRDiT-XS/10/0", backend)
    with pytest.raises(RuntimeError, match="depth 0"):
        flat.extract_transformer_hidden_features(x, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_freeze_coarse_path(backend):
    _, model = build("PRDiT-XS/10/1", backend)
    model.requires_grad_(True)
    assert all(p.requires_grad for p in model.parameters())
    model.freeze_coarse_path()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith(("t_embedder.mlp.", "t_embedder.coarse_head.", "coarse."))}
    assert any(n.startswith("fine.") for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_matching_variant(backend):
    """The FM-256 branch shares the interface: float t (1000 t), encode, features."""
    ref, model = build("PRDiT-XS/10/8", backend, out_channels=1)
    x = torch.randn(3, 1, S, S, S)
    with torch.no_grad():
        full = ref(x, torch.full((3,), 437.5))
        for t in (437.5, torch.tensor(437.5), torch.full((3,), 437.5)):
            assert rel_max(model(x, t, y=None), full) < FP32_TOL
        coarse, fine = model(x, 437.5, return_intermediate=True)
        assert coarse.shape == (3, 1, S, S, S) and rel_max(coarse + fine, full) < FP32_TOL
        _, states = spec_features(ref, x, torch.full((3,), 50), upto=5)
        assert rel_max(model(x, mode="encode"), states[5]) < FP32_TOL
        assert rel_max(model.extract_transformer_hidden_features(x, 50, capture_layers=5)["block_5"], states[5]) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_tf_prdit_has_the_smaller_interface(backend):
    """DiT- names: forward(input, t, y=None, return_intermediate=False); no encode mode and no
    feature helpers (a TypeError that says so)."""
    ref, model = build("DiT-XS/10/8", backend)
    x = torch.randn(1, 1, S, S, S)
    with torch.no_grad():
        out = ref(x, torch.tensor([200]))
        assert rel_max(model(x, 200, y=None), out) < FP32_TOL
        assert rel_max(model(x, torch.tensor(200)), out) < FP32_TOL
        coarse, fine = model(x, 200, return_intermediate=True)
        assert rel_max(coarse + fine, out) < FP32_TOL
    with pytest.raises(TypeError, match="TF-PRDiT"):
        model(x, 200, mode="encode")
    with pytest.raises(TypeError, match="TF-PRDiT"):
        model.get_vlm_features(x)
    with pytest.raises(TypeError, match="TF-PRDiT"):
        model.extract_transformer_hidden_features(x, 200)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sr_wrapper_interface(backend):
    """PRDiT-SR forward(x, t, y=None, return_intermediate=False): int / 0-d t, y ignored, and
    the pair (upsampled base prediction, head residual) whose sum is the output."""
    torch.manual_seed(0)
    base = randomize_(create_model("PRDiT-XS/10/1", S), std=0.05)
    sr = randomize_(create_sr_model(base, 2 * S, hidden=32, patch=10, pad=1), std=0.05).eval()
    model = sr if backend == "reference" else accelerate(sr, dtype=torch.float32, impl="torch")
    x = torch.randn(3, 1, 2 * S, 2 * S, 2 * S)
    with torch.no_grad():
        out = sr(x, torch.full((3,), 640))
        for t in (torch.full((3,), 640), torch.tensor(640), 640):
            assert rel_max(model(x, t, y=None), out) < FP32_TOL
        up, residual = model(x, 640, y=None, return_intermediate=True)
        expected_up = upsample_prediction(base(downsample_nearest(x, 2), torch.full((3,), 640)), 2 * S, 1)
    assert up.shape == residual.shape == out.shape
    assert rel_max(up, expected_up) < FP32_TOL
    assert rel_max(up + residual, out) < FP32_TOL and residual.abs().max() > 1e-3
    with pytest.raises(ValueError, match="t is required"):
        model(x, None)


def test_fast_features_on_the_triton_kernels():
    """Encode mode and the hidden features through the fast backend's Triton kernels
    (unfold, the fused embedding/adaLN passes), against the spec's features."""
    ref, model = build("PRDiT-XS/10/8", "fast", impl="auto")
    x, t = torch.randn(3, 1, S, S, S), torch.tensor([3, 50, 777])
    with torch.no_grad():
        embed, states = spec_features(ref, x, t, upto=7)
        assert rel_max(model(x, t, mode="encode"), states[5]) < FP32_TOL
        feats = model.extract_transformer_hidden_features(x, t, capture_layers=[0, 5], include_patch_embed=True)
    assert rel_max(feats["patch_embed"], embed) < FP32_TOL
    for key, state in (("block_0", states[0]), ("block_5", states[5]), ("final", states[7])):
        assert rel_max(feats[key], state) < FP32_TOL, key


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_features_checks_its_request(backend):
    """hidden_features (what `prdit-fast features` calls) refuses an empty or out-of-range
    request and a model without a transformer."""
    _, model = build("PRDiT-XS/10/1", backend)
    x, t = torch.randn(1, 1, S, S, S), torch.tensor([1])
    with pytest.raises(ValueError, match="at least one block"):
        model.hidden_features(x, t, [])
    with pytest.raises(ValueError, match=r"valid range \[0, 1\)"):
        model.hidden_features(x, t, [1])
    assert set(model.hidden_features(x, t, [0], patch_embed=True)) == {"patch_embed", "block_0"}
    _, flat = build("PRDiT-XS/10/0", backend)
    with pytest.raises(RuntimeError, match="depth 0"):
        flat.hidden_features(x, t, [0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_coarse_checkpoint(backend, tmp_path):
    """A stage-1 file's ``model`` weights (official layout with DDP prefixes; our safetensors
    format) fill the coarse path, non-strictly (the transformer keeps its weights), and the
    coarse path is frozen; a file without the coarse path is refused."""
    torch.manual_seed(1)
    stage1 = randomize_(create_model("PRDiT-XS/10/0", S), std=0.05).eval()
    official = {"model": {"module." + k: v for k, v in stage1.state_dict().items()},
                "ema": stage1.state_dict(), "config": {"model": {"name": "PRDiT-XS/10/0"}}, "epoch": 3}
    torch.save(official, tmp_path / "stage1.pt")
    _, model = build("PRDiT-XS/10/1", backend)
    model.requires_grad_(True)
    fine_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fine.")}
    loaded = model.load_coarse_checkpoint(tmp_path / "stage1.pt")
    assert sorted(loaded) == sorted(stage1.state_dict())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in stage1.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in fine_before.items())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("fine.", "t_embedder.fine_head.")) for n in trainable)
    x, t = torch.randn(3, 1, S, S, S), torch.tensor([3, 300, 900])
    with torch.no_grad():
        coarse, _ = model(x, t, return_intermediate=True)
        assert rel_max(coarse, stage1(x, t)) < FP32_TOL  # the stage-1 model's prediction
    save_checkpoint(tmp_path / "ours.safetensors", stage1)  # our format: the EMA weights stand in for model
    _, again = build("PRDiT-XS/10/1", backend)
    again.load_coarse_checkpoint(tmp_path / "ours.safetensors")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in stage1.state_dict().items())
    torch.save({"model": {"fine.patch_embedder.skip.weight": torch.zeros(192, 1000)}}, tmp_path / "stage2.pt")
    with pytest.raises(ValueError, match="not a stage-1 checkpoint"):
        model.load_coarse_checkpoint(tmp_path / "stage2.pt")
