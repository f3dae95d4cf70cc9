"""unfold3d / fold3d (prdit_fast.ops.unfold) against models.unfold3d and its autograd.

CPU runs use the Triton interpreter (fp32, tiny volumes); bf16 / fp16 and a full-size
check need a GPU. Tolerances: unfold is a copy, so exact in every dtype; fold sums in fp32,
so fp32 results agree with the reference to 1e-5 absolute (values are sums of <= 27
standard normals; only the summation order differs); bf16 fold is that fp32 sum rounded
once, within one bf16 ulp (rtol 2^-7) of the reference's fp32 sum rounded once.
"""
from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from prdit_fast import models
from prdit_fast.ops.unfold import fold3d, fold3d_reference, unfold3d

STRIDE = 8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, C, S, p): every S in {16, 24, 40}, p in {10, 12, 16}, B in {1, 3}, C in {1, 2} at least once
CASES = [(1, 1, 16, 12), (3, 2, 16, 10), (1, 2, 24, 16), (3, 1, 24, 12), (1, 1, 40, 10)]
IDS = [f"B{b}-C{c}-S{s}-p{p}" for b, c, s, p in CASES]


def _pad(patch: int) -> int:
    return (patch - STRIDE) // 2


def _autograd_fold(tokens: torch.Tensor, size, patch: int) -> torch.Tensor:
    """The adjoint of the reference unfold, by autograd."""
    B, C = tokens.shape[0], tokens.shape[2] // patch**3
    x = torch.zeros((B, C, *size), dtype=tokens.dtype, device=tokens.device, requires_grad=True)
    (grad,) = torch.autograd.grad(models.unfold3d(x, patch, STRIDE, _pad(patch)), x, tokens)
    return grad


@pytest.mark.parametrize("B,C,S,p", CASES, ids=IDS)
def test_unfold_equals_reference(B, C, S, p):
    x = torch.randn(B, C, S, S, S, device=DEVICE)
    got = unfold3d(x, p, STRIDE, _pad(p), impl="triton")
    assert got.shape == (B, (S // STRIDE) ** 3, C * p**3) and got.dtype == x.dtype
    assert torch.equal(got, models.unfold3d(x, p, STRIDE, _pad(p)))


def test_unfold_non_contiguous_and_non_cubic():
    # a channels-last-like view with a sliced width: every stride differs from the contiguous one
    base = torch.randn(2, 16, 24, 40, 3, device=DEVICE)
    x = base[..., :32, 1:].permute(0, 4, 1, 2, 3)
    assert not x.is_contiguous() and x.shape == (2, 2, 16, 24, 32)
    got = unfold3d(x, 12, STRIDE, 2, impl="triton")
    assert torch.equal(got, models.unfold3d(x.contiguous(), 12, STRIDE, 2))


def assert_adjoint_identity(x: torch.Tensor, y: torch.Tensor, folded_y: torch.Tensor, p: int) -> None:
    """<unfold(x), y> = <x, fold(y)>, the unfold from the fp32 kernel, compared in fp64."""
    windows = unfold3d(x, p, STRIDE, _pad(p), impl="triton").double()
    lhs = (windows * y.double()).sum()
    rhs = (x.double() * folded_y.double()).sum()
    # only the fp32 rounding of the fold's sums (<= 27 terms) separates the two sides
    scale = (windows.abs() * y.double().abs()).sum()
    assert abs(lhs - rhs) <= 1e-6 * scale


@pytest.mark.parametrize("B,C,S,p", CASES[:3], ids=IDS[:3])
def test_fold_is_the_autograd_adjoint_of_reference_unfold(B, C, S, p):
    """The fold kernel against autograd's adjoint of the reference unfold, and (the same
    fold's output) the adjoint identity with the unfold kernel."""
    tokens = torch.randn(B, (S // STRIDE) ** 3, C * p**3, device=DEVICE)
    expected = _autograd_fold(tokens, (S, S, S), p)
    folded = fold3d(tokens, S, p, STRIDE, _pad(p), impl="triton")
    torch.testing.assert_close(folded, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(fold3d_reference(tokens, S, p, STRIDE, _pad(p)), expected, rtol=0, atol=1e-5)
    assert_adjoint_identity(torch.randn(B, C, S, S, S, device=DEVICE), tokens, folded, p)


def test_fold_non_cubic_matches_autograd():
    size = (16, 24, 8)
    tokens = torch.randn(2, 2 * 3 * 1, 16**3, device=DEVICE)
    got = fold3d(tokens, size, 16, STRIDE, 4, impl="triton")
    torch.testing.assert_close(got, _autograd_fold(tokens, size, 16), rtol=0, atol=1e-5)


def test_adjoint_identity():
    """<unfold(x), y> = <x, fold(y)>, both sides from the fp32 kernels, at the case the
    test above does not run (S 40); it checks the identity at the others."""
    B, C, S, p = CASES[4]
    y = torch.randn(B, (S // STRIDE) ** 3, C * p**3, device=DEVICE)
    folded = fold3d(y, S, p, STRIDE, _pad(p), impl="triton")
    assert_adjoint_identity(torch.randn(B, C, S, S, S, device=DEVICE), y, folded, p)


@pytest.mark.parametrize("B,C,S,p", [CASES[0], CASES[2], CASES[4]], ids=[IDS[0], IDS[2], IDS[4]])
def test_fold_mean_reconstructs(B, C, S, p):
    x = torch.randn(B, C, S, S, S, device=DEVICE)
    tokens = unfold3d(x, p, STRIDE, _pad(p), impl="triton")
    torch.testing.assert_close(fold3d(tokens, S, p, STRIDE, _pad(p), "mean", impl="triton"), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(fold3d_reference(tokens, S, p, STRIDE, _pad(p), "mean"), x, rtol=0, atol=1e-6)


def test_unfold_gradient_matches_reference():
    """unfold's backward is the fold kernel (checked at every case above): here the autograd
    wiring, at batch 2 and one channel."""
    B, C, S, p = 2, 1, 16, 12
    x = torch.randn(B, C, S, S, S, device=DEVICE, requires_grad=True)
    grad_tokens = torch.randn(B, (S // STRIDE) ** 3, C * p**3, device=DEVICE)
    (got,) = torch.autograd.grad(unfold3d(x, p, STRIDE, _pad(p), impl="triton"), x, grad_tokens)
    (want,) = torch.autograd.grad(models.unfold3d(x, p, STRIDE, _pad(p)), x, grad_tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_fold_gradient_matches_reference(reduce):
    B, C, S, p = 2, 1, 24, 12
    tokens = torch.randn(B, (S // STRIDE) ** 3, C * p**3, device=DEVICE, requires_grad=True)
    grad_volume = torch.randn(B, C, S, S, S, device=DEVICE)
    (got,) = torch.autograd.grad(fold3d(tokens, S, p, STRIDE, 2, reduce, impl="triton"), tokens, grad_volume)
    (want,) = torch.autograd.grad(fold3d_reference(tokens, S, p, STRIDE, 2, reduce), tokens, grad_volume)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_second_order_gradient_through_unfold():
    """backward(unfold) is fold and backward(fold) is unfold, so a double backward works."""
    S, p = 16, 12
    x = torch.randn(1, 1, S, S, S, device=DEVICE, requires_grad=True)
    w = torch.randn(1, 8, p**3, device=DEVICE, requires_grad=True)

    def second(unfold):
        (g,) = torch.autograd.grad((unfold(x, p, STRIDE, 2) * w).sum(), x, create_graph=True)
        return torch.autograd.grad((g * g).sum(), w)[0]

    torch.testing.assert_close(
        second(lambda *a: unfold3d(*a, impl="triton")), second(models.unfold3d), rtol=1e-5, atol=1e-5
    )


def test_out_dtype_casts_on_the_store_and_gradients_keep_input_dtypes():
    x = torch.randn(2, 1, 16, 16, 16, device=DEVICE, requires_grad=True)
    tokens = unfold3d(x, 12, STRIDE, 2, out_dtype=torch.float16, impl="triton")
    assert tokens.dtype == torch.float16
    assert torch.equal(tokens, models.unfold3d(x, 12, STRIDE, 2).half())
    grad_tokens = torch.randn_like(tokens)
    (grad,) = torch.autograd.grad(tokens, x, grad_tokens)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, _autograd_fold(grad_tokens.float(), (16, 16, 16), 12), rtol=0, atol=1e-5)
    # fp16 tokens folded straight to an fp32 volume: no fp16 rounding of the sums
    summed = fold3d(grad_tokens, 16, 12, STRIDE, 2, out_dtype=torch.float32, impl="triton")
    assert summed.dtype == torch.float32
    torch.testing.assert_close(summed, fold3d_reference(grad_tokens.float(), 16, 12, STRIDE, 2), rtol=0, atol=1e-5)


def test_torch_impl_is_the_reference():
    x = torch.randn(1, 1, 16, 16, 16, device=DEVICE)
    assert torch.equal(unfold3d(x, 12, STRIDE, 2, impl="torch"), models.unfold3d(x, 12, STRIDE, 2))
    y = torch.randn(1, 8, 12**3, device=DEVICE)
    # the same scatter-add twice; on a GPU its atomics add in no fixed order
    torch.testing.assert_close(fold3d(y, 16, 12, STRIDE, 2, impl="torch"), fold3d_reference(y, 16, 12, STRIDE, 2),
                               rtol=1e-6, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="2\\*pad"):
        unfold3d(x, 12, STRIDE, 3)
    with pytest.raises(ValueError, match="multiple of stride"):
        unfold3d(torch.randn(1, 1, 20, 16, 16), 12, STRIDE, 2)
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        unfold3d(torch.randn(16, 16, 16), 12, STRIDE, 2)
    with pytest.raises(ValueError, match="impl"):
        unfold3d(x, 12, STRIDE, 2, impl="cuda")
    with pytest.raises(ValueError, match="dtype"):
        unfold3d(x.double(), 12, STRIDE, 2, impl="triton")
    with pytest.raises(ValueError, match="expects tokens"):
        fold3d(torch.randn(1, 7, 12**3), 16, 12, STRIDE, 2)
    with pytest.raises(ValueError, match="reduce"):
        fold3d(torch.randn(1, 8, 12**3), 16, 12, STRIDE, 2, reduce="max")
    # fp64 has no kernel: "auto" quietly uses the reference
    assert torch.equal(unfold3d(x.double(), 12, STRIDE, 2), models.unfold3d(x.double(), 12, STRIDE, 2))


# --------------------------------------------------------------------------- GPU
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unfold_half_precision_is_exact(dtype):
    x = torch.randn(2, 1, 64, 64, 64, device="cuda").to(dtype)
    assert torch.equal(unfold3d(x, 12, STRIDE, 2, impl="triton"), models.unfold3d(x, 12, STRIDE, 2))


@requires_cuda
def test_fold_bf16_rounds_the_fp32_sum_once():
    tokens = torch.randn(2, 8**3, 12**3, device="cuda").to(torch.bfloat16)
    got = fold3d(tokens, 64, 12, STRIDE, 2, impl="triton")
    want = fold3d_reference(tokens.float(), 64, 12, STRIDE, 2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("S,p", [(128, 12), (64, 16), (64, 10)])
def test_full_size_fp32_on_gpu(S, p):
    x = torch.randn(2, 1, S, S, S, device="cuda")
    tokens = unfold3d(x, p, STRIDE, _pad(p), impl="triton")
    assert torch.equal(tokens, models.unfold3d(x, p, STRIDE, _pad(p)))
    torch.testing.assert_close(
        fold3d(tokens, S, p, STRIDE, _pad(p), impl="triton"), _autograd_fold(tokens, (S, S, S), p), rtol=0, atol=1e-4
    )
    torch.testing.assert_close(fold3d(tokens, S, p, STRIDE, _pad(p), "mean", impl="triton"), x, rtol=0, atol=1e-5)


def test_fold_with_more_overlap_than_the_kernel_unrolls_uses_the_reference():
    # p = 24 at stride 8: up to 4 windows overlap a voxel along w, one more than the kernel
    # unrolls; "auto" takes the reference, "triton" says why it cannot
    tokens = torch.randn(1, 8, 24**3, device=DEVICE)
    torch.testing.assert_close(fold3d(tokens, 16, 24, STRIDE, 8), _autograd_fold(tokens, (16, 16, 16), 24),
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="windows overlap along the width"):
        fold3d(tokens, 16, 24, STRIDE, 8, impl="triton")
