"""The LayerNorm-GEMM kernels (prdit_fast.ops.layernorm_gemm) against torch: row moments,
the normalise-on-load and the epilogue-normalised GEMM, per-sample weights, the folded
LayerNorm affine, the residual epilogue. fp32 under the Triton interpreter on odd M, N, K;
1e-4 of the largest magnitude.
"""
from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICE as DEVICE
from conftest import assert_close_scaled, requires_triton

from prdit_fast.ops.layernorm_gemm import (
    chunk_moments,
    folded_norm_linear,
    layernorm_epilogue_gemm,
    normalize_on_load_gemm,
    tiles_within_samples,
)

pytestmark = requires_triton


def test_per_sample_weights_select_each_tiles_sample():
    """layernorm_epilogue_gemm with (B, N, K) weights and (B, N) biases, no LayerNorm: row r uses
    sample r // tokens_per_sample's weights (fp32, exact up to summation order)."""
    B, T, N, K = 3, 128, 40, 72
    if not tiles_within_samples(T, torch.float32):
        pytest.skip("the GPU's fp32 tiles are larger than this token count")
    a = torch.randn(B * T, K, device=DEVICE)
    w, bias = torch.randn(B, N, K, device=DEVICE), torch.randn(B, N, device=DEVICE)
    out, _ = layernorm_epilogue_gemm(a, w, bias, tokens_per_sample=T)
    expected = torch.einsum("btk,bnk->btn", a.view(B, T, K), w) + bias[:, None, :]
    assert_close_scaled(out.view(B, T, N), expected)


def test_folded_norm_linear_batches_samples():
    """One launch folds B (gamma, beta) rows: W * gamma_b, b + W beta_b, rowsum(W * gamma_b)."""
    N, K, B = 40, 200, 3
    w, b = torch.randn(N, K, device=DEVICE), torch.randn(N, device=DEVICE)
    gamma, beta = 1.0 + 0.5 * torch.randn(B, K, device=DEVICE), torch.randn(B, K, device=DEVICE)
    folded_w, folded_b, colsum = folded_norm_linear(w, b, gamma, beta)
    assert folded_w.shape == (B, N, K) and folded_b.shape == colsum.shape == (B, N)
    torch.testing.assert_close(folded_w, w * gamma[:, None, :])
    torch.testing.assert_close(folded_b, b + beta @ w.t(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(colsum, (w * gamma[:, None, :]).sum(2), rtol=1e-5, atol=1e-4)
    single_w, single_b, single_colsum = folded_norm_linear(w, b, gamma[1], beta[1])
    assert single_w.shape == (N, K)
    torch.testing.assert_close(single_w, folded_w[1])
    torch.testing.assert_close(single_b, folded_b[1])
    torch.testing.assert_close(single_colsum, colsum[1])
    with pytest.raises(ValueError, match="gamma and beta"):
        folded_norm_linear(w, b, gamma, beta[:, :10])


def test_chunk_moments_merge_to_row_mean_and_var():
    x = 100.0 + torch.randn(37, 200, device=DEVICE)
    stats = chunk_moments(x)
    assert stats.shape == (2, 37, 4)
    counts = torch.tensor([64, 64, 64, 8], device=DEVICE, dtype=torch.float32)
    mean = (stats[0] * counts).sum(1) / 200
    m2 = (stats[1] + counts * (stats[0] - mean[:, None]) ** 2).sum(1)
    torch.testing.assert_close(mean, x.double().mean(1).float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(m2 / 200, x.double().var(1, unbiased=False).float(), rtol=1e-4, atol=1e-6)


def test_out_residual_is_added_in_the_epilogue():
    M, K, N = 70, 96, 40  # partial row and column tiles
    a, weight, bias = (torch.randn(M, K, device=DEVICE), torch.randn(N, K, device=DEVICE) / K**0.5,
                       torch.randn(N, device=DEVICE))
    residual = torch.randn(M, N, device=DEVICE)
    out, _ = layernorm_epilogue_gemm(a, weight, bias, out_residual=residual)
    assert_close_scaled(out, a @ weight.t() + bias + residual)
    with pytest.raises(ValueError, match="needs stats and colsum"):
        layernorm_epilogue_gemm(a, weight, bias, stats=chunk_moments(a), out_residual=residual)
    with pytest.raises(ValueError, match="output's shape"):
        layernorm_epilogue_gemm(a, weight, bias, out_residual=residual[:, :8])


def test_both_gemm_kernels_normalise_rows_like_layer_norm():
    """The two kernels on the same LN(a) W^T + b: on load (with a shared and a per-sample
    modulation) and in the epilogue (with colsum), against torch; odd M, N and K."""
    M, K, N, T = 70, 100, 40, 35
    a = 3.0 + torch.randn(M, K, device=DEVICE)  # rows with a mean far from zero
    weight, bias = torch.randn(N, K, device=DEVICE) / K**0.5, torch.randn(N, device=DEVICE)
    stats = chunk_moments(a)
    normed = torch.nn.functional.layer_norm(a, (K,), eps=1e-6)
    out, _ = layernorm_epilogue_gemm(a, weight, bias, stats=stats, eps=1e-6, colsum=weight.sum(1))
    assert_close_scaled(out, normed @ weight.t() + bias)
    scale, shift = torch.randn(K, device=DEVICE), torch.randn(K, device=DEVICE)
    out, _ = normalize_on_load_gemm(a, weight, bias, stats=stats, eps=1e-6, scale=scale, shift=shift)
    assert_close_scaled(out, (normed * scale + shift) @ weight.t() + bias)
    scale, shift = torch.randn(2, K, device=DEVICE), torch.randn(2, K, device=DEVICE)
    out, _ = normalize_on_load_gemm(a, weight, bias, stats=stats, eps=1e-6, scale=scale, shift=shift,
                                    tokens_per_sample=T)
    modulated = normed.view(2, T, K) * scale[:, None] + shift[:, None]
    assert_close_scaled(out, (modulated @ weight.t()).view(M, N) + bias)
