"""The whole local denoiser (spec section 4, ``coarse.mlp_denoise``) from fused GEMMs.

    mods       = adaLN(SiLU(c))                         one small cuBLAS GEMM, (B, 6D)
    h          = mlp1(mod(norm1(x), sh1, sc1))           2 launches (adaptive SwiGLU)
    h          = mlp2(mod(norm2(h), sh2, sc2))           2 launches
    out        = linear_final(mod(h + x, sh3, sc3))      1 launch: residual + modulation on A load

Plus one row-moments pass over x and, per SwiGLU, one pass folding its LayerNorm
affine into fc2 (see ``adaptive_swiglu``). Every other LayerNorm's statistics come from
the previous launch's epilogue, so no activation is read twice for normalisation and no
normalised copy is ever written. The backward recomputes the reference module with
plain torch ops and autograd.
"""
from __future__ import annotations

import torch

from prdit_fast.models import LocalDenoiser
from prdit_fast.ops.adaptive_swiglu import (
    Backend,
    chunk_moments,
    fused_adaptive_swiglu_rows,
    prologue_gemm,
    swiglu_params,
    triton_usable,
)


def _fused_local_denoiser(tokens: torch.Tensor, c: torch.Tensor, module: LocalDenoiser) -> torch.Tensor:
    B, N, D = tokens.shape
    sh1, sc1, sh2, sc2, sh3, sc3 = module.adaLN_modulation(c).chunk(6, dim=1)
    x = tokens.reshape(B * N, D)
    h, h_stats = fused_adaptive_swiglu_rows(
        x, chunk_moments(x), N, sh1, sc1, swiglu_params(module.mlp1),
        module.norm1.eps, module.mlp1.norm.eps, emit_stats=True,
    )
    h, _ = fused_adaptive_swiglu_rows(
        h, h_stats, N, sh2, sc2, swiglu_params(module.mlp2), module.norm2.eps, module.mlp2.norm.eps,
    )
    final = module.linear_final
    out, _ = prologue_gemm(
        h, final.weight, final.bias, residual=x, scale=1.0 + sc3.float(), shift=sh3, tokens_per_sample=N,
    )
    return out.view(B, N, -1)


class _LocalDenoiserFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, c, module, names, *params):
        ctx.module, ctx.names = module, names
        ctx.save_for_backward(tokens, c, *params)
        return _fused_local_denoiser(tokens, c, module)

    @staticmethod
    def backward(ctx, grad_out):
        tokens, c, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        wants = [needs[0], needs[1], *needs[4:]]
        leaves = [t.detach().requires_grad_(w) for t, w in zip([tokens, c, *params], wants)]
        with torch.enable_grad():
            out = torch.func.functional_call(ctx.module, dict(zip(ctx.names, leaves[2:])), (leaves[0], leaves[1]))
        wanted = [t for t, w in zip(leaves, wants) if w]
        grads = iter(torch.autograd.grad(out, wanted, grad_out)) if wanted else iter(())
        result = [next(grads) if w else None for w in wants]
        return (result[0], result[1], None, None, *result[2:])


def local_denoiser(
    tokens: torch.Tensor, c_coarse: torch.Tensor, module: LocalDenoiser, backend: Backend = "auto"
) -> torch.Tensor:
    """``module(tokens, c_coarse)`` computed with the fused kernels.

    tokens: (B, N, D) unfolded noisy volume; c_coarse: (B, D) timestep condition;
    module: the reference ``LocalDenoiser`` (its live parameters are used). Returns
    (B, N, s^3 Cout). backend: "triton" (fused, error if it cannot run), "torch" (the
    reference module) or "auto" (Triton when possible).
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, N, D), got shape {tuple(tokens.shape)}")
    B, N, D = tokens.shape
    dim = module.linear_final.in_features
    if D != dim:
        raise ValueError(f"the local denoiser has token width {dim}, but tokens have width {D}")
    if c_coarse.shape != (B, D):
        raise ValueError(f"c_coarse must have shape (B, D) = ({B}, {D}), got {tuple(c_coarse.shape)}")
    names, params = zip(*module.named_parameters())
    if N == 0 or not triton_usable(backend, [tokens, c_coarse, *params], "local_denoiser"):
        return module(tokens, c_coarse)
    return _LocalDenoiserFunction.apply(tokens, c_coarse, module, names, *params)
