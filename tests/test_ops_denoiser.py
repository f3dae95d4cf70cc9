"""The fused local denoiser (prdit_fast.ops.denoiser) against the reference LocalDenoiser.

On CPU the kernels run under TRITON_INTERPRET=1 in fp32: 1e-4 of the largest magnitude,
forward and (rtol 1e-4, atol 1e-5) backward; bf16 at PRDiT-B/12 width needs a GPU.
"""
from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICE as DEVICE
from conftest import assert_close_scaled, meta_shadow, randomize_, rel_rms, requires_cuda, requires_triton

from prdit_fast.models import LocalDenoiser, create_model
from prdit_fast.ops.denoiser import local_denoiser

BF16_REL_TOL = 2e-2  # bf16 fused (and bf16 eager) vs an fp32 reference, relative Frobenius error

pytestmark = requires_triton


def test_local_denoiser_matches_prdit_xs10_coarse_path():
    """PRDiT-XS/10/0 at S = 16: D = 1000, N = 8 tokens, out width 1024."""
    model = randomize_(create_model("PRDiT-XS/10/0", 16)).to(DEVICE)
    module = model.coarse.mlp_denoise
    tokens = model.tokens(torch.randn(2, 1, 16, 16, 16, device=DEVICE))
    c = torch.randn(2, 1000, device=DEVICE)
    out = local_denoiser(tokens, c, module, impl="triton")
    assert out.shape == (2, 8, 1024)
    assert_close_scaled(out, module(tokens, c))


@pytest.mark.parametrize("N", [7, 32, 33])
def test_local_denoiser_small_matches_and_gradients(N):
    B, D = 3, 96
    module = randomize_(LocalDenoiser(D, 128)).to(DEVICE)
    tokens = torch.randn(B, N, D, device=DEVICE, requires_grad=True)
    c = torch.randn(B, D, device=DEVICE, requires_grad=True)
    out = local_denoiser(tokens, c, module, impl="triton")
    ref = module(tokens, c)
    assert_close_scaled(out, ref)
    grad_out = torch.randn_like(ref)
    inputs = [tokens, c, *module.parameters()]
    names = ["tokens", "c", *(n for n, _ in module.named_parameters())]
    fused, expected = torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(ref, inputs, grad_out)
    for name, g, r in zip(names, fused, expected):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_local_denoiser_with_the_16bit_folded_form_forced_in_fp32(monkeypatch):
    """The form 16-bit weights take (per-sample folded fc1 and linear_final weights, the
    residual in mlp2's fc2 epilogue), checked in fp32 under the interpreter: N = 64 keeps
    every 32-row tile in one sample."""
    from prdit_fast.ops import denoiser as denoiser_module
    from prdit_fast.ops import swiglu as swiglu_module

    always = lambda dtype, tokens: True  # noqa: E731
    monkeypatch.setattr(swiglu_module, "folds_modulation", always)
    monkeypatch.setattr(denoiser_module, "folds_modulation", always)
    B, N, D = 3, 64, 96
    module = randomize_(LocalDenoiser(D, 128)).to(DEVICE)
    tokens, c = torch.randn(B, N, D, device=DEVICE), torch.randn(B, D, device=DEVICE)
    assert_close_scaled(local_denoiser(tokens, c, module, impl="triton"), module(tokens, c))


def test_local_denoiser_on_a_shadow_module_with_plain_tensor_parameters():
    """FastPRDiT passes a meta-device LocalDenoiser whose parameter slots hold
    differentiable casts of the real parameters; gradients must reach the originals."""
    module = randomize_(LocalDenoiser(64, 32)).to(DEVICE)
    shadow = meta_shadow(module, 64, 32)
    tokens, c = torch.randn(2, 7, 64, device=DEVICE), torch.randn(2, 64, device=DEVICE)
    out = local_denoiser(tokens, c, shadow, impl="triton")
    ref = module(tokens, c)
    assert_close_scaled(out, ref)
    weight = module.mlp2.norm.weight
    (g,), (r,) = torch.autograd.grad(out.sum(), [weight]), torch.autograd.grad(ref.sum(), [weight])
    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_local_denoiser_inference_mode_and_strided_tokens():
    module = randomize_(LocalDenoiser(64, 32)).to(DEVICE)
    tokens = torch.randn(2, 64, 7, device=DEVICE).transpose(1, 2)  # last-dim stride 7
    c = torch.randn(2, 64, device=DEVICE)
    with torch.inference_mode():
        assert_close_scaled(local_denoiser(tokens, c, module, impl="triton"), module(tokens, c))


def test_local_denoiser_rejects_bad_shapes():
    module = LocalDenoiser(64, 32).to(DEVICE)
    with pytest.raises(ValueError, match="token width"):
        local_denoiser(torch.randn(1, 4, 32, device=DEVICE), torch.randn(1, 32, device=DEVICE), module)
    with pytest.raises(ValueError, match="c_coarse"):
        local_denoiser(torch.randn(2, 4, 64, device=DEVICE), torch.randn(1, 64, device=DEVICE), module)


# ----------------------------------------------------------------------------- GPU
@requires_cuda
def test_local_denoiser_bf16_cuda_b12():
    """PRDiT-B/12/0 local denoiser at S = 64 (N = 512, D = 1728) in bf16."""
    model = randomize_(create_model("PRDiT-B/12/0", 64)).cuda()
    module = model.coarse.mlp_denoise
    tokens = model.tokens(torch.randn(2, 1, 64, 64, 64, device="cuda"))
    c = torch.randn(2, 1728, device="cuda")
    truth = module(tokens, c)
    module16 = create_model("PRDiT-B/12/0", 64).coarse.mlp_denoise.cuda().bfloat16()
    module16.load_state_dict(module.state_dict())
    fused = local_denoiser(tokens.bfloat16(), c.bfloat16(), module16, impl="triton")
    eager = module16(tokens.bfloat16(), c.bfloat16())
    err, eager_err = rel_rms(fused, truth), rel_rms(eager, truth)
    assert err < BF16_REL_TOL and err < 1.5 * eager_err + 1e-3, (err, eager_err)
    assert_close_scaled(local_denoiser(tokens, c, module, impl="triton"), truth, tol=2e-4)
