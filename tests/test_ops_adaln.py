"""prdit_fast.ops.adaln: the fused LayerNorm + modulation (+ gated residual, + patch-embedder
LayerNorm and positional encoding) kernel against its plain-torch references, forward and
backward.

The Triton kernel runs on the GPU, or on the CPU under the Triton interpreter (fp32 only
there). fp32 tolerance 2e-5 absolute on unit-scale data (LayerNorm statistics in another
summation order); bf16 output: 1e-2 absolute (one bf16 rounding of values of order 3).
"""
from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

from prdit_fast.ops.adaln import (
    embed_layernorm_modulate,
    embed_layernorm_modulate_reference,
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
)


def _inputs(device, B=2, N=7, H=48, dtype=torch.float32):
    x = (torch.randn(B, N, H, device=device) * 3 + 1).to(dtype)
    mods = torch.randn(B, 5 * H, device=device)  # views of one matrix, as the model passes them
    shift, scale, gate = mods[:, :H], mods[:, H : 2 * H], mods[:, 3 * H : 4 * H]
    branch = torch.randn(B, N, H, device=device).to(dtype)
    return x, gate, branch, shift, scale


@pytest.mark.parametrize("H", [48, 200])  # 200: not a power of two (masked columns)
def test_layernorm_modulate_matches_reference(device, H):
    x, _, _, shift, scale = _inputs(device, H=H)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, shift, scale)]
    y = layernorm_modulate(*leaves, impl="triton")
    y_ref = layernorm_modulate_reference(x, shift, scale)
    assert torch.allclose(y, y_ref, atol=2e-5)
    grad = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, grad)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (x, shift, scale)]
    grads_ref = torch.autograd.grad(layernorm_modulate_reference(*ref_leaves), ref_leaves, grad)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, atol=1e-4)


def test_gated_residual_matches_reference(device):
    inputs = _inputs(device)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    x_new, y = gated_residual_layernorm_modulate(*leaves, eps=1e-6, impl="triton")
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    x_ref, y_ref = gated_residual_layernorm_modulate_reference(*ref_leaves, eps=1e-6)
    assert torch.allclose(x_new, x_ref, atol=1e-6) and torch.allclose(y, y_ref, atol=2e-5)
    # both outputs carry gradient: the residual stream and the next GEMM's input
    gx, gy = torch.randn_like(x_new), torch.randn_like(y)
    grads = torch.autograd.grad((x_new * gx).sum() + (y * gy).sum(), leaves)
    grads_ref = torch.autograd.grad((x_ref * gx).sum() + (y_ref * gy).sum(), ref_leaves)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, atol=1e-4)


def test_torch_impl_is_the_reference():
    x, gate, branch, shift, scale = _inputs("cpu")
    want = layernorm_modulate_reference(x, shift, scale)
    assert torch.equal(layernorm_modulate(x, shift, scale, impl="torch"), want)
    got = gated_residual_layernorm_modulate(x, gate, branch, shift, scale, impl="torch")
    want = gated_residual_layernorm_modulate_reference(x, gate, branch, shift, scale)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_shapes_raise(device):
    x, gate, branch, shift, scale = _inputs(device)
    with pytest.raises(ValueError, match="per-sample modulation"):
        layernorm_modulate(x, shift[:, :10], scale, impl="triton")
    with pytest.raises(ValueError, match="branch must match"):
        gated_residual_layernorm_modulate(x, gate, branch[:, :3], shift, scale, impl="triton")
    with pytest.raises(ValueError, match=r"\(B, N, H\)"):
        layernorm_modulate(x[0], shift, scale, impl="triton")


@requires_cuda
def test_bf16_output_with_fp32_residual_stream():
    x, gate, branch, shift, scale = _inputs("cuda", B=3, N=300, H=768)
    branch = branch.bfloat16()
    x_new, y = gated_residual_layernorm_modulate(x, gate, branch, shift, scale, out_dtype=torch.bfloat16)
    x_ref, y_ref = gated_residual_layernorm_modulate_reference(x, gate, branch, shift, scale, out_dtype=torch.float32)
    assert x_new.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert torch.allclose(x_new, x_ref, atol=1e-5)
    assert (y.float() - y_ref).abs().max() < 1e-2 * y_ref.abs().max()


def _embed_inputs(device, B, N, H, dtype=torch.float32):
    """e, gamma, beta, pos (1, N, H) fp32, shift, scale: the patch embedder's tail as
    FastPRDiT feeds it (shift/scale views of one modulation matrix)."""
    e = (torch.randn(B, N, H, device=device) * 2 - 0.5).to(dtype)
    gamma = torch.rand(H, device=device) + 0.5
    beta = torch.randn(H, device=device) * 0.3
    pos = torch.randn(1, N, H, device=device)
    mods = torch.randn(B, 3 * H, device=device)
    return e, gamma, beta, pos, mods[:, :H], mods[:, H : 2 * H]


# fp32: x to 1e-5 (one LayerNorm, summation order), y to 2e-5 and gradients to 1e-4 as above
@pytest.mark.parametrize("B, N, H", [(1, 5, 48), (3, 64, 200), (3, 5, 200), (1, 64, 48)])
def test_embed_layernorm_modulate_matches_reference(device, B, N, H):
    e, gamma, beta, pos, shift, scale = _embed_inputs(device, B, N, H)
    diff = (e, gamma, beta, shift, scale)  # pos is a buffer: no gradient asked

    def run(fn, leaves):
        e_, gamma_, beta_, shift_, scale_ = leaves
        return fn(e_, gamma_, beta_, 1e-5, pos, shift_, scale_, 1e-6)

    leaves = [t.detach().clone().requires_grad_(True) for t in diff]
    x, y = run(lambda *a: embed_layernorm_modulate(*a, impl="triton"), leaves)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in diff]
    x_ref, y_ref = run(embed_layernorm_modulate_reference, ref_leaves)
    assert x.dtype == torch.float32 and y.dtype == torch.float32 and x.shape == y.shape == (B, N, H)
    assert torch.allclose(x, x_ref, atol=1e-5)
    assert torch.allclose(y, y_ref, atol=2e-5)
    # both outputs carry gradient: the residual stream and the first GEMM's input
    gx, gy = torch.randn_like(x), torch.randn_like(y)
    grads = torch.autograd.grad((x * gx).sum() + (y * gy).sum(), leaves)
    grads_ref = torch.autograd.grad((x_ref * gx).sum() + (y_ref * gy).sum(), ref_leaves)
    for name, g, g_ref in zip(("e", "gamma", "beta", "shift", "scale"), grads, grads_ref):
        assert torch.allclose(g, g_ref, atol=1e-4, rtol=1e-5), name


def test_embed_gradient_through_y_only_and_of_pos(device):
    """y alone feeding the loss (x's gradient None) and a pos that requires grad."""
    e, gamma, beta, pos, shift, scale = _embed_inputs(device, 2, 5, 48)
    pos2d = pos[0].clone().requires_grad_(True)
    e = e.requires_grad_(True)
    _, y = embed_layernorm_modulate(e, gamma, beta, 1e-5, pos2d, shift, scale, impl="triton")
    pos_ref = pos2d.detach().clone().requires_grad_(True)
    e_ref = e.detach().clone().requires_grad_(True)
    _, y_ref = embed_layernorm_modulate_reference(e_ref, gamma, beta, 1e-5, pos_ref, shift, scale)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum(), (e, pos2d))
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), (e_ref, pos_ref))
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, atol=1e-4)


def test_embed_torch_impl_is_the_reference():
    e, gamma, beta, pos, shift, scale = _embed_inputs("cpu", 2, 5, 48)
    got = embed_layernorm_modulate(e, gamma, beta, 1e-5, pos, shift, scale, impl="torch")
    want = embed_layernorm_modulate_reference(e, gamma, beta, 1e-5, pos, shift, scale)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_embed_bad_shapes_raise(device):
    e, gamma, beta, pos, shift, scale = _embed_inputs(device, 2, 5, 48)
    for impl in ("triton", "torch"):
        with pytest.raises(ValueError, match=r"\(B, N, H\)"):
            embed_layernorm_modulate(e[0], gamma, beta, 1e-5, pos, shift, scale, impl=impl)
        with pytest.raises(ValueError, match=r"gamma must have shape \(48,\)"):
            embed_layernorm_modulate(e, gamma[:10], beta, 1e-5, pos, shift, scale, impl=impl)
        with pytest.raises(ValueError, match=r"beta must have shape \(48,\)"):
            embed_layernorm_modulate(e, gamma, beta[None], 1e-5, pos, shift, scale, impl=impl)
        with pytest.raises(ValueError, match=r"pos must have shape \(5, 48\) or \(1, 5, 48\)"):
            embed_layernorm_modulate(e, gamma, beta, 1e-5, pos[:, :4], shift, scale, impl=impl)
    with pytest.raises(ValueError, match="per-sample modulation"):
        embed_layernorm_modulate(e, gamma, beta, 1e-5, pos, shift[:1], scale, impl="triton")


@requires_cuda
def test_embed_bf16_input_and_output():
    """bf16 e (the fc2 GEMM output) and bf16 y: x stays fp32 and matches the fp32 reference
    on the same bf16 e to 1e-5; y within 1e-2 of its largest magnitude (one bf16 rounding);
    bf16 gradients of e within 2e-2 of their largest magnitude."""
    e, gamma, beta, pos, shift, scale = _embed_inputs("cuda", 3, 300, 768, dtype=torch.bfloat16)
    e = e.requires_grad_(True)
    x, y = embed_layernorm_modulate(e, gamma, beta, 1e-5, pos, shift, scale, out_dtype=torch.bfloat16)
    e_ref = e.detach().clone().requires_grad_(True)
    x_ref, y_ref = embed_layernorm_modulate_reference(
        e_ref, gamma, beta, 1e-5, pos, shift, scale, out_dtype=torch.float32
    )
    assert x.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert torch.allclose(x, x_ref, atol=1e-5)
    assert (y.float() - y_ref).abs().max() < 1e-2 * y_ref.abs().max()
    gy = torch.randn_like(y_ref)
    (g,) = torch.autograd.grad((y.float() * gy).sum(), e)
    (g_ref,) = torch.autograd.grad((y_ref * gy).sum(), e_ref)
    assert g.dtype == torch.bfloat16
    assert (g.float() - g_ref.float()).abs().max() < 2e-2 * g_ref.float().abs().max()
