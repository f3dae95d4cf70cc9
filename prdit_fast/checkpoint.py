"""Reading and writing PRDiT checkpoints.

Three kinds of file load with ``load_checkpoint``:

* the official release's ``torch.save`` dict (spec section 13): ``model``, ``ema``,
  ``config`` (nested: ``config["model"]["name"]``, ``config["data"]["image_size"]``,
  ``config["model"]["in_channels"]``), ``epoch``, ``train_steps``, optional ``optimizer``;
  keys may carry DDP's ``module.`` prefix;
* a bare state dict (torch or safetensors file), which needs ``variant=`` and ``input_size=``;
* the stage-3 super-resolution wrapper PRDiT-SR (spec section 8, ``prdit_fast.sr``) in each
  of these kinds: the official config then has ``data.base_image_size``, ``base_model.*`` and
  ``sr_model.*`` sections, ours ``SRConfig.to_dict()``; the state dict ``base.*``,
  ``t_embedder_sr.*``, ``sr.mlp_denoise.*``;
* a model folder (``save_model_folder``; ``prdit_fast.Pipeline.save_pretrained``,
  ``prdit-fast export``): ``config.json`` (``format``, ``version``, ``config``, ``process``,
  ``diffusion``, ``volume``: the training data's voxel size and intensity recipe) and
  ``model.safetensors`` (one state dict: the weights to sample with);
* our own format, written by ``save_checkpoint``: a torch file holding
  ``{"format": "prdit_fast", "version": 1, "config": PRDiTConfig.to_dict(), "process":
  "ian" | "flow_matching", "diffusion": {"noise_std": ...} (IaN), "model": ..., "ema": ...
  (optional), "extra": ... (optional)}``, or a ``.safetensors`` file with the same config,
  process and diffusion as metadata and the EMA weights under an ``ema.`` prefix.

The process follows the network's head, as in the official code: ``out_channels`` = 2C
is IaN, = C flow matching (spec section 14); an official config gives it as
``config["model"]["out_channels"]`` (absent: 2C), a bare state dict by the shape of
``linear_final``. The loaded model's ``config.process`` says which.

The normalization (``PRDiTConfig.norm``: "layer" PRDiT, "rms" the TF-PRDiT reconstruction
prior of spec section 15) comes from the config: ours records it, an official config's
``DiT-...`` name selects "rms". Both variants have the same state-dict names and shapes,
so the weights cannot tell them apart: ``load_checkpoint`` refuses a requested variant or
norm that contradicts the file. The IaN noise scale travels with the weights
(``diffusion.noise_std``; files without it: 1.0 for "rms", 0.5 for "layer", as the two
official works) and is returned as the loaded model's ``noise_std``.

Files are always read with ``torch.load(..., weights_only=True)``: nothing in a
checkpoint can run code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from .atomic import atomic_path, write_json
from .diffusion import default_noise_std
from .models import NORMS, PRDiT, PRDiTConfig, canonical_name, variant_config
from .sr import PRDiTSR, SRConfig, build_sr_model, config_from_official_sr, is_official_sr_config
from .state_dict import infer_architecture, strip_wrapper_prefixes

FORMAT = "prdit_fast"
FORMAT_VERSION = 1
# what ``load_checkpoint(backend=...)`` and training's ``model.backend`` build
MODEL_BACKENDS = ("reference", "fast")
_EMA_PREFIX = "ema."
_LISTED = 5  # how many offending keys an error message names


_NORM_WORDS = {"layer": "PRDiT, LayerNorm", "rms": "TF-PRDiT, RMSNorm"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the requested model."""


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #
def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw contents of a checkpoint file as a dict.

    torch files are returned as stored (official dict, bare state dict, or our format).
    A safetensors file of ours is returned in the same shape as our torch format
    (``format``, ``version``, ``config``, ``model``, optional ``ema`` and ``extra``); any
    other safetensors file is returned as a bare state dict. The file kind is detected
    from its first bytes, not its name. Raises FileNotFoundError, or CheckpointError for
    an empty, truncated, corrupt or unsafe (arbitrary pickled objects) file.
    """
    path = Path(path)
    if path.is_dir():
        if is_model_folder(path):
            return _read_model_folder(path, map_location)
        raise CheckpointError(f"{path} is a folder without {MODEL_CONFIG_FILE}: not a model folder; pass a checkpoint "
                              f"file, or a folder written by Pipeline.save_pretrained / prdit-fast export")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the write was interrupted; use another copy")
    if not head.startswith(b"PK") and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
        return _read_safetensors(path, map_location)
    if not head.startswith((b"PK", b"\x80")):  # a torch file is a zip archive or (legacy) a pickle
        raise CheckpointError(
            f"{path} is not a checkpoint: neither a torch file (zip or pickle) nor safetensors (it starts with "
            f"{head[:8]!r}); give the .pt / .safetensors file"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise CheckpointError(
                f"checkpoint {path} holds Python objects other than tensors and plain containers, which "
                f"prdit_fast refuses to unpickle (torch.load weights_only=True). Re-save it as a dict of "
                f"state dicts and plain values. Detail: {str(e).splitlines()[0]}"
            ) from e
        raise CheckpointError(f"checkpoint {path} is corrupt (not a readable torch file): {e}") from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({path.stat().st_size} bytes; torch.load said: "
            f"{str(e).splitlines()[0]}). Copy or download it again."
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict (state dict or checkpoint)")
    return dict(obj)


def _read_safetensors(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"safetensors checkpoint {path} is truncated or corrupt: {e}. Copy it again.") from e
    if meta.get("format") != FORMAT:
        return tensors
    key = "version"
    try:
        out: dict[str, Any] = {"format": FORMAT, "version": int(meta.get("version", FORMAT_VERSION))}
        for key in ("config", "diffusion", "extra"):
            if key in meta or key == "config":
                out[key] = json.loads(meta[key])
    except (KeyError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(
            f"safetensors checkpoint {path}: its metadata field {key!r} is missing or unreadable "
            f"({type(e).__name__}: {e}); re-save it with prdit_fast.save_checkpoint"
        ) from e
    out["model"] = {k: v for k, v in tensors.items() if not k.startswith(_EMA_PREFIX)}
    ema = {k[len(_EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(_EMA_PREFIX)}
    if ema:
        out["ema"] = ema
    if "process" in meta:
        out["process"] = meta["process"]
    return out


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


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


def model_from_config(config: Mapping[str, Any]) -> PRDiT | PRDiTSR:
    """A freshly initialized PRDiT (or PRDiT-SR) from a config dict: ours
    (``PRDiTConfig.to_dict()``, ``SRConfig.to_dict()``) or the official nested one
    (``{"model": {"name": ...}, "data": {"image_size": ...}}``, or stage 3's sections)."""
    cfg = _parse_config(config)
    return build_sr_model(cfg) if isinstance(cfg, SRConfig) else PRDiT(cfg)


def _official_config(config: Mapping[str, Any]) -> PRDiTConfig | SRConfig:
    if is_official_sr_config(config):
        try:
            return config_from_official_sr(config)
        except ValueError as e:
            raise CheckpointError(f"checkpoint config: {e}") from e
    return config_from_official(config)


def _parse_config(config: Mapping[str, Any]) -> PRDiTConfig | SRConfig:
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
        return _network_config(_parse_config(ckpt["config"])).norm
    if isinstance(ckpt.get("model"), Mapping) and isinstance(ckpt.get("config"), Mapping):
        return _network_config(_official_config(ckpt["config"])).norm
    return None


def _network_config(cfg: PRDiTConfig | SRConfig) -> PRDiTConfig:
    """The PRDiT config that fixes the normalization: the config itself, or an SR wrapper's base."""
    return cfg.base if isinstance(cfg, SRConfig) else cfg


def _noise_std(ckpt: Mapping[str, Any], cfg: PRDiTConfig | SRConfig, path: Path) -> float:
    """The IaN noise scale the weights were trained with: recorded in our format, else the
    official default of the variant's work."""
    recorded = ckpt.get("diffusion")
    if isinstance(recorded, Mapping) and "noise_std" in recorded:
        value = recorded["noise_std"]
        if not isinstance(value, (int, float)) or not value > 0:
            raise CheckpointError(f"{path} records diffusion.noise_std {value!r}; it must be a positive number")
        return float(value)
    return default_noise_std(_network_config(cfg).norm)


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
        config = _parse_config(ckpt["config"])
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
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # safetensors, legacy or broken files: the general reader (and its errors)
        ckpt = read_checkpoint(path)
    state, cfg, _ = _weights_and_config(ckpt, True, path)
    if cfg is not None:
        return cfg.process
    arch = infer_architecture(strip_wrapper_prefixes(state))
    if arch is None:
        return None
    return "flow_matching" if arch["out_channels"] == arch["in_channels"] else "ian"


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


def _check_keys(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, cfg: PRDiTConfig | SRConfig) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or wrong):
        return

    def listed(title: str, items: list[str]) -> str:
        more = f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else ""
        return f"{len(items)} {title}: {', '.join(items[:_LISTED])}{more}"

    problems = [listed(t, i) for t, i in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if i]
    raise CheckpointError(f"{path} does not match {cfg.name}: " + "; ".join(problems))


def load_checkpoint(
    path: str | os.PathLike,
    ema: bool = True,
    map_location: str | torch.device = "cpu",
    variant: str | None = None,
    input_size: int | None = None,
    backend: str = "reference",
    norm: str | None = None,
    **backend_kwargs: Any,
) -> nn.Module:
    """Build the network a checkpoint describes and load its weights (``strict=True``).

    ema: use the EMA weights when the file has them (what sampling wants), else ``model``.
    map_location: device of the returned model.
    variant: e.g. 'PRDiT-B/12/4' (or the TF-PRDiT 'DiT-B/12/12'); required for a bare
        state dict, otherwise a check (CheckpointError when the file holds another variant,
        including the same shapes with the other normalization).
    input_size: volume edge S; required for a bare state dict, otherwise it overrides the
        size the checkpoint was trained at (the weights do not depend on S).
        For a PRDiT-SR checkpoint (spec section 8) ``variant`` names the BASE variant and
        ``input_size`` the target edge; the result is a ``prdit_fast.sr.PRDiTSR``.
    backend: 'reference' returns the PRDiT module (eval mode); 'fast' returns
        ``prdit_fast.fast.accelerate(model, **backend_kwargs)``.
    norm: "layer" or "rms"; for a bare state dict it overrides what ``variant``'s name
        implies, otherwise a check (CheckpointError when the file's config says the other).

    The returned PRDiT's ``checkpoint_weights`` says which tensors were loaded:
    'ema', 'model' or 'state dict'; its ``noise_std`` is the IaN noise scale the weights
    were trained with (``IaNDiffusion(noise_std=model.noise_std)`` samples them).
    """
    if backend not in MODEL_BACKENDS:
        raise ValueError(f"backend must be one of {MODEL_BACKENDS}, got {backend!r}")
    if backend_kwargs and backend != "fast":
        raise ValueError(f"options {sorted(backend_kwargs)} apply to backend='fast' only")
    if norm is not None and norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} ('layer': PRDiT, 'rms': TF-PRDiT), got {norm!r}")
    path = Path(path)
    requested = canonical_name(variant, norm) if variant is not None else None
    ckpt = read_checkpoint(path, map_location)
    state, cfg, which = _weights_and_config(ckpt, ema, path)
    state = strip_wrapper_prefixes(state)
    if cfg is not None and norm is not None and _network_config(cfg).norm != norm:
        raise CheckpointError(
            f"{path} holds a {cfg.name} checkpoint with norm={_network_config(cfg).norm!r} "
            f"({_NORM_WORDS[_network_config(cfg).norm]}, per its config), but norm={norm!r} was requested: the same "
            f"weights under the other normalization compute something else; drop norm= or pass the file's"
        )
    if isinstance(cfg, SRConfig) or (cfg is None and _SR_MARKER in state):
        model = _load_sr(state, cfg, path, map_location, requested, input_size)
        model.checkpoint_weights = which
        model.noise_std = _noise_std(ckpt, model.config, path)
        if backend == "fast":
            from .fast import accelerate  # here: the fast backend imports Triton, slow to start

            return accelerate(model, **backend_kwargs)
        return model
    arch = infer_architecture(state)
    if cfg is None:
        if requested is None or input_size is None:
            hint = f" Its weights look like {arch['name']}." if arch and arch["name"] else ""
            raise CheckpointError(
                f"{path} has no model config (a bare state dict, or a checkpoint without 'config'): pass "
                f"variant= (e.g. 'PRDiT-B/12/4') and input_size= (the volume edge it was trained at; on the command "
                f"line --variant and --size).{hint}"
            )
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

    device = torch.device(map_location) if isinstance(map_location, (str, torch.device)) else torch.device("cpu")
    with device:
        model = PRDiT(cfg)
    _check_keys(model, state, path, cfg)
    model.load_state_dict(state, strict=True)
    model.eval()
    model.checkpoint_weights = which
    model.noise_std = _noise_std(ckpt, cfg, path)
    if backend == "fast":
        from .fast import accelerate  # here: the fast backend imports Triton, slow to start

        return accelerate(model, **backend_kwargs)
    return model


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


def _load_sr(
    state: dict[str, torch.Tensor], cfg: SRConfig | None, path: Path, map_location: Any,
    requested: str | None, input_size: int | None,
) -> PRDiTSR:
    """A PRDiT-SR wrapper (eval mode) with ``state`` loaded strictly. ``requested`` names
    the BASE variant; ``input_size`` is the target edge (the base's scales with it)."""
    base_state = {k[len("base."):]: v for k, v in state.items() if k.startswith("base.")}
    arch = infer_architecture(base_state)
    if cfg is None:
        if requested is None or input_size is None:
            hint = f" Its base looks like {arch['name']}." if arch and arch["name"] else ""
            raise CheckpointError(
                f"{path} is a bare PRDiT-SR state dict: pass variant= (the BASE variant, e.g. 'PRDiT-B/12/4') "
                f"and input_size= (the target edge, e.g. 256).{hint}"
            )
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
    device = torch.device(map_location) if isinstance(map_location, (str, torch.device)) else torch.device("cpu")
    model = build_sr_model(cfg, device)
    _check_keys(model, state, path, cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


def copy_matching_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy every tensor of ``state`` whose name and shape match one of ``model`` (spec
    section 13: how stage 2 starts from a stage-1 checkpoint). Returns the copied names;
    the rest of ``model`` keeps its initialization."""
    state = strip_wrapper_prefixes(state)
    copied = []
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            source = state.get(name)
            if source is not None and tuple(source.shape) == tuple(tensor.shape):
                tensor.copy_(source)
                copied.append(name)
    return copied


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #
def _unwrap(model: nn.Module) -> nn.Module:
    """The PRDiT inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _cpu_state(module_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    return {k: v.detach().cpu().contiguous() for k, v in strip_wrapper_prefixes(state).items()}


_SAFE_LEAVES = (type(None), bool, int, float, str, torch.Tensor, torch.dtype, torch.device)


def _check_loadable(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` loads again under torch.load(weights_only=True)."""
    if isinstance(value, _SAFE_LEAVES):
        return
    if type(value) in (dict, OrderedDict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key of type {type(k).__name__}; use str or int keys")
            _check_loadable(v, f"{where}[{k!r}]")
        return
    if type(value) in (list, tuple, torch.Size):
        for i, v in enumerate(value):
            _check_loadable(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}, which torch.load(weights_only=True) cannot read back; "
        f"store tensors, numbers, strings, None, and dicts/lists/tuples of them"
    )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    ema_model: nn.Module | Mapping[str, torch.Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
    noise_std: float | None = None,
) -> Path:
    """Write ``model`` (a PRDiT, possibly wrapped by DDP / torch.compile) atomically.

    ``path`` ending in ``.safetensors``: safetensors with the config (and ``extra``) as
    JSON metadata, EMA weights under the ``ema.`` prefix; ``extra`` must then be
    JSON-serializable. Any other name: a torch file ``{"format", "version", "config",
    "model", "ema"?, "extra"?}`` where ``extra`` may hold tensors (optimizer state, RNG
    states) as long as it loads with ``weights_only=True`` (checked before writing).
    ``noise_std``: the IaN noise scale the weights were trained with (None: the model's
    ``noise_std`` from ``load_checkpoint``, else ``default_noise_std`` of its norm).
    Returns the path written.
    """
    path = Path(path)
    net = _unwrap(model)
    cfg = getattr(net, "config", None)
    if not isinstance(cfg, (PRDiTConfig, SRConfig)):
        raise TypeError(
            f"save_checkpoint needs a PRDiT or PRDiT-SR model (with a PRDiTConfig / SRConfig .config), "
            f"got {type(net).__name__}"
        )
    if noise_std is None:
        noise_std = getattr(net, "noise_std", None) or default_noise_std(_network_config(cfg).norm)
    if not noise_std > 0:
        raise ValueError(f"noise_std must be positive, got {noise_std!r}")
    # the IaN noise scale; flow matching's noise is N(0, I) by definition
    diffusion = {"noise_std": float(noise_std)} if cfg.process == "ian" else None
    weights = _cpu_state(net)
    ema_weights = None if ema_model is None else _cpu_state(_unwrap(ema_model) if isinstance(ema_model, nn.Module) else ema_model)
    if ema_weights is not None and set(ema_weights) != set(weights):
        raise ValueError("ema_model's state dict has different keys than model's: pass the EMA copy of this model")

    if path.name.endswith(".safetensors"):
        from safetensors.torch import save_file

        meta = {
            "format": FORMAT, "version": str(FORMAT_VERSION), "config": json.dumps(cfg.to_dict()), "process": cfg.process,
            **({"diffusion": json.dumps(diffusion)} if diffusion else {}),
        }
        if extra is not None:
            try:
                meta["extra"] = json.dumps(extra)
            except TypeError as e:
                raise ValueError(
                    f"extra must be JSON-serializable for a .safetensors checkpoint ({e}); "
                    f"use a .pt path to store tensors such as optimizer state"
                ) from e
        tensors = dict(weights)
        if ema_weights is not None:
            # safetensors refuses tensors that share memory (an EMA that is the model itself)
            tensors.update({_EMA_PREFIX + k: v.clone() for k, v in ema_weights.items()})
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    payload: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "config": cfg.to_dict(), "process": cfg.process,
        **({"diffusion": diffusion} if diffusion else {}), "model": weights,
    }
    if ema_weights is not None:
        payload["ema"] = ema_weights
    if extra is not None:
        _check_loadable(extra, "extra")
        payload["extra"] = dict(extra)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


# --------------------------------------------------------------------------- #
# Training checkpoints: <checkpoint_dir>/<step:07d>.pt
# --------------------------------------------------------------------------- #
_STEP_FILE_RE = re.compile(r"^(\d+)\.pt$")


def training_checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """Where a training run keeps its checkpoint of ``step``."""
    return Path(directory) / f"{step:07d}.pt"


def checkpoints_newest_first(directory: str | os.PathLike) -> list[Path]:
    """The ``<step>.pt`` files of ``directory``, highest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_FILE_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The ``<step>.pt`` with the highest step in ``directory``, or None."""
    found = checkpoints_newest_first(directory)
    return found[0] if found else None


LATEST = "latest"  # in a run's checkpoint folder: a link to its newest <step>.pt (no .pt: globs skip it)


def link_latest(path: str | os.PathLike) -> Path:
    """Point ``latest`` beside the training checkpoint ``path`` at it (a relative symbolic
    link, replaced atomically), so ``.../checkpoints/latest`` opens the newest checkpoint in
    any tool; it has no ``.pt`` suffix, so a ``*.pt`` glob sees each checkpoint once."""
    path = Path(path)
    link = path.parent / LATEST
    tmp = path.parent / f".{LATEST}.tmp-link{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(path.name, tmp)
    os.replace(tmp, link)
    return link


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint reference as a file: a file as given; a run's checkpoint folder or the
    run folder itself (its ``checkpoints/``) -> the newest ``<step>.pt``; ``.../latest`` or
    ``.../latest.pt`` without such a file -> the newest ``<step>.pt`` of that folder.
    FileNotFoundError names what was looked for."""
    path = Path(path).expanduser()
    if path.is_file():
        return path.resolve() if path.name == LATEST else path
    folders = [path, path / "checkpoints"] if path.is_dir() else []
    if path.name in (LATEST, f"{LATEST}.pt"):
        folders = [path.parent]
    for folder in folders:
        found = latest_checkpoint(folder)
        if found is not None:
            return found
    if folders:
        raise FileNotFoundError(f"{path}: no <step>.pt checkpoint in {' or '.join(map(str, folders))}")
    raise FileNotFoundError(f"{path}: no such checkpoint file or run folder")


def remove_training_checkpoints(paths: list[Path]) -> None:
    """Delete training checkpoints (retention, ``prdit_fast.training.retention``)."""
    for p in paths:
        Path(p).unlink(missing_ok=True)


def save_training_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    ema: nn.Module,
    optimizer: Mapping[str, Any],
    config: Mapping[str, Any],
    train_steps: int,
    epoch: int,
    data_position: int,
    world_size: int,
    rng: list[Any],
) -> Path:
    """Write a training checkpoint atomically: the official layout of spec section 13
    (``model``, ``ema``, ``config`` nested, ``train_steps``, ``epoch``, ``optimizer``) plus
    what an exact resume needs (``data_position``, ``world_size``, ``rng``: one state per
    rank). ``optimizer`` is the optimizer's ``state_dict()``."""
    payload = {
        "model": _cpu_state(model),
        "ema": _cpu_state(ema),
        "optimizer": optimizer,
        "config": config,
        "train_steps": train_steps,
        "epoch": epoch,
        "data_position": data_position,
        "world_size": world_size,
        "rng": rng,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


# --------------------------------------------------------------------------- #
# Model folders: config.json + model.safetensors (prdit_fast.Pipeline's save_pretrained)
# --------------------------------------------------------------------------- #
MODEL_CONFIG_FILE = "config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"


def is_model_folder(path: str | os.PathLike) -> bool:
    """A folder holding a model folder's ``config.json``."""
    return (Path(path) / MODEL_CONFIG_FILE).is_file()


def read_model_folder_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a model folder (no weights read); CheckpointError when it is
    not one of ours."""
    config_path = Path(path) / MODEL_CONFIG_FILE
    try:
        record = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path} is not readable JSON ({e}); copy or download the model folder again") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("config"), dict):
        raise CheckpointError(f"{config_path} is not a prdit_fast model config (expected 'format': {FORMAT!r} and a "
                              f"'config' section; write one with Pipeline.save_pretrained or prdit-fast export)")
    return record


def _read_model_folder(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """A model folder in the shape of our torch format (``format``, ``version``,
    ``config``, ``process``, ``diffusion``, ``model``) plus its ``volume`` record."""
    record = read_model_folder_config(path)
    weights = path / MODEL_WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"model folder {path} has {MODEL_CONFIG_FILE} but no {MODEL_WEIGHTS_FILE}; copy it again")
    tensors = _read_safetensors(weights, map_location)
    return {**{k: v for k, v in record.items() if k != "weights"}, "model": tensors}


def save_model_folder(directory: str | os.PathLike, model: nn.Module, volume: Mapping[str, Any] | None = None,
                      noise_std: float | None = None) -> Path:
    """Write ``model`` (a PRDiT / PRDiT-SR; its weights as they are: pass the EMA copy) as
    a model folder: ``model.safetensors`` (the state dict) and ``config.json``
    (``format``, ``version``, ``config``: ``PRDiTConfig.to_dict()``, ``process``,
    ``diffusion``: the IaN noise scale as in ``save_checkpoint``, ``volume``: the record of
    ``prdit_fast.data.recipes`` or None). Each file is written atomically, the config
    last, so a folder with a config is complete. Returns the folder."""
    from safetensors.torch import save_file

    directory = Path(directory)
    net = _unwrap(model)
    cfg = getattr(net, "config", None)
    if not isinstance(cfg, (PRDiTConfig, SRConfig)):
        raise TypeError(f"save_model_folder needs a PRDiT or PRDiT-SR model, got {type(net).__name__}")
    if noise_std is None:
        noise_std = getattr(net, "noise_std", None) or default_noise_std(_network_config(cfg).norm)
    record = {
        "format": FORMAT, "version": FORMAT_VERSION, "config": cfg.to_dict(), "process": cfg.process,
        **({"diffusion": {"noise_std": float(noise_std)}} if cfg.process == "ian" else {}),
        "volume": None if volume is None else dict(volume), "weights": MODEL_WEIGHTS_FILE,
    }
    json.dumps(record)  # a volume record JSON cannot hold fails here, before anything is written
    with atomic_path(directory / MODEL_WEIGHTS_FILE) as tmp:
        save_file(_cpu_state(net), str(tmp), metadata={"format": "pt"})
    write_json(directory / MODEL_CONFIG_FILE, record)
    return directory
