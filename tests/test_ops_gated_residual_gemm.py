"""prdit_fast.ops.gated_residual_gemm: the GEMM with the adaLN gate and the residual in its
epilogue against the plain-torch reference, forward and backward.

Tolerances: fp32 under the interpreter (IEEE dots), relative RMS error below 1e-5 on the
output and every gradient (summation order only); bf16 on a GPU (skipped without one),
2e-2 relative RMS on the output against the fp32 reference on the same bf16-rounded inputs.
"""
from __future__ import annotations

import pytest
import torch
from conftest import rel_rms, requires_cuda

from prdit_fast.ops.gated_residual_gemm import gated_residual_linear, gated_residual_linear_reference

TOLERANCE = 1e-5


def _inputs(B, T, K, N, device, dtype=torch.float32):
    a = torch.randn(B, T, K, device=device, dtype=dtype)
    weight = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    gate = torch.randn(B, N, device=device)
    residual = torch.randn(B, T, N, device=device)
    return a, weight, bias, gate, residual


@pytest.mark.parametrize("B, T, K, N", [(1, 1, 16, 8), (2, 37, 48, 40), (3, 5, 33, 70)])
def test_forward_and_backward_match_the_reference(B, T, K, N, device):
    inputs = _inputs(B, T, K, N, device)
    grad_out = torch.randn(B, T, N, device=device)
    results = []
    for fn in (lambda *x: gated_residual_linear(*x, impl="triton"), gated_residual_linear_reference):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    ours, ref = results
    assert ours[0].dtype == torch.float32 and ours[0].shape == (B, T, N)
    for name, o, r in zip(("out", "a", "weight", "bias", "gate", "residual"), ours, ref):
        assert rel_rms(o, r) < TOLERANCE, name


def test_every_row_is_written_and_samples_get_their_own_gate(device):
    # gate 0 for sample 0, 1 for sample 1: sample 0's rows are exactly the residual
    a, weight, bias, gate, residual = _inputs(2, 19, 32, 24, device)
    gate = torch.stack([torch.zeros(24, device=device), torch.ones(24, device=device)])
    out = gated_residual_linear(a, weight, bias, gate, residual, impl="triton")
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], residual[0])
    assert rel_rms(out[1], residual[1] + torch.nn.functional.linear(a[1], weight, bias)) < TOLERANCE


def test_bad_input_says_what_is_expected():
    a, weight, bias, gate, residual = _inputs(2, 3, 8, 4, "cpu")
    with pytest.raises(ValueError, match="same K"):
        gated_residual_linear(a, weight[:, :5], bias, gate, residual)
    with pytest.raises(ValueError, match=r"gate \(2, 4\)"):
        gated_residual_linear(a, weight, bias, gate[:1], residual)
    with pytest.raises(ValueError, match="must be fp32"):
        gated_residual_linear(a, weight, bias, gate.half(), residual)


@requires_cuda
def test_bf16_on_gpu():
    a, weight, bias, gate, residual = _inputs(4, 4096, 768, 768, "cuda", torch.bfloat16)
    out = gated_residual_linear(a, weight, bias, gate, residual, impl="triton")
    ref = gated_residual_linear_reference(a.float(), weight.float(), bias.float(), gate, residual)
    assert rel_rms(out, ref) < 2e-2
