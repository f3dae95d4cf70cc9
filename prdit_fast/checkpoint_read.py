"""Reading checkpoint files: every layout prdit_fast reads or writes, described here.

Layouts:

* the official release's dict (spec section 13): ``model``, ``ema``, ``config`` (nested:
  ``config["model"]["name"]``, ``config["data"]["image_size"]``, ...), ``epoch``,
  ``train_steps``, optional ``optimizer``; keys may carry DDP's ``module.`` prefix;
* a training run's ``<checkpoint_dir>/<step:07d>.pt``: the official dict plus what an
  exact resume needs (``data_position``, ``world_size``, ``rng``: one state per rank);
  ``save_training_checkpoint`` / ``read_training_checkpoint``;
* a bare state dict (torch or safetensors file);
* a model folder (``checkpoint.write.save_model_folder``; ``prdit_fast.Pipeline.save_pretrained``,
  ``prdit-fast export``): ``config.json`` (``format``, ``version``, ``config``, ``process``,
  ``diffusion``, ``volume``: the training data's voxel size and intensity recipe) and
  ``model.safetensors`` (one state dict: the weights to sample with);
* our own format, written by ``save_checkpoint``: a torch file holding
  ``{"format": "prdit_fast", "version": 1, "config": PRDiTConfig.to_dict() (or
  SRConfig.to_dict()), "process": "ian" | "flow_matching", "diffusion": {"noise_std": ...}
  (IaN), "model": ..., "ema": ... (optional), "extra": ... (optional)}``, or a
  ``.safetensors`` file with the same config, process and diffusion as metadata and the
  EMA weights under an ``ema.`` prefix.

Files are always read with ``torch.load(..., weights_only=True)``: nothing in a checkpoint
can run code. This module imports nothing from the package: it sits below the models, so
any module may read a file through it (the models' ``load_coarse_checkpoint`` does). The
rest of the checkpoint code is the package ``prdit_fast/checkpoint/``, which re-exports
these names: which network a file holds is decided in ``checkpoint/resolve.py``, writing is
``checkpoint/write.py``, loading into a network ``checkpoint/load.py``.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch


FORMAT = "prdit_fast"
FORMAT_VERSION = 1
_EMA_PREFIX = "ema."


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the requested model."""


# DDP wraps the model in ``module.``, torch.compile in ``_orig_mod.``
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP ``module.`` and torch.compile ``_orig_mod.`` prefixes from every key."""
    out = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


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


def read_lazily(path: str | os.PathLike) -> dict[str, Any]:
    """Like ``read_checkpoint``, but a zip-format torch file is memory-mapped: reading its
    config does not read its weights."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # safetensors, legacy or broken files: the general reader (and its errors)
        return read_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        return read_checkpoint(path)  # its error says what the file holds
    return dict(ckpt)


def checkpoint_volume_metadata(path: str | os.PathLike) -> Mapping[str, Any] | None:
    """The ``volume`` record of a checkpoint (voxel size, intensity recipe;
    ``prdit_fast.data.recipes``): a training checkpoint's config section, a model folder's
    ``config.json`` entry; None when the checkpoint has none. The weights are
    memory-mapped (files) or not read (folders)."""
    if is_model_folder(path):
        volume = read_model_folder_config(path).get("volume")
    else:
        config = read_lazily(path).get("config")
        volume = config.get("volume") if isinstance(config, Mapping) else None
    return volume if isinstance(volume, Mapping) else None


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
