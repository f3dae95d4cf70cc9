"""The fused kernels in the RMSNorm form of TF-PRDiT (spec section 15) against the references.

The same checks as the LayerNorm form: the Triton kernels (the interpreter on the CPU,
fp32), forward and backward, odd shapes (widths that are not powers of two or multiples
of the tiles, token counts that straddle samples). The normalisation is
``x / sqrt(mean(x^2) + 1e-5)``: no mean. Tolerances as for the LayerNorm form: 2e-5
absolute forward and 1e-4 backward for the adaLN kernel, 1e-4 of the largest magnitude
for the GEMM kernels and the whole network.
"""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close_scaled, randomize_, requires_cuda

from prdit_fast.testing import randomized_model, rel_rms
from prdit_fast.fast import accelerate
from prdit_fast.models import RMS_EPS, LocalDenoiser, SwiGLU, create_model
from prdit_fast.ops.adaln import (
    embed_layernorm_modulate,
    embed_layernorm_modulate_reference,
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
)
from prdit_fast.ops.denoiser import local_denoiser
from prdit_fast.ops.dispatch import triton_runs_on
from prdit_fast.ops.swiglu import adaptive_swiglu, reference_adaptive_swiglu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GEMM_TOL = 1e-4

pytestmark = pytest.mark.skipif(
    not triton_runs_on(torch.empty(0, device=DEVICE)), reason="Triton cannot run here (no GPU, no interpreter)"
)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Written out, not F.rms_norm: the references below must agree with this."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)


def grads_match(out, ref_out, leaves, ref_leaves, atol):
    weights = [torch.randn_like(o) for o in out]
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), leaves)
    want = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref_out, weights)), ref_leaves)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("B, N, H", [(2, 7, 48), (3, 5, 200)])
def test_adaln_kernels_in_rms_form(B, N, H):
    x = torch.randn(B, N, H, device=DEVICE) * 3 + 1  # a mean far from 0: RMS and LayerNorm differ
    mods = torch.randn(B, 5 * H, device=DEVICE)
    shift, scale, gate = mods[:, :H], mods[:, H : 2 * H], mods[:, 3 * H : 4 * H]
    branch = torch.randn(B, N, H, device=DEVICE)
    # the reference is the RMSNorm written out
    want = rms_norm(x) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(layernorm_modulate_reference(x, shift, scale, RMS_EPS, rms=True), want)

    leaves = [t.clone().requires_grad_(True) for t in (x, shift, scale)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, shift, scale)]
    y = layernorm_modulate(*leaves, eps=RMS_EPS, impl="triton", rms=True)
    y_ref = layernorm_modulate_reference(*ref_leaves, eps=RMS_EPS, rms=True)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=2e-5)
    grads_match([y], [y_ref], leaves, ref_leaves, atol=1e-4)

    inputs = (x, gate, branch, shift, scale)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    ref_leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = gated_residual_layernorm_modulate(*leaves, eps=RMS_EPS, impl="triton", rms=True)
    ref = gated_residual_layernorm_modulate_reference(*ref_leaves, eps=RMS_EPS, rms=True)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=2e-5)
    grads_match(out, ref, leaves, ref_leaves, atol=1e-4)

    e = torch.randn(B, N, H, device=DEVICE) * 2 + 0.5
    gamma, beta = torch.rand(H, device=DEVICE) + 0.5, torch.randn(H, device=DEVICE)
    pos = torch.randn(N, H, device=DEVICE)
    inputs = (e, gamma, beta, pos, shift, scale)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    ref_leaves = [t.clone().requires_grad_(True) for t in inputs]

    def embed(fn, e, gamma, beta, pos, shift, scale):
        return fn(e, gamma, beta, 1e-5, pos, shift, scale, eps=RMS_EPS, rms=True, **(
            {"impl": "triton"} if fn is embed_layernorm_modulate else {}))

    out = embed(embed_layernorm_modulate, *leaves)
    ref = embed(embed_layernorm_modulate_reference, *ref_leaves)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=2e-5)
    grads_match(out, ref, leaves, ref_leaves, atol=1e-4)


def assert_grads_close(got, want):
    for g, r in zip(got, want):
        # summation-order noise scales with the gradient's size: atol relative to its max
        torch.testing.assert_close(g, r, rtol=1e-4, atol=max(1e-5, 1e-4 * r.abs().max().item()))


# token counts 7 (per-row gather), 33 (tiles straddling samples); width 200 leaves partial tiles
@pytest.mark.parametrize("B, N, D", [(1, 7, 64), (3, 33, 200)])
def test_adaptive_swiglu_rms_form_forward_and_backward(B, N, D):
    block = randomize_(SwiGLU(D)).to(DEVICE)
    x = (torch.randn(B, N, D, device=DEVICE) + 0.7).requires_grad_(True)
    shift = (0.5 * torch.randn(B, D, device=DEVICE)).requires_grad_(True)
    scale = (0.5 * torch.randn(B, D, device=DEVICE)).requires_grad_(True)
    want = block((rms_norm(x) * (1 + scale[:, None]) + shift[:, None]))
    ref = reference_adaptive_swiglu(x, shift, scale, block, RMS_EPS, rms=True)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    got = adaptive_swiglu(x, shift, scale, block, norm_eps=RMS_EPS, impl="triton", rms=True)
    assert_close_scaled(got, ref)
    inputs = [x, shift, scale, *block.parameters()]
    grad_out = torch.randn_like(ref)
    assert_grads_close(torch.autograd.grad(got, inputs, grad_out), torch.autograd.grad(ref, inputs, grad_out))


@pytest.mark.parametrize("impl, N", [("triton", 33), ("triton", 32), ("gemm", 7)])
def test_local_denoiser_rms_form(impl, N):
    """The whole local denoiser on an RMS LocalDenoiser (its adaLN output RMSNorm included),
    both implementations; N = 32 is the per-sample tile form under the interpreter."""
    B, D = 3, 96
    module = randomize_(LocalDenoiser(D, 128, norm="rms")).to(DEVICE)
    tokens = (torch.randn(B, N, D, device=DEVICE) + 0.5).requires_grad_(True)
    c = torch.randn(B, D, device=DEVICE, requires_grad=True)
    out = local_denoiser(tokens, c, module, impl=impl)
    ref = module(tokens, c)
    assert_close_scaled(out, ref)
    inputs = [tokens, c, *module.parameters()]
    grad_out = torch.randn_like(ref)
    assert_grads_close(torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(ref, inputs, grad_out))


def test_fast_tf_prdit_matches_reference_fp32():
    """accelerate() of a DiT- (RMS) model: the adaLN kernels in their RMS form, the blocks'
    modulation RMSNorm on the concatenated adaLN GEMM, fp32 outputs and gradients. The
    fused local denoiser (tested above in its RMS form) is slow under the interpreter at
    D = 1000: the reference module runs in its place, as in test_fast.py."""
    ref = randomized_model("DiT-XS/10/2", 16).train()
    fast = accelerate(ref, dtype=torch.float32, impl={"local_denoiser": "torch"})
    x = torch.randn(2, 1, 16, 16, 16)
    t = torch.tensor([900, 13])
    trainable = [p for p in ref.parameters() if p.requires_grad]
    outs = []
    for model in (ref, fast):
        xi = x.clone().requires_grad_(True)
        out = model(xi, t)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        outs.append((out.detach(), torch.autograd.grad((out * weights).sum(), [xi] + trainable)))
    (out_r, grads_r), (out_f, grads_f) = outs
    assert_close_scaled(out_f, out_r)
    for g, r in zip(grads_f, grads_r):
        assert_close_scaled(g, r)
    # the same weights in the LayerNorm network are far off: the RMS form is really used
    layer = accelerate(randomized_model("PRDiT-XS/10/2", 16), dtype=torch.float32, impl={"local_denoiser": "torch"})
    with torch.no_grad():
        assert (layer(x, t) - out_r).abs().max() > 100 * GEMM_TOL * out_r.abs().max()


def test_accelerate_foreign_module_takes_its_norm():
    """A foreign module with the official structure (here DDP-style, under ``module.``):
    its local denoiser's norm1 class says which variant it is; anything else is an error."""
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    rms_model = randomized_model("DiT-XS/10/1", 16)
    wrapped = accelerate(Wrapper(rms_model), dtype=torch.float32, input_size=16)
    assert wrapped.config.norm == "rms" and wrapped.config.name == "DiT-XS/10/1"
    rms_model.coarse.mlp_denoise.norm1 = torch.nn.Identity()
    with pytest.raises(ValueError, match="cannot tell the normalization"):
        accelerate(Wrapper(rms_model), dtype=torch.float32, input_size=16)


# --------------------------------------------------------------------------- GPU only (bf16)
@requires_cuda
@pytest.mark.parametrize("impl", ["triton", "gemm"])
def test_local_denoiser_rms_bf16_cuda(impl):
    """DiT-B/12/0's local denoiser at S = 64 (N = 512: the per-sample folded form) in bf16
    against the fp32 reference: relative RMS error < 2e-2 and within 1.5x of eager bf16's."""
    model = randomize_(create_model("DiT-B/12/0", 64)).cuda()
    module = model.coarse.mlp_denoise
    tokens = model.tokens(torch.randn(2, 1, 64, 64, 64, device="cuda") + 0.3)
    c = torch.randn(2, 1728, device="cuda")
    truth = module(tokens, c)
    module16 = create_model("DiT-B/12/0", 64).coarse.mlp_denoise.cuda().bfloat16()
    module16.load_state_dict(module.state_dict())
    fused = local_denoiser(tokens.bfloat16(), c.bfloat16(), module16, impl=impl)
    eager = module16(tokens.bfloat16(), c.bfloat16())
    err, eager_err = rel_rms(fused, truth), rel_rms(eager, truth)
    assert err < 2e-2 and err < 1.5 * eager_err + 1e-3, (err, eager_err)


@requires_cuda
def test_fast_tf_prdit_bf16_cuda():
    """The whole TF-PRDiT fast backend in bf16 against the fp32 reference (TF32 off), as
    test_fast.py's bound for PRDiT: output relative RMS error < 3e-2."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = randomized_model("DiT-B/12/2", 32).cuda().eval()
    fast = accelerate(ref, dtype=torch.bfloat16)
    x = torch.randn(2, 1, 32, 32, 32, device="cuda")
    t = torch.tensor([17, 803], device="cuda")
    with torch.no_grad():
        assert rel_rms(fast(x, t), ref(x, t)) < 3e-2
