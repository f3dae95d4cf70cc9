"""prdit_fast.ops.adaln: the fused LayerNorm + modulation (+ gated residual) kernel against
its plain-torch reference, forward and backward.

The Triton kernel runs on the GPU, or on the CPU under the Triton interpreter (fp32 only
there). fp32 tolerance 2e-5 absolute on unit-scale data (LayerNorm statistics in another
summation order); bf16 output: 1e-2 absolute (one bf16 rounding of values of order 3).
"""
from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

from prdit_fast.ops.adaln import (
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
    y = layernorm_modulate(*leaves, backend="triton")
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
    x_new, y = gated_residual_layernorm_modulate(*leaves, eps=1e-6, backend="triton")
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    x_ref, y_ref = gated_residual_layernorm_modulate_reference(*ref_leaves, eps=1e-6)
    assert torch.allclose(x_new, x_ref, atol=1e-6) and torch.allclose(y, y_ref, atol=2e-5)
    # both outputs carry gradient: the residual stream and the next GEMM's input
    gx, gy = torch.randn_like(x_new), torch.randn_like(y)
    grads = torch.autograd.grad((x_new * gx).sum() + (y * gy).sum(), leaves)
    grads_ref = torch.autograd.grad((x_ref * gx).sum() + (y_ref * gy).sum(), ref_leaves)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, atol=1e-4)


def test_torch_backend_is_the_reference():
    x, gate, branch, shift, scale = _inputs("cpu")
    want = layernorm_modulate_reference(x, shift, scale)
    assert torch.equal(layernorm_modulate(x, shift, scale, backend="torch"), want)
    got = gated_residual_layernorm_modulate(x, gate, branch, shift, scale, backend="torch")
    want = gated_residual_layernorm_modulate_reference(x, gate, branch, shift, scale)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_shapes_raise(device):
    x, gate, branch, shift, scale = _inputs(device)
    with pytest.raises(ValueError, match="per-sample modulation"):
        layernorm_modulate(x, shift[:, :10], scale, backend="triton")
    with pytest.raises(ValueError, match="branch must match"):
        gated_residual_layernorm_modulate(x, gate, branch[:, :3], shift, scale, backend="triton")
    with pytest.raises(ValueError, match=r"\(B, N, H\)"):
        layernorm_modulate(x[0], shift, scale, backend="triton")


@requires_cuda
def test_bf16_output_with_fp32_residual_stream():
    x, gate, branch, shift, scale = _inputs("cuda", B=3, N=300, H=768)
    branch = branch.bfloat16()
    x_new, y = gated_residual_layernorm_modulate(x, gate, branch, shift, scale, out_dtype=torch.bfloat16)
    x_ref, y_ref = gated_residual_layernorm_modulate_reference(x, gate, branch, shift, scale, out_dtype=torch.float32)
    assert x_new.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert torch.allclose(x_new, x_ref, atol=1e-5)
    assert (y.float() - y_ref).abs().max() < 1e-2 * y_ref.abs().max()
