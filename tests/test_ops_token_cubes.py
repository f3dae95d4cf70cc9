"""unpatchify (prdit_fast.ops.token_cubes) against models.unpatchify(tokens + residual).

Without a residual the op is a copy, so every comparison is exact; with one, the kernel
sums in fp32 and rounds once, which for fp32 tokens is exactly torch's fp32 ``a + b``.
"""
from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from prdit_fast import models
from prdit_fast.ops.token_cubes import unpatchify

STRIDE = 8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(1, 16, 2), (3, 24, 2), (2, 16, 4)]  # (B, S, Cout)


def _tokens(B: int, S: int, channels: int, dtype=torch.float32, requires_grad=False) -> torch.Tensor:
    t = torch.randn(B, (S // STRIDE) ** 3, STRIDE**3 * channels, device=DEVICE).to(dtype)
    return t.requires_grad_(requires_grad)


@pytest.mark.parametrize("B,S,channels", CASES)
def test_unpatchify_with_residual_equals_reference_of_sum(B, S, channels):
    a, b = _tokens(B, S, channels), _tokens(B, S, channels)
    got = unpatchify(a, S, STRIDE, channels, residual=b, impl="triton")
    assert got.shape == (B, channels, S, S, S) and got.dtype == torch.float32
    assert torch.equal(got, models.unpatchify(a + b, S, STRIDE, channels))
    assert torch.equal(unpatchify(a, S, STRIDE, channels, impl="triton"), models.unpatchify(a, S, STRIDE, channels))


def test_non_contiguous_tokens():
    a = _tokens(2, 16, 2)
    view = a.transpose(0, 1).contiguous().transpose(0, 1)  # same values, batch-minor strides
    assert not view.is_contiguous()
    assert torch.equal(unpatchify(view, 16, STRIDE, 2, impl="triton"), models.unpatchify(a, 16, STRIDE, 2))


def test_gradients_reach_both_token_tensors():
    B, S, channels = 2, 16, 2
    a, b = _tokens(B, S, channels, requires_grad=True), _tokens(B, S, channels, requires_grad=True)
    grad = torch.randn(B, channels, S, S, S, device=DEVICE)
    got = torch.autograd.grad(unpatchify(a, S, STRIDE, channels, residual=b, impl="triton"), (a, b), grad)
    want = torch.autograd.grad(models.unpatchify(a + b, S, STRIDE, channels), (a, b), grad)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_gradient_only_where_required_and_in_each_dtype():
    B, S, channels = 1, 16, 2
    a = _tokens(B, S, channels, requires_grad=True)
    b = _tokens(B, S, channels, dtype=torch.float16)  # no grad wanted
    out = unpatchify(a, S, STRIDE, channels, residual=b, impl="triton")
    assert out.dtype == torch.float32  # promoted
    grad = torch.randn_like(out)
    (ga,) = torch.autograd.grad(out, a, grad)
    assert ga.dtype == torch.float32
    assert torch.equal(ga, torch.autograd.grad(models.unpatchify(a + b.float(), S, STRIDE, channels), a, grad)[0])


def test_torch_impl_and_errors():
    a, b = _tokens(1, 16, 2), _tokens(1, 16, 2)
    got = unpatchify(a, 16, STRIDE, 2, residual=b, impl="torch")
    assert torch.equal(got, models.unpatchify(a + b, 16, STRIDE, 2))
    with pytest.raises(ValueError, match="expects tokens"):
        unpatchify(a, 24, STRIDE, 2)
    with pytest.raises(ValueError, match="expects tokens"):
        unpatchify(a, 16, STRIDE, 4)
    with pytest.raises(ValueError, match="residual"):
        unpatchify(a, 16, STRIDE, 2, residual=b[:, :4])
    with pytest.raises(ValueError, match="multiple of stride"):
        unpatchify(a, 20, STRIDE, 2)


@requires_cuda
def test_bf16_tokens_sum_in_fp32_then_round_once():
    B, S, channels = 2, 64, 2
    a, b = _tokens(B, S, channels, torch.bfloat16), _tokens(B, S, channels, torch.bfloat16)
    for out_dtype in (torch.bfloat16, torch.float32):
        got = unpatchify(a, S, STRIDE, channels, residual=b, out_dtype=out_dtype, impl="triton")
        want = models.unpatchify((a.float() + b.float()).to(out_dtype), S, STRIDE, channels)
        assert got.dtype == out_dtype and torch.equal(got, want)


@requires_cuda
def test_full_size_on_gpu():
    a, b = _tokens(2, 128, 2), _tokens(2, 128, 2)
    got = unpatchify(a, 128, STRIDE, 2, residual=b, impl="triton")
    assert torch.equal(got, models.unpatchify(a + b, 128, STRIDE, 2))
