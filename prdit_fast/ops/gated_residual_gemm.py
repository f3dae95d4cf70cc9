"""The adaLN-Zero gate and the residual add in a GEMM's epilogue (``attn.proj``, ``mlp.fc2``).

A DiT block ends each branch with ``x + gate_b * (a W^T + bias)``: x the fp32 residual
stream (B, T, N), a the branch's GEMM input (B, T, K) in the compute dtype, gate_b the
per-sample gate (B, N). Composed, the GEMM writes its (B, T, N) output and a second pass
reads it back with x. Here one Triton GEMM does it all: its epilogue adds the bias, scales
by the gate of each row's sample (row m belongs to sample m // T), adds the residual tile
and stores the fp32 sum, so the branch output never reaches memory.

    gated_residual_linear(a, weight, bias, gate, residual) -> residual + gate[:, None] * (a W^T + bias)

``impl="torch"`` (and "auto" wherever Triton cannot run: ``prdit_fast.ops.dispatch``) is
the plain-torch reference ``gated_residual_linear_reference``. The backward is the reference's own gradient,
computed in plain torch from the saved inputs (the forward kernel has no backward).
Whether the fast backend's DiT blocks use it (against the cuBLAS GEMM + the fused
residual-LayerNorm pass they use now) is decided by ``benchmarks/bench_ops_gated_residual_gemm.py``
on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prdit_fast.ops.common import autotune_configs, triton_importable
from prdit_fast.ops.dispatch import TORCH, resolve
from prdit_fast.ops.layernorm_gemm import dot_precision, dtype_refusal

if triton_importable():
    import triton
    import triton.language as tl

    def _configs(shapes):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
                for (m, n, k, s, w) in shapes]

    # sm_90a, checked with benchmarks/check_sm90.py: the first (used untuned) holds the fp32
    # accumulator and the fp32 residual tile of 128 x 128 in 8 warps without spilling;
    # 128 x 256 spills (~1 KB of stack) and is left out
    _TUNED = [(128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (128, 128, 64, 4, 8), (64, 128, 64, 4, 4)]
    _CONFIGS = autotune_configs(interpreted=_configs([(32, 64, 32, 1, 4)]), tuned=_configs(_TUNED))

    @triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
    @triton.jit
    def _gated_residual_gemm_kernel(
        a_ptr, w_ptr, bias_ptr, gate_ptr, res_ptr, out_ptr,
        M, N, K, n_tokens,
        stride_am, stride_wn, stride_gb, stride_rm, stride_om,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # grouped tile order: GROUP_M row tiles share each weight column tile while it is in L2
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask, n_mask = offs_m < M, offs_n < N
        a_tile = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
        w_tile = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]  # W^T tile (BLOCK_K, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            k_mask = offs_k + k < K
            a = tl.load(a_tile, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_tile, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            a_tile += BLOCK_K
            w_tile += BLOCK_K

        # epilogue: (acc + bias) * gate[sample of the row] + residual, stored in fp32
        mask = m_mask[:, None] & n_mask[None, :]
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        sample = offs_m // n_tokens
        gate = tl.load(gate_ptr + sample[:, None] * stride_gb + offs_n[None, :], mask=mask, other=0.0)
        residual = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
        out = (acc + bias[None, :]) * gate + residual
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=mask)


def gated_residual_linear_reference(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor,
                                    residual: torch.Tensor) -> torch.Tensor:
    """residual + gate[:, None] * F.linear(a, weight, bias), in fp32: a (B, T, K), weight
    (N, K), bias (N,), gate (B, N) fp32, residual (B, T, N) fp32 -> (B, T, N) fp32."""
    return residual + gate.unsqueeze(1) * F.linear(a, weight, bias).float()


def _launch(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor,
            residual: torch.Tensor) -> torch.Tensor:
    B, T, K = a.shape
    N = weight.shape[0]
    M = B * T
    rows = a.reshape(M, K).contiguous()
    weight = weight.contiguous()
    res = residual.reshape(M, N).contiguous()
    out = torch.empty(M, N, device=a.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _gated_residual_gemm_kernel[grid](
        rows, weight, bias, gate.contiguous(), res, out, M, N, K, T,
        rows.stride(0), weight.stride(0), gate.shape[1], res.stride(0), out.stride(0),
        DOT_PRECISION=dot_precision(a.dtype),
    )
    return out.view(B, T, N)


class _GatedResidualLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, weight, bias, gate, residual):
        ctx.save_for_backward(a, weight, bias, gate)
        return _launch(a, weight, bias, gate, residual)

    @staticmethod
    def backward(ctx, grad_out):
        a, weight, bias, gate = ctx.saved_tensors
        need_a, need_w, need_b, need_gate, need_res = ctx.needs_input_grad
        grad_branch = (grad_out * gate.unsqueeze(1)).to(a.dtype)  # d out / d (a W^T + b), (B, T, N)
        grads = [None] * 5
        if need_a:
            grads[0] = grad_branch @ weight
        if need_w:
            grads[1] = grad_branch.reshape(-1, weight.shape[0]).t() @ a.reshape(-1, weight.shape[1])
        if need_b:
            grads[2] = grad_branch.sum((0, 1)).to(bias.dtype)
        if need_gate:
            grads[3] = (grad_out * F.linear(a, weight, bias).float()).sum(1)
        if need_res:
            grads[4] = grad_out
        return tuple(grads)


def gated_residual_linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor,
                          residual: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """residual + gate[:, None] * (a W^T + bias) with the gate and the residual in the GEMM's
    epilogue: a (B, T, K), weight (N, K), bias (N,) in one compute dtype; gate (B, N) and
    residual (B, T, N) fp32 -> (B, T, N) fp32. impl: "auto", "triton" (raises where it
    cannot run) or "torch" (``prdit_fast.ops.dispatch``)."""
    if a.dim() != 3 or weight.dim() != 2 or a.shape[2] != weight.shape[1]:
        raise ValueError(f"a must be (B, T, K) and weight (N, K) with the same K; got {tuple(a.shape)} "
                         f"and {tuple(weight.shape)}")
    B, T, _ = a.shape
    N = weight.shape[0]
    if bias.shape != (N,) or gate.shape != (B, N) or residual.shape != (B, T, N):
        raise ValueError(f"need bias ({N},), gate ({B}, {N}) and residual ({B}, {T}, {N}); got "
                         f"{tuple(bias.shape)}, {tuple(gate.shape)} and {tuple(residual.shape)}")
    if gate.dtype != torch.float32 or residual.dtype != torch.float32:
        raise ValueError(f"gate and residual must be fp32, got {gate.dtype} and {residual.dtype}")
    tensors = [a, weight, bias]
    chosen = TORCH if B * T == 0 else resolve("gated_residual_linear", impl, tensors, dtype_refusal(tensors))
    if chosen == TORCH:
        return gated_residual_linear_reference(a, weight, bias, gate, residual)
    return _GatedResidualLinear.apply(a, weight, bias, gate, residual)
