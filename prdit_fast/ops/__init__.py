"""The fast ops, as functions on tensors. Each module holds one op family: its ``@triton.jit``
kernels, the launcher, the ``torch.autograd.Function`` and the functional API; each op has
a plain-torch reference that the tests compare against. ``dispatch`` decides which
implementation runs (``impl="auto" | "torch" | "triton"``, and "gemm" for the local denoiser).

    unfold3d, fold3d           unfold.py          volume <-> overlapping window tokens
    unpatchify                 token_cubes.py     tokens (+ residual tokens) -> volume
    layernorm_modulate, ...    adaln.py           adaLN-Zero LayerNorm + modulation (+ gate)
    adaptive_swiglu            swiglu.py          the adaptive SwiGLU as fused GEMMs
    swiglu_gate_layernorm      swiglu_gate.py     SiLU gate + LayerNorm between cuBLAS GEMMs
    local_denoiser             denoiser.py        the whole local denoiser
    gated_residual_linear      gated_residual_gemm.py  x + gate * (a W^T + b) in one GEMM's epilogue
    attention                  attention_backends.py   flash-attn / cuDNN / SDPA / xformers / math
    sampler_update, initial_noise, step_noise   sampling.py   the sampler step with Philox noise
    flow_update                flow_update.py     the flow-matching solver stage from velocity tokens
    sr_assemble                sr_assemble.py     PRDiT-SR: upsampled base prediction + head tokens
    ms_ssim_cross              ms_ssim_cross.py   MS-SSIM's per-pair cross term and formula at one scale
"""
from .adaln import embed_layernorm_modulate, gated_residual_layernorm_modulate, layernorm_modulate
from .attention_backends import attention
from .denoiser import local_denoiser
from .dispatch import ImplUnavailable, default_impl, resolve
from .flow_update import flow_update
from .gated_residual_gemm import gated_residual_linear
from .ms_ssim_cross import ms_ssim_cross
from .sampling import initial_noise, sampler_update, step_noise
from .sr_assemble import sr_assemble
from .swiglu import adaptive_swiglu
from .swiglu_gate import swiglu_gate_layernorm
from .token_cubes import unpatchify
from .unfold import fold3d, unfold3d

__all__ = [
    "ms_ssim_cross",
    "unfold3d",
    "fold3d",
    "unpatchify",
    "layernorm_modulate",
    "gated_residual_layernorm_modulate",
    "embed_layernorm_modulate",
    "adaptive_swiglu",
    "swiglu_gate_layernorm",
    "local_denoiser",
    "gated_residual_linear",
    "attention",
    "sampler_update",
    "initial_noise",
    "step_noise",
    "flow_update",
    "sr_assemble",
    "resolve",
    "default_impl",
    "ImplUnavailable",
]
