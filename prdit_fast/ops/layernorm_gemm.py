"""LayerNorm-GEMM kernels in Triton: ``LN(a) W^T + b`` (and the SwiGLU gate) with the row
normalisation fused into the GEMM, never written as a tensor of its own. Shared by the
adaptive SwiGLU (``swiglu.py``), the local denoiser (``denoiser.py``) and the gated residual
GEMM (``gated_residual_gemm.py``).

Two kernels, named for where the LayerNorm happens (GEMM 1 and GEMM 2 are the adaptive
SwiGLU's of ``swiglu.py``):

* ``layernorm_epilogue_gemm``: the K loop is a pure GEMM (A goes from memory straight to
  the tensor cores) and the rows' LayerNorm is applied after the dot,
  LN(a) W^T = rstd * (a W^T - mean * colsum) with colsum = W.sum(1). An affine LayerNorm
  (gamma, beta) folds into the weights first (``folded_norm_linear``: W' = W * gamma,
  b' = b + W beta, colsum from the ROUNDED W', so the mean correction cancels exactly what
  the GEMM adds, up to fp32 accumulation error). GEMM 2 always runs here: h is stored in
  the compute dtype exactly as the reference's LN reads it, and products of 16-bit values
  are exact in fp32. GEMM 1 runs here too for 16-bit weights when every row tile lies in
  one sample (tokens per sample a multiple of BLOCK_M = 128: 512/4096/32768 at
  64^3/128^3/256^3): the modulation is then an affine LayerNorm with per-sample
  (gamma, beta) = (1 + scale_b, shift_b), folded once per sample into W_b (B, D, D) for
  fc1_g and fc1_x. The fold is recomputed from the live parameters on every call (one
  pass over the weights, never cached, so it cannot go stale). The cost of the B folded
  weight copies against the saved per-element work, and the SASS counts behind the
  choice: benchmarks/results/design-notes.md.
* ``normalize_on_load_gemm``: the A tile is normalised and modulated as it is loaded,
  in fp32 registers, then cast to the weight dtype for ``tl.dot`` (fp32 accumulate).
  GEMM 1 runs here in fp32 and for token counts that are not a multiple of the tile
  rows. Centring on load matters in fp32: rows of CT tokens from air or soft tissue have
  |mean| >> std, and the folded form's cancellation, harmless next to a 16-bit
  reference's own rounding, would dominate the error of an fp32 one (and under TF32 the
  A operand itself is rounded to 10 bits).

The TF-PRDiT variant (spec section 15) normalises the modulated input with the
parameter-free RMSNorm instead (``rms=True``): a constexpr flag (NORM_RMS) of the GEMM
that consumes the statistics, which merges the same partial moments into the mean square
(the sum of M2 + count mean^2 over the groups: no cancellation) and takes the mean as 0;
everything else is unchanged, and the SwiGLU's inner affine LayerNorm stays a LayerNorm.

Row statistics travel as per-64-column partial moments (mean, M2) in a small fp32
buffer of shape (2, M, ceil(D / 64)): the input's by a cheap stats kernel, the
hidden ``h``'s by GEMM 1's epilogue (each N-tile writes its own groups, so no
atomics and no zero-init), and the consumer merges them with Chan's parallel
formula, which does not cancel the way sum(x^2) - n mean^2 does.
"""
from __future__ import annotations

import torch

from prdit_fast.ops.common import autotune_configs, interpreter_enabled, triton_importable

# Width of the column groups whose partial moments are stored; every BLOCK_N is a
# multiple of it so an N-tile writes whole groups.
STATS_GROUP = 64
# What the normalize-on-load GEMM modulates its A tile with: nothing, (K,) vectors shared
# by all rows, (B, K) per sample. The kernel's TILE_MODULATION then says how one row tile
# finds its rows' vectors.
MODULATION_NONE, MODULATION_SHARED, MODULATION_PER_SAMPLE = 0, 1, 2
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if triton_importable():
    import triton
    import triton.language as tl

    def _configs(shapes):
        return [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for (m, n, k, s, w) in shapes
        ]

    # The interpreter's cost is per op, not per element: few, large-ish tiles there.
    _INTERPRETED = _configs([(32, 64, 64, 1, 4)])
    # Hopper-oriented, checked with ptxas for sm_90a. The first is the config used untuned
    # (PRDIT_AUTOTUNE=0) and fits every kernel variant. The gated kernel holds two
    # accumulators: at 128x128 it needs 8 warps (4 warps spill ~1 KB in the K loop) and
    # 128x256x64 needs 240 KB of shared memory (227 KB per block), so those two are
    # offered to the single-GEMM launches only (the epilogue-normalised fc2, whose A tile
    # goes straight to wgmma). Every BLOCK_M is 128, which ``tiles_within_samples`` reads.
    _TUNED_16BIT_GATED = [(128, 64, 64, 3, 8), (128, 128, 64, 3, 8), (128, 128, 64, 4, 8),
                          (128, 128, 32, 4, 8), (128, 64, 32, 4, 4)]
    _CONFIGS_16BIT_GATED = autotune_configs(interpreted=_INTERPRETED, tuned=_configs(_TUNED_16BIT_GATED))
    _CONFIGS_16BIT = autotune_configs(interpreted=_INTERPRETED, tuned=_configs(
        _TUNED_16BIT_GATED + [(128, 128, 64, 4, 4), (128, 256, 64, 3, 8)]))
    # fp32 tiles are twice the bytes and IEEE dots run on the FMA units: small tiles
    # (the 16-bit ones exceed shared memory and take ~40 s each to compile).
    _CONFIGS_FP32 = autotune_configs(interpreted=_INTERPRETED, tuned=_configs([(64, 64, 32, 3, 4), (128, 64, 32, 3, 8)]))

    @triton.jit
    def _chunk_moments_kernel(
        x_ptr, stats_ptr, M, D, stride_xm, stride_plane, stride_sm,
        BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        group = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = group * GROUP + tl.arange(0, GROUP)
        row_mask = rows < M
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        count = tl.minimum(D - group * GROUP, GROUP).to(tl.float32)
        mean = tl.sum(x, axis=1) / count
        dev = tl.where(mask, x - mean[:, None], 0.0)
        m2 = tl.sum(dev * dev, axis=1)
        tl.store(stats_ptr + rows * stride_sm + group, mean, mask=row_mask)
        tl.store(stats_ptr + stride_plane + rows * stride_sm + group, m2, mask=row_mask)

    @triton.jit
    def _fold_norm_kernel(
        w_ptr, b_ptr, gamma_ptr, beta_ptr, wf_ptr, bf_ptr, colsum_ptr, N, K,
        stride_wn, stride_gb, stride_fb, stride_fn, stride_vb,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Per (gamma, beta) row b: W'_b = W * gamma_b, b'_b = b + W beta_b, colsum_b =
        rowsum of the rounded W'_b. The sample is grid axis 0 (the fastest), so the B
        programs reading the same rows of W run together and W leaves DRAM once."""
        sample = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        gamma_ptr += sample * stride_gb
        beta_ptr += sample * stride_gb
        wf_ptr += sample * stride_fb
        colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        w_beta = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < K
            mask = row_mask[:, None] & k_mask[None, :]
            w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_wn + k[None, :], mask=mask, other=0.0)
            w = w.to(tl.float32)
            gamma = tl.load(gamma_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
            wf = (w * gamma[None, :]).to(wf_ptr.dtype.element_ty)
            tl.store(wf_ptr + rows.to(tl.int64)[:, None] * stride_fn + k[None, :], wf, mask=mask)
            colsum += tl.sum(wf.to(tl.float32), axis=1)
            w_beta += tl.sum(w * beta[None, :], axis=1)
        bias = tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(bf_ptr + sample * stride_vb + rows, bias + w_beta, mask=row_mask)
        tl.store(colsum_ptr + sample * stride_vb + rows, colsum, mask=row_mask)

    @triton.jit
    def _row_mean_rstd(stats_ptr, rows, K, eps, stride_plane, stride_sm,
                       GROUPS_POW2: tl.constexpr, GROUP: tl.constexpr, NORM_RMS: tl.constexpr):
        """Merge the per-group (mean, M2) of each row (Chan et al.) into mean, rstd; NORM_RMS:
        mean 0 and rstd = 1 / sqrt(mean(x^2) + eps), the sum of squares being M2 + count mean^2."""
        groups = tl.arange(0, GROUPS_POW2)
        count = tl.minimum(tl.maximum(K - groups * GROUP, 0), GROUP).to(tl.float32)
        mask = (count > 0)[None, :] & (rows >= 0)[:, None]
        ptrs = stats_ptr + rows[:, None] * stride_sm + groups[None, :]
        g_mean = tl.load(ptrs, mask=mask, other=0.0)
        g_m2 = tl.load(ptrs + stride_plane, mask=mask, other=0.0)
        if NORM_RMS:
            mean = tl.zeros_like(tl.sum(g_mean, axis=1))
            dev = g_mean
        else:
            mean = tl.sum(g_mean * count[None, :], axis=1) / K
            dev = g_mean - mean[:, None]
        m2 = tl.sum(g_m2 + count[None, :] * dev * dev, axis=1)
        rstd = 1.0 / tl.sqrt(m2 / K + eps)
        return mean, rstd

    @triton.jit
    def _fold_row_mean(acc, mean, rstd, colsum_ptr, offs_n):
        colsum = tl.load(colsum_ptr + offs_n)
        return rstd[:, None] * acc - (rstd * mean)[:, None] * colsum[None, :]

    @triton.jit
    def _load_affine(ptr, rows, k, k_mask, b_first, b_second, in_first, n_tokens, n_samples, stride_cb,
                     TILE_MODULATION: tl.constexpr):
        """Per-column multiplier/offset for the A tile rows, as fp32 broadcastable to (BM, BK)."""
        if TILE_MODULATION == 1:
            v = tl.load(ptr + b_first * stride_cb + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        elif TILE_MODULATION == 2:
            # The tile spans at most two samples: two vector loads and a select.
            v1 = tl.load(ptr + b_first * stride_cb + k, mask=k_mask, other=0.0).to(tl.float32)
            v2 = tl.load(ptr + b_second * stride_cb + k, mask=k_mask, other=0.0).to(tl.float32)
            v = tl.where(in_first[:, None], v1[None, :], v2[None, :])
        else:
            sample = tl.minimum(rows // n_tokens, n_samples - 1)
            v = tl.load(ptr + sample[:, None] * stride_cb + k[None, :], mask=k_mask[None, :], other=0.0)
            v = v.to(tl.float32)
        return v

    @triton.jit
    def _tile_of_program(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of this program, in grouped order: consecutive programs share A
        row-blocks and W column-blocks in L2."""
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_pid_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows

    @triton.jit
    def _store_tile(y, out_ptr, out_stats_ptr, pid_m, pid_n, M, N, stride_om, stride_out_plane, stride_out_sm,
                    EMIT_STATS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Store the fp32 tile ``y`` in the output dtype and, with EMIT_STATS, the per-group
        partial moments of the values as stored (rounded), which is what the next LN reads."""
        out_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        out_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = out_m < M
        col_ok = out_n < N
        y_out = y.to(out_ptr.dtype.element_ty)
        out_ptrs = out_ptr + out_m.to(tl.int64)[:, None] * stride_om + out_n[None, :]
        tl.store(out_ptrs, y_out, mask=row_ok[:, None] & col_ok[None, :])
        if EMIT_STATS:
            # (BLOCK_M, BLOCK_N) viewed as (BLOCK_M, BLOCK_N // GROUP, GROUP): one stats group per slice.
            yr = tl.where(col_ok[None, :], y_out.to(tl.float32), 0.0)
            first_col = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // GROUP) * GROUP
            count = tl.minimum(tl.maximum(N - first_col, 0), GROUP).to(tl.float32)
            g_sum = tl.sum(tl.reshape(yr, (BLOCK_M, BLOCK_N // GROUP, GROUP)), axis=2)
            g_mean = g_sum / tl.maximum(count, 1.0)[None, :]
            g_mean_full = tl.broadcast_to(g_mean[:, :, None], (BLOCK_M, BLOCK_N // GROUP, GROUP))
            dev = tl.where(col_ok[None, :], yr - tl.reshape(g_mean_full, (BLOCK_M, BLOCK_N)), 0.0)
            g_m2 = tl.sum(tl.reshape(dev * dev, (BLOCK_M, BLOCK_N // GROUP, GROUP)), axis=2)
            groups = pid_n * (BLOCK_N // GROUP) + tl.arange(0, BLOCK_N // GROUP)
            s_ptrs = out_stats_ptr + out_m[:, None] * stride_out_sm + groups[None, :]
            s_mask = row_ok[:, None] & (count > 0)[None, :]
            tl.store(s_ptrs, g_mean, mask=s_mask)
            tl.store(s_ptrs + stride_out_plane, g_m2, mask=s_mask)

    @triton.jit
    def _dot_k_step(a, w, w2_ptrs, k_mask, acc, acc2, GATED: tl.constexpr, EVEN_K: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
        """One K step: acc += a w, and with GATED acc2 += a w2 on the same A tile (w2 loaded here)."""
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if GATED:
            if EVEN_K:
                w2 = tl.load(w2_ptrs)
            else:
                w2 = tl.load(w2_ptrs, mask=k_mask[:, None], other=0.0)
            acc2 = tl.dot(a, w2, acc2, input_precision=DOT_PRECISION)
        return acc, acc2

    @triton.jit
    def _bias_and_gate(acc, acc2, bias_ptr, bias2_ptr, offs_n, GATED: tl.constexpr):
        """acc + bias, or with GATED the SwiGLU gate SiLU(acc + bias) * (acc2 + bias2), in fp32."""
        y = acc + tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
        if GATED:
            up = acc2 + tl.load(bias2_ptr + offs_n).to(tl.float32)[None, :]
            y = y * tl.sigmoid(y) * up
        return y

    @triton.jit
    def _normalize_on_load_gemm_kernel(
        a_ptr, stats_ptr, scale_ptr, shift_ptr, w_ptr, bias_ptr, w2_ptr, bias2_ptr, out_ptr, out_stats_ptr,
        M, N, K, n_tokens, n_samples, eps,
        stride_am, stride_plane, stride_sm, stride_cb, stride_wn, stride_w2n,
        stride_om, stride_out_plane, stride_out_sm,
        NORMALIZE: tl.constexpr, NORM_RMS: tl.constexpr, MODULATION: tl.constexpr, GATED: tl.constexpr,
        EMIT_STATS: tl.constexpr,
        GROUPS_POW2: tl.constexpr, GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr, TILE_MODULATION: tl.constexpr,
    ):
        """out = epilogue(modulate(LN(A)) @ W^T), the A tile normalised and modulated as it is
        loaded, in fp32 registers: LN(A) = (A - mean) * rstd per row when NORMALIZE (from the
        partial moments at stats_ptr), modulate = * scale + shift with TILE_MODULATION (0 none,
        1 one vector per tile, 2 a tile across two samples, 3 a gather per row). Epilogue:
        + bias, or with GATED the SwiGLU gate SiLU(. + bias) * (A' @ W2^T + bias2)."""
        pid_m, pid_n = _tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        # Tails wrap around (duplicate valid rows/cols) so the main loop needs no M/N masks.
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
        w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
        w2_ptrs = w2_ptr + offs_n.to(tl.int64)[None, :] * stride_w2n + offs_k[:, None]
        if NORMALIZE:
            mean, rstd = _row_mean_rstd(stats_ptr, offs_m, K, eps, stride_plane, stride_sm, GROUPS_POW2, GROUP,
                                        NORM_RMS)
        b_first = (pid_m * BLOCK_M) // n_tokens
        b_second = tl.minimum(b_first + 1, n_samples - 1)
        in_first = (offs_m // n_tokens) == b_first

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < K
            # K tails: masked A stays finite and masked W is zero, so they add nothing.
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
            a = a.to(tl.float32)
            if NORMALIZE:
                a = (a - mean[:, None]) * rstd[:, None]
            if TILE_MODULATION != 0:
                scale = _load_affine(scale_ptr, offs_m, k, k_mask, b_first, b_second, in_first,
                                     n_tokens, n_samples, stride_cb, TILE_MODULATION)
                shift = _load_affine(shift_ptr, offs_m, k, k_mask, b_first, b_second, in_first,
                                     n_tokens, n_samples, stride_cb, TILE_MODULATION)
                a = a * scale + shift
            a = a.to(w.dtype)
            acc, acc2 = _dot_k_step(a, w, w2_ptrs, k_mask, acc, acc2, GATED, EVEN_K, DOT_PRECISION)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            w2_ptrs += BLOCK_K

        y = _bias_and_gate(acc, acc2, bias_ptr, bias2_ptr, offs_n, GATED)
        _store_tile(y, out_ptr, out_stats_ptr, pid_m, pid_n, M, N, stride_om, stride_out_plane, stride_out_sm,
                    EMIT_STATS, GROUP, BLOCK_M, BLOCK_N)

    @triton.jit
    def _layernorm_epilogue_gemm_kernel(
        a_ptr, stats_ptr, colsum_ptr, colsum2_ptr, w_ptr, bias_ptr, w2_ptr, bias2_ptr, res_ptr,
        out_ptr, out_stats_ptr,
        M, N, K, n_tokens, eps,
        stride_am, stride_plane, stride_sm, stride_wn, stride_w2n, stride_wb, stride_vb, stride_rm,
        stride_om, stride_out_plane, stride_out_sm,
        NORMALIZE: tl.constexpr, NORM_RMS: tl.constexpr, GATED: tl.constexpr, SAMPLE_WEIGHTS: tl.constexpr,
        RESIDUAL: tl.constexpr,
        EMIT_STATS: tl.constexpr, GROUPS_POW2: tl.constexpr, GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        """out = epilogue(A @ W^T): the A tile goes from memory straight to the tensor cores
        (the K loop is a pure GEMM). With NORMALIZE the rows' LayerNorm (no affine; any
        affine is folded into W) is applied after the dot: rstd * (A W^T - mean * colsum),
        colsum = W.sum(1) of the weights as stored. Epilogue: + bias, or with GATED the
        SwiGLU gate SiLU(. + bias) * (A W2^T [normalised likewise] + bias2); with RESIDUAL
        + R (M, N). SAMPLE_WEIGHTS: W, W2 are (B, N, K) and colsum, colsum2, bias, bias2
        (B, N), batch strides stride_wb, stride_vb; every row tile lies in one sample
        (n_tokens % BLOCK_M == 0, checked by the host) and uses that sample's weights."""
        pid_m, pid_n = _tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        # Tails wrap around (duplicate valid rows/cols) so the main loop needs no M/N masks.
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
        if SAMPLE_WEIGHTS:
            w_offset = ((pid_m * BLOCK_M) // n_tokens).to(tl.int64) * stride_wb
            w_ptr += w_offset
            w2_ptr += w_offset
        w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
        w2_ptrs = w2_ptr + offs_n.to(tl.int64)[None, :] * stride_w2n + offs_k[:, None]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + offs_k) < K
            # K tails: masked A and masked W are zero, so they add nothing.
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
            acc, acc2 = _dot_k_step(a, w, w2_ptrs, k_mask, acc, acc2, GATED, EVEN_K, DOT_PRECISION)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            w2_ptrs += BLOCK_K

        if SAMPLE_WEIGHTS:
            # Offset here rather than before the K loop, where it would hold registers.
            v_offset = ((pid_m * BLOCK_M) // n_tokens).to(tl.int64) * stride_vb
            colsum_ptr += v_offset
            colsum2_ptr += v_offset
            bias_ptr += v_offset
            bias2_ptr += v_offset
        if NORMALIZE:
            mean, rstd = _row_mean_rstd(stats_ptr, offs_m, K, eps, stride_plane, stride_sm, GROUPS_POW2, GROUP,
                                        NORM_RMS)
            acc = _fold_row_mean(acc, mean, rstd, colsum_ptr, offs_n)
        if GATED and NORMALIZE:
            acc2 = _fold_row_mean(acc2, mean, rstd, colsum2_ptr, offs_n)
        y = _bias_and_gate(acc, acc2, bias_ptr, bias2_ptr, offs_n, GATED)
        if RESIDUAL:
            # the wrapped (always valid) rows and columns of the tile, as in the main loop
            y += tl.load(res_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :]).to(tl.float32)
        _store_tile(y, out_ptr, out_stats_ptr, pid_m, pid_n, M, N, stride_om, stride_out_plane, stride_out_sm,
                    EMIT_STATS, GROUP, BLOCK_M, BLOCK_N)

    def _tile_modulation(args) -> int:
        """How a tile of the normalize-on-load GEMM finds its modulation rows: 0 none, 1 one
        vector (shared, or the tile lies in one sample), 2 the tile straddles two samples,
        3 gather per row."""
        kind, tokens, block_m = args["MODULATION"], args["n_tokens"], args["BLOCK_M"]
        if kind == MODULATION_NONE:
            return 0
        if kind == MODULATION_SHARED or tokens % block_m == 0:
            return 1
        return 2 if tokens >= block_m else 3

    def _autotuned(kernel, key: list[str], heuristics: dict) -> dict[str, object]:
        """``kernel`` autotuned per operand kind: fp32, 16-bit, 16-bit with the gate."""
        derived = triton.heuristics(dict(heuristics, EVEN_K=lambda args: args["K"] % args["BLOCK_K"] == 0))
        return {
            "fp32": triton.autotune(_CONFIGS_FP32, key=key)(derived(kernel)),
            "16bit": triton.autotune(_CONFIGS_16BIT, key=key)(derived(kernel)),
            "16bit_gated": triton.autotune(_CONFIGS_16BIT_GATED, key=key)(derived(kernel)),
        }

    _NORMALIZE_ON_LOAD = _autotuned(_normalize_on_load_gemm_kernel,
                                    ["M", "N", "K", "GATED", "NORMALIZE", "NORM_RMS", "MODULATION"],
                                    {"TILE_MODULATION": _tile_modulation})
    _LAYERNORM_EPILOGUE = _autotuned(_layernorm_epilogue_gemm_kernel,
                                     ["M", "N", "K", "GATED", "NORMALIZE", "NORM_RMS", "RESIDUAL", "SAMPLE_WEIGHTS"], {})


def _num_groups(width: int) -> int:
    return -(-width // STATS_GROUP)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul policy so the fused op and cuBLAS agree; for
    # 16-bit inputs the setting has no effect and "tf32" is Triton's default.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _rowwise(t: torch.Tensor) -> torch.Tensor:
    """2D view with a unit column stride (the kernels assume it)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def chunk_moments(x: torch.Tensor) -> torch.Tensor:
    """Per-row partial moments that the fused GEMMs normalise with.

    x: (M, D) -> fp32 (2, M, ceil(D / 64)): [0] the mean, [1] the sum of squared
    deviations of each 64-column group (the last group may be narrower).
    """
    x = _rowwise(x)
    M, D = x.shape
    stats = torch.empty((2, M, _num_groups(D)), device=x.device, dtype=torch.float32)
    block_m = 16 if interpreter_enabled() else 32
    grid = (triton.cdiv(M, block_m), _num_groups(D))
    _chunk_moments_kernel[grid](
        x, stats, M, D, x.stride(0), stats.stride(0), stats.stride(1),
        BLOCK_M=block_m, GROUP=STATS_GROUP, num_warps=4,
    )
    return stats


def tiles_within_samples(tokens_per_sample: int, dtype: torch.dtype) -> bool:
    """Whether every row tile of the fused GEMM for ``dtype`` lies inside one sample, i.e.
    ``tokens_per_sample`` is a multiple of every candidate BLOCK_M (per-sample weights need it)."""
    configs = _CONFIGS_FP32 if dtype == torch.float32 else _CONFIGS_16BIT + _CONFIGS_16BIT_GATED
    return tokens_per_sample > 0 and all(tokens_per_sample % c.kwargs["BLOCK_M"] == 0 for c in configs)


def folds_modulation(dtype: torch.dtype, tokens_per_sample: int) -> bool:
    """Whether a per-sample modulation of the fused GEMM's input is folded into per-sample
    weights (16-bit weights, every row tile inside one sample) rather than applied on load."""
    return dtype != torch.float32 and tiles_within_samples(tokens_per_sample, dtype)


def _gemm_variant(kernels: dict, dtype: torch.dtype, gated: bool):
    if dtype == torch.float32:
        return kernels["fp32"]
    return kernels["16bit_gated" if gated else "16bit"]


def _check_gate(weight: torch.Tensor, up_weight: torch.Tensor | None, up_bias: torch.Tensor | None) -> None:
    if (up_weight is None) != (up_bias is None):
        raise ValueError("the SwiGLU gate needs both up_weight and up_bias")
    if up_weight is not None and up_weight.shape != weight.shape:
        raise ValueError(f"up_weight must match weight's shape {tuple(weight.shape)}, got {tuple(up_weight.shape)}")


def _output(a: torch.Tensor, n: int, dtype: torch.dtype, emit_stats: bool):
    """The output (M, n) and, when asked, its partial-moments buffer (2, M, ceil(n / 64))."""
    out = torch.empty((a.shape[0], n), device=a.device, dtype=dtype)
    stats = torch.empty((2, a.shape[0], _num_groups(n)), device=a.device, dtype=torch.float32) if emit_stats else None
    return out, stats


def _grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def normalize_on_load_gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    stats: torch.Tensor | None = None,
    eps: float = 0.0,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    tokens_per_sample: int | None = None,
    up_weight: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    emit_stats: bool = False,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One GEMM launch whose A tile is normalised and modulated as it is loaded:
    out = epilogue((LN(a) * scale + shift) @ weight^T).

    a: (M, K). LN (no affine, ``eps``; the RMSNorm when ``rms``) is applied when ``stats``
    (from ``chunk_moments`` or a previous ``emit_stats``) is given. scale/shift: None, (K,) shared by all rows, or
    (B, K) per sample with row r in sample r // tokens_per_sample. weight: (N, K), bias:
    (N,). With ``up_weight``/``up_bias`` (N, K)/(N,) the epilogue is the SwiGLU gate
    SiLU(a' W^T + b) * (a' Wu^T + bu). Returns out (M, N) in the weight dtype and, if
    ``emit_stats``, the partial moments (2, M, ceil(N / 64)) of out.
    """
    a, weight = _rowwise(a), _rowwise(weight)
    M, K = a.shape
    N = weight.shape[0]
    _check_gate(weight, up_weight, up_bias)
    gated = up_weight is not None
    if gated:
        up_weight = _rowwise(up_weight)
    n_tokens, n_samples = (tokens_per_sample or M), 1
    if scale is None:
        modulation, stride_cb = MODULATION_NONE, 0
    elif scale.dim() == 1:
        modulation, stride_cb = MODULATION_SHARED, 0
    else:
        # (B, K) vectors are tiny: contiguous copies give scale and shift one batch stride.
        if tokens_per_sample is None:
            raise ValueError("per-sample scale/shift (B, K) need tokens_per_sample")
        scale, shift = scale.contiguous(), shift.contiguous()
        n_samples, stride_cb, modulation = scale.shape[0], scale.stride(0), MODULATION_PER_SAMPLE
    out, out_stats = _output(a, N, weight.dtype, emit_stats)
    unused = out  # stands in for absent pointers; never dereferenced (constexpr-disabled)
    stats_t = stats if stats is not None else out_stats if out_stats is not None else torch.empty(
        (2, 1, 1), device=a.device, dtype=torch.float32)
    out_stats_t = out_stats if out_stats is not None else stats_t
    kernel = _gemm_variant(_NORMALIZE_ON_LOAD, weight.dtype, gated)
    kernel[_grid(M, N)](
        a, stats_t, scale if scale is not None else unused, shift if shift is not None else unused,
        weight, bias, up_weight if gated else weight, up_bias if gated else bias, out, out_stats_t,
        M, N, K, n_tokens, n_samples, float(eps),
        a.stride(0), stats_t.stride(0), stats_t.stride(1), stride_cb, weight.stride(0),
        up_weight.stride(0) if gated else 0, out.stride(0), out_stats_t.stride(0), out_stats_t.stride(1),
        NORMALIZE=stats is not None, NORM_RMS=rms, MODULATION=modulation, GATED=gated, EMIT_STATS=emit_stats,
        GROUPS_POW2=triton.next_power_of_2(_num_groups(K)), GROUP=STATS_GROUP,
        DOT_PRECISION=dot_precision(weight.dtype),
    )
    return out, out_stats


def layernorm_epilogue_gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    stats: torch.Tensor | None = None,
    eps: float = 0.0,
    colsum: torch.Tensor | None = None,
    tokens_per_sample: int | None = None,
    up_weight: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    up_colsum: torch.Tensor | None = None,
    out_residual: torch.Tensor | None = None,
    emit_stats: bool = False,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One GEMM launch whose K loop is a pure GEMM, the rows' LayerNorm applied in the
    epilogue: out = rstd * (a W^T - mean * colsum) + bias [gate] [+ out_residual]
    (``rms``: the RMSNorm, mean 0).

    a: (M, K) as stored. With ``stats`` (a's partial moments) and ``colsum`` (N,) fp32 =
    weight.sum(1) of the stored weights, LN(a) @ W^T (no affine, ``eps``); without them
    a plain a @ W^T. weight: (N, K), bias: (N,), or per-sample weights (B, N, K) with
    bias/colsum (B, N) giving row r those of sample r // tokens_per_sample, which needs
    ``tiles_within_samples(tokens_per_sample, weight.dtype)``. With ``up_weight``/``up_bias``
    (and ``up_colsum`` when normalising) of the same shapes the epilogue is the SwiGLU gate.
    ``out_residual`` (M, N) is added to the output. Returns out (M, N) in the weight dtype
    and, if ``emit_stats``, the partial moments (2, M, ceil(N / 64)) of out.
    """
    a = _rowwise(a)
    M, K = a.shape
    N = weight.shape[-2]
    _check_gate(weight, up_weight, up_bias)
    gated = up_weight is not None
    if (stats is None) != (colsum is None) or (gated and (colsum is None) != (up_colsum is None)):
        raise ValueError("the epilogue LayerNorm needs stats and colsum (and up_colsum with up_weight), or none")
    sample_weights = weight.dim() == 3
    if sample_weights:
        if tokens_per_sample is None or weight.shape[0] * tokens_per_sample != M:
            raise ValueError(f"per-sample weights {tuple(weight.shape)} need tokens_per_sample with "
                             f"B * tokens_per_sample = M = {M}, got tokens_per_sample={tokens_per_sample}")
        if not tiles_within_samples(tokens_per_sample, weight.dtype):
            raise ValueError(f"per-sample weights need every row tile inside one sample; tokens_per_sample="
                             f"{tokens_per_sample} is not a multiple of the tile rows: use (N, K) weights")
        # Batched operands share one batch stride: contiguous copies (no-ops for the
        # freshly folded tensors) make it so.
        weight, bias = weight.contiguous(), bias.contiguous()
        colsum = colsum.contiguous() if colsum is not None else None
        if gated:
            up_weight, up_bias = up_weight.contiguous(), up_bias.contiguous()
            up_colsum = up_colsum.contiguous() if up_colsum is not None else None
        stride_wb, stride_vb = weight.stride(0), bias.stride(0)
    else:
        weight = _rowwise(weight)
        up_weight = _rowwise(up_weight) if gated else None
        stride_wb, stride_vb = 0, 0
    if out_residual is not None:
        if out_residual.shape != (M, N):
            raise ValueError(f"out_residual must have the output's shape {(M, N)}, got {tuple(out_residual.shape)}")
        out_residual = _rowwise(out_residual)
    out, out_stats = _output(a, N, weight.dtype, emit_stats)
    stats_t = stats if stats is not None else out_stats if out_stats is not None else torch.empty(
        (2, 1, 1), device=a.device, dtype=torch.float32)
    out_stats_t = out_stats if out_stats is not None else stats_t
    colsum_t = colsum if colsum is not None else stats_t  # never dereferenced without NORMALIZE
    kernel = _gemm_variant(_LAYERNORM_EPILOGUE, weight.dtype, gated)
    kernel[_grid(M, N)](
        a, stats_t, colsum_t, up_colsum if up_colsum is not None else colsum_t,
        weight, bias, up_weight if gated else weight, up_bias if gated else bias,
        out_residual if out_residual is not None else a, out, out_stats_t,
        M, N, K, tokens_per_sample or M, float(eps),
        a.stride(0), stats_t.stride(0), stats_t.stride(1), weight.stride(-2),
        up_weight.stride(-2) if gated else 0, stride_wb, stride_vb,
        out_residual.stride(0) if out_residual is not None else 0,
        out.stride(0), out_stats_t.stride(0), out_stats_t.stride(1),
        NORMALIZE=stats is not None, NORM_RMS=rms, GATED=gated, SAMPLE_WEIGHTS=sample_weights,
        RESIDUAL=out_residual is not None,
        EMIT_STATS=emit_stats, GROUPS_POW2=triton.next_power_of_2(_num_groups(K)), GROUP=STATS_GROUP,
        DOT_PRECISION=dot_precision(weight.dtype),
    )
    return out, out_stats


def folded_norm_linear(
    weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold a LayerNorm's affine (gamma, beta) into the Linear after it, from the live parameters.

    linear(LN(h) * gamma + beta) = rstd * (h W'^T - mean colsum) + b' with W' = W * gamma
    (N, K) in the weight dtype, b' = b + W beta and colsum = W'.sum(1), both fp32 (N,),
    colsum summed from the rounded W' so the mean correction cancels exactly what the GEMM
    adds. gamma, beta: (K,), or (B, K) for one fold per sample in one launch, which gives
    W' (B, N, K) and b', colsum (B, N). One pass over W per call: unlike a cache keyed on
    ``_version``, it cannot go stale when weights are updated through ``.data`` (which
    bypasses the version counter).
    """
    N, K = weight.shape
    if gamma.shape != beta.shape or gamma.dim() not in (1, 2) or gamma.shape[-1] != K:
        raise ValueError(f"gamma and beta must both be (K,) or (B, K) with K = {K}, "
                         f"got {tuple(gamma.shape)} and {tuple(beta.shape)}")
    weight = _rowwise(weight)
    batch = () if gamma.dim() == 1 else (gamma.shape[0],)
    gamma, beta = gamma.reshape(-1, K).contiguous(), beta.reshape(-1, K).contiguous()
    folded_w = torch.empty((*batch, N, K), device=weight.device, dtype=weight.dtype)
    folded_b = torch.empty((*batch, N), device=weight.device, dtype=torch.float32)
    colsum = torch.empty((*batch, N), device=weight.device, dtype=torch.float32)
    block_n, block_k = (32, 256) if interpreter_enabled() else (16, 256)
    _fold_norm_kernel[(gamma.shape[0], triton.cdiv(N, block_n))](
        weight, bias, gamma, beta, folded_w, folded_b, colsum, N, K,
        weight.stride(0), gamma.stride(0), N * K, K, N,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return folded_w, folded_b, colsum


def dtype_refusal(tensors: list[torch.Tensor]) -> str | None:
    """Why the fused GEMM kernels cannot take these inputs and parameters (their dtypes), or None."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _SUPPORTED_DTYPES:
        return (f"the fused kernels need inputs and parameters of one dtype among fp32/bf16/fp16, "
                f"got {sorted(map(str, dtypes))}")
    return None
