"""The PRDiT reference network, in plain PyTorch (spec sections 1-6 and 12).

Data flow for a volume ``x`` of shape (B, C, S, S, S):

    tokens   = unfold(x)                               # (B, N, D),  D = C p^3, N = (S/s)^3
    c        = t_embedder(t)                           # (B, hidden)
    coarse   = coarse.mlp_denoise(tokens, c_coarse)    # (B, N, s^3 Cout)  local denoiser
    fine     = fine(tokens, c_fine)                    # (B, N, s^3 Cout)  global residual DiT
    out      = unpatchify(coarse + fine)               # (B, Cout, S, S, S)

``unfold`` and ``unpatchify`` (and ``modulate``) are the token layout of
``prdit_fast.layout``, the lowest layer, which the fast ops share.

Cout = 2C for the IaN process (channels [eps_hat, x0_hat]) or C for flow matching
(the velocity ``v``; spec section 14). ``t`` is the integer IaN step or, for flow
matching, the float ``1000 t``; the sinusoidal features take either.

Parameter names and shapes are those of the official release, so an official
state dict loads with ``strict=True``. This module is the numerical truth that
every fast kernel in ``prdit_fast.ops`` is tested against.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .interface import OfficialInterface, last_block
from .layout import PATCHES, STRIDE, modulate, unfold3d, unpatchify, validate_tiling

# size -> (hidden, heads); spec section 1
SIZES: dict[str, tuple[int, int]] = {
    "XS": (192, 6),
    "S": (384, 6),
    "B": (768, 12),
    "L": (1024, 16),
    "XL": (1152, 16),
}
DEPTHS = (0, 1, 2, 3, 4, 8, 10, 12)
MLP_RATIO = 4.0
TIMESTEP_FEATURES = 256
NUM_TIMESTEPS = 1000

# 'PRDiT-{size}/{p}/{depth}', optionally '-s{stride}' (spec sections 1 and 14); 'DiT-...' is the
# TF-PRDiT reconstruction prior (spec section 15)
_NAME_RE = re.compile(r"^(PRDiT-|DiT-)?(XS|S|B|L|XL)/(\d+)/(\d+)(?:-s(\d+))?$")
# the official registry's variants outside the standard grid: name -> (patch, stride, pad).
# XS/4/1 is listed there but its grids do not agree; validate_tiling refuses it.
SPECIAL_VARIANTS: dict[str, tuple[int, int, int]] = {
    "XS/4/0": (4, 4, 0),
    "XS/4/1": (4, 2, 0),
}
# the released 256^3 line of work (spec section 14), listed by list_models()
STRIDE16_VARIANTS = ("PRDiT-B/16/0-s16", "PRDiT-B/16/12-s16")
# The normalization of the four modulated norms (and of the adaLN outputs, spec section 15):
# "layer" is PRDiT (LayerNorm, eps 1e-6); "rms" is the training-free reconstruction prior
# TF-PRDiT, whose official registry names are DiT-{size}/{p}/{depth}.
NORMS = ("layer", "rms")
RMS_EPS = 1e-5
_NAME_PREFIX = {"layer": "PRDiT-", "rms": "DiT-"}


@dataclass(frozen=True)
class PRDiTConfig:
    """Everything that fixes the architecture. JSON-serializable via ``asdict``."""

    hidden: int
    heads: int
    depth: int
    patch: int
    input_size: int
    in_channels: int = 1
    stride: int = STRIDE
    pad: int | None = None  # None: (patch - stride) / 2
    name: str | None = None
    out_channels: int | None = None  # None: 2C (IaN); C: the flow-matching velocity head
    norm: str = "layer"  # "layer" (PRDiT) or "rms" (TF-PRDiT, spec section 15)

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS} ('layer': PRDiT, 'rms': TF-PRDiT), got {self.norm!r}")
        _check_norm(self.norm)
        if self.pad is None:
            object.__setattr__(self, "pad", (self.patch - self.stride) // 2)
        validate_tiling(self.input_size, self.patch, self.stride, self.pad)
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", 2 * self.in_channels)
        if self.out_channels not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(
                f"out_channels must be 2 * in_channels = {2 * self.in_channels} (IaN: noise and clean "
                f"predictions) or in_channels = {self.in_channels} (flow matching: the velocity), "
                f"got {self.out_channels}"
            )
        if self.depth < 0:
            raise ValueError(f"depth must be >= 0, got {self.depth}")
        if self.depth > 0 and self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")

    @property
    def token_dim(self) -> int:  # D = C p^3
        return self.in_channels * self.patch**3

    @property
    def process(self) -> str:
        """'ian' (Cout = 2C: [eps_hat, x0_hat]) or 'flow_matching' (Cout = C: velocity)."""
        return "flow_matching" if self.out_channels == self.in_channels else "ian"

    @property
    def out_token_dim(self) -> int:  # s^3 Cout
        return self.stride**3 * self.out_channels

    @property
    def grid(self) -> int:  # g = S / s
        return self.input_size // self.stride

    @property
    def num_tokens(self) -> int:  # N = g^3
        return self.grid**3

    def to_dict(self) -> dict:
        return asdict(self)


class Variant(NamedTuple):
    """A parsed variant name: size (XS..XL), patch p, depth, stride s, reflect pad, and the
    norm the name implies ("rms" for the TF-PRDiT names DiT-..., else "layer")."""

    size: str
    patch: int
    depth: int
    stride: int
    pad: int
    norm: str = "layer"

    @property
    def name(self) -> str:
        """The canonical name: 'PRDiT-B/12/4', 'PRDiT-B/16/12-s16', 'PRDiT-XS/4/0', 'DiT-B/12/12'."""
        base = f"{_NAME_PREFIX[self.norm]}{self.size}/{self.patch}/{self.depth}"
        special = SPECIAL_VARIANTS.get(f"{self.size}/{self.patch}/{self.depth}")
        official_stride = special[1] if special is not None else STRIDE
        return base if self.stride == official_stride else f"{base}-s{self.stride}"


def parse_variant(name: str) -> Variant:
    """'PRDiT-B/12/4' (or 'B/12/4') -> Variant('B', 12, 4, stride 8, pad 2, norm "layer");
    'DiT-B/12/12' is the TF-PRDiT RMSNorm variant (norm "rms").

    'PRDiT-{size}/{p}/{depth}-s{stride}' sets the stride (pad (p - s) / 2), e.g.
    'PRDiT-B/16/12-s16' (p 16, s 16, pad 0); the official special 'PRDiT-XS/4/0' is p 4,
    s 4, pad 0. ValueError lists the valid names; whether the geometry tiles is checked
    by ``validate_tiling`` when a config is built."""
    m = _NAME_RE.match(name.strip()) if isinstance(name, str) else None
    if m is not None:
        norm = "rms" if m.group(1) == "DiT-" else "layer"
        size, patch, depth = m.group(2), int(m.group(3)), int(m.group(4))
        special = SPECIAL_VARIANTS.get(f"{size}/{patch}/{depth}")
        if special is not None and (m.group(5) is None or int(m.group(5)) == special[1]):
            return Variant(size, patch, depth, special[1], special[2], norm)
        if patch in PATCHES and depth in DEPTHS:
            stride = int(m.group(5)) if m.group(5) is not None else STRIDE
            if 1 <= stride <= patch and (patch - stride) % 2 == 0:
                return Variant(size, patch, depth, stride, (patch - stride) // 2, norm)
    raise ValueError(
        f"unknown PRDiT variant {name!r}. Valid names are PRDiT-{{size}}/{{p}}/{{depth}} with size in "
        f"{list(SIZES)}, p in {list(PATCHES)}, depth in {list(DEPTHS)}, e.g. 'PRDiT-B/12/4' (stride "
        f"{STRIDE}), optionally with '-s{{stride}}' for a stride s <= p with p - s even, e.g. "
        f"'PRDiT-B/16/12-s16', and the official 'PRDiT-XS/4/0' (DiT-... for the TF-PRDiT reconstruction "
        f"prior); see prdit_fast.list_models()"
    )


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} ('layer': PRDiT, 'rms': TF-PRDiT), got {norm!r}")


def named_variant(name: str, norm: str | None = None) -> Variant:
    """``parse_variant`` with the norm the name implies, or ``norm`` when given (it wins)."""
    v = parse_variant(name)
    if norm is None:
        return v
    _check_norm(norm)
    return v._replace(norm=norm)


def canonical_name(name: str, norm: str | None = None) -> str:
    """'B/16/12-s16' -> 'PRDiT-B/16/12-s16'; 'B/12/4-s8' -> 'PRDiT-B/12/4'; ('B/12/12', 'rms')
    -> 'DiT-B/12/12' (``norm`` as for ``named_variant``)."""
    return named_variant(name, norm).name


def variant_config(
    name: str, input_size: int, in_channels: int = 1, out_channels: int | None = None, norm: str | None = None
) -> PRDiTConfig:
    """The config of a named variant at volume edge ``input_size``; ``out_channels`` None
    is 2C (IaN), C the flow-matching velocity head; ``norm`` None follows the name
    (DiT-... is "rms"), an explicit one wins and the config's name follows it."""
    v = named_variant(name, norm)
    hidden, heads = SIZES[v.size]
    try:
        return PRDiTConfig(
            hidden=hidden, heads=heads, depth=v.depth, patch=v.patch, input_size=input_size,
            in_channels=in_channels, stride=v.stride, pad=v.pad, name=v.name, out_channels=out_channels,
            norm=v.norm,
        )
    except ValueError as e:
        raise ValueError(f"{v.name} (p {v.patch}, s {v.stride}, pad {v.pad}) at {input_size}^3: {e}") from None


# --------------------------------------------------------------------------- #
# Embeddings and the modulated norms (spec sections 2, 5 and 15)
# --------------------------------------------------------------------------- #
def timestep_features(t: torch.Tensor, dim: int = TIMESTEP_FEATURES, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features, cosines first: (B,) -> (B, dim) in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def positional_encoding(grid: int, hidden: int) -> torch.Tensor:
    """Fixed 3D sin/cos encoding on the output token grid: (g^3, hidden), fp32.

    Per token (x, y, z) = (width, height, depth) coordinates (i + 0.5) / g;
    F = hidden // 6 log-spaced frequencies 2 pi (0.95 g / 2)^(k / (F - 1)); channels
    [sin x, cos x, sin y, cos y, sin z, cos z], zeros in the last hidden - 6F.
    """
    nfreq = hidden // 6
    if nfreq < 2:
        raise ValueError(f"hidden {hidden} is too small for the positional encoding (need >= 12)")
    coords = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    z, y, x = torch.meshgrid(coords, coords, coords, indexing="ij")  # raster: depth slowest
    k = torch.arange(nfreq, dtype=torch.float64)
    freqs = 2 * math.pi * (0.95 * grid / 2) ** (k / (nfreq - 1))
    parts = []
    for c in (x, y, z):
        arg = c.reshape(-1, 1) * freqs
        parts += [torch.sin(arg), torch.cos(arg)]
    pe = torch.cat(parts, dim=1)
    pe = F.pad(pe, (0, hidden - 6 * nfreq))
    return pe.float()


def modulated_norm(dim: int, norm: str) -> nn.Module:
    """The parameter-free norm in front of a modulation: LayerNorm (eps 1e-6) for PRDiT,
    RMSNorm x / sqrt(mean(x^2) + 1e-5) for TF-PRDiT (spec section 15)."""
    if norm == "rms":
        return nn.RMSNorm(dim, eps=RMS_EPS, elementwise_affine=False)
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)


def adaln_modulation(dim: int, width: int, norm: str) -> nn.Sequential:
    """SiLU -> Linear(dim, width) [-> RMSNorm over the whole output for TF-PRDiT]. The
    RMSNorm has no parameters, so the state-dict names (``adaLN_modulation.1.*``) are the same."""
    layers = [nn.SiLU(), nn.Linear(dim, width)]
    if norm == "rms":
        layers.append(nn.RMSNorm(width, eps=RMS_EPS, elementwise_affine=False))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- #
# Timestep embedder (spec section 2)
# --------------------------------------------------------------------------- #
class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, token_dim: int, depth: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FEATURES, hidden), nn.SiLU())
        self.coarse_head = nn.Linear(hidden, token_dim)
        self.fine_head = nn.Linear(hidden, hidden) if depth > 0 else nn.Identity()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) integer IaN steps or float flow-matching times 1000 t -> shared embedding
        c (B, hidden); the heads map it to c_coarse = coarse_head(c) (B, D) and
        c_fine = fine_head(c) (B, hidden)."""
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype))


# --------------------------------------------------------------------------- #
# Local denoiser (spec section 4)
# --------------------------------------------------------------------------- #
class SwiGLU(nn.Module):
    """fc2(norm(SiLU(fc1_g(z)) * fc1_x(z))), hidden width = D."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1_g = nn.Linear(dim, dim)
        self.fc1_x = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.silu(self.fc1_g(z)) * self.fc1_x(z)))


class LocalDenoiser(nn.Module):
    """Two adaptive SwiGLU blocks on tokens of width D, conditioned per sample."""

    def __init__(self, dim: int, out_dim: int, norm: str = "layer"):
        super().__init__()
        self.norm1 = modulated_norm(dim, norm)
        self.norm2 = modulated_norm(dim, norm)
        self.mlp1 = SwiGLU(dim)
        self.mlp2 = SwiGLU(dim)
        self.linear_final = nn.Linear(dim, out_dim)
        self.adaLN_modulation = adaln_modulation(dim, 6 * dim, norm)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) tokens, c: (B, D) -> (B, N, s^3 Cout)."""
        sh1, sc1, sh2, sc2, sh3, sc3 = self.adaLN_modulation(c).chunk(6, dim=1)
        h = self.mlp1(modulate(self.norm1(x), sh1, sc1))
        h = self.mlp2(modulate(self.norm2(h), sh2, sc2))
        h = modulate(h + x, sh3, sc3)
        return self.linear_final(h)


class CoarsePath(nn.Module):
    def __init__(self, dim: int, out_dim: int, norm: str = "layer"):
        super().__init__()
        self.mlp_denoise = LocalDenoiser(dim, out_dim, norm)


# --------------------------------------------------------------------------- #
# Global residual DiT (spec section 5)
# --------------------------------------------------------------------------- #
class PatchEmbedder(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(hidden * MLP_RATIO))
        self.fc2 = nn.Linear(int(hidden * MLP_RATIO), hidden)
        self.skip = nn.Linear(dim, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, hidden)."""
        return self.norm(self.fc2(F.gelu(self.fc1(x), approximate="tanh")) + self.skip(x))


# How the reference computes softmax(q k^T / sqrt(Dh)) v. "sdpa" is what the official
# code runs (its config's `flash_attn: True`): F.scaled_dot_product_attention, which picks
# a flash / memory-efficient / cuDNN kernel for the device and dtype. "handwritten" writes
# the same math out (scale on q, scores materialized): the equivalence tests compare the two.
ATTENTION_FORMS = ("sdpa", "handwritten")


class Attention(nn.Module):
    """Multi-head self-attention over all N tokens (non-causal); same parameters in every form."""

    def __init__(self, hidden: int, heads: int, form: str = "sdpa"):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.form = check_attention_form(form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, hidden) -> (B, N, hidden)."""
        B, N, Dm = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, Dm // self.heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
        if self.form == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)  # default scale Dh^-0.5
        else:
            scale = (Dm // self.heads) ** -0.5
            out = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, Dm))


def check_attention_form(form: str) -> str:
    if form not in ATTENTION_FORMS:
        raise ValueError(f"attention form must be one of {list(ATTENTION_FORMS)}, got {form!r}")
    return form


def set_attention_form(model: nn.Module, form: str) -> nn.Module:
    """Make every reference ``Attention`` in ``model`` compute with ``form`` ("sdpa", the
    default and the official code's choice, or "handwritten"); returns ``model``. The
    parameters and the state dict are unchanged."""
    check_attention_form(form)
    for module in model.modules():
        if isinstance(module, Attention):
            module.form = form
    return model


class Mlp(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, int(hidden * MLP_RATIO))
        self.fc2 = nn.Linear(int(hidden * MLP_RATIO), hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block."""

    def __init__(self, hidden: int, heads: int, norm: str = "layer"):
        super().__init__()
        self.norm1 = modulated_norm(hidden, norm)
        self.attn = Attention(hidden, heads)
        self.norm2 = modulated_norm(hidden, norm)
        self.mlp = Mlp(hidden)
        self.adaLN_modulation = adaln_modulation(hidden, 6 * hidden, norm)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shm, scm, gm, shf, scf, gf = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gm.unsqueeze(1) * self.attn(modulate(self.norm1(x), shm, scm))
        x = x + gf.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shf, scf))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class GlobalDiT(nn.Module):
    def __init__(self, cfg: PRDiTConfig):
        super().__init__()
        self.patch_embedder = PatchEmbedder(cfg.token_dim, cfg.hidden)
        self.register_buffer("pos_embed", positional_encoding(cfg.grid, cfg.hidden)[None], persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(cfg.hidden, cfg.heads, cfg.norm) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg.hidden, cfg.out_token_dim)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, N, D) -> the patch embedding plus positions (B, N, hidden)."""
        return self.patch_embedder(tokens) + self.pos_embed

    def forward(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """tokens: (B, N, D), c: (B, hidden) -> (B, N, s^3 Cout)."""
        x = self.embed(tokens)  # (B, N, hidden)
        for block in self.blocks:
            x = block(x, c)
        return self.final_layer(x, c)


# --------------------------------------------------------------------------- #
# The network
# --------------------------------------------------------------------------- #
class PRDiT(OfficialInterface, nn.Module):
    """PRDiT: local denoiser + (depth > 0) global residual DiT.

    forward(x (B, C, S, S, S), t (B,)) -> (B, Cout, S, S, S). IaN (Cout = 2C, t the integer
    step): channels [0:C] eps_hat, [C:2C] x0_hat. Flow matching (Cout = C, t = 1000 t as a
    float): the velocity. When depth > 0 the coarse path is frozen and runs without gradients.
    The rest of the official interface (int / 0-d t, ``y``, ``return_intermediate``,
    ``mode="encode"``, the feature helpers) is ``prdit_fast.interface.OfficialInterface``.
    """

    def __init__(self, cfg: PRDiTConfig):
        super().__init__()
        self.config = cfg
        self.t_embedder = TimestepEmbedder(cfg.hidden, cfg.token_dim, cfg.depth)
        self.coarse = CoarsePath(cfg.token_dim, cfg.out_token_dim, cfg.norm)
        self.fine = GlobalDiT(cfg) if cfg.depth > 0 else None
        self.initialize_weights()
        if cfg.depth > 0:
            self.freeze_coarse_path()

    def coarse_parameters(self):
        """Parameters of the coarse path: t_embedder.mlp, coarse_head and the local denoiser."""
        yield from self.t_embedder.mlp.parameters()
        yield from self.t_embedder.coarse_head.parameters()
        yield from self.coarse.parameters()

    def freeze_coarse_path(self) -> None:
        """The timestep MLP, the coarse head and the local denoiser stop requiring gradients."""
        for p in self.coarse_parameters():
            p.requires_grad_(False)

    def initialize_weights(self) -> None:
        """Spec section 12: a fresh model predicts exactly zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        te = self.t_embedder
        for lin in (te.mlp[0], te.coarse_head) + ((te.fine_head,) if self.fine is not None else ()):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        zero = [self.coarse.mlp_denoise.adaLN_modulation[1], self.coarse.mlp_denoise.linear_final]
        if self.fine is not None:
            nn.init.xavier_uniform_(self.fine.patch_embedder.skip.weight, gain=0.1)
            zero += [b.adaLN_modulation[1] for b in self.fine.blocks]
            zero += [self.fine.final_layer.adaLN_modulation[1], self.fine.final_layer.linear]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def check_input(self, x: torch.Tensor, t: torch.Tensor) -> None:
        cfg = self.config
        want = (cfg.in_channels,) + (cfg.input_size,) * 3
        if x.dim() != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"{cfg.name or 'PRDiT'} expects volumes of shape (B, {', '.join(map(str, want))}), "
                f"got {tuple(x.shape)}; build the model with input_size={x.shape[-1] if x.dim() == 5 else '?'} "
                f"or resample the volume"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) (one step per volume), got {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"t must hold integer IaN steps or float flow-matching times 1000 t, got {t.dtype}")

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return unfold3d(x, cfg.patch, cfg.stride, cfg.pad)

    def _coarse_and_fine(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, C, S, S, S), t (B,) -> (coarse tokens, fine tokens or None at depth 0), each (B, N, s^3 Cout)."""
        self.check_input(x, t)
        tokens = self.tokens(x)  # (B, N, D)
        frozen = self.fine is not None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            c = self.t_embedder(t)  # (B, hidden)
            coarse = self.coarse.mlp_denoise(tokens, self.t_embedder.coarse_head(c))
        return coarse, None if self.fine is None else self.fine(tokens, self.t_embedder.fine_head(c))

    def _volume(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return unpatchify(tokens, cfg.input_size, cfg.stride, cfg.out_channels)

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, C, S, S, S), t (B,) -> (B, Cout, S, S, S): the network output."""
        coarse, fine = self._coarse_and_fine(x, t)
        return self._volume(coarse if fine is None else coarse + fine)

    def denoise_parts(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the local denoiser's volume, the transformer's residual volume), whose sum is
        ``denoise(x, t)``; depth > 0."""
        coarse, fine = self._coarse_and_fine(x, t)
        return self._volume(coarse), self._volume(fine)

    def hidden_features(
        self, x: torch.Tensor, t: torch.Tensor, blocks: list[int], patch_embed: bool = False, final: bool = False
    ) -> dict[str, torch.Tensor]:
        """The transformer's token states (B, N, hidden): "patch_embed" (embedding plus
        positions), "block_i" after each block i of ``blocks``, "final" after the last block.
        Runs the blocks up to the last one needed; no local denoiser, no final layer."""
        self.check_input(x, t)
        last = last_block(self.config.depth, blocks, final, self._model_name())
        with torch.no_grad():  # the frozen coarse path's timestep MLP, as in forward
            c = self.t_embedder(t)
        c_fine = self.t_embedder.fine_head(c)
        h = self.fine.embed(self.tokens(x))
        out = {"patch_embed": h} if patch_embed else {}
        for i, block in enumerate(self.fine.blocks[: last + 1]):
            h = block(h, c_fine)
            if i in blocks:
                out[f"block_{i}"] = h
        if final:
            out["final"] = h
        return out


def list_models() -> list[str]:
    """The named variants: the standard grid (e.g. 'PRDiT-B/12/4'), the stride-16 256^3
    models and the official special variant that tiles ('PRDiT-XS/4/0'). Other strides
    are reachable with the '-s{stride}' suffix; each also exists as the TF-PRDiT RMSNorm
    variant ('DiT-B/12/12')."""
    standard = [f"PRDiT-{s}/{p}/{d}" for s in SIZES for p in PATCHES for d in DEPTHS]
    return standard + list(STRIDE16_VARIANTS) + ["PRDiT-XS/4/0"]


def create_model(
    name: str, input_size: int, in_channels: int = 1, out_channels: int | None = None, norm: str | None = None
) -> PRDiT:
    """Build the reference network of a named variant for volumes of edge ``input_size``.

    out_channels: None or 2C for the IaN process ([eps_hat, x0_hat]), C for flow matching
    (the velocity head of the released 256^3 models, spec section 14).
    norm: "layer" (PRDiT) or "rms" (TF-PRDiT, spec section 15); None follows the name
    (DiT-... names are the RMS variant)."""
    return PRDiT(variant_config(name, input_size, in_channels, out_channels, norm))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
