"""Two-stage PRDiT training: stage 1 (depth 0, local denoiser) and stage 2 (depth > 0,
global residual DiT over a frozen stage-1 coarse path), spec sections 7, 9, 12 and 13;
and stage 3, the PRDiT-SR refinement of section 8 (a config with a ``base_model`` section:
3a trains the head over a frozen base, 3b fine-tunes the base too; see ``prdit_fast.sr``).

``train(config)`` runs on one device, or on every rank of a ``torchrun`` launch
(DistributedDataParallel; NCCL on GPU, gloo on CPU). ``training.batch_size`` is the
GLOBAL batch, as in the official configs: each of W ranks takes batch_size / W volumes
per micro-step (batch_size must be divisible by W); an optimizer step accumulates the
gradients of ``training.grad_accum_steps`` micro-steps, so the effective batch is
batch_size x grad_accum_steps.

The process follows the head (spec section 14): ``model.out_channels`` = in_channels
trains flow matching (``prdit_fast.flow_matching``), 2 in_channels (the default) IaN.
``training.amp`` is bf16 autocast, ``model.grad_checkpoint`` activation checkpointing
(the official keys; ``training.bf16`` and ``training.grad_checkpointing`` are read as
them).

Data order. The training stream is the concatenation of per-epoch permutations of the
dataset (epoch e shuffled by ``(training.seed, e)``); micro-step m consumes stream
positions [m B, (m + 1) B), rank r the slice [m B + r B / W, m B + (r + 1) B / W). The position
is stored in every checkpoint, so ``--resume`` continues the stream exactly where it
stopped, and on one CPU process the resumed run is bit-for-bit the uninterrupted one.

Checkpoints (``<output.results_dir>/<output.checkpoint_dir>/<step:07d>.pt``, written
atomically by rank 0) have the official layout of spec section 13 (``model``, ``ema``,
``config`` nested, ``train_steps``, ``epoch``, ``optimizer``) plus ``rng`` (one state
per rank: torch CPU, CUDA, numpy, python ``random`` and the diffusion noise generator),
``data_position`` and ``world_size``, so the official tools and
``prdit_fast.checkpoint.load_checkpoint`` read them.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import re
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .atomic import atomic_path, remove_stale_temps
from .checkpoint import (
    MODEL_BACKENDS,
    checkpoint_norm,
    copy_matching_weights,
    load_checkpoint,
    read_checkpoint,
    strip_wrapper_prefixes,
)
from .diffusion import IaNDiffusion, default_noise_std
from .flow_matching import FlowMatching
from .errors import UsageError
from .metrics.during_training import DEFAULTS as EVALUATION_DEFAULTS
from .models import DiTBlock, PRDiT, SwiGLU, canonical_name, create_model
from .sr import (
    PRDiTSR,
    config_from_official_sr,
    build_sr_model,
    is_official_sr_config,
    sr_parameter_groups,
    training_losses_with_consistency,
)

log = logging.getLogger("prdit_fast.train")

REQUIRED = object()  # marks config keys without a default

# Every key train() reads, with its default. Official configs' keys that prdit_fast
# does not use are listed in IGNORED; anything else draws a warning.
DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "image_size": REQUIRED,  # volume edge S the model sees; preprocessed volumes are average-pooled to it
        "base_image_size": None,  # stage 3: the base network's edge S_lo
        "path": None,  # folder / list of volumes, or the root of train_list / val_list entries
        "train_list": None,  # official split file: one volume per line (prdit_fast.data.dataset)
        "val_list": None,  # validation split file (logging.eval_every)
        "dataset": None,  # "phantom": the synthetic phantom; None: the files named above
        "task": None,  # the official configs' dataset name ("lidc", "rad_chestct"); recorded
        "num_workers": 4,
        "cache_dir": None,  # training cache folder (prdit_fast.data.cache); None: ~/.cache/prdit_fast/training
        "cache_dtype": "auto",  # "auto" | "float16" | "float32" (auto: float16 for the known CT recipes)
        "phantom_length": 64,  # number of phantom volumes when no data is named
    },
    "model": {
        "name": REQUIRED,  # e.g. PRDiT-B/12/0 (stage 1) or PRDiT-B/12/4 (stage 2)
        "in_channels": 1,
        "out_channels": None,  # None or 2 * in_channels: IaN; in_channels: flow matching (spec section 14)
        "pretrained_path": None,  # stage-1 checkpoint to start stage 2 from
        "backend": "reference",  # "reference" | "fast" (prdit_fast.fast.accelerate)
        "grad_checkpoint": False,  # recompute DiT / SwiGLU blocks in backward (reference backend)
    },
    "training": {
        "batch_size": REQUIRED,  # global batch over all ranks
        "learning_rate": REQUIRED,
        "total_steps": None,  # None -> epochs * ceil(len(dataset) / batch_size)
        "epochs": None,
        "gradient_clip": 1.0,  # max global grad norm; 0 or None disables clipping
        "ema_decay": 0.9999,
        "weight_decay": 0.0,
        "log_every": None,  # None -> logging.log_every, else 100
        "ckpt_every": None,  # None -> logging.ckpt_every, else 1000
        "seed": 0,
        "amp": False,  # bf16 autocast (reference backend) / bf16 GEMMs (fast backend)
        "grad_accum_steps": 1,  # micro-batches of batch_size per optimizer step
        "device": "auto",  # "auto" (CUDA when available), "cuda" or "cpu"
        "max_bad_steps": 10,  # consecutive non-finite gradient steps before giving up
        "fine_tune_lr": None,  # stage 3b: learning rate of the base's parameter group
        "lowfreq_weight": 0.0,  # stage 3: weight of the low-frequency consistency term (official: unused)
    },
    "logging": {
        "log_every": 100,
        "ckpt_every": 1000,
        "eval_every": None,  # validation loss + EMA sample images every N steps (prdit_fast.monitor)
        "eval_samples": 2,  # EMA samples drawn at each evaluation
        "eval_sample_steps": 50,  # sampler steps of those samples
        "tensorboard": True,  # event files in the run folder when tensorboard is installed
    },
    "output": {"results_dir": "results", "checkpoint_dir": "checkpoints"},
    "metrics": dict(EVALUATION_DEFAULTS),  # FID / MMD every N steps (prdit_fast.metrics.during_training)
    "wandb": {"enable": False, "project": "", "entity": "", "tags": ""},
}
# stage 3 (PRDiT-SR, spec section 8): sections a config with base_model.name has, where
# model.name is not needed
SR_DEFAULTS: dict[str, dict[str, Any]] = {
    "base_model": {"name": REQUIRED, "in_channels": 1, "out_channels": None, "checkpoint": None, "finetune": False},
    "sr_model": {"hidden_size": 768, "patch_size": 12, "stride": 8, "padding": 2, "resume_checkpoint": None},
}
# prdit_fast's earlier names of official keys: still read, as the official key
RENAMED: dict[tuple[str, str], tuple[str, str]] = {
    ("training", "bf16"): ("training", "amp"),
    ("training", "grad_checkpointing"): ("model", "grad_checkpoint"),
}
IGNORED: dict[str, set[str]] = {
    "data": {"val_frac", "augment", "normalize"},
    "model": {"num_classes", "checkpoint", "flash_attn"},
    "training": {"compile_model", "compile_mode"},
}
DATASET_VALUES = (None, "phantom")

# Numeric keys: (type, lowest allowed, whether None is allowed). Checked after defaults.
_NUMBERS: dict[tuple[str, str], tuple[type, float, bool]] = {
    ("data", "image_size"): (int, 1, False),
    ("data", "base_image_size"): (int, 1, True),
    ("data", "num_workers"): (int, 0, False),
    ("data", "phantom_length"): (int, 1, False),
    ("model", "in_channels"): (int, 1, False),
    ("training", "batch_size"): (int, 1, False),
    ("training", "grad_accum_steps"): (int, 1, False),
    ("training", "total_steps"): (int, 1, True),
    ("training", "epochs"): (int, 1, True),
    ("training", "gradient_clip"): (float, 0, True),
    ("training", "ema_decay"): (float, 0, False),
    ("training", "weight_decay"): (float, 0, False),
    ("training", "seed"): (int, 0, False),
    ("training", "max_bad_steps"): (int, 1, False),
    ("training", "fine_tune_lr"): (float, 0, True),
    ("training", "lowfreq_weight"): (float, 0, False),
    ("training", "log_every"): (int, 1, True),
    ("training", "ckpt_every"): (int, 1, True),
    ("logging", "log_every"): (int, 1, False),
    ("logging", "ckpt_every"): (int, 1, False),
    ("logging", "eval_every"): (int, 1, True),
    ("logging", "eval_samples"): (int, 0, False),
    ("logging", "eval_sample_steps"): (int, 1, False),
    ("metrics", "every"): (int, 1, True),
    ("metrics", "samples"): (int, 2, False),
    ("metrics", "sample_steps"): (int, 1, False),
    ("metrics", "real_volumes"): (int, 2, False),
    ("metrics", "batch_size"): (int, 1, False),
}


class ConfigError(UsageError):
    """A training config value that is missing, of the wrong type or out of range; the
    message names the key."""
_CKPT_RE = re.compile(r"^(\d+)\.pt$")


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #
def load_config(path: str | os.PathLike) -> dict:
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a training config is a YAML mapping with sections data, model, training")
    return config


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """``["training.batch_size=8", "data.path=/x"]`` -> a copy of config with those keys
    set; values are parsed as YAML (numbers, booleans, null, lists)."""
    import yaml

    out = copy.deepcopy(config)
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. training.batch_size=8")
        section = out.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"override {item!r}: config section {parts[0]!r} is not a mapping")
        section[parts[1]] = yaml.safe_load(value)
    return out


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Booleans and strings as the type of their default; numbers are checked by
    ``_number`` (YAML reads 1e-4 as a string, so numeric strings are parsed there)."""
    if value is None or default is None or default is REQUIRED:
        return value
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def _number(value: Any, kind: type, lowest: float, optional: bool, where: str) -> Any:
    """``value`` as ``kind`` (int or float; numeric strings parsed), >= ``lowest``; None
    only when ``optional``. ConfigError names ``where``."""
    if value is None or value == "":
        if optional:
            return None
        raise ConfigError(f"{where} must be set (a number >= {lowest:g}), got {value!r}")
    what = "an integer" if kind is int else "a number"
    parsed = value
    if isinstance(value, str):
        try:
            parsed = float(value.strip())
        except ValueError:
            raise ConfigError(f"{where} must be {what} >= {lowest:g}, got {value!r}") from None
    if isinstance(parsed, bool) or not isinstance(parsed, (int, float)) or not math.isfinite(parsed):
        raise ConfigError(f"{where} must be {what} >= {lowest:g}, got {value!r}")
    if kind is int:
        if float(parsed) != int(parsed):
            raise ConfigError(f"{where} must be {what} >= {lowest:g}, got {value!r}")
        parsed = int(parsed)
    else:
        parsed = float(parsed)
    if parsed < lowest:
        raise ConfigError(f"{where} must be {what} >= {lowest:g}, got {value!r}")
    return parsed


def _apply_renames(config: Mapping[str, Any]) -> dict:
    """A copy of ``config`` with the RENAMED keys under their official names (each value
    checked under the name it was given); ConfigError when both names disagree."""
    out = {section: dict(values) if isinstance(values, Mapping) else values for section, values in config.items()}
    for (old_section, old_key), (section, key) in RENAMED.items():
        old = out.get(old_section)
        if not isinstance(old, Mapping) or old_key not in old:
            continue
        value = _coerce(old.pop(old_key), DEFAULTS[section][key], f"{old_section}.{old_key}")
        target = out.setdefault(section, {})
        if not isinstance(target, dict):
            continue  # reported as a bad section by resolve_config
        if key in target and _coerce(target[key], DEFAULTS[section][key], f"{section}.{key}") != value:
            raise ConfigError(
                f"{old_section}.{old_key} ({value!r}) is the former name of {section}.{key} ({target[key]!r}); "
                f"set only {section}.{key}"
            )
        target[key] = value
    return out


def resolve_config(config: Mapping[str, Any]) -> dict:
    """A complete, typed copy of a training config: defaults filled in, numbers parsed
    and range-checked, required keys checked (ConfigError names the key), keys that
    prdit_fast does not use warned about. The RENAMED keys are read as their official
    names."""
    config = _apply_renames(config)
    stage3 = is_official_sr_config(config)
    defaults_all = {**DEFAULTS, **SR_DEFAULTS} if stage3 else DEFAULTS
    out: dict[str, dict[str, Any]] = {}
    for section, values in config.items():
        if not isinstance(values, Mapping):
            if section in defaults_all:
                raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
            warnings.warn(f"unknown config key {section!r} ignored", stacklevel=2)
            continue
        for key in values:
            known = section in defaults_all and key in defaults_all[section]
            ignored = section in IGNORED and ({key, "*"} & IGNORED[section])
            if not known and not ignored:
                warnings.warn(f"unknown config key {section}.{key} ignored", stacklevel=2)
    if (config.get("data") or {}).get("augment"):
        warnings.warn("data.augment is not implemented by prdit_fast (no random flips); training without", stacklevel=2)
    missing = []
    for section, defaults in defaults_all.items():
        given = config.get(section) or {}
        out[section] = {}
        for key, default in defaults.items():
            value = given.get(key, default)
            if value is REQUIRED and stage3 and (section, key) == ("model", "name"):
                value = None  # the wrapper is named by base_model.name
            if value is REQUIRED:
                missing.append(f"{section}.{key}")
                continue
            out[section][key] = _coerce(value, default, f"{section}.{key}")
    if missing:
        raise ConfigError(
            f"training config lacks {', '.join(missing)}; set them in the YAML or on the command line "
            f"(e.g. prdit-fast train --config FILE data.image_size=128)"
        )
    for (section, key), (kind, lowest, optional) in _NUMBERS.items():
        out[section][key] = _number(out[section][key], kind, lowest, optional, f"{section}.{key}")
    tr, model, data = out["training"], out["model"], out["data"]
    lr = _number(tr["learning_rate"], float, 0, False, "training.learning_rate")
    if lr <= 0:
        raise ConfigError(f"training.learning_rate must be > 0, got {tr['learning_rate']!r}")
    tr["learning_rate"] = lr
    if tr["ema_decay"] > 1:
        raise ConfigError(f"training.ema_decay must be in [0, 1], got {tr['ema_decay']}")
    tr["gradient_clip"] = tr["gradient_clip"] or 0.0
    for key in ("log_every", "ckpt_every"):
        tr[key] = tr[key] if tr[key] is not None else out["logging"][key]
    if out["metrics"]["weights"] and out["metrics"]["every"] is None:
        raise ConfigError("metrics.weights is set but metrics.every is not: set the steps between evaluations")
    if tr["total_steps"] is None and tr["epochs"] is None:
        raise ConfigError("set training.total_steps (or training.epochs)")
    if model["backend"] not in MODEL_BACKENDS:
        raise ConfigError(f"model.backend must be one of {MODEL_BACKENDS}, got {model['backend']!r}")
    if data["dataset"] not in DATASET_VALUES:
        raise ConfigError(f"data.dataset must be 'phantom' or unset, got {data['dataset']!r}")
    if model["out_channels"] is not None:
        out_channels = _number(model["out_channels"], int, 1, False, "model.out_channels")
        if out_channels not in (model["in_channels"], 2 * model["in_channels"]):
            raise ConfigError(
                f"model.out_channels {model['out_channels']} must be 2 * in_channels = {2 * model['in_channels']} "
                f"(IaN: noise and clean predictions) or in_channels = {model['in_channels']} (flow matching: "
                f"the velocity)"
            )
        model["out_channels"] = out_channels
    for section, key in (("model", "pretrained_path"), ("data", "path"), ("data", "train_list"), ("data", "val_list")):
        out[section][key] = out[section][key] or None
    if stage3:
        _check_stage3(out)
    return out


def _check_stage3(config: dict) -> None:
    """Stage-3 consistency: the wrapper's geometry, the base's learning rate, no stage-2 keys."""
    if config["model"]["pretrained_path"]:
        raise ConfigError("stage 3 loads its base from base_model.checkpoint; remove model.pretrained_path")
    if config["data"]["base_image_size"] is None:
        raise ConfigError("a stage-3 config (base_model section) needs data.base_image_size, the base's volume edge")
    try:
        config_from_official_sr(config)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    config["model"]["in_channels"] = int(config["base_model"]["in_channels"])  # what the data loader reads
    if config["base_model"]["finetune"] and not config["training"]["fine_tune_lr"]:
        raise ConfigError("stage 3b (base_model.finetune: true) needs training.fine_tune_lr > 0 for the base's parameter group")


def _run_identity(config: Mapping[str, Any]) -> tuple:
    """What a checkpoint's config must share with this run's to resume it: the network
    (for stage 3 also the base, both sizes and the stage), the volume edge, the channels and
    the process."""
    if is_official_sr_config(config):
        cfg = config_from_official_sr(config)
        stage = "3b" if config["base_model"].get("finetune") else "3a"
        return (cfg.name, f"{cfg.base.input_size}^3 -> {cfg.input_size}^3", cfg.in_channels, f"stage {stage}")
    model, data = config.get("model") or {}, config.get("data") or {}
    channels = model.get("in_channels", 1)
    process = "flow matching" if model.get("out_channels") == channels else "IaN"  # the head (spec section 14)
    return (_canonical_name(model.get("name")), data.get("image_size"), channels, process)


# --------------------------------------------------------------------------- #
# Data order
# --------------------------------------------------------------------------- #
class StreamSampler(Sampler[int]):
    """This rank's indices of the endless training stream from ``position`` on (see the
    module docstring): per step, the global batch's slice [rank b, (rank + 1) b)."""

    def __init__(self, length: int, global_batch: int, rank: int, world: int, seed: int, position: int):
        self.length, self.global_batch, self.rank, self.world = length, global_batch, rank, world
        self.per_rank = global_batch // world
        self.seed, self.position = seed, position

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.length)

    def __iter__(self) -> Iterator[int]:
        start = self.position
        epoch, perm = -1, None
        while True:
            for j in range(self.per_rank):
                e, i = divmod(start + self.rank * self.per_rank + j, self.length)
                if e != epoch:
                    epoch, perm = e, self.permutation(e)
                yield int(perm[i])
            start += self.global_batch


# --------------------------------------------------------------------------- #
# Model helpers
# --------------------------------------------------------------------------- #
def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every trainable DiTBlock and SwiGLU block in the backward pass instead of
    storing its activations (torch.utils.checkpoint, non-reentrant), by wrapping the
    instances' forward methods. Returns the number of blocks wrapped."""
    from torch.utils.checkpoint import checkpoint

    wrapped = 0
    for module in model.modules():
        if isinstance(module, (DiTBlock, SwiGLU)) and any(p.requires_grad for p in module.parameters()):
            inner = module.forward

            def forward(*args, _inner=inner):
                return checkpoint(_inner, *args, use_reentrant=False)

            module.forward = forward
            wrapped += 1
    return wrapped


def load_pretrained(model: PRDiT, path: str | os.PathLike) -> list[str]:
    """Stage 2 from stage 1 (spec section 13): copy every tensor of the checkpoint's
    ``model`` weights (as the official code does; ``ema`` when there is no ``model``, or a
    bare state dict) whose name and shape match; the rest keeps its fresh initialization.
    Raises ValueError when the coarse path is not fully covered (wrong file)."""
    ckpt = read_checkpoint(path)
    norm = checkpoint_norm(ckpt)
    if norm is not None and norm != model.config.norm:
        raise ValueError(
            f"model.pretrained_path {path} holds a norm={norm!r} network, but {model.config.name} has "
            f"norm={model.config.norm!r}: the same weights under the other normalization compute something else; "
            f"give a stage-1 checkpoint of the same variant family (DiT-... is the RMSNorm variant)"
        )
    state = next((ckpt[k] for k in ("model", "ema") if isinstance(ckpt.get(k), Mapping)), ckpt)
    copied = set(copy_matching_weights(model, strip_wrapper_prefixes(state)))
    coarse = {n for n, p in model.named_parameters() if any(p is q for q in model.coarse_parameters())}
    absent = sorted(coarse - copied)
    if absent:
        raise ValueError(
            f"model.pretrained_path {path} does not provide the coarse path of {model.config.name}: "
            f"{len(absent)} tensors missing or of another shape (e.g. {absent[0]}); give a stage-1 checkpoint "
            f"with the same size and patch (e.g. PRDiT-B/12/0 for PRDiT-B/12/4)"
        )
    return sorted(copied)


def sr_model_for_training(config: Mapping[str, Any], fresh: bool) -> PRDiTSR:
    """The wrapper a resolved stage-3 training config describes, on the CPU.

    Stage 3a (``base_model.finetune`` false): the base's weights are the ``model`` entry of
    ``base_model.checkpoint`` (as the official code loads them), frozen. Stage 3b (true):
    the whole wrapper's ``model`` weights come from ``sr_model.resume_checkpoint`` and the
    base trains too. ``fresh`` False (resuming a run of our own) skips those loads: the
    run's checkpoint provides every tensor.
    """
    cfg = config_from_official_sr(config)
    finetune = bool(config["base_model"]["finetune"])
    model = build_sr_model(cfg)
    if fresh:
        if finetune:
            source = config["sr_model"]["resume_checkpoint"]
            if not source:
                raise ValueError(
                    "stage 3b (base_model.finetune: true) continues from a stage-3a checkpoint: set "
                    "sr_model.resume_checkpoint"
                )
            loaded = load_checkpoint(source, ema=False, input_size=cfg.input_size)
            if not isinstance(loaded, PRDiTSR) or loaded.config != cfg:
                got = loaded.config.name if isinstance(loaded, PRDiTSR) else f"a plain {loaded.config.name}"
                raise ValueError(
                    f"sr_model.resume_checkpoint {source} holds {got}, not the {cfg.name} {cfg.base.input_size}^3 -> "
                    f"{cfg.input_size}^3 wrapper (head {cfg.hidden}/{cfg.patch}/{cfg.stride}/{cfg.pad}) this config asks for"
                )
            model.load_state_dict(loaded.state_dict())
        else:
            source = config["base_model"]["checkpoint"]
            if not source:
                raise ValueError(
                    "stage 3a (base_model.finetune: false) refines a trained base: set base_model.checkpoint "
                    "(a stage-1 or stage-2 checkpoint at data.base_image_size)"
                )
            loaded = load_checkpoint(source, ema=False, variant=cfg.base.name, input_size=cfg.base.input_size)
            model.base.load_state_dict(loaded.state_dict())
    model.set_base_trainable(finetune)
    return model


def _rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,  # this rank's device
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
        "noise": generator.get_state(),
    }


def _set_rng_state(state: Mapping, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available() and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu())
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(state["noise"].cpu())


def checkpoints_newest_first(directory: str | os.PathLike) -> list[Path]:
    """The ``<step>.pt`` files of ``directory``, highest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The ``<step>.pt`` with the highest step in ``directory``, or None."""
    found = checkpoints_newest_first(directory)
    return found[0] if found else None


def _canonical_name(name: Any) -> str | None:
    try:
        return canonical_name(name)
    except ValueError:
        return None


def _state_on_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- #
# The trainer
# --------------------------------------------------------------------------- #
class Trainer:
    """One rank's training state. ``run()`` trains to ``training.total_steps`` and returns
    the last checkpoint's path. ``model`` (the PRDiT being trained) and ``ema`` are
    exposed for inspection.

    resume: continue from the latest readable checkpoint of ``output.results_dir``;
    without it a results folder that already holds checkpoints is refused (it belongs
    to another run). from_scratch: allow a stage-2 model (depth > 0) without
    ``model.pretrained_path`` (its local denoiser stays frozen at initialization).
    """

    def __init__(self, config: Mapping[str, Any], resume: bool = False, from_scratch: bool = False):
        self.config = resolve_config(config)
        cfg_data, cfg_model, tr = self.config["data"], self.config["model"], self.config["training"]
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if tr["device"] not in ("auto", "cuda", "cpu"):
            raise ValueError(f"training.device must be 'auto', 'cuda' or 'cpu', got {tr['device']!r}")
        if tr["device"] == "cuda" and not torch.cuda.is_available():
            raise ValueError("training.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        if tr["device"] != "cpu" and torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            self.device = torch.device("cpu")
        if tr["batch_size"] % self.world:
            raise ValueError(
                f"training.batch_size {tr['batch_size']} is the global batch and must be divisible by the "
                f"number of ranks {self.world}"
            )
        self.global_batch = tr["batch_size"]  # per micro-step, over all ranks
        self.accum_steps = tr["grad_accum_steps"]
        self.samples_per_step = self.global_batch * self.accum_steps  # the effective batch
        self.run_dir = Path(self.config["output"]["results_dir"])
        self.ckpt_dir = self.run_dir / self.config["output"]["checkpoint_dir"]
        candidates = checkpoints_newest_first(self.ckpt_dir)
        if candidates and not resume:
            raise ConfigError(
                f"{self.ckpt_dir} already holds checkpoints of a run (latest {candidates[0].name}); pass --resume "
                f"to continue that run, or set output.results_dir to a new folder"
            )

        seed = tr["seed"]
        torch.manual_seed(seed)  # the same initialization on every rank
        np.random.seed(seed)
        random.seed(seed)
        self.dataset: Dataset = self._dataset()
        n = len(self.dataset)
        self.config["volume"] = self._volume_metadata()
        per_epoch = math.ceil(n / self.samples_per_step)
        self.total_steps = int(tr["total_steps"] if tr["total_steps"] is not None else tr["epochs"] * per_epoch)

        self.stage3 = is_official_sr_config(self.config)
        self.model: PRDiT | PRDiTSR
        if self.stage3:
            self.model = sr_model_for_training(self.config, fresh=not candidates).to(self.device)
        else:
            self.model = create_model(
                cfg_model["name"], cfg_data["image_size"], cfg_model["in_channels"], cfg_model["out_channels"]
            ).to(self.device)
        if resume and not candidates:
            self._info(f"--resume: no checkpoint in {self.ckpt_dir} yet; starting from step 0")
        if cfg_model["pretrained_path"] and not candidates:
            copied = load_pretrained(self.model, cfg_model["pretrained_path"])
            self._info(f"stage 2: copied {len(copied)} tensors from {cfg_model['pretrained_path']}")
        elif self.model.config.depth > 0 and not candidates and not self.stage3:
            if not from_scratch:
                raise ConfigError(
                    f"model.pretrained_path is empty: stage 2 ({self.model.config.name}) starts from a stage-1 "
                    f"checkpoint (its local denoiser is frozen); set model.pretrained_path, or pass --from-scratch "
                    f"to train it with the local denoiser frozen at initialization"
                )
            log.warning("--from-scratch: %s trains with its local denoiser frozen at initialization",
                        self.model.config.name)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        ema_by_name = dict(self.ema.named_parameters())
        self.ema_params = [ema_by_name[n] for n, p in self.model.named_parameters() if p.requires_grad]

        net: nn.Module = self.model
        if cfg_model["grad_checkpoint"]:
            if cfg_model["backend"] == "fast":
                warnings.warn("model.grad_checkpoint applies to the reference backend only; ignored", stacklevel=2)
            else:
                self._info(f"activation checkpointing on {enable_activation_checkpointing(self.model)} blocks")
        if cfg_model["backend"] == "fast":
            from .fast import accelerate  # here: the fast backend imports Triton, slow to start

            net = accelerate(self.model, dtype=torch.bfloat16 if tr["amp"] else torch.float32)
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, gradient_as_bucket_view=True,
            )
        self.net = net
        # the head decides the process, as in the official code (spec section 14); the IaN noise
        # scale follows the network's norm (TF-PRDiT: 1.0, spec section 15)
        network = self.model.config.base if self.stage3 else self.model.config  # SR: its base network's
        self.diffusion = (
            FlowMatching() if self.model.config.process == "flow_matching"
            else IaNDiffusion(noise_std=default_noise_std(network.norm))
        )
        # one fused kernel on CUDA; elsewhere the multi-tensor (foreach) path, not a loop
        impl = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        groups = (
            sr_parameter_groups(self.model, tr["learning_rate"], tr["fine_tune_lr"]) if self.stage3 else self.trainable
        )
        self.optimizer = torch.optim.AdamW(groups, lr=tr["learning_rate"], weight_decay=tr["weight_decay"], **impl)
        self.noise = torch.Generator(device=self.device)
        self.noise.manual_seed(seed * 1_000_003 + self.rank)  # differs per rank: independent noise and t
        self.step = 0
        self.position = 0  # samples of the training stream consumed (all ranks)
        self.monitor = None  # prdit_fast.monitor.RunMonitor, opened by run()
        self.val_set = self._validation_set()
        self.last_checkpoint: Path | None = None
        if candidates:
            self._restore_latest_readable(candidates)
        self.model.train()
        self.evaluation = None  # rank 0 only: FID / MMD of EMA samples every metrics.every steps
        if self.config["metrics"]["weights"] and self.rank == 0:
            from .metrics.during_training import TrainingEvaluation

            self.evaluation = TrainingEvaluation(self.config["metrics"], self.dataset, cfg_data["image_size"],
                                                 self.device, seed)

        n_train = sum(p.numel() for p in self.trainable)
        n_all = sum(p.numel() for p in self.model.parameters())
        self._info(
            f"{self.model.config.name} at {cfg_data['image_size']}^3 on {self.world} x {self.device.type}: "
            f"{n_train:,} trainable / {n_all:,} parameters; dataset {n} volumes; "
            f"global batch {self.global_batch} x {self.accum_steps} accumulation steps; "
            f"{self.model.config.process} loss; step {self.step} of {self.total_steps}"
        )

    # ------------------------------------------------------------------ setup
    def _info(self, message: str) -> None:
        if self.rank == 0:
            log.info(message)

    def _dataset(self) -> Dataset:
        """The training set, named in the log's first lines (the phantom says why)."""
        from .data.dataset import build_dataset, data_files

        data = self.config["data"]
        self.train_files = data_files(data, "train")
        dataset = build_dataset(data, self.config["model"]["in_channels"], self.config["training"]["seed"])
        if self.train_files is None:
            why = "data.dataset: phantom" if data["dataset"] == "phantom" else "the config names no data"
            self._info(f"data: the synthetic phantom, {len(dataset)} volumes ({why})")
        else:
            named = data["train_list"] or data["path"]
            self._info(f"data: {len(dataset)} volumes from {named} (first {self.train_files[0]})")
        return dataset

    def _validation_set(self) -> Dataset | None:
        """The set ``logging.eval_every`` evaluates on, or None when evaluation is off."""
        if self.config["logging"]["eval_every"] is None:
            return None
        from .data.dataset import build_dataset

        data = self.config["data"]
        val = build_dataset(data, self.config["model"]["in_channels"], self.config["training"]["seed"], split="val")
        if val is None:
            log.warning("logging.eval_every is set but data.val_list is not: no validation during training")
        return val

    def _volume_metadata(self) -> dict:
        from .data.recipes import volume_metadata

        meta = volume_metadata(self.train_files, self.config["data"])
        self._info(f"volumes: {meta['voxel_size_mm']} mm voxels, intensity {meta['intensity']} ({meta['source']})")
        return meta

    def _loader(self) -> Iterator[torch.Tensor]:
        sampler = StreamSampler(
            len(self.dataset), self.global_batch, self.rank, self.world, self.config["training"]["seed"], self.position
        )
        workers = self.config["data"]["num_workers"]
        loader = DataLoader(
            self.dataset, batch_size=self.global_batch // self.world, sampler=sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0, drop_last=False,
        )
        return iter(loader)

    def _restore_latest_readable(self, candidates: list[Path]) -> None:
        """Resume from the newest checkpoint that reads; an unreadable one (a truncated
        copy, a disk error) is skipped with a warning."""
        from .checkpoint import CheckpointError

        for path in candidates:
            try:
                ckpt = read_checkpoint(path, map_location=self.device)
            except CheckpointError as e:
                log.warning("cannot read %s (%s); trying the previous checkpoint", path, e)
                continue
            self._restore(path, ckpt)
            return
        raise RuntimeError(f"--resume: none of the {len(candidates)} checkpoints in {self.ckpt_dir} can be read")

    def _restore(self, path: Path, ckpt: Mapping[str, Any]) -> None:
        mine, theirs = _run_identity(self.config), _run_identity(ckpt.get("config", {}))
        if mine != theirs:
            raise ValueError(
                f"cannot resume from {path}: it trains {', '.join(map(str, theirs))}; "
                f"the config asks for {', '.join(map(str, mine))}; use another output.results_dir"
            )
        self.model.load_state_dict(strip_wrapper_prefixes(ckpt["model"]))
        self.ema.load_state_dict(strip_wrapper_prefixes(ckpt["ema"]))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self._apply_config_hyperparameters(ckpt)
        self.step = int(ckpt["train_steps"])
        self.position = int(ckpt.get("data_position", self.step * self.samples_per_step))
        states = ckpt.get("rng") or []
        if len(states) == self.world:
            _set_rng_state(states[self.rank], self.noise)
        else:
            warnings.warn(
                f"{path} was written by {len(states)} ranks, this run has {self.world}: the data order continues, "
                f"the noise streams are reseeded",
                stacklevel=2,
            )
            self.noise.manual_seed((self.config["training"]["seed"] * 1_000_003 + self.rank) ^ (self.step << 20))
        self.last_checkpoint = path
        self._info(f"resumed from {path} at step {self.step}")

    def _apply_config_hyperparameters(self, ckpt: Mapping[str, Any]) -> None:
        """The config's learning rate and weight decay win over the checkpoint's optimizer
        state (a resumed run may lower them); a change is logged and the checkpoint
        config records the new values."""
        tr = self.config["training"]
        for key, name in (("lr", "learning_rate"), ("weight_decay", "weight_decay")):
            # stage 3b: the base's group (the second) has its own learning rate
            names = [name] + [("fine_tune_lr" if key == "lr" else name)] * (len(self.optimizer.param_groups) - 1)
            for group, wanted in zip(self.optimizer.param_groups, names):
                if group[key] != tr[wanted]:
                    self._info(f"resume: training.{wanted} changed from {group[key]} (checkpoint) to {tr[wanted]} (config)")
                    group[key] = tr[wanted]

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write ``<step>.pt`` (rank 0), all ranks meeting at barriers around the write."""
        path = self.ckpt_dir / f"{self.step:07d}.pt"
        states = [_rng_state(self.noise)]
        if self.distributed:
            states = [None] * self.world
            dist.all_gather_object(states, _rng_state(self.noise))
            dist.barrier()
        if self.rank == 0:
            payload = {
                "model": _state_on_cpu(self.model),
                "ema": _state_on_cpu(self.ema),
                "optimizer": self.optimizer.state_dict(),
                "config": self.config,
                "train_steps": self.step,
                "epoch": self.position // len(self.dataset),
                "data_position": self.position,
                "world_size": self.world,
                "rng": states,
            }
            with atomic_path(path) as tmp:
                torch.save(payload, tmp)
        if self.distributed:
            dist.barrier()
        self.last_checkpoint = path
        return path

    def _write_run_config(self) -> None:
        import yaml

        if self.rank == 0:
            with atomic_path(self.run_dir / "config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def _log_metrics(self, record: dict) -> None:
        """One record (rank 0) to ``log.jsonl`` and to TensorBoard / W&B."""
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.monitor.scalars(record["step"], {k: v for k, v in record.items() if k not in ("step", "time")})

    def _evaluate(self) -> None:
        """logging.eval_every: the EMA model's validation loss and mid-slices of a few EMA
        samples (rank 0; see ``prdit_fast.monitor``)."""
        if self.rank != 0:
            return
        from PIL import Image

        from .monitor import sample_sheet, validation_loss

        lg = self.config["logging"]
        started = time.perf_counter()
        loss = validation_loss(self.ema, self.diffusion, self.val_set, self.device, self.global_batch // self.world)
        self._log_metrics({"step": self.step, "val_loss": loss, "time": time.time()})
        message = f"step {self.step}: validation loss {loss:.5f} (EMA, {min(len(self.val_set), 64)} volumes)"
        if lg["eval_samples"]:
            sheet = sample_sheet(self.ema, self.diffusion, lg["eval_samples"], lg["eval_sample_steps"], self.device)
            with atomic_path(self.run_dir / "eval" / f"step_{self.step:07d}.png") as tmp:
                Image.fromarray(np.rint(sheet * 255).astype(np.uint8)).save(tmp, format="PNG")
            self.monitor.image(self.step, "ema_samples", sheet)
            message += f"; {lg['eval_samples']} EMA samples in {self.run_dir / 'eval'}"
        self._info(f"{message} ({time.perf_counter() - started:.1f} s)")

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def update_ema(self) -> None:
        # ema <- decay * ema + (1 - decay) * model, all tensors in one foreach kernel
        torch._foreach_lerp_(self.ema_params, [p.detach() for p in self.trainable], 1.0 - self.config["training"]["ema_decay"])

    def _micro_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The mean training loss of one micro-batch x (b, C, S, S, S), under autocast when asked."""
        tr = self.config["training"]
        bf16_autocast = tr["amp"] and self.config["model"]["backend"] == "reference"
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16_autocast else nullcontext()
        with autocast:
            if self.stage3 and tr["lowfreq_weight"] > 0:
                losses = training_losses_with_consistency(
                    self.diffusion, self.net, x, self.noise, tr["lowfreq_weight"], self.model.config.factor
                )
            else:
                losses = self.diffusion.training_losses(self.net, x, generator=self.noise)
            return losses["loss"].mean()

    def train_step(self, micro_batches: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """One optimizer step over this rank's ``grad_accum_steps`` micro-batches, each
        (b, C, S, S, S): their gradients are summed with weight 1 / grad_accum_steps, so
        the step equals one over the concatenated batch (up to the per-micro-batch noise
        and t draws). DDP all-reduces only at the last micro-batch. Returns (mean loss,
        applied)."""
        tr = self.config["training"]
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        for i, x in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = self.net.no_sync() if self.distributed and not last else nullcontext()
            with sync:
                micro = self._micro_loss(x) / len(micro_batches)
                micro.backward()
            loss += micro.detach()
        # the norm is identical on every rank (gradients are all-reduced), so all skip together
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, tr["gradient_clip"] if tr["gradient_clip"] > 0 else math.inf)
        if not math.isfinite(norm.item()):
            return loss.detach(), False
        self.optimizer.step()
        self.update_ema()
        return loss.detach(), True

    def run(self) -> Path:
        tr = self.config["training"]
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            folders = (self.run_dir, self.ckpt_dir, self.run_dir / "eval")
            stale = [p for folder in folders for p in remove_stale_temps(folder)]
            if stale:
                self._info(f"removed {len(stale)} unfinished files a killed run left (e.g. {stale[0].name})")
            self._write_run_config()
        from .monitor import RunMonitor

        # W&B fails here, not later; a run resumed from a checkpoint continues its W&B run
        self.monitor = RunMonitor(self.run_dir, self.config, enabled=self.rank == 0, resumed=self.step > 0)
        if self.step >= self.total_steps:
            self._info(f"already at step {self.step} of {self.total_steps}; nothing to train")
            return self.last_checkpoint or self.save()
        batches = self._loader()
        window_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        window_steps, bad_steps = 0, 0
        t_window = time.perf_counter()
        while self.step < self.total_steps:
            micro_batches = [next(batches).to(self.device, non_blocking=True) for _ in range(self.accum_steps)]
            loss, applied = self.train_step(micro_batches)
            self.position += self.samples_per_step
            if not applied:
                bad_steps += 1
                warnings.warn(f"step {self.step + 1}: non-finite gradient norm; optimizer step skipped", stacklevel=2)
                if bad_steps >= tr["max_bad_steps"]:
                    raise RuntimeError(
                        f"{bad_steps} consecutive steps with non-finite gradients at step {self.step + 1}: training "
                        f"diverged; lower training.learning_rate or check the data"
                    )
                continue
            bad_steps = 0
            self.step += 1
            window_loss += loss
            window_steps += 1
            if self.step % tr["log_every"] == 0 or self.step == self.total_steps:
                self._log_window(window_loss, window_steps, time.perf_counter() - t_window)
                window_loss.zero_()
                window_steps = 0
                t_window = time.perf_counter()
            if self.step % tr["ckpt_every"] == 0 or self.step == self.total_steps:
                path = self.save()
                self._info(f"checkpoint {path}")
            if self.evaluation is not None and self.step % self.evaluation.every == 0:
                record = self.evaluation(self.ema, self.step)
                self._log_metrics(record)
                self._info(f"step {self.step}: FID x10^3 {record['eval_fid_x1e3']:.3f}  MMD {record['eval_mmd']:.4f} "
                           f"({record['eval_samples']} EMA samples, {record['eval_seconds']:.0f} s)")
            if self.val_set is not None and self.step % self.config["logging"]["eval_every"] == 0:
                self._evaluate()
        self.monitor.close()
        return self.last_checkpoint

    def _log_window(self, loss_sum: torch.Tensor, steps: int, seconds: float) -> None:
        mean = loss_sum / steps
        if self.distributed:
            dist.all_reduce(mean)
            mean /= self.world
        mean = float(mean.item())
        steps_per_s = steps / max(seconds, 1e-9)
        remaining = self.total_steps - self.step
        hours_left = remaining / steps_per_s / 3600
        unit = "GPU" if self.device.type == "cuda" else "CPU-process"
        if self.rank == 0:
            record = {
                "step": self.step, "loss": mean, "samples_per_s": steps_per_s * self.samples_per_step,
                "steps_per_s": steps_per_s, "hours_to_finish": hours_left,
                "device_hours_to_finish": hours_left * self.world, "world_size": self.world, "time": time.time(),
            }
            self._log_metrics(record)
            log.info(
                "step %d/%d  loss %.5f  %.2f samples/s  %.1f %s-hours to finish (%.2f h on %d)",
                self.step, self.total_steps, mean, record["samples_per_s"], record["device_hours_to_finish"],
                unit, hours_left, self.world,
            )


def train(config: Mapping[str, Any], resume: bool = False, from_scratch: bool = False) -> Path:
    """Train as ``config`` says (see DEFAULTS and ``Trainer``); under ``torchrun``
    (WORLD_SIZE > 1) every rank calls this and the process group is set up here.
    Returns the last checkpoint."""
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        on_gpu = torch.cuda.is_available() and config.get("training", {}).get("device", "auto") != "cpu"
        backend = "nccl" if on_gpu else "gloo"
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        created = True
    try:
        return Trainer(config, resume=resume, from_scratch=from_scratch).run()
    finally:
        if created:
            dist.destroy_process_group()
