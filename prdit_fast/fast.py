"""The fast PRDiT backend: the reference network's own parameters, a faster forward.

``accelerate(model)`` wraps a reference ``PRDiT`` (or any module with the official
structure) in a ``FastPRDiT`` that REGISTERS the reference's ``t_embedder``, ``coarse``
and ``fine`` submodules under the same names: ``state_dict()`` keys are identical, the
parameters are the same tensors (no copy), ``load_state_dict`` of an official
checkpoint works on either, and training the FastPRDiT trains the reference.

What runs per step (B volumes, N tokens, hidden h):

* ONE unfold of the input volume; the tokens feed both the local denoiser and the
  patch embedder. Where windows tile without overlap (the stride-16 256^3 models: p = s
  = 16, pad 0) the unfold is one blocked copy (``ops.unfold.blocked_unfold3d``). The
  head is whatever the config says: [eps_hat, x0_hat] (IaN) or the flow-matching
  velocity (``out_channels`` = C); t may be an integer step or the float 1000 t.
* Timestep embedding, ``coarse_head``/``fine_head`` and ALL adaLN modulation vectors in
  fp32: the ``adaLN_modulation.1`` weights of every block and of the final layer are
  concatenated into one (6 h depth + 2 h, h) matrix, so the modulation of a whole step is
  one GEMM on SiLU(c_fine).
* Patch embedder: ``fc1`` + tanh-GELU as one GEMM with a GELU epilogue (see
  ``_linear_gelu``); ``skip`` with fc2's bias is ``fc2``'s accumulator input (``addmm``),
  so ``fc2(gelu(fc1 x)) + skip x`` needs no separate add. Its LayerNorm (affine), the
  positional encoding and the first block's LayerNorm + modulation are ONE Triton pass
  (``embed_layernorm_modulate``): it reads fc2's compute-dtype output once and writes the
  fp32 residual stream and the first GEMM input.
* DiT blocks: the residual stream stays fp32; every ``LayerNorm + modulate`` is one Triton
  kernel writing the GEMM input in the compute dtype, and every ``x + gate * branch`` is
  fused with the LayerNorm + modulation that follows it (``prdit_fast.ops.adaln``).
  Attention through ``prdit_fast.ops.attention_backends`` (flash-attn / cuDNN / flash SDPA / ...).
  GEMMs are cuBLAS in the compute dtype (bf16 by default); in inference on CUDA the MLP's
  ``fc1`` + tanh-GELU is one cuBLASLt GEMM with a GELU epilogue, in training GELU is a
  separate elementwise pass (the epilogue op has no backward).
* The local denoiser is ``prdit_fast.ops.local_denoiser`` on a view of
  ``coarse.mlp_denoise`` whose parameter slots hold the cached compute-dtype weights: for
  16-bit CUDA tokens its cuBLAS path (fused LayerNorm + modulation, one GEMM for both gate
  halves, a fused SiLU-gate + LayerNorm kernel), otherwise the fused adaptive-SwiGLU
  kernels (``prdit_fast.ops.dispatch`` decides, and says why).
* Output assembly in fp32: coarse + fine tokens are summed in fp32 and unpatchified, in
  one kernel; the sampling engine passes both parts to its update kernel instead, which
  sums them as it reads them.

Derived weights (the compute-dtype casts and the concatenations above) are cached
(``prdit_fast.ops.derived.DerivedWeights``, the one cache the ops use too), keyed on each
source parameter's identity, ``data_ptr`` and ``_version``: an optimizer step,
``load_state_dict``, ``.to()`` or any in-place update under ``torch.no_grad()`` refreshes
them at the next forward. The cache is plain tensors, not parameters or buffers (the
state dict is unchanged); it costs one compute-dtype copy of the weights. Writes through
``param.data`` bypass the version counter: call ``invalidate_cache()`` after those. When a
parameter requires grad and autograd is on, its derived weights are rebuilt every forward
(differentiably) instead, so training gets exact gradients.

Tolerances (tests/test_fast.py): with ``dtype=torch.float32`` the output and gradients
match the reference within 1e-4 of their largest magnitude (only summation order
differs). bf16 (GEMM and attention inputs rounded to 8 mantissa bits; statistics,
modulation, residual stream and output sum in fp32): the GPU tests allow 3e-2 relative
RMS error on the output and 5e-2 on gradients (the bf16 errors measured on the CPU:
benchmarks/results/design-notes.md).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import models
from .interface import OfficialInterface, last_block
from .models import PRDiT, PRDiTConfig
from .ops import (
    attention,
    embed_layernorm_modulate,
    gated_residual_layernorm_modulate,
    local_denoiser,
    unfold3d,
    unpatchify,
)
from .ops.attention_backends import ATTENTION_BACKENDS
from .ops.derived import DerivedWeights
from .ops.dispatch import GEMM, per_op_impl, resolve
from .ops.fp8_linear import E4M3, fp8_linear, fp8_unsupported, quantize_e4m3
from .sr import PRDiTSR
from .sr_fast import FastPRDiTSR
from .checkpoint_read import strip_wrapper_prefixes
from .state_dict import infer_architecture

# float8_e4m3fn: the GEMMs in FP8 with per-row scales (inference only), the rest in bf16
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, E4M3)
# the ops a FastPRDiT forward runs, whose implementation ``impl`` chooses (attention has
# its own ``attention`` choice of library)
FAST_OPS = (
    "unfold3d", "local_denoiser", "embed_layernorm_modulate", "gated_residual_layernorm_modulate", "fp8_linear",
    "unpatchify",
)


class FastPRDiT(OfficialInterface, nn.Module):
    """PRDiT forward over the reference's parameters: bf16 GEMMs, fused adaLN, fast attention.

    forward(x (B, C, S, S, S), t (B,)) -> (B, 2C, S, S, S) fp32, like ``PRDiT.forward``, with
    the whole official interface (``prdit_fast.interface``: int / 0-d t, ``y``,
    ``return_intermediate``, ``mode="encode"``, the feature helpers);
    forward_tokens(x, t) -> (B, N, s^3 Cout) fp32, the same before unpatchify;
    token_parts(x, t) -> (coarse, fine) tokens in the compute dtype, before their sum.
    Build it with ``accelerate``.
    """

    # the reference's helpers work unchanged on the shared submodules
    check_input = PRDiT.check_input
    coarse_parameters = PRDiT.coarse_parameters
    freeze_coarse_path = PRDiT.freeze_coarse_path
    initialize_weights = PRDiT.initialize_weights

    def __init__(
        self,
        reference: PRDiT,
        dtype: torch.dtype = torch.bfloat16,
        attention: str = "auto",
        impl: str | Mapping[str, str] = "auto",
    ):
        super().__init__()
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {dtype}")
        if attention != "auto" and attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be 'auto' or one of {list(ATTENTION_BACKENDS)}, got {attention!r}")
        self.config: PRDiTConfig = reference.config
        # dtype of the GEMM operands; activations, attention and the local denoiser run in
        # ``dtype`` (bf16 when the GEMMs are FP8)
        self.gemm_dtype = dtype
        self.dtype = torch.bfloat16 if dtype == E4M3 else dtype
        self.attention = attention
        self.impl = impl
        self._impls = per_op_impl(impl, FAST_OPS)  # op name -> "auto" | "torch" | "triton" | "gemm"
        self.t_embedder = reference.t_embedder
        self.coarse = reference.coarse
        self.fine = reference.fine
        # kept out of the module tree so its parameters are not registered twice
        self.__dict__["_reference"] = reference
        self._derived = DerivedWeights()
        # the local denoiser's structure holding compute-dtype views of its weights, for
        # the fused op, which wants inputs and weights in one dtype (built on first use)
        self.__dict__["_shadow_denoiser"] = None

    @property
    def reference(self) -> PRDiT:
        """The reference network over the same parameters (the numerical truth)."""
        return self._reference

    def invalidate_cache(self) -> None:
        """Drop the derived-weight cache (needed only after writes through ``param.data``)."""
        self._derived.clear()

    def extra_repr(self) -> str:
        return f"dtype={self.gemm_dtype}, attention={self.attention!r}, impl={self.impl!r}"

    # ------------------------------------------------------------------ weights
    def _cast(self, name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or tensor.dtype == self.dtype:
            return tensor
        return self._derived.get(name, (tensor,), lambda: tensor.to(self.dtype))

    def _linear(self, name: str, layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._cast(name + ".weight", layer.weight), self._cast(name + ".bias", layer.bias)

    def _gemm(self, name: str, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        """``layer(x)`` in the GEMM dtype: (..., K) -> (..., N) in the compute dtype. FP8: the
        weight quantized once per row (cached), x per row on the way (``ops.fp8_linear``)."""
        if self.gemm_dtype != E4M3:
            return F.linear(x, *self._linear(name, layer))
        weight_q, weight_scale = self._quantized(name + ".e4m3", layer.weight)
        bias = self._cast(name + ".bias", layer.bias)
        return fp8_linear(x, weight_q, weight_scale, bias, out_dtype=self.dtype, impl=self._impls["fp8_linear"])

    def _quantized(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(e4m3 weight, per-row scales) of ``weight``, cached under ``name``."""
        return self._derived.get(name, (weight,), lambda: quantize_e4m3(weight))

    def _denoiser_fp8_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear`` for the local denoiser's GEMMs in FP8: its weights (compute-dtype casts
        and the [Wg; Wx] concatenation, each a cached tensor) quantized once, keyed by storage."""
        weight_q, weight_scale = self._quantized(f"denoiser.e4m3@{weight.data_ptr():x}", weight)
        return fp8_linear(x, weight_q, weight_scale, bias, out_dtype=self.dtype, impl=self._impls["fp8_linear"])

    def _gemm_gelu(self, name: str, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        """tanh-GELU(``layer(x)``): cuBLASLt's GELU epilogue in 16 bits, a separate pass after FP8."""
        if self.gemm_dtype != E4M3:
            return _linear_gelu(x, *self._linear(name, layer))
        return F.gelu(self._gemm(name, x, layer), approximate="tanh")

    def _modulation_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[blocks.0 adaLN; ...; blocks.{depth-1} adaLN; final adaLN]: (6 h depth + 2 h, h), fp32."""
        layers = [b.adaLN_modulation[1] for b in self.fine.blocks] + [self.fine.final_layer.adaLN_modulation[1]]
        weights, biases = [m.weight for m in layers], [m.bias for m in layers]
        weight = self._derived.get("adaln.weight", weights, lambda: torch.cat(weights))
        bias = self._derived.get("adaln.bias", biases, lambda: torch.cat(biases))
        return weight, bias

    # ------------------------------------------------------------------ forward
    def train(self, mode: bool = True) -> "FastPRDiT":
        super().train(mode)
        self._reference.training = mode  # the submodules are shared; keep the reference's own flag in step
        return self

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, C, S, S, S), t (B,) -> (B, Cout, S, S, S) fp32: the network output."""
        cfg = self.config
        coarse, fine = self.token_parts(x, t)
        # the coarse + fine sum is fused into the layout kernel, in fp32
        tokens, residual = (coarse, None) if fine is None else (fine, coarse)
        return unpatchify(
            tokens, cfg.input_size, cfg.stride, cfg.out_channels, residual,
            out_dtype=torch.float32, impl=self._impls["unpatchify"],
        )

    def denoise_parts(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coarse volume, fine volume), each (B, Cout, S, S, S) fp32; depth > 0."""
        cfg = self.config
        return tuple(  # type: ignore[return-value]
            unpatchify(part, cfg.input_size, cfg.stride, cfg.out_channels, out_dtype=torch.float32,
                       impl=self._impls["unpatchify"])
            for part in self.token_parts(x, t)
        )

    def hidden_features(
        self, x: torch.Tensor, t: torch.Tensor, blocks: list[int], patch_embed: bool = False, final: bool = False
    ) -> dict[str, torch.Tensor]:
        """The transformer's fp32 residual stream (B, N, hidden) at "patch_embed", "block_i"
        (i in ``blocks``) and "final", as ``PRDiT.hidden_features``. Runs the unfold, the
        timestep MLP and fine head, the embedder and the blocks up to the last one needed
        (GEMMs in the compute dtype): no local denoiser, no final layer."""
        self.check_input(x, t)
        cfg = self.config
        last = last_block(cfg.depth, blocks, final, self._model_name())
        tokens = unfold3d(x, cfg.patch, cfg.stride, cfg.pad, out_dtype=self.dtype, impl=self._impls["unfold3d"])
        with torch.no_grad():  # the frozen coarse path's timestep MLP, as in forward
            c = self.t_embedder(t)
        wanted = {f"block_{i}" for i in blocks} | ({"patch_embed"} if patch_embed else set())
        out: dict[str, torch.Tensor] = {}

        def keep(name: str, state: torch.Tensor) -> None:
            if name in wanted:
                out[name] = state

        state = self._transformer(tokens, self.t_embedder.fine_head(c), last=last, keep=keep)
        keep(f"block_{last}", state)  # the state after the last block is returned, not kept
        if final:
            out["final"] = state
        return out

    def forward_tokens(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, C, S, S, S), t (B,) -> output tokens (B, N, s^3 Cout) fp32, coarse + fine,
        each an s^3 cube laid out (d, h, w, channel) as ``models.unpatchify`` expects."""
        coarse, fine = self.token_parts(x, t)
        return coarse.float() if fine is None else coarse.float() + fine.float()

    def token_parts(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, C, S, S, S), t (B,) -> (coarse tokens, fine tokens or None at depth 0),
        each (B, N, s^3 Cout) in the compute dtype; their fp32 sum is the output."""
        self.check_input(x, t)
        if self.gemm_dtype == E4M3:  # an explicit impl that cannot run fails before any work
            resolve("fp8_linear", self._impls["fp8_linear"], [x], fp8_unsupported(x.device))
        cfg = self.config
        # ONE unfold per step, casting on the store: the (B, N, D) tokens are written once,
        # in the compute dtype, straight from the fp32 volume
        tokens = unfold3d(x, cfg.patch, cfg.stride, cfg.pad, out_dtype=self.dtype, impl=self._impls["unfold3d"])
        frozen = self.fine is not None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            c = self.t_embedder(t)  # (B, hidden) fp32
            coarse = self._local_denoiser(tokens, self.t_embedder.coarse_head(c))
        if self.fine is None:
            return coarse, None
        return coarse, self._transformer(tokens, self.t_embedder.fine_head(c))

    def _local_denoiser(self, tokens: torch.Tensor, c_coarse: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D) compute dtype, c_coarse (B, D) fp32 -> (B, N, s^3 Cout)."""
        module = self.coarse.mlp_denoise
        if self.dtype != module.linear_final.weight.dtype:
            module = self._compute_dtype_denoiser()
            c_coarse = c_coarse.to(self.dtype)
        impl = self._impls["local_denoiser"]
        if self.gemm_dtype == E4M3 and resolve("local_denoiser", impl, [tokens, c_coarse]) == GEMM:
            # FP8 GEMMs in the cuBLAS-composed form; the other forms keep 16-bit GEMMs
            return local_denoiser(tokens, c_coarse, module, impl=GEMM, linear=self._denoiser_fp8_linear)
        return local_denoiser(tokens, c_coarse, module, impl=impl)

    def _compute_dtype_denoiser(self) -> nn.Module:
        """A LocalDenoiser whose parameter slots hold the (cached) compute-dtype casts of
        ``coarse.mlp_denoise``'s parameters; refreshed every call, so it never goes stale."""
        module = self.coarse.mlp_denoise
        shadow = self._shadow_denoiser
        if shadow is None:
            with torch.device("meta"):
                shadow = models.LocalDenoiser(
                    module.linear_final.in_features, module.linear_final.out_features, self.config.norm
                )
            self.__dict__["_shadow_denoiser"] = shadow
        for name, param in module.named_parameters():
            owner, _, leaf = name.rpartition(".")
            # plain tensors in the parameter slots: the casts must stay differentiable
            shadow.get_submodule(owner)._parameters[leaf] = self._cast("coarse." + name, param)
        return shadow

    def _transformer(
        self, tokens: torch.Tensor, c_fine: torch.Tensor, last: int | None = None,
        keep: Callable[[str, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """tokens (B, N, D) compute dtype, c_fine (B, h) fp32.

        keep None: the whole transformer and its final layer -> fine tokens (B, N, s^3 Cout).
        Otherwise blocks 0..``last`` only: ``keep(name, state)`` receives the fp32 residual
        stream (B, N, h) as "patch_embed" and "block_i", and the state after block ``last``
        is returned (no final layer; the last residual update is a plain fp32 add)."""
        fine, cfg, dt = self.fine, self.config, self.dtype
        B, N, _ = tokens.shape
        h, heads = cfg.hidden, cfg.heads
        head = keep is None
        num_blocks = cfg.depth if head else last + 1
        weight, bias = self._modulation_weights()
        width = 6 * h * num_blocks + (2 * h if head else 0)  # only the modulation vectors that are used
        mod = F.linear(F.silu(c_fine), weight[:width], bias[:width])  # (B, width) fp32
        rms = cfg.norm == "rms"
        if rms:
            # TF-PRDiT: each block's 6h modulation vector ends with an RMSNorm (the final layer's does not)
            blocks_mod = F.rms_norm(mod[:, : 6 * h * num_blocks].view(B, num_blocks, 6 * h), (6 * h,), eps=models.RMS_EPS)
            mod = torch.cat([blocks_mod.reshape(B, -1), mod[:, 6 * h * num_blocks :]], dim=1)

        def vector(i: int) -> torch.Tensor:  # the i-th (B, h) modulation vector
            return mod[:, i * h : (i + 1) * h]

        pe = fine.patch_embedder
        rows = tokens.reshape(B * N, -1)
        act = self._gemm_gelu("embed.fc1", rows, pe.fc1)  # (B N, 4h)
        if self.gemm_dtype == E4M3:
            embedded = self._gemm("embed.fc2", act, pe.fc2) + self._gemm("embed.skip", rows, pe.skip)
        else:
            # the skip GEMM carries fc2's bias and is fc2's accumulator input: no separate add
            skip = F.linear(rows, self._cast("embed.skip.weight", pe.skip.weight),
                            self._cast("embed.fc2.bias", pe.fc2.bias))
            embedded = torch.addmm(skip, act, self._cast("embed.fc2.weight", pe.fc2.weight).t())  # (B N, h)
        blocks = fine.blocks
        adaln_impl = self._impls["gated_residual_layernorm_modulate"]
        x, y = embed_layernorm_modulate(  # x: the fp32 residual stream
            embedded.view(B, N, h), pe.norm.weight, pe.norm.bias, pe.norm.eps, fine.pos_embed,
            vector(0), vector(1), blocks[0].norm1.eps, dt, self._impls["embed_layernorm_modulate"], rms=rms,
        )
        if keep is not None:
            keep("patch_embed", x)
        for i in range(num_blocks):
            block, name = blocks[i], f"blocks.{i}"
            qkv = self._gemm(name + ".qkv", y, block.attn.qkv).view(B, N, 3, heads, h // heads)
            attended = attention(qkv, self.attention).reshape(B, N, h)
            branch = self._gemm(name + ".proj", attended, block.attn.proj)
            x, y = gated_residual_layernorm_modulate(
                x, vector(6 * i + 2), branch, vector(6 * i + 3), vector(6 * i + 4), block.norm2.eps, dt, adaln_impl,
                rms=rms,
            )
            hidden = self._gemm_gelu(name + ".fc1", y, block.mlp.fc1)
            branch = self._gemm(name + ".fc2", hidden, block.mlp.fc2)
            if not head and i == last:  # features end here: no next norm to fuse with
                return x + vector(6 * i + 5).unsqueeze(1) * branch.float()
            # the next norm is the next block's norm1, or the final layer's (a LayerNorm in both variants)
            nxt = 6 * (i + 1)
            final = i + 1 == len(blocks)
            eps = fine.final_layer.norm_final.eps if final else blocks[i + 1].norm1.eps
            x, y = gated_residual_layernorm_modulate(
                x, vector(6 * i + 5), branch, vector(nxt), vector(nxt + 1), eps, dt, adaln_impl, rms=rms and not final
            )
            if keep is not None:
                keep(f"block_{i}", x)
        return self._gemm("final", y, fine.final_layer.linear)


def _linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """tanh-GELU(x W^T + b): (..., K) -> (..., M). On CUDA without autograd, cuBLASLt's
    bias + GELU epilogue (tanh approximation; the CUDA fallback also applies tanh-GELU)
    saves a pass over the 4h-wide activations; ``_addmm_activation`` has no backward, and
    on the CPU it applies the erf GELU, so elsewhere the plain composition runs."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    if x.is_cuda and not needs_grad:
        out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


# --------------------------------------------------------------------------- #
# Building a FastPRDiT
# --------------------------------------------------------------------------- #
def accelerate(
    model: nn.Module,
    dtype: torch.dtype = torch.bfloat16,
    attention: str = "auto",
    input_size: int | None = None,
    impl: str | Mapping[str, str] = "auto",
) -> FastPRDiT | FastPRDiTSR:
    """A FastPRDiT (or, for a PRDiT-SR wrapper, a FastPRDiTSR) sharing ``model``'s parameters.

    model: a ``PRDiT``, a ``FastPRDiT`` (re-wrapped with the new options), a PRDiT-SR
        wrapper (``prdit_fast.sr.PRDiTSR`` or its fast form: returns a
        ``prdit_fast.sr_fast.FastPRDiTSR``), or any module
        whose state dict has the official PRDiT structure (e.g. the official code's model,
        possibly DDP-wrapped); for the latter a reference PRDiT is built whose parameters
        ARE the module's parameter tensors.
    dtype: compute dtype of the GEMMs and attention (bf16, fp16 or fp32), or
        ``torch.float8_e4m3fn``: the GEMMs of the transformer, the patch embedder and (in its
        cuBLAS-composed "gemm" form, the 16-bit CUDA default) the local denoiser in FP8 with
        per-row scales on a GPU with FP8 tensor cores (sm_89+), everything else in bf16;
        inference only (``prdit_fast.ops.fp8_linear``).
    attention: 'auto' or a backend of ``prdit_fast.ops.attention_backends``.
    input_size: volume edge S; needed only for a foreign module whose size cannot be read
        from it (a depth-0 model without ``config`` / ``input_size`` / ``pos_embed``).
    impl: which implementation runs each op (``prdit_fast.ops.dispatch``): "auto" (the
        documented default per device and dtype), "triton" (the Triton kernels; raises
        where they cannot run), "torch" (the plain-torch references: same data flow, same
        cached weights), or a mapping from op names in ``FAST_OPS`` to choices, e.g.
        ``{"local_denoiser": "gemm"}`` (ops not named run "auto").
    """
    if isinstance(model, PRDiTSR) or isinstance(getattr(model, "reference", None), PRDiTSR):
        reference = model if isinstance(model, PRDiTSR) else model.reference
        return FastPRDiTSR(reference, FastPRDiT, dtype=dtype, attention=attention, impl=impl)
    if isinstance(model, FastPRDiT):
        model = model.reference
    if not isinstance(model, PRDiT):
        model = _reference_sharing(model, input_size)
    elif input_size is not None and input_size != model.config.input_size:
        raise ValueError(
            f"model was built for input_size={model.config.input_size}; build the reference at "
            f"{input_size} (the weights do not depend on it) instead of passing input_size"
        )
    return FastPRDiT(model, dtype=dtype, attention=attention, impl=impl)


def _reference_sharing(module: nn.Module, input_size: int | None) -> PRDiT:
    """A reference PRDiT built from ``module``'s state-dict shapes whose parameters are
    ``module``'s own parameter tensors."""
    params = strip_wrapper_prefixes(dict(module.named_parameters()))
    state = strip_wrapper_prefixes(module.state_dict())
    arch = infer_architecture(state)
    if arch is None:
        raise ValueError(
            f"{type(module).__name__} does not have the PRDiT structure: its state dict lacks "
            f"t_embedder.mlp.0.weight / t_embedder.coarse_head.weight / coarse.mlp_denoise.linear_final.weight"
        )
    heads = next((n for hid, n in models.SIZES.values() if hid == arch["hidden"]), None)
    if heads is None:
        raise ValueError(f"hidden width {arch['hidden']} is not a PRDiT size {dict(models.SIZES)}")
    size = input_size or _input_size_of(module, state, arch["hidden"], arch["stride"])
    norm = _foreign_norm(module)
    cfg = PRDiTConfig(
        hidden=arch["hidden"], heads=heads, depth=arch["depth"], patch=arch["patch"], input_size=size,
        in_channels=arch["in_channels"], stride=arch["stride"], pad=arch["pad"],
        name=models.canonical_name(arch["name"], norm) if arch["name"] else None,
        out_channels=arch["out_channels"], norm=norm,
    )
    with torch.device("meta"):  # shapes only: every parameter is replaced by the module's
        reference = PRDiT(cfg)
    ours = dict(reference.named_parameters())
    if set(ours) != set(params):
        missing, extra = sorted(set(ours) - set(params)), sorted(set(params) - set(ours))
        raise ValueError(
            f"{type(module).__name__} is not an official PRDiT: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, param in params.items():
        if param.shape != ours[name].shape:
            raise ValueError(f"{name}: shape {tuple(param.shape)} differs from {cfg.name}'s {tuple(ours[name].shape)}")
        owner, _, leaf = name.rpartition(".")
        setattr(reference.get_submodule(owner), leaf, param)
    device = next(iter(params.values())).device
    if reference.fine is not None:
        reference.fine.pos_embed = models.positional_encoding(cfg.grid, cfg.hidden)[None].to(device)
    return reference


def _foreign_norm(module: nn.Module) -> str:
    """The normalization of a foreign PRDiT-structured module, from its local denoiser's
    ``norm1``: "layer" for a LayerNorm, "rms" for an RMSNorm (the TF-PRDiT code's own class
    included, by name). The state dict cannot tell them apart, so anything else is an error."""
    norm1 = next((m for n, m in module.named_modules() if n.endswith("coarse.mlp_denoise.norm1")), None)
    if isinstance(norm1, nn.LayerNorm):
        return "layer"
    if norm1 is not None and "rms" in type(norm1).__name__.lower():
        return "rms"
    raise ValueError(
        f"cannot tell the normalization of {type(module).__name__}: coarse.mlp_denoise.norm1 is "
        f"{type(norm1).__name__ if norm1 is not None else 'absent'}, neither a LayerNorm (PRDiT) nor an RMSNorm "
        f"(TF-PRDiT); build a prdit_fast PRDiT (create_model(..., norm=...)) and load the weights into it"
    )


def _input_size_of(module: nn.Module, state: dict[str, torch.Tensor], hidden: int, stride: int) -> int:
    config = getattr(module, "config", None)
    for source in (config, module):
        for attr in ("input_size", "image_size"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, int):
                return value
    pos = state.get("fine.pos_embed")
    if pos is None:
        pos = next((b for n, b in module.named_buffers() if n.endswith("pos_embed")), None)
    if pos is not None and pos.shape[-1] == hidden:
        grid = round(pos.shape[-2] ** (1 / 3))
        return grid * stride
    raise ValueError(f"cannot tell the volume edge of {type(module).__name__}: pass accelerate(..., input_size=S)")

