"""Which network a checkpoint holds: the one place a checkpoint's config is resolved.

``resolve_network`` takes a file's contents (``read.read_checkpoint``) and returns
the network config, the weights to load and the IaN noise scale, for every kind:

* ours: ``PRDiTConfig.to_dict()`` / ``SRConfig.to_dict()`` (``parse_config``);
* official IaN / flow matching / TF-PRDiT: the nested ``config`` (``config_from_official``);
  the head decides the process (``model.out_channels`` C: flow matching, 2C or absent:
  IaN, spec section 14) and a ``DiT-...`` name the RMSNorm variant (spec section 15);
* official stage 3 (PRDiT-SR, spec section 8): ``data.base_image_size`` and the
  ``base_model`` / ``sr_model`` sections (``config_from_official_sr``);
* a bare state dict: ``variant=`` and ``input_size=`` name it, checked against what the
  shapes say (``prdit_fast.state_dict.infer_architecture``).

Both norms have the same state-dict names and shapes, so the weights cannot tell them
apart: a requested variant or norm that contradicts the file's config is refused. The IaN
noise scale travels with the weights (``diffusion.noise_std``; files without it: 1.0 for
"rms", 0.5 for "layer", as the two official works).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch

from ..diffusion import default_noise_std
from ..models import NORMS, PRDiTConfig, canonical_name, variant_config
from ..sr import SR_HIDDEN, SR_PAD, SR_PATCH, SR_STRIDE, SRConfig
from ..checkpoint_read import FORMAT, FORMAT_VERSION, CheckpointError, read_lazily, strip_wrapper_prefixes
from ..state_dict import infer_architecture

_NORM_WORDS = {"layer": "PRDiT, LayerNorm", "rms": "TF-PRDiT, RMSNorm"}


def is_official_sr_config(config: Any) -> bool:
    """True for the official stage-3 config dict (a ``base_model`` section naming the base)."""
    return isinstance(config, Mapping) and isinstance(config.get("base_model"), Mapping) and bool(
        config["base_model"].get("name")
    )


def config_from_official_sr(config: Mapping[str, Any]) -> SRConfig:
    """SRConfig from the official stage-3 config: ``data.image_size`` (S_hi),
    ``data.base_image_size`` (S_lo), ``base_model.{name, in_channels, out_channels}``,
    ``sr_model.{hidden_size, patch_size, stride, padding}`` (defaults 768, 12, 8, 2).
    ValueError names a missing or inconsistent key."""
    data, base_model = config.get("data") or {}, config["base_model"]
    sr_model = config.get("sr_model") or {}
    try:
        name, hi, lo = base_model["name"], data["image_size"], data["base_image_size"]
    except KeyError as e:
        raise ValueError(
            f"stage-3 config lacks {e}: it needs data.image_size, data.base_image_size and base_model.name"
        ) from None
    channels = int(base_model.get("in_channels", 1))
    out = base_model.get("out_channels")
    if out is not None and int(out) != 2 * channels:
        raise ValueError(
            f"base_model.out_channels {out} must be 2 * in_channels = {2 * channels}: PRDiT-SR refines an IaN "
            f"base (eps_hat, x0_hat)"
        )
    base = variant_config(name, _edge(lo, "data.base_image_size"), channels)
    return SRConfig(
        base=base, input_size=_edge(hi, "data.image_size"),
        hidden=int(sr_model.get("hidden_size", SR_HIDDEN)), patch=int(sr_model.get("patch_size", SR_PATCH)),
        stride=int(sr_model.get("stride", SR_STRIDE)), pad=int(sr_model.get("padding", SR_PAD)),
    )


def _edge(size: Any, key: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"PRDiT-SR needs cubic volumes; {key} is {list(size)}")
        size = size[0]
    return int(size)


def official_sr_config(cfg: SRConfig, base_checkpoint: str | None = None, finetune: bool = False) -> dict:
    """The official stage-3 config sections describing ``cfg`` (what checkpoints carry)."""
    return {
        "data": {"image_size": cfg.input_size, "base_image_size": cfg.base.input_size},
        "base_model": {
            "name": cfg.base.name, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "checkpoint": base_checkpoint, "finetune": finetune,
        },
        "sr_model": {"hidden_size": cfg.hidden, "patch_size": cfg.patch, "stride": cfg.stride, "padding": cfg.pad},
    }


def config_from_official(config: Mapping[str, Any]) -> PRDiTConfig:
    """PRDiTConfig from the official release's nested config dict."""
    try:
        name = config["model"]["name"]
        size = config["data"]["image_size"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint config lacks {e}: the official format has config['model']['name'] and "
            f"config['data']['image_size']"
        ) from e
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise CheckpointError(f"PRDiT needs a cubic volume; the checkpoint config has image_size {list(size)}")
        size = size[0]
    # as in the official code, the head decides the process: C outputs -> flow matching, 2C -> IaN
    out_channels = config["model"].get("out_channels")
    try:
        return variant_config(
            name, int(size), int(config["model"].get("in_channels", 1)),
            None if out_channels is None else int(out_channels),
        )
    except ValueError as e:
        raise CheckpointError(f"checkpoint config does not describe a PRDiT: {e}") from e


def _official_config(config: Mapping[str, Any]) -> PRDiTConfig | SRConfig:
    if is_official_sr_config(config):
        try:
            return config_from_official_sr(config)
        except ValueError as e:
            raise CheckpointError(f"checkpoint config: {e}") from e
    return config_from_official(config)


def parse_config(config: Mapping[str, Any]) -> PRDiTConfig | SRConfig:
    """The network config of a checkpoint's ``config``: ours (``PRDiTConfig.to_dict()``,
    ``SRConfig.to_dict()``) or the official nested one (IaN / flow matching / TF-PRDiT by
    the name, or stage 3's sections)."""
    if is_official_sr_config(config) or ("model" in config and isinstance(config["model"], Mapping)):
        return _official_config(config)
    if "base" in config:
        try:
            return SRConfig.from_dict(config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"bad PRDiT-SR config: {e}") from e
    fields = {f.name for f in dataclasses.fields(PRDiTConfig)}
    unknown = set(config) - fields
    if unknown:
        raise CheckpointError(f"unknown model config fields {sorted(unknown)}; known: {sorted(fields)}")
    return PRDiTConfig(**config)


def checkpoint_norm(ckpt: Mapping[str, Any]) -> str | None:
    """The normalization a checkpoint's config declares ("layer" or "rms"), or None when
    it has no config (a bare state dict: the weights alone cannot tell)."""
    if ckpt.get("format") == FORMAT:
        return parse_config(ckpt["config"]).norm
    if isinstance(ckpt.get("model"), Mapping) and isinstance(ckpt.get("config"), Mapping):
        return _official_config(ckpt["config"]).norm
    return None


def _noise_std(ckpt: Mapping[str, Any], cfg: PRDiTConfig | SRConfig, path: Path) -> float:
    """The IaN noise scale the weights were trained with: recorded in our format, else the
    official default of the variant's work."""
    recorded = ckpt.get("diffusion")
    if isinstance(recorded, Mapping) and "noise_std" in recorded:
        value = recorded["noise_std"]
        if not isinstance(value, (int, float)) or not value > 0:
            raise CheckpointError(f"{path} records diffusion.noise_std {value!r}; it must be a positive number")
        return float(value)
    return default_noise_std(cfg.norm)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _weights_and_config(
    ckpt: Mapping[str, Any], ema: bool, path: Path
) -> tuple[dict, PRDiTConfig | SRConfig | None, str]:
    """(state dict, config or None, which weights) of any supported checkpoint kind."""
    if ckpt.get("format") == FORMAT:
        version = int(ckpt.get("version", 0))
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format version {version}; this prdit_fast reads up to "
                f"{FORMAT_VERSION}: upgrade prdit_fast"
            )
        config = parse_config(ckpt["config"])
        process = ckpt.get("process", config.process)
        if process != config.process:
            raise CheckpointError(
                f"checkpoint {path} says process {process!r}, but its config has {config.out_channels} output "
                f"channels for {config.in_channels} input channels, i.e. {config.process!r}: the file is inconsistent"
            )
    elif isinstance(ckpt.get("model"), Mapping):
        config = _official_config(ckpt["config"]) if isinstance(ckpt.get("config"), Mapping) else None
    elif _is_state_dict(ckpt):
        return dict(ckpt), None, "state dict"
    else:
        raise CheckpointError(
            f"{path} is not a PRDiT checkpoint: expected a state dict or a dict with 'model' "
            f"(and 'ema', 'config'); top-level keys are {sorted(map(str, ckpt))[:10]}"
        )
    if ema and isinstance(ckpt.get("ema"), Mapping) and ckpt["ema"]:
        return dict(ckpt["ema"]), config, "ema"
    return dict(ckpt["model"]), config, "model"


def checkpoint_process(path: str | os.PathLike) -> str | None:
    """'ian' or 'flow_matching': the process of the network a checkpoint holds (its
    config's out_channels, else its head's shape), read without loading the weights
    (memory-mapped where the file allows); None when the file does not say."""
    path = Path(path)
    ckpt = read_lazily(path)
    state, cfg, _ = _weights_and_config(ckpt, True, path)
    if cfg is not None:
        return cfg.process
    arch = infer_architecture(strip_wrapper_prefixes(state))
    if arch is None:
        return None
    return "flow_matching" if arch["out_channels"] == arch["in_channels"] else "ian"


class Resolved(NamedTuple):
    """What a checkpoint holds: the network's config, the weights to load into it (wrapper
    prefixes stripped), which of the file's weights they are ('ema', 'model' or
    'state dict') and the IaN noise scale they were trained with."""

    config: PRDiTConfig | SRConfig
    state: dict[str, torch.Tensor]
    weights: str
    noise_std: float


def resolve_network(
    ckpt: Mapping[str, Any],
    path: str | os.PathLike,
    ema: bool = True,
    variant: str | None = None,
    input_size: int | None = None,
    norm: str | None = None,
) -> Resolved:
    """The network ``ckpt`` (a file's contents, read from ``path``) holds; see
    ``prdit_fast.checkpoint.load_checkpoint`` for the arguments. CheckpointError names
    whatever contradicts the file."""
    if norm is not None and norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} ('layer': PRDiT, 'rms': TF-PRDiT), got {norm!r}")
    path = Path(path)
    requested = canonical_name(variant, norm) if variant is not None else None
    state, cfg, which = _weights_and_config(ckpt, ema, path)
    state = strip_wrapper_prefixes(state)
    if cfg is not None and norm is not None and cfg.norm != norm:
        raise CheckpointError(
            f"{path} holds a {cfg.name} checkpoint with norm={cfg.norm!r} ({_NORM_WORDS[cfg.norm]}, per its "
            f"config), but norm={norm!r} was requested: the same weights under the other normalization compute "
            f"something else; drop norm= or pass the file's"
        )
    if isinstance(cfg, SRConfig) or (cfg is None and _SR_MARKER in state):
        cfg = _sr_config(state, cfg, path, requested, input_size)
    else:
        cfg = _prdit_config(state, cfg, path, requested, variant, input_size)
    return Resolved(cfg, state, which, _noise_std(ckpt, cfg, path))


def _require_names(requested: str | None, input_size: int | None, arch: dict | None, looks: str, message: str) -> None:
    """A file without a config is named by the caller: CheckpointError ``message`` (with
    the variant its shapes suggest) unless both the variant and the edge are given."""
    if requested is None or input_size is None:
        hint = f" {looks} {arch['name']}." if arch and arch["name"] else ""
        raise CheckpointError(message + hint)


def _prdit_config(
    state: Mapping[str, torch.Tensor], cfg: PRDiTConfig | None, path: Path, requested: str | None,
    variant: str | None, input_size: int | None,
) -> PRDiTConfig:
    """A PRDiT's config: the file's (a requested variant checked, ``input_size`` applied), or
    for a bare state dict the requested variant at ``input_size``; checked against the shapes."""
    arch = infer_architecture(state)
    if cfg is None:
        _require_names(requested, input_size, arch, "Its weights look like", (
            f"{path} has no model config (a bare state dict, or a checkpoint without 'config'): pass "
            f"variant= (e.g. 'PRDiT-B/12/4') and input_size= (the volume edge it was trained at; on the command "
            f"line --variant and --size)."))
        cfg = variant_config(
            requested, input_size, arch["in_channels"] if arch else 1, arch["out_channels"] if arch else None
        )
        origin = f"variant={variant!r}"
    else:
        if requested is not None and cfg.name != requested:
            raise CheckpointError(f"{path} holds a {cfg.name} checkpoint (per its config), but variant={variant!r} was requested")
        if input_size is not None and input_size != cfg.input_size:
            cfg = dataclasses.replace(cfg, input_size=input_size)
        origin = "the checkpoint's config"
    _check_architecture(arch, cfg, path, origin)
    return cfg


def _sr_config(
    state: Mapping[str, torch.Tensor], cfg: SRConfig | None, path: Path, requested: str | None,
    input_size: int | None,
) -> SRConfig:
    """A PRDiT-SR wrapper's config. ``requested`` names the BASE variant; ``input_size`` is
    the target edge (the base's scales with it)."""
    base_state = {k[len("base."):]: v for k, v in state.items() if k.startswith("base.")}
    arch = infer_architecture(base_state)
    if cfg is None:
        _require_names(requested, input_size, arch, "Its base looks like", (
            f"{path} is a bare PRDiT-SR state dict: pass variant= (the BASE variant, e.g. 'PRDiT-B/12/4') "
            f"and input_size= (the target edge, e.g. 256)."))
        if input_size % 2:
            raise CheckpointError(f"input_size {input_size} must be even: the base of PRDiT-SR works at half the edge")
        base = variant_config(requested, input_size // 2, arch["in_channels"] if arch else 1)
        cfg = _sr_from_state(state, base, input_size, path)
        origin = f"variant={requested!r}"
    else:
        if requested is not None and cfg.base.name != requested:
            raise CheckpointError(
                f"{path} holds a {cfg.name} checkpoint (per its config), but variant={requested!r} was requested"
            )
        if input_size is not None and input_size != cfg.input_size:
            if input_size % cfg.factor:
                raise CheckpointError(f"input_size {input_size} is not a multiple of the refinement factor {cfg.factor}")
            base = dataclasses.replace(cfg.base, input_size=input_size // cfg.factor)
            cfg = dataclasses.replace(cfg, base=base, input_size=input_size)
        origin = "the checkpoint's config"
    _check_architecture(arch, cfg.base, path, f"{origin} (base)")
    return cfg


def _check_architecture(arch: dict[str, Any] | None, cfg: PRDiTConfig, path: Path, origin: str) -> None:
    if arch is None:
        return
    want = {
        "hidden": cfg.hidden, "patch": cfg.patch, "stride": cfg.stride, "depth": cfg.depth,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
    }
    if all(arch[k] == v for k, v in want.items()):
        return
    looks = arch["name"] or "a network with " + ", ".join(f"{k} {arch[k]}" for k in want)
    hint = f"Pass variant={arch['name']!r}" if arch["name"] else "Pass the matching variant"
    if arch["out_channels"] != cfg.out_channels:
        hint += f" and out_channels={arch['out_channels']}"
    raise CheckpointError(
        f"{path} holds the weights of {looks} ({arch['evidence']}), but {origin} asks for {cfg.name} "
        f"(" + ", ".join(f"{k} {v}" for k, v in want.items()) + f"). {hint}."
    )


_SR_MARKER = "sr.mlp_denoise.linear_final.weight"


def _sr_from_state(state: Mapping[str, torch.Tensor], base: PRDiTConfig, input_size: int, path: Path) -> SRConfig:
    """The head geometry of a bare PRDiT-SR state dict, read from its shapes (the base at
    ``input_size / 2``, the official factor)."""
    try:
        hidden = state["t_embedder_sr.mlp.0.weight"].shape[0]
        patch = round((state["t_embedder_sr.coarse_head.weight"].shape[0] / base.in_channels) ** (1 / 3))
        stride = round((state[_SR_MARKER].shape[0] / base.out_channels) ** (1 / 3))
    except KeyError as e:
        raise CheckpointError(f"{path} looks like a PRDiT-SR state dict but lacks {e}") from None
    try:
        return SRConfig(base=base, input_size=input_size, hidden=hidden, patch=patch, stride=stride, pad=(patch - stride) // 2)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
