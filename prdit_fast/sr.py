"""PRDiT-SR: the stage-3 high-resolution refinement wrapper (spec section 8).

A trained low-resolution PRDiT (the *base*, at edge ``S_lo``) is the structural prior of
a volume ``f`` times larger (``S_hi = f S_lo``, f = 2 officially); a local denoiser at
the target resolution (the *head*) learns the residual. For a noisy volume x at S_hi:

    x_lo            = x[..., ::f, ::f, ::f]                    nearest downsample (B, C, S_lo^3)
    eps_lo, x0_lo   = base(x_lo, t)                            (B, 2C, S_lo^3)
    eps_up, x0_up   = nearest(eps_lo), trilinear(x0_lo)        (B, 2C, S_hi^3), align_corners=False
    tokens          = unfold(x, p', s', pad')                  (B, N', C p'^3), N' = (S_hi / s')^3
    local           = unpatchify(sr.mlp_denoise(tokens, c'))   (B, 2C, S_hi^3), c' = t_embedder_sr(t)
    out             = local + [eps_up, x0_up]                  (B, 2C, S_hi^3)

so the wrapper keeps the base model's contract and ``IaNDiffusion``'s loss and samplers
apply unchanged at S_hi. State-dict layout (the official one): ``base.*`` (a complete
PRDiT), ``t_embedder_sr.{mlp.0, coarse_head}`` and ``sr.mlp_denoise.*``.

Stage 3a trains the head with the base frozen and run without gradients (no activation
memory is kept for it); stage 3b fine-tunes the base too (``set_base_trainable``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .interface import batch_timesteps
from .layout import downsample_nearest, unfold3d, unpatchify, upsample_prediction, validate_tiling
from .models import CoarsePath, PRDiT, PRDiTConfig, TimestepEmbedder

# spec section 8: the official sr_model defaults
SR_HIDDEN = 768
SR_PATCH = 12
SR_STRIDE = 8
SR_PAD = 2


@dataclass(frozen=True)
class SRConfig:
    """Everything that fixes a PRDiT-SR wrapper. JSON-serializable via ``to_dict``.

    base: the base network's config (at S_lo); input_size: the target edge S_hi (a
    multiple of the base's edge); hidden, patch, stride, pad: the head's timestep width
    and token geometry (p', s', pad').
    """

    base: PRDiTConfig
    input_size: int
    hidden: int = SR_HIDDEN
    patch: int = SR_PATCH
    stride: int = SR_STRIDE
    pad: int = SR_PAD

    def __post_init__(self):
        lo, hi = self.base.input_size, self.input_size
        if hi <= lo or hi % lo:
            raise ValueError(
                f"PRDiT-SR needs a target edge that is a multiple (> 1) of the base's: base {lo}^3, "
                f"target {hi}^3 (officially 2x, e.g. 128 -> 256)"
            )
        if self.base.out_channels != 2 * self.base.in_channels:
            raise ValueError(
                f"PRDiT-SR wraps an IaN PRDiT (2C = {2 * self.base.in_channels} output channels: eps_hat, x0_hat); "
                f"{self.base.name} has {self.base.out_channels}"
            )
        if self.hidden < 1:
            raise ValueError(f"sr_model.hidden_size must be >= 1, got {self.hidden}")
        validate_tiling(hi, self.patch, self.stride, self.pad)

    # what the engine, the samplers and the CLI read of any model's config
    @property
    def factor(self) -> int:  # f = S_hi / S_lo
        return self.input_size // self.base.input_size

    @property
    def in_channels(self) -> int:
        return self.base.in_channels

    @property
    def out_channels(self) -> int:  # [eps_hat, x0_hat]
        return self.base.out_channels

    @property
    def process(self) -> str:  # always "ian": the base is checked to be IaN above
        return self.base.process

    @property
    def norm(self) -> str:  # the base's normalization ("layer" or "rms")
        return self.base.norm

    @property
    def depth(self) -> int:  # the transformer depth (the base's; the head has none)
        return self.base.depth

    @property
    def name(self) -> str:
        return f"PRDiT-SR({self.base.name})"

    @property
    def head(self) -> PRDiTConfig:
        """The head as a depth-0 PRDiT config at S_hi: same timestep embedder (no fine head),
        same local denoiser, same token geometry, so FLOP counts and layouts carry over."""
        return PRDiTConfig(
            hidden=self.hidden, heads=1, depth=0, patch=self.patch, input_size=self.input_size,
            in_channels=self.in_channels, stride=self.stride, pad=self.pad, name=f"{self.name} head",
        )

    @property
    def token_dim(self) -> int:  # D' = C p'^3
        return self.head.token_dim

    @property
    def out_token_dim(self) -> int:  # s'^3 2C
        return self.head.out_token_dim

    @property
    def num_tokens(self) -> int:  # N' = (S_hi / s')^3
        return self.head.num_tokens

    def to_dict(self) -> dict:
        return {"base": self.base.to_dict(), **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)[1:]}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SRConfig":
        """Inverse of ``to_dict``. ValueError names unknown fields."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown or "base" not in data:
            raise ValueError(f"an SR config has fields {sorted(fields)} (base required); got {sorted(data)}")
        base_fields = {f.name for f in dataclasses.fields(PRDiTConfig)}
        base = dict(data["base"])
        if set(base) - base_fields:
            raise ValueError(f"unknown base config fields {sorted(set(base) - base_fields)}; known: {sorted(base_fields)}")
        return cls(base=PRDiTConfig(**base), **{k: v for k, v in data.items() if k != "base"})


# --------------------------------------------------------------------------- #
# The wrapper
# --------------------------------------------------------------------------- #
class PRDiTSR(nn.Module):
    """PRDiT-SR over ``base``: forward(x (B, C, S_hi^3), t (B,) int) -> (B, 2C, S_hi^3),
    channels [0:C] eps_hat, [C:2C] x0_hat, like ``PRDiT.forward``.

    The base runs without gradients while none of its parameters requires grad (stage 3a,
    the default: ``create_sr_model`` freezes it)."""

    def __init__(self, base: PRDiT, cfg: SRConfig):
        super().__init__()
        if base.config != cfg.base:
            raise ValueError(f"the base network's config {base.config} differs from the SR config's {cfg.base}")
        self.config = cfg
        self.base = base
        self.t_embedder_sr = TimestepEmbedder(cfg.hidden, cfg.token_dim, depth=0)  # mlp + coarse_head
        self.sr = CoarsePath(cfg.token_dim, cfg.out_token_dim)  # sr.mlp_denoise
        self.initialize_head()
        self.set_base_trainable(False)

    # ------------------------------------------------------------------ parameters
    def head_modules(self) -> tuple[nn.Module, nn.Module]:
        return self.t_embedder_sr, self.sr

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The SR head's parameters: ``t_embedder_sr`` and ``sr.mlp_denoise``."""
        for module in self.head_modules():
            yield from module.parameters()

    def set_base_trainable(self, trainable: bool) -> None:
        """Stage 3a (False): the whole base frozen. Stage 3b (True): the base trains as in its
        own stage, i.e. everything but a depth > 0 base's frozen coarse path (spec section 6),
        which the base's forward runs without gradients anyway."""
        self.base.requires_grad_(trainable)
        if trainable and self.base.config.depth > 0:
            self.base.freeze_coarse_path()

    def head_as_prdit(self) -> PRDiT:
        """The head as a depth-0 PRDiT at S_hi whose ``t_embedder`` and ``coarse`` ARE this
        wrapper's ``t_embedder_sr`` and ``sr`` (shared parameters, nothing copied): what the
        fast backend runs it through."""
        with torch.device("meta"):
            head = PRDiT(self.config.head)
        head.t_embedder, head.coarse = self.t_embedder_sr, self.sr
        return head

    @property
    def base_trainable(self) -> bool:
        return any(p.requires_grad for p in self.base.parameters())

    def initialize_head(self) -> None:
        """Spec sections 8 and 12 for the head: Xavier-uniform Linears with zero bias,
        N(0, 0.02) timestep weights, and ``adaLN_modulation.1`` and ``linear_final`` zero,
        so a fresh wrapper outputs exactly the upsampled base prediction."""
        for module in self.head_modules():
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        for lin in (self.t_embedder_sr.mlp[0], self.t_embedder_sr.coarse_head):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        denoiser = self.sr.mlp_denoise
        for lin in (denoiser.adaLN_modulation[1], denoiser.linear_final):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # ------------------------------------------------------------------ forward
    # the base's contract at S_hi: the same shape and step checks and messages
    check_input = PRDiT.check_input

    def base_prediction(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The base's [eps_lo, x0_lo] (B, 2C, S_lo^3) on the nearest-downsampled x."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.base_trainable):
            return self.base(downsample_nearest(x, self.config.factor), t)

    def head_tokens(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The head's output tokens (B, N', s'^3 2C) for the full-resolution x."""
        cfg = self.config
        c = self.t_embedder_sr.coarse_head(self.t_embedder_sr(t))  # (B, C p'^3)
        return self.sr.mlp_denoise(unfold3d(x, cfg.patch, cfg.stride, cfg.pad), c)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | int, y: object = None, return_intermediate: bool = False,
        return_base: bool = False,
    ):
        """x (B, C, S_hi^3), t (B,), a 0-d tensor or an int -> (B, 2C, S_hi^3); ``y`` is accepted
        and ignored (the official interface, spec section 16). ``return_intermediate``: the
        pair (upsampled base prediction, head residual), each (B, 2C, S_hi^3), whose sum is
        the output. ``return_base``: also the base's own prediction (B, 2C, S_lo^3) (for the
        low-frequency consistency term), as (result, base prediction)."""
        del y
        t = batch_timesteps(t, x)
        self.check_input(x, t)
        cfg = self.config
        base_out = self.base_prediction(x, t)
        local = unpatchify(self.head_tokens(x, t), cfg.input_size, cfg.stride, cfg.out_channels)
        up = upsample_prediction(base_out, cfg.input_size, cfg.in_channels).to(local.dtype)
        result = (up, local) if return_intermediate else local + up
        return (result, base_out) if return_base else result


def create_sr_model(
    base: PRDiT,
    target_size: int,
    hidden: int = SR_HIDDEN,
    patch: int = SR_PATCH,
    stride: int = SR_STRIDE,
    pad: int = SR_PAD,
) -> PRDiTSR:
    """Wrap the IaN PRDiT ``base`` (its weights are used, not copied) in a fresh PRDiT-SR
    head refining to ``target_size``^3 (a multiple of the base's edge). The base is frozen
    (stage 3a); ``model.set_base_trainable(True)`` unfreezes it (stage 3b)."""
    if not isinstance(base, PRDiT):
        raise TypeError(f"create_sr_model wraps a reference PRDiT (prdit_fast.create_model / load_checkpoint), got {type(base).__name__}")
    cfg = SRConfig(base=base.config, input_size=target_size, hidden=hidden, patch=patch, stride=stride, pad=pad)
    device = next(base.parameters()).device
    with device:
        return PRDiTSR(base, cfg).to(device)


def build_sr_model(cfg: SRConfig, device: torch.device | str | None = None) -> PRDiTSR:
    """A freshly initialized wrapper (base included) for ``cfg``, e.g. to load weights into."""
    with torch.device(device or "cpu"):
        return PRDiTSR(PRDiT(cfg.base), cfg)


def lowfreq_consistency(out: torch.Tensor, base_out: torch.Tensor, factor: int, channels: int) -> torch.Tensor:
    """The paper's low-frequency consistency term, per sample (B,): mean squared difference
    between the refined x0 prediction average-pooled to the base grid and the base's own
    x0 prediction (detached: the base is the prior the refinement must agree with)."""
    pooled = F.avg_pool3d(out[:, channels:].float(), factor)
    return (pooled - base_out[:, channels:].detach().float()).pow(2).mean(dim=(1, 2, 3, 4))


# --------------------------------------------------------------------------- #
# Training (stages 3a and 3b)
# --------------------------------------------------------------------------- #
def sr_parameter_groups(model: PRDiTSR, learning_rate: float, fine_tune_lr: float | None) -> list[dict]:
    """AdamW parameter groups: the head (``t_embedder_sr``, ``sr.*``) at ``learning_rate``,
    and, when the base trains (stage 3b), its trainable parameters at ``fine_tune_lr``."""
    groups = [{"params": list(model.head_parameters()), "lr": learning_rate}]
    base = [p for p in model.base.parameters() if p.requires_grad]
    if base:
        if fine_tune_lr is None:
            raise ValueError("stage 3b trains the base in its own parameter group: set training.fine_tune_lr")
        groups.append({"params": base, "lr": fine_tune_lr})
    return groups


def training_losses_with_consistency(
    diffusion, net, x0: torch.Tensor, generator: torch.Generator | None, weight: float, factor: int
) -> dict[str, torch.Tensor]:
    """``diffusion.training_losses`` of the wrapper ``net`` plus ``weight`` times the
    low-frequency consistency term (also returned as ``lowfreq_loss``), from the same
    forward pass: ``net(x, t, return_base=True)`` hands back the base's prediction."""
    captured: dict[str, torch.Tensor] = {}

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        captured["out"], captured["base"] = net(x, t, return_base=True)
        return captured["out"]

    losses = diffusion.training_losses(model, x0, generator=generator)
    lowfreq = lowfreq_consistency(captured["out"], captured["base"], factor, x0.shape[1])
    losses["lowfreq_loss"] = lowfreq
    losses["loss"] = losses["loss"] + weight * lowfreq
    return losses
