"""Writing checkpoint files, atomically (``prdit_fast.atomic``): our format
(``save_checkpoint``), the official layout (``save_official_checkpoint``), model folders
(``save_model_folder``) and a training run's ``<checkpoint_dir>/<step:07d>.pt`` files, which
are also named, listed, linked as ``latest``, pruned and read back for a resume here. The
layouts are described in ``read.py``.
"""
from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn as nn

from ..atomic import atomic_path, write_json
from ..diffusion import default_noise_std
from ..models import PRDiTConfig
from ..sr import SRConfig
from ..checkpoint_read import strip_wrapper_prefixes, _EMA_PREFIX, FORMAT, FORMAT_VERSION, MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, CheckpointError, read_checkpoint


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
        noise_std = getattr(net, "noise_std", None) or default_noise_std(cfg.norm)
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


def save_official_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | Mapping[str, torch.Tensor],
    ema: nn.Module | Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    train_steps: int = 0,
    epoch: int = 0,
    optimizer: Mapping[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """Write the official release's layout (spec section 13) atomically: ``model``, ``ema``
    (weights, wrapper prefixes stripped, on the CPU), ``config`` (nested, as the official
    configs), ``train_steps``, ``epoch``, ``optimizer`` (a ``state_dict()``, when given) and
    ``extra`` as further top-level entries (checked to load with ``weights_only=True``)."""
    payload: dict[str, Any] = {
        "model": _cpu_state(_unwrap(model) if isinstance(model, nn.Module) else model),
        "ema": _cpu_state(_unwrap(ema) if isinstance(ema, nn.Module) else ema),
        "config": dict(config),
        "train_steps": int(train_steps),
        "epoch": int(epoch),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer
    _check_loadable(payload["config"], "config")
    _check_loadable(extra, "extra")
    payload.update(extra)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


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
    """A training run's ``<step>.pt``: the official layout plus what an exact resume needs
    (``data_position``: samples of the training stream consumed, ``world_size``, ``rng``:
    one random state per rank). ``optimizer`` is the optimizer's ``state_dict()``."""
    return save_official_checkpoint(
        path, model, ema, config, train_steps, epoch, optimizer,
        data_position=data_position, world_size=world_size, rng=rng,
    )


class TrainingState(NamedTuple):
    """What a training checkpoint holds for a resume (``read_training_checkpoint``)."""

    model: dict[str, torch.Tensor]  # wrapper prefixes stripped
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    config: dict[str, Any]  # the official nested layout
    train_steps: int
    data_position: int | None  # None: a checkpoint without it (the official code's)
    rng: list[Any]  # one state per rank of the run that wrote it; may be empty


_RESUME_KEYS = ("model", "ema", "optimizer", "config", "train_steps")


def read_training_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> TrainingState:
    """A training checkpoint in ``save_training_checkpoint``'s layout, to resume from.
    CheckpointError when the file cannot be read or lacks what a resume needs."""
    ckpt = read_checkpoint(path, map_location)
    missing = [k for k in _RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} is not a training checkpoint (it lacks {', '.join(missing)}); a resume reads the "
            f"<step>.pt files that prdit-fast train writes"
        )
    position = ckpt.get("data_position")
    return TrainingState(
        model=strip_wrapper_prefixes(ckpt["model"]), ema=strip_wrapper_prefixes(ckpt["ema"]),
        optimizer=ckpt["optimizer"], config=dict(ckpt["config"]), train_steps=int(ckpt["train_steps"]),
        data_position=None if position is None else int(position), rng=list(ckpt.get("rng") or []),
    )


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
        noise_std = getattr(net, "noise_std", None) or default_noise_std(cfg.norm)
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
