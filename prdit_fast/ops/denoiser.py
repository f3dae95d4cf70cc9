"""The whole local denoiser (spec section 4, ``coarse.mlp_denoise``), two implementations.

impl="triton": every GEMM is a fused Triton kernel (``adaptive_swiglu``):

    mods       = adaLN(SiLU(c))                         one small cuBLAS GEMM, (B, 6D)
    h          = mlp1(mod(norm1(x), sh1, sc1))           2 launches (adaptive SwiGLU)
    u          = mlp2(mod(norm2(h), sh2, sc2)) + x       2 launches, x added in fc2's epilogue
    out        = linear_final(mod(u, sh3, sc3))          1 launch: for 16-bit weights on per-sample
                                                         weights W (1 + sc3_b) (a pure GEMM),
                                                         else modulation on A load

Plus one row-moments pass over x and, per SwiGLU, one pass folding its LayerNorm
affine into fc2 (see ``adaptive_swiglu``). Every other LayerNorm's statistics come from
the previous launch's epilogue, so no activation is read twice for normalisation and no
normalised copy is ever written. The backward recomputes the reference module with
plain torch ops and autograd.

impl="gemm": every GEMM is cuBLAS, with Triton only for the memory-bound passes between:

    m  = layernorm_modulate(x, sh1, sc1)                 Triton, fp32 statistics
    gu = m @ [Wg; Wx]^T + [bg; bx]                       ONE cuBLAS GEMM of width 2D
    h  = LN_affine(SiLU(gu[:, :D]) * gu[:, D:])          Triton (``swiglu_gate``): one read, one write
    y  = h @ W2^T + b2                                   cuBLAS
    ... the same for mlp2, reading y, up to h2 ...
    u  = x + h2 @ W2^T                                   cuBLAS, the residual as accumulator input
    out = linear_final(u * (1 + sc3) + (1 + sc3) b2 + sh3)   one torch pass, then cuBLAS

Its autograd is the composition's own (each Triton op has a backward).

impl="auto" runs "gemm" for 16-bit CUDA tokens and "triton" elsewhere Triton runs
(``prdit_fast.ops.dispatch`` says why); benchmarks/bench_ops_swiglu.py times both.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from prdit_fast.ops.adaln import layernorm_modulate
from prdit_fast.ops.derived import derived_for, recompute_backward
from prdit_fast.ops.dispatch import GEMM, TORCH, resolve
from prdit_fast.ops.layernorm_gemm import (
    chunk_moments,
    dtype_refusal,
    folded_norm_linear,
    folds_modulation,
    layernorm_epilogue_gemm,
    normalize_on_load_gemm,
)
from prdit_fast.ops.swiglu import fused_adaptive_swiglu_rows, swiglu_params
from prdit_fast.ops.swiglu_gate import swiglu_gate_layernorm

FC1 = "fc1"  # the name of [Wg; Wx], [bg; bx] in a SwiGLU block's derived-weight cache


def is_rms(norm_module: torch.nn.Module) -> bool:
    """Whether a modulated norm of the reference network is TF-PRDiT's RMSNorm (else PRDiT's LayerNorm)."""
    return isinstance(norm_module, torch.nn.RMSNorm)


def _concat_fc1(block: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """[Wg; Wx] (2D, D) and [bg; bx] (2D,) from the block's live tensors, cached in the
    block's ``derived_for`` cache (refreshed when any of the four changes)."""
    named = dict(block.named_parameters())
    wg, wx, bg, bx = (named[n] for n in ("fc1_g.weight", "fc1_x.weight", "fc1_g.bias", "fc1_x.bias"))
    return derived_for(block).get(FC1, (wg, wx, bg, bx), lambda: (torch.cat([wg, wx]), torch.cat([bg, bx])))


Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _gemm_swiglu_hidden(m: torch.Tensor, block: torch.nn.Module, linear: Linear) -> torch.Tensor:
    """norm(SiLU(fc1_g(m)) * fc1_x(m)), fc2's input: one GEMM and one Triton pass."""
    gu = linear(m, *_concat_fc1(block))  # (B, N, 2D)
    return swiglu_gate_layernorm(gu, block.norm.weight, block.norm.bias, block.norm.eps, impl="triton")


def _gemm_local_denoiser(tokens: torch.Tensor, c: torch.Tensor, module: torch.nn.Module,
                         linear: Linear | None) -> torch.Tensor:
    sh1, sc1, sh2, sc2, sh3, sc3 = module.adaLN_modulation(c).chunk(6, dim=1)
    B, N, D = tokens.shape
    x = tokens.contiguous()
    rms = is_rms(module.norm1)
    m = layernorm_modulate(x, sh1, sc1, eps=module.norm1.eps, impl="triton", rms=rms)
    mlp1, mlp2 = module.mlp1, module.mlp2
    gemm = linear or F.linear
    h = gemm(_gemm_swiglu_hidden(m, mlp1, gemm), mlp1.fc2.weight, mlp1.fc2.bias)
    m = layernorm_modulate(h, sh2, sc2, eps=module.norm2.eps, impl="triton", rms=rms)
    # fc2 of mlp2 takes the residual as its GEMM's accumulator input, so h2 + x costs no
    # pass of its own; fc2's bias joins the shift: (u + b2)(1 + sc3) + sh3, u = x + hid W2^T
    hidden = _gemm_swiglu_hidden(m, mlp2, gemm).view(B * N, D)
    if linear is None:
        u = torch.addmm(x.view(B * N, D), hidden, mlp2.fc2.weight.t()).view(B, N, D)
    else:  # a GEMM that takes no accumulator input (FP8): the residual is one add
        u = x + linear(hidden, mlp2.fc2.weight, None).view(B, N, D)
    gain = 1.0 + sc3
    z = torch.addcmul(torch.addcmul(sh3, gain, mlp2.fc2.bias).unsqueeze(1), u, gain.unsqueeze(1))
    return gemm(z, module.linear_final.weight, module.linear_final.bias)


def _fused_local_denoiser(tokens: torch.Tensor, c: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    B, N, D = tokens.shape
    sh1, sc1, sh2, sc2, sh3, sc3 = module.adaLN_modulation(c).chunk(6, dim=1)
    x = tokens.reshape(B * N, D)
    rms = is_rms(module.norm1)
    h, h_stats = fused_adaptive_swiglu_rows(
        x, chunk_moments(x), N, sh1, sc1, swiglu_params(module.mlp1),
        module.norm1.eps, module.mlp1.norm.eps, emit_stats=True, rms=rms,
    )
    # the residual joins mlp2's fc2 epilogue, so linear_final reads one tensor, u = h2 + x
    u, _ = fused_adaptive_swiglu_rows(
        h, h_stats, N, sh2, sc2, swiglu_params(module.mlp2), module.norm2.eps, module.mlp2.norm.eps,
        out_residual=x, rms=rms,
    )
    final = module.linear_final
    gain = 1.0 + sc3.float()
    if folds_modulation(final.weight.dtype, N):
        # linear_final(u * gain_b + sh3_b) = u (W * gain_b)^T + b + W sh3_b: a pure GEMM
        weight, bias, _ = folded_norm_linear(final.weight, final.bias, gain, sh3)
        out, _ = layernorm_epilogue_gemm(u, weight, bias, tokens_per_sample=N)
    else:
        out, _ = normalize_on_load_gemm(u, final.weight, final.bias, scale=gain, shift=sh3, tokens_per_sample=N)
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

        def reference(tokens, c, *params):
            return torch.func.functional_call(ctx.module, dict(zip(ctx.names, params)), (tokens, c))

        grads = recompute_backward(reference, [tokens, c, *params], [needs[0], needs[1], *needs[4:]], grad_out)
        return (grads[0], grads[1], None, None, *grads[2:])


def local_denoiser(
    tokens: torch.Tensor,
    c_coarse: torch.Tensor,
    module: torch.nn.Module,
    impl: str = "auto",
    linear: Linear | None = None,
) -> torch.Tensor:
    """``module(tokens, c_coarse)`` computed with Triton kernels (and cuBLAS).

    tokens: (B, N, D) unfolded noisy volume; c_coarse: (B, D) timestep condition;
    module: the reference ``prdit_fast.models.LocalDenoiser`` (its live parameters are used). Returns
    (B, N, s^3 Cout). impl: "triton" (fused Triton GEMMs), "gemm" (cuBLAS GEMMs +
    Triton memory passes), "torch" (the reference module) or "auto" ("gemm" for 16-bit
    CUDA tokens, "triton" elsewhere Triton runs, else "torch"; ``prdit_fast.ops.dispatch``).
    An explicit "triton" or "gemm" that cannot run raises. linear: the GEMM of the "gemm"
    form, ``linear(x, weight, bias or None)`` like ``F.linear`` (None: cuBLAS, with the
    residual as mlp2.fc2's accumulator input); the FP8 backend passes its e4m3 GEMM. Only
    the "gemm" form takes one: ValueError where another form would run.
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
    tensors = [tokens, c_coarse, *params]
    chosen = TORCH if N == 0 else resolve("local_denoiser", impl, tensors, dtype_refusal(tensors))
    if linear is not None and chosen != GEMM:
        raise ValueError(f"local_denoiser: a custom linear runs in the 'gemm' form only; these inputs run "
                         f"{chosen!r} (pass impl='gemm' where Triton runs)")
    if chosen == TORCH:
        return module(tokens, c_coarse)
    if chosen == GEMM:
        return _gemm_local_denoiser(tokens, c_coarse, module, linear)
    return _LocalDenoiserFunction.apply(tokens, c_coarse, module, names, *params)
