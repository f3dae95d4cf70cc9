"""The fast backend of PRDiT-SR (spec section 8): ``accelerate`` on a ``PRDiTSR``.

``FastPRDiTSR`` registers the reference wrapper's own submodules under the official
names (``base`` is a ``FastPRDiT`` over the reference base, whose state dict is the
base's; ``t_embedder_sr``; ``sr``), so parameters are shared and state dicts identical.
Per step, for x at S_hi:

* the base (a FastPRDiT at S_lo) reads the nearest downsample ``x[..., ::f, ::f, ::f]``
  as a strided VIEW: its Triton unfold takes any strides, so no S_lo copy of x is made;
* the head is the fast local denoiser path of a FastPRDiT over the head viewed as a
  depth-0 PRDiT at S_hi (``PRDiTSR.head_as_prdit``): one unfold, the fused local denoiser;
* assembly: the base's coarse + fine tokens become its (B, 2C, S_lo^3) prediction in one
  unpatchify kernel; eps is upsampled nearest and x0 trilinearly (``F.interpolate``) and
  added to the head's output (``forward``), or handed to the engine's fused sampler update
  as a residual in the head's token layout (``token_parts``).

The upsampled prediction is a full-resolution intermediate (plus its token-layout copy in
sampling): the fusion of the upsample into the unpatchify / sampler update is not built.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from typing import Mapping

from .engine import volume_to_tokens
from .fast import FastPRDiT
from .ops import unpatchify
from .sr import PRDiTSR, SRConfig, downsample_nearest, upsample_prediction


class FastPRDiTSR(nn.Module):
    """PRDiT-SR forward over the reference wrapper's parameters.

    forward(x (B, C, S_hi^3), t (B,), return_base=False) -> (B, 2C, S_hi^3) fp32, like
    ``PRDiTSR.forward``; token_parts(x, t) -> (head tokens in the compute dtype, the
    upsampled base prediction as fp32 tokens), each (B, N', s'^3 2C), whose fp32 sum is the
    output in the head's token layout (what ``prdit_fast.engine.Sampler`` reads).
    Build it with ``prdit_fast.fast.accelerate``.
    """

    check_input = PRDiTSR.check_input
    head_modules = PRDiTSR.head_modules
    head_parameters = PRDiTSR.head_parameters
    set_base_trainable = PRDiTSR.set_base_trainable
    base_trainable = PRDiTSR.base_trainable

    def __init__(self, reference: PRDiTSR, dtype: torch.dtype = torch.bfloat16, attention: str = "auto",
                 impl: str | Mapping[str, str] = "auto"):
        super().__init__()
        self.config: SRConfig = reference.config
        self.base = FastPRDiT(reference.base, dtype=dtype, attention=attention, impl=impl)
        self.t_embedder_sr = reference.t_embedder_sr
        self.sr = reference.sr
        self.dtype = self.base.dtype
        self.attention = attention
        self.impl = impl
        # kept out of the module tree so no parameter is registered twice
        self.__dict__["_reference"] = reference
        self.__dict__["_head"] = FastPRDiT(reference.head_as_prdit(), dtype=dtype, attention=attention, impl=impl)

    @property
    def reference(self) -> PRDiTSR:
        """The reference wrapper over the same parameters (the numerical truth)."""
        return self._reference

    def invalidate_cache(self) -> None:
        """Drop the derived-weight caches (needed only after writes through ``param.data``)."""
        self.base.invalidate_cache()
        self._head.invalidate_cache()

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, attention={self.attention!r}, impl={self.impl!r}"

    # ------------------------------------------------------------------ forward
    def base_prediction(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The base's [eps_lo, x0_lo] (B, 2C, S_lo^3) fp32, read from the strided downsample."""
        base = self.base.config
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.base_trainable):
            coarse, fine = self.base.token_parts(downsample_nearest(x, self.config.factor), t)
            return unpatchify(coarse, base.input_size, base.stride, base.out_channels, fine, out_dtype=torch.float32,
                              impl=self.base._impls["unpatchify"])

    def _upsampled_base(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        base_out = self.base_prediction(x, t)
        return upsample_prediction(base_out, self.config.input_size, self.config.in_channels), base_out

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_base: bool = False):
        self.check_input(x, t)
        cfg = self.config
        head, _ = self._head.token_parts(x, t)
        up, base_out = self._upsampled_base(x, t)
        out = unpatchify(head, cfg.input_size, cfg.stride, cfg.out_channels, out_dtype=torch.float32,
                         impl=self._head._impls["unpatchify"]) + up
        return (out, base_out) if return_base else out

    def token_parts(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(head tokens (B, N', s'^3 2C) compute dtype, upsampled base prediction as fp32
        tokens of the same layout); their fp32 sum is the output."""
        self.check_input(x, t)
        head, _ = self._head.token_parts(x, t)
        up, _ = self._upsampled_base(x, t)
        return head, volume_to_tokens(up, self.config.stride)

