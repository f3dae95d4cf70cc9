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
  unpatchify kernel (a 1/8-size volume); then ONE pass (``ops.sr_assemble``) reads it and
  the head's tokens and writes eps_up + eps_loc and x0_up + x0_loc (eps nearest, x0
  trilinear): the output volume in ``forward``, fp32 tokens in the head's layout in
  ``token_parts``, which the engine's fused sampler update reads. The upsampled base
  prediction never exists on its own.

In sampling there is no assembly pass at all: ``sr_parts`` hands the engine the head's
tokens and the base's low-resolution prediction, and the fused sampler update
(``ops.sampler_update(..., base=)``) upsamples and adds the base as it reads the head's
tokens, so no full-resolution intermediate sits between the network and the update. With
autograd on (training), the assembly is the plain-torch composition (``F.interpolate`` +
unpatchify), which has a backward; the Triton passes have none.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from typing import Callable, Mapping

from .interface import batch_timesteps
from .ops import unpatchify
from .ops.dispatch import per_op_impl
from .ops.sr_assemble import sr_assemble
from .sr import PRDiTSR, SRConfig, downsample_nearest, upsample_prediction


class FastPRDiTSR(nn.Module):
    """PRDiT-SR forward over the reference wrapper's parameters.

    forward(x (B, C, S_hi^3), t (B,), return_base=False) -> (B, 2C, S_hi^3) fp32, like
    ``PRDiTSR.forward``; token_parts(x, t) -> (the output as fp32 tokens (B, N', s'^3 2C)
    in the head's token layout, None): what ``prdit_fast.engine.Sampler`` reads.
    Build it with ``prdit_fast.fast.accelerate``.
    """

    check_input = PRDiTSR.check_input
    head_modules = PRDiTSR.head_modules
    head_parameters = PRDiTSR.head_parameters
    set_base_trainable = PRDiTSR.set_base_trainable
    base_trainable = PRDiTSR.base_trainable

    def __init__(self, reference: PRDiTSR, fast_model: Callable[..., nn.Module], dtype: torch.dtype = torch.bfloat16,
                 attention: str = "auto", impl: str | Mapping[str, str] = "auto"):
        """fast_model: ``prdit_fast.fast.FastPRDiT``, which ``accelerate`` passes in (this
        module is imported by fast.py, so it does not import fast.py back)."""
        super().__init__()
        self.config: SRConfig = reference.config
        # "sr_assemble" is this wrapper's own op; every other named op is the FastPRDiTs'
        own = impl if isinstance(impl, str) else {k: v for k, v in impl.items() if k == "sr_assemble"}
        self._assemble_impl = per_op_impl(own, ("sr_assemble",))["sr_assemble"]
        impl = impl if isinstance(impl, str) else {k: v for k, v in impl.items() if k != "sr_assemble"}
        self.base = fast_model(reference.base, dtype=dtype, attention=attention, impl=impl)
        self.t_embedder_sr = reference.t_embedder_sr
        self.sr = reference.sr
        self.dtype = self.base.dtype
        self.attention = attention
        self.impl = impl
        # kept out of the module tree so no parameter is registered twice
        self.__dict__["_reference"] = reference
        self.__dict__["_head"] = fast_model(reference.head_as_prdit(), dtype=dtype, attention=attention, impl=impl)

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

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | int, y: object = None, return_intermediate: bool = False,
        return_base: bool = False,
    ):
        """As ``PRDiTSR.forward``: ``y`` ignored, t a (B,) / 0-d tensor or an int;
        ``return_intermediate`` gives (upsampled base, head residual) fp32, unfused."""
        del y
        t = batch_timesteps(t, x)
        self.check_input(x, t)
        cfg = self.config
        head, _ = self._head.token_parts(x, t)
        base_out = self.base_prediction(x, t)
        unfused = return_intermediate or (torch.is_grad_enabled() and (head.requires_grad or base_out.requires_grad))
        if unfused:
            up = upsample_prediction(base_out, cfg.input_size, cfg.in_channels)
            local = unpatchify(head, cfg.input_size, cfg.stride, cfg.out_channels, out_dtype=torch.float32,
                               impl=self._head._impls["unpatchify"])
            result = (up, local) if return_intermediate else local + up
        else:
            result = sr_assemble(base_out, cfg.input_size, cfg.stride, head, "volume", impl=self._assemble_impl)
        return (result, base_out) if return_base else result

    @torch.no_grad()
    def sr_parts(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the head's tokens (B, N', s'^3 2C) in the compute dtype, the base's [eps_lo, x0_lo]
        (B, 2C, S_lo^3) fp32): what the engine's sampler update reads, upsampling and adding
        the base itself (``ops.sampler_update(..., base=)``). Inference only."""
        self.check_input(x, t)
        head, _ = self._head.token_parts(x, t)
        return head, self.base_prediction(x, t)

    @torch.no_grad()
    def token_parts(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(the output as fp32 tokens (B, N', s'^3 2C) in the head's layout, None): head +
        upsampled base in one pass, for the engine's sampler update. Inference only."""
        self.check_input(x, t)
        cfg = self.config
        head, _ = self._head.token_parts(x, t)
        base_out = self.base_prediction(x, t)
        return sr_assemble(base_out, cfg.input_size, cfg.stride, head, "tokens", impl=self._assemble_impl), None

