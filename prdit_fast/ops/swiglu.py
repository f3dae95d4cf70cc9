"""Adaptive SwiGLU (spec section 4) as two fused Triton GEMMs.

    m = LN(x) * (1 + scale_b) + shift_b              LN without affine, eps norm_eps
    h = SiLU(m @ Wg^T + bg) * (m @ Wx^T + bx)       GEMM 1: both products share each A tile
    y = LN_affine(h) @ W2^T + b2                     GEMM 2: LN with gamma, beta (eps block.norm.eps)

The two launches are the LayerNorm-GEMM kernels of ``prdit_fast.ops.layernorm_gemm``:
GEMM 1 normalises and modulates x (on load, or folded into per-sample weights for 16-bit
weights), GEMM 2 folds the inner LayerNorm affine into fc2 and normalises in its epilogue.

The backward recomputes the reference composition with plain torch ops (cuBLAS) and
autograd (``prdit_fast.ops.derived.recompute_backward``); the forward is always the
fused kernels (impl="triton").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prdit_fast.layout import modulate
from prdit_fast.ops.derived import recompute_backward
from prdit_fast.ops.dispatch import TRITON, resolve
from prdit_fast.ops.layernorm_gemm import chunk_moments, dtype_refusal, folded_norm_linear, folds_modulation
from prdit_fast.ops.layernorm_gemm import layernorm_epilogue_gemm, normalize_on_load_gemm

SWIGLU_PARAMS = (
    "fc1_g.weight", "fc1_g.bias", "fc1_x.weight", "fc1_x.bias",
    "norm.weight", "norm.bias", "fc2.weight", "fc2.bias",
)


def swiglu_params(block: torch.nn.Module) -> list[torch.Tensor]:
    """The block's parameters in the order of ``SWIGLU_PARAMS`` (the live tensors)."""
    named = dict(block.named_parameters())
    return [named[name] for name in SWIGLU_PARAMS]


def fused_adaptive_swiglu_rows(
    x: torch.Tensor,
    x_stats: torch.Tensor,
    tokens_per_sample: int,
    shift: torch.Tensor,
    scale: torch.Tensor,
    params: list[torch.Tensor],
    norm_eps: float,
    inner_eps: float,
    emit_stats: bool = False,
    fold_modulation: bool | None = None,
    out_residual: torch.Tensor | None = None,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The two fused launches of one adaptive SwiGLU on flattened tokens.

    x: (M, D) rows, sample-major with ``tokens_per_sample`` rows per sample; x_stats:
    its ``chunk_moments``; shift, scale: (B, D); params: ``swiglu_params(block)``.
    fold_modulation: run GEMM 1 as a pure GEMM on per-sample folded weights
    (``prdit_fast.ops.layernorm_gemm``) instead of normalising and modulating its A tile on load; None chooses it
    for 16-bit weights when ``tiles_within_samples``, True forces it (also in fp32, which
    is how the CPU tests check it). ``out_residual`` (M, D) is added to y in fc2's epilogue.
    ``rms``: the modulated norm (eps ``norm_eps``) is TF-PRDiT's RMSNorm, not a LayerNorm.
    Returns y (M, D) and, if ``emit_stats``, y's partial moments for a following LN.
    """
    wg, bg, wx, bx, gamma, beta, w2, b2 = params
    gain = 1.0 + scale.float()
    if fold_modulation is None:
        fold_modulation = folds_modulation(wg.dtype, tokens_per_sample)
    if fold_modulation:
        wg_folded, bg_folded, colsum_g = folded_norm_linear(wg, bg, gain, shift)
        wx_folded, bx_folded, colsum_x = folded_norm_linear(wx, bx, gain, shift)
        h, h_stats = layernorm_epilogue_gemm(
            x, wg_folded, bg_folded, stats=x_stats, eps=norm_eps, colsum=colsum_g,
            tokens_per_sample=tokens_per_sample, up_weight=wx_folded, up_bias=bx_folded,
            up_colsum=colsum_x, emit_stats=True, rms=rms,
        )
    else:
        h, h_stats = normalize_on_load_gemm(
            x, wg, bg, stats=x_stats, eps=norm_eps, scale=gain, shift=shift,
            tokens_per_sample=tokens_per_sample, up_weight=wx, up_bias=bx, emit_stats=True, rms=rms,
        )
    # h is stored exactly as the reference's LN reads it, so its LN folds into fc2.
    w2_folded, b2_folded, colsum = folded_norm_linear(w2, b2, gamma, beta)
    return layernorm_epilogue_gemm(h, w2_folded, b2_folded, stats=h_stats, eps=inner_eps, colsum=colsum,
                                   out_residual=out_residual, emit_stats=emit_stats)


def reference_adaptive_swiglu(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, block: torch.nn.Module, norm_eps: float = 1e-6,
    rms: bool = False,
) -> torch.Tensor:
    """The plain-torch composition: block(modulate(LN(x), shift, scale)) (``rms``: RMSNorm(x));
    (B, N, D) -> (B, N, D)."""
    norm = F.rms_norm if rms else F.layer_norm
    return block(modulate(norm(x, x.shape[-1:], eps=norm_eps), shift, scale))


class _AdaptiveSwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, block, norm_eps, rms, *params):
        ctx.block, ctx.norm_eps, ctx.rms = block, norm_eps, rms
        ctx.save_for_backward(x, shift, scale, *params)
        B, N, D = x.shape
        x2d = x.reshape(B * N, D)
        y, _ = fused_adaptive_swiglu_rows(
            x2d, chunk_moments(x2d), N, shift, scale, params, norm_eps, block.norm.eps, rms=rms
        )
        return y.view(B, N, D)

    @staticmethod
    def backward(ctx, grad_out):
        x, shift, scale, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad

        def reference(x, shift, scale, *params):
            norm = F.rms_norm if ctx.rms else F.layer_norm
            m = modulate(norm(x, x.shape[-1:], eps=ctx.norm_eps), shift, scale)
            return torch.func.functional_call(ctx.block, dict(zip(SWIGLU_PARAMS, params)), (m,))

        wants = [needs[0], needs[1], needs[2], *needs[6:]]
        grads = recompute_backward(reference, [x, shift, scale, *params], wants, grad_out)
        return (*grads[:3], None, None, None, *grads[3:])


def adaptive_swiglu(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    block: torch.nn.Module,
    norm_eps: float = 1e-6,
    impl: str = "auto",
    rms: bool = False,
) -> torch.Tensor:
    """block(modulate(LN(x), shift, scale)) = fc2(norm(SiLU(fc1_g(m)) * fc1_x(m))); ``rms``:
    RMSNorm(x) instead of LN(x) (TF-PRDiT).

    x: (B, N, D) tokens; shift, scale: (B, D) per-sample modulation; block: the
    reference ``prdit_fast.models.SwiGLU`` whose live parameters are used; LN has no affine and eps
    ``norm_eps``. Returns (B, N, D). impl: "triton" (fused kernels, error if they
    cannot run), "torch" (the reference composition) or "auto" (``prdit_fast.ops.dispatch``).
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, D) tokens, got shape {tuple(x.shape)}")
    B, N, D = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        if t.shape != (B, D):
            raise ValueError(f"{name} must have shape (B, D) = ({B}, {D}), got {tuple(t.shape)}")
    if block.fc1_g.in_features != D:
        raise ValueError(f"the SwiGLU block has width {block.fc1_g.in_features}, but tokens have width {D}")
    params = swiglu_params(block)
    tensors = [x, *params]
    if N == 0 or resolve("adaptive_swiglu", impl, tensors, dtype_refusal(tensors)) != TRITON:
        return reference_adaptive_swiglu(x, shift, scale, block, norm_eps, rms)
    return _AdaptiveSwiGLUFunction.apply(x, shift, scale, block, norm_eps, rms, *params)
