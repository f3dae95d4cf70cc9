"""prdit_fast.ops.fp8_linear: the e4m3 quantization against a from-first-principles
rounding in float64, the scales, the dequantized-matmul reference, and the GPU path
(``torch._scaled_mm``) against that reference where a GPU with FP8 tensor cores exists.

Tolerances: quantization is exact (q equals round-to-nearest-even onto the e4m3 grid of
x / scale, computed independently in float64); dequantized elements lie within half a
grid step (|x| 2^-4 for normals, scale 2^-10 for subnormals). The FP8 matmul against
fp32 on unit-scale Gaussian data: relative RMS error below 6e-2 (measured ~3.5e-2 per row;
a product of two e4m3 roundings). The GPU path against the reference on the same
quantized operands: relative RMS below 1e-2 (bf16 output rounding and accumulation order).
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_rms

from prdit_fast.ops.dispatch import ImplUnavailable
from prdit_fast.ops.fp8_linear import (
    E4M3,
    E4M3_MAX,
    dequantize_e4m3,
    fp8_linear,
    fp8_linear_reference,
    fp8_unsupported,
    quantize_e4m3,
)

E4M3_MIN_EXPONENT = -6  # smallest normal 2^-6; subnormal spacing 2^-9
MANTISSA_BITS = 3


def e4m3_round_float64(v: torch.Tensor) -> torch.Tensor:
    """Round float64 values (|v| <= 448) to the nearest e4m3 value, ties to even, from the
    format's definition (no torch float8 cast)."""
    mag = v.abs()
    exponent = torch.floor(torch.log2(mag.clamp_min(1e-300))).clamp_min(E4M3_MIN_EXPONENT)
    spacing = torch.pow(2.0, exponent - MANTISSA_BITS)
    return torch.round(v / spacing) * spacing  # torch.round: half to even


@pytest.mark.parametrize("shape, block", [((7, 48), None), ((3, 5, 64), None), ((9, 256), 128), ((2, 96), 32)])
def test_quantization_matches_the_format_definition(shape, block):
    x = torch.randn(shape, dtype=torch.float64) * torch.logspace(-3, 2, shape[-1], dtype=torch.float64)
    q, scale = quantize_e4m3(x, block)
    groups = 1 if block is None else shape[-1] // block
    assert q.dtype == E4M3 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], groups)
    per_group = x.float().unflatten(-1, (groups, -1))
    assert torch.equal(scale, per_group.abs().amax(-1) / E4M3_MAX)
    expected = e4m3_round_float64((per_group / scale.unsqueeze(-1)).double()).flatten(-2)
    assert torch.equal(q.double(), expected)
    # the largest element of each row / block lands on +-448: the range is used, nothing saturates
    assert torch.equal(q.float().unflatten(-1, (groups, -1)).abs().amax(-1), torch.full(scale.shape, E4M3_MAX))
    back = dequantize_e4m3(q, scale, block).double()
    half_step = x.abs() * 2.0**-4 + (scale.repeat_interleave(shape[-1] // groups, -1).double() * 2.0**-10)
    assert (back - x).abs().le(half_step * (1 + 1e-6)).all()


def test_zero_rows_quantize_to_zero():
    x = torch.zeros(3, 32)
    x[1] = torch.randn(32)
    q, scale = quantize_e4m3(x)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(dequantize_e4m3(q, scale)[0], torch.zeros(32))


def test_block_scales_keep_an_outlier_from_flattening_its_row():
    x = torch.randn(4, 256)
    x[:, 0] = 1e6  # one outlier per row: under a per-row scale the rest falls below e4m3's subnormals
    row_err = rel_rms(dequantize_e4m3(*quantize_e4m3(x))[:, 128:], x[:, 128:])
    block_err = rel_rms(dequantize_e4m3(*quantize_e4m3(x, 128), 128)[:, 128:], x[:, 128:])
    assert block_err < 0.1 * row_err


@pytest.mark.parametrize("rows, k, n, block", [(37, 64, 48, None), (5, 256, 33, 128)])
def test_reference_matmul_is_close_to_fp32(rows, k, n, block):
    x, w, b = torch.randn(rows, k), torch.randn(n, k) / math.sqrt(k), torch.randn(n)
    out = fp8_linear_reference(x, w, b, block)
    assert out.dtype == x.dtype and out.shape == (rows, n)
    assert rel_rms(out, torch.nn.functional.linear(x, w, b)) < 6e-2


def test_torch_impl_is_the_reference_on_cached_weights():
    x, w, b = torch.randn(2, 19, 64), torch.randn(40, 64), torch.randn(40)
    w_q, w_scale = quantize_e4m3(w)
    out = fp8_linear(x, w_q, w_scale, b, out_dtype=torch.float32, impl="torch")
    assert out.shape == (2, 19, 40)
    assert rel_rms(out, fp8_linear_reference(x, w, b)) < 1e-6


def test_clear_errors():
    w_q, w_scale = quantize_e4m3(torch.randn(16, 32))
    if fp8_unsupported("cpu") is not None:
        with pytest.raises(ImplUnavailable, match=r"fp8_linear: impl='gemm' cannot run: FP8 GEMMs need an NVIDIA GPU"):
            fp8_linear(torch.randn(4, 32), w_q, w_scale, impl="gemm")
    with pytest.raises(ValueError, match="positive divisor"):
        quantize_e4m3(torch.randn(4, 48), block=32)
    with pytest.raises(ValueError, match="float8_e4m3fn with weight_scale"):
        fp8_linear(torch.randn(4, 32), torch.randn(16, 32), w_scale, impl="torch")
    with pytest.raises(ValueError, match="width 31"):
        fp8_linear(torch.randn(4, 31), w_q, w_scale, impl="torch")
    with pytest.raises(RuntimeError, match="inference only"):
        fp8_linear(torch.randn(4, 32, requires_grad=True), w_q, w_scale, impl="torch")


def _fp8_device() -> str | None:
    return None if not torch.cuda.is_available() or fp8_unsupported("cuda") else "cuda"


@pytest.mark.skipif(_fp8_device() is None, reason="needs a GPU with FP8 tensor cores (sm_89+)")
@pytest.mark.parametrize("rows, k, n", [(37, 1728, 1024), (4096, 768, 2304)])
def test_scaled_mm_matches_the_reference_on_gpu(rows, k, n):
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") / math.sqrt(k)
    b = torch.randn(n, device="cuda")
    w_q, w_scale = quantize_e4m3(w)
    with torch.no_grad():
        out = fp8_linear(x, w_q, w_scale, b)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_rms(out, fp8_linear_reference(x.float(), w, b)) < 1e-2


def test_fast_backend_with_fp8_gemms_against_the_reference():
    """accelerate(model, dtype=float8_e4m3fn) with the reference kernels (CPU): the
    transformer's GEMMs really run through e4m3 (further from fp32 than bf16 alone), the
    output stays within the tolerance of two e4m3 roundings, and the weights are quantized
    once (cached) while the state dict is untouched."""
    from conftest import randomize_

    from prdit_fast.fast import accelerate
    from prdit_fast.models import create_model

    model = randomize_(create_model("PRDiT-XS/10/2", 16)).eval()
    x, t = 0.5 * torch.randn(2, 1, 16, 16, 16), torch.tensor([10, 700])
    keys = list(model.state_dict())
    with torch.no_grad():
        truth = model(x, t)
        fp8 = accelerate(model, dtype=E4M3, impl="torch")
        bf16 = accelerate(model, dtype=torch.bfloat16, impl="torch")
        out_fp8, out_bf16 = fp8(x, t), bf16(x, t)
        assert fp8.gemm_dtype == E4M3 and fp8.dtype == torch.bfloat16
        cached = fp8._derived.cached("blocks.0.qkv.e4m3")[0]
        fp8(x, t)
        assert fp8._derived.cached("blocks.0.qkv.e4m3")[0] is cached
    assert list(model.state_dict()) == keys
    err_fp8, err_bf16 = rel_rms(out_fp8, truth), rel_rms(out_bf16, truth)
    assert err_bf16 < err_fp8 < 6e-2, (err_bf16, err_fp8)


def test_fast_backend_fp8_off_gpu_says_what_to_do():
    from prdit_fast.fast import accelerate
    from prdit_fast.models import create_model

    if fp8_unsupported("cpu") is None:
        pytest.skip("this CPU build runs FP8 GEMMs")
    fast = accelerate(create_model("PRDiT-XS/10/1", 16).eval(), dtype=E4M3, impl={"fp8_linear": "gemm"})
    with pytest.raises(ImplUnavailable, match="FP8 GEMMs need an NVIDIA GPU"), torch.no_grad():
        fast(torch.randn(1, 1, 16, 16, 16), torch.tensor([3]))


def test_local_denoiser_gemm_form_with_fp8_linears(device):
    """The local denoiser's cuBLAS-composed form with its GEMMs swapped for FP8 (fp32 under
    the interpreter, the dequantized reference as the GEMM): F.linear passed explicitly
    reproduces the default form (1e-5), and FP8 stays within six chained e4m3 GEMMs of it
    (each ~3.5%: measured 7.6e-2 in all)."""
    from conftest import randomize_

    from prdit_fast.models import LocalDenoiser
    from prdit_fast.ops import local_denoiser

    module = randomize_(LocalDenoiser(64, 48)).to(device)
    tokens, c = torch.randn(2, 7, 64, device=device), torch.randn(2, 64, device=device)
    with torch.no_grad():
        default = local_denoiser(tokens, c, module, impl="gemm")
        explicit = local_denoiser(tokens, c, module, impl="gemm", linear=torch.nn.functional.linear)
        fp8 = local_denoiser(tokens, c, module, impl="gemm", linear=fp8_linear_reference)
        truth = module(tokens, c)
    assert rel_rms(default, truth) < 1e-5 and rel_rms(explicit, truth) < 1e-5
    assert 1e-4 < rel_rms(fp8, truth) < 0.15
    with pytest.raises(ValueError, match="custom linear runs in the 'gemm' form only"):
        local_denoiser(tokens, c, module, impl="torch", linear=fp8_linear_reference)
