"""The SwiGLU gate + LayerNorm kernel and the gemm-path local denoiser vs the references.

On CPU the Triton kernels run under TRITON_INTERPRET=1 in fp32 (tiny shapes); the bf16
comparison needs a GPU (requires_cuda).
"""
from __future__ import annotations

import pytest
import torch
from conftest import meta_shadow, randomize_, rel_rms, requires_cuda

from prdit_fast.models import LocalDenoiser, create_model
from prdit_fast.ops.denoiser import FC1, local_denoiser
from prdit_fast.ops.derived import derived_for
from prdit_fast.ops.dispatch import resolve, triton_runs_on
from prdit_fast.ops.swiglu_gate import (
    swiglu_gate_layernorm,
    swiglu_gate_layernorm_reference,
)

# fp32 kernel vs fp32 torch: same math, different summation order.
FP32_RTOL, FP32_ATOL = 1e-4, 1e-5
# bf16 gemm path vs the fp32 reference module: relative RMS error.
BF16_REL_TOL = 2e-2

pytestmark = pytest.mark.skipif(
    not triton_runs_on(torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu")),
    reason="Triton cannot run here (no GPU, no interpreter)",
)



def assert_grads_match(out, ref, inputs, names):
    grad_out = torch.randn_like(ref)
    got, expected = torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(ref, inputs, grad_out)
    for name, g, r in zip(names, got, expected):
        # summation-order noise scales with the gradient's size: atol relative to its max
        atol = max(FP32_ATOL, FP32_RTOL * r.abs().max().item())
        torch.testing.assert_close(g, r, rtol=FP32_RTOL, atol=atol, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("rows,D", [(7, 96), (33, 200), (7, 1000)])
def test_gate_layernorm_matches_torch_forward_and_backward(rows, D, device):
    gu = torch.randn(rows, 2 * D, device=device, requires_grad=True)
    gamma = torch.empty(D, device=device).uniform_(0.5, 1.5).requires_grad_()
    beta = (0.3 * torch.randn(D, device=device)).requires_grad_()
    out = swiglu_gate_layernorm(gu, gamma, beta, 1e-5, impl="triton")
    ref = swiglu_gate_layernorm_reference(gu, gamma, beta, 1e-5)
    assert out.shape == (rows, D)
    torch.testing.assert_close(out, ref, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert_grads_match(out, ref, [gu, gamma, beta], ["gu", "gamma", "beta"])


def test_gate_layernorm_batched_shape_and_bad_input(device):
    gu = torch.randn(2, 5, 2 * 96, device=device)
    gamma, beta = torch.ones(96, device=device), torch.zeros(96, device=device)
    out = swiglu_gate_layernorm(gu, gamma, beta, impl="triton")
    assert out.shape == (2, 5, 96)
    torch.testing.assert_close(out, swiglu_gate_layernorm_reference(gu, gamma, beta), rtol=FP32_RTOL, atol=FP32_ATOL)
    with pytest.raises(ValueError, match="2D"):
        swiglu_gate_layernorm(gu[..., :-1], gamma, beta)
    with pytest.raises(ValueError, match="gamma and beta"):
        swiglu_gate_layernorm(gu, gamma[:-1], beta)
    with pytest.raises(ValueError, match="impl"):
        swiglu_gate_layernorm(gu, gamma, beta, impl="cuda")


@pytest.mark.parametrize("N", [7, 33])
def test_gemm_local_denoiser_matches_reference_with_gradients(N, device):
    B, D = 2, 96
    module = randomize_(LocalDenoiser(D, 40)).to(device)
    tokens = (torch.randn(B, N, D, device=device) + 0.5).requires_grad_()
    c = torch.randn(B, D, device=device, requires_grad=True)
    out = local_denoiser(tokens, c, module, impl="gemm")
    ref = module(tokens, c)
    torch.testing.assert_close(out, ref, rtol=FP32_RTOL, atol=FP32_ATOL)
    names = ["tokens", "c", *(n for n, _ in module.named_parameters())]
    assert_grads_match(out, ref, [tokens, c, *module.parameters()], names)


def test_gemm_local_denoiser_matches_prdit_xs10_coarse_path(device):
    """PRDiT-XS/10/0 at S = 16: D = 1000, N = 8 tokens, out width 1024."""
    model = randomize_(create_model("PRDiT-XS/10/0", 16)).to(device)
    module = model.coarse.mlp_denoise
    tokens = model.tokens(torch.randn(2, 1, 16, 16, 16, device=device)).detach().requires_grad_()
    c = torch.randn(2, 1000, device=device, requires_grad=True)
    out = local_denoiser(tokens, c, module, impl="gemm")
    ref = module(tokens, c)
    assert out.shape == (2, 8, 1024)
    torch.testing.assert_close(out, ref, rtol=FP32_RTOL, atol=FP32_ATOL)
    weights = [module.mlp1.fc1_g.weight, module.mlp2.fc1_x.bias, module.mlp2.norm.weight]
    assert_grads_match(out, ref, [tokens, c, *weights], ["tokens", "c", "fc1_g.weight", "fc1_x.bias", "norm.weight"])


def test_gemm_path_sees_in_place_weight_updates(device):
    """The cached [Wg; Wx] is refreshed after an in-place change under no_grad."""
    module = randomize_(LocalDenoiser(64, 32)).to(device)
    tokens, c = torch.randn(2, 7, 64, device=device), torch.randn(2, 64, device=device)
    with torch.no_grad():
        before = local_denoiser(tokens, c, module, impl="gemm")
        assert derived_for(module.mlp1).cached(FC1) is not None and derived_for(module.mlp2).cached(FC1) is not None
        cached = derived_for(module.mlp1).cached(FC1)
        again = local_denoiser(tokens, c, module, impl="gemm")
        assert derived_for(module.mlp1).cached(FC1) is cached  # unchanged weights: the copy is reused
        torch.testing.assert_close(again, before, rtol=0, atol=0)
        module.mlp1.fc1_x.weight.mul_(-2.0)
        module.mlp2.fc1_g.bias.add_(1.0)
        after = local_denoiser(tokens, c, module, impl="gemm")
        ref = module(tokens, c)
    assert rel_rms(after, before) > 1e-2
    torch.testing.assert_close(after, ref, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert derived_for(module.mlp1).cached(FC1) is not cached
    assert set(module.state_dict()) == set(LocalDenoiser(64, 32).state_dict())  # no extra entries


def test_gemm_path_on_a_shadow_module_with_plain_tensor_parameters(device):
    """FastPRDiT's meta-device shadow holds differentiable casts; gradients reach the originals."""
    module = randomize_(LocalDenoiser(64, 32)).to(device)
    shadow = meta_shadow(module, 64, 32)
    tokens, c = torch.randn(2, 7, 64, device=device), torch.randn(2, 64, device=device)
    out = local_denoiser(tokens, c, shadow, impl="gemm")
    ref = module(tokens, c)
    torch.testing.assert_close(out, ref, rtol=FP32_RTOL, atol=FP32_ATOL)
    weight = module.mlp1.fc1_g.weight
    (g,), (r,) = torch.autograd.grad(out.sum(), [weight]), torch.autograd.grad(ref.sum(), [weight])
    torch.testing.assert_close(g, r, rtol=FP32_RTOL, atol=FP32_ATOL)


def test_gemm_path_inference_mode_then_autograd(device):
    """A cache built under inference_mode must serve a later no_grad call and not break
    a later autograd call; strided tokens are accepted."""
    module = randomize_(LocalDenoiser(64, 32)).to(device)
    tokens = torch.randn(2, 64, 7, device=device).transpose(1, 2)  # last-dim stride 7
    c = torch.randn(2, 64, device=device)
    with torch.inference_mode():
        out = local_denoiser(tokens, c, module, impl="gemm")
    torch.testing.assert_close(out, module(tokens, c), rtol=FP32_RTOL, atol=FP32_ATOL)
    with torch.no_grad():
        local_denoiser(tokens, c, module, impl="gemm")
    tokens = tokens.detach().requires_grad_()
    (g,) = torch.autograd.grad(local_denoiser(tokens, c, module, impl="gemm").sum(), [tokens])
    (r,) = torch.autograd.grad(module(tokens, c).sum(), [tokens])
    torch.testing.assert_close(g, r, rtol=FP32_RTOL, atol=FP32_ATOL)


def test_impl_selection_rule_and_bad_impl():
    cpu16 = torch.empty(1, 1, 8, dtype=torch.bfloat16)
    assert resolve("local_denoiser", "auto", [cpu16]) == "triton"  # CPU (interpreter): the fused kernels
    assert resolve("local_denoiser", "auto", [torch.empty(1, 1, 8)]) == "triton"
    assert resolve("local_denoiser", "gemm", [cpu16]) == "gemm"
    assert resolve("local_denoiser", "triton", [cpu16]) == "triton"
    module = LocalDenoiser(8, 4)
    with pytest.raises(ValueError, match="impl must be 'auto' or one of"):
        local_denoiser(torch.randn(1, 2, 8), torch.randn(1, 8), module, impl="cublas")


# ----------------------------------------------------------------------------- GPU
@requires_cuda
def test_impl_auto_picks_gemm_for_16bit_cuda():
    assert resolve("local_denoiser", "auto", [torch.empty(1, 1, 8, device="cuda", dtype=torch.bfloat16)]) == "gemm"
    assert resolve("local_denoiser", "auto", [torch.empty(1, 1, 8, device="cuda", dtype=torch.float16)]) == "gemm"
    assert resolve("local_denoiser", "auto", [torch.empty(1, 1, 8, device="cuda")]) == "triton"


@requires_cuda
@pytest.mark.parametrize("variant,S", [("PRDiT-B/12/0", 64), ("PRDiT-XS/10/0", 40)])
def test_gemm_local_denoiser_bf16_cuda(variant, S):
    """bf16 gemm path vs the fp32 reference module: relative RMS < 2e-2, gradients too."""
    model = randomize_(create_model(variant, S)).cuda()
    module = model.coarse.mlp_denoise
    tokens = model.tokens(torch.randn(2, 1, S, S, S, device="cuda")).detach() + 0.5
    c = torch.randn(2, tokens.shape[-1], device="cuda")
    truth = module(tokens, c)
    module16 = create_model(variant, S).coarse.mlp_denoise.cuda().bfloat16()
    module16.load_state_dict(module.state_dict())
    t16 = tokens.bfloat16().requires_grad_()
    out = local_denoiser(t16, c.bfloat16(), module16, impl="auto")
    assert out.dtype == torch.bfloat16
    assert rel_rms(out, truth) < BF16_REL_TOL
    tokens.requires_grad_()
    grad_out = torch.randn_like(truth)
    (g_truth,) = torch.autograd.grad(module(tokens, c), [tokens], grad_out)
    (g16,) = torch.autograd.grad(out, [t16], grad_out.bfloat16())
    assert rel_rms(g16, g_truth) < BF16_REL_TOL
