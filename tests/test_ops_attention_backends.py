"""prdit_fast.ops.attention_backends: every backend that runs here against the math backend, and the
math backend against the reference ``models.Attention`` computation.

Tolerances: fp32 math vs models.Attention 1e-5 absolute (same operations, other
einsum order); bf16 GPU backends vs fp32 math: 2e-2 absolute on outputs of unit scale,
gradients 3e-2 relative RMS.
"""
from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

from prdit_fast.models import Attention
from prdit_fast.ops.attention_backends import ATTENTION_BACKENDS, attention, available_backends, last_backend


def test_math_matches_reference_attention_module():
    B, N, hidden, heads = 2, 37, 48, 4
    module = Attention(hidden, heads)
    x = torch.randn(B, N, hidden)
    qkv = module.qkv(x).reshape(B, N, 3, heads, hidden // heads)
    ours = module.proj(attention(qkv, backend="math").reshape(B, N, hidden))
    assert torch.allclose(ours, module(x), atol=1e-5)


def test_math_gradient_matches_reference_module():
    B, N, hidden, heads = 1, 9, 24, 2
    module = Attention(hidden, heads)
    x = torch.randn(B, N, hidden, requires_grad=True)
    (g_ref,) = torch.autograd.grad(module(x).square().sum(), x)
    qkv = module.qkv(x).reshape(B, N, 3, heads, hidden // heads)
    out = module.proj(attention(qkv, backend="math").reshape(B, N, hidden))
    (g_ours,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)


def test_auto_on_cpu_is_math():
    assert available_backends("cpu") == ["math"]
    qkv = torch.randn(1, 5, 3, 2, 8)
    out = attention(qkv)
    assert last_backend() == "math"
    assert out.shape == (1, 5, 2, 8) and torch.equal(out, attention(qkv, "math"))


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"\(B, N, 3, H, D\)"):
        attention(torch.randn(2, 5, 4, 8))
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(torch.randn(1, 5, 3, 2, 8), backend="fast")
    with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
        attention(torch.zeros(1, 5, 3, 2, 8, dtype=torch.int32))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cannot run"):
            attention(torch.randn(1, 5, 3, 2, 8), backend="sdpa_flash")


def _gpu_backends() -> list[str]:
    return [b for b in ATTENTION_BACKENDS if b != "math"]


@requires_cuda
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_backend_matches_math_bf16(backend):
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} is not available on this machine")
    B, N, H, D = 2, 300, 12, 64  # N not a multiple of the tile sizes
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref_in = qkv.detach().float().requires_grad_(True)
    out = attention(qkv, backend=backend)
    assert last_backend() == backend and out.shape == (B, N, H, D) and out.dtype == torch.bfloat16
    ref = attention(ref_in, backend="math")
    assert (out.float() - ref).abs().max() < 2e-2
    grad_out = torch.randn_like(ref)
    (g,) = torch.autograd.grad(out.float(), qkv, grad_out)
    (g_ref,) = torch.autograd.grad(ref, ref_in, grad_out)
    assert ((g.float() - g_ref).pow(2).mean().sqrt() / g_ref.pow(2).mean().sqrt()) < 3e-2


@requires_cuda
def test_gpu_auto_picks_a_fast_backend():
    qkv = torch.randn(2, 256, 3, 12, 64, device="cuda", dtype=torch.bfloat16)
    out = attention(qkv)
    assert last_backend() in available_backends("cuda")
    assert last_backend() != "math", f"auto fell back to math; available: {available_backends('cuda')}"
    assert (out.float() - attention(qkv.float(), "math")).abs().max() < 2e-2
