"""The network a training run trains: ``build_model`` is the one place it is built, for
every stage (spec sections 7-9, 13):

- stage 1 (depth 0) and flow matching: a fresh ``create_model``;
- stage 2 (depth > 0): the same, with the stage-1 weights of ``model.pretrained_path``
  copied in (``load_pretrained``); its local denoiser is frozen by the model itself;
- stage 3 (a ``base_model`` section): the PRDiT-SR wrapper, its base from
  ``base_model.checkpoint`` (3a, frozen) or the whole wrapper from
  ``sr_model.resume_checkpoint`` (3b, the base trains too).

A run resuming its own checkpoint (``fresh=False``) skips those loads: the checkpoint
provides every tensor.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

import torch.nn as nn

from ..checkpoint import (
    build_network,
    checkpoint_norm,
    config_from_official_sr,
    copy_matching_weights,
    load_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
    strip_wrapper_prefixes,
)
from ..models import DiTBlock, PRDiT, SwiGLU, create_model
from ..sr import PRDiTSR
from .config import ConfigError, TrainConfig

log = logging.getLogger("prdit_fast.train")


def build_model(config: TrainConfig, fresh: bool = True, from_scratch: bool = False) -> PRDiT | PRDiTSR:
    """The model ``config`` trains, on the CPU, with its starting weights (see the module
    docstring). from_scratch: allow stage 2 without ``model.pretrained_path`` (its local
    denoiser stays frozen at initialization)."""
    if config.stage3:
        return _stage3_model(config, fresh)
    m = config.model
    model = create_model(m.name, config.data.image_size, m.in_channels, m.out_channels)
    if not fresh:
        return model
    if m.pretrained_path:
        copied = load_pretrained(model, m.pretrained_path)
        log.info("stage 2: copied %d tensors from %s", len(copied), m.pretrained_path)
    elif model.config.depth > 0:
        if not from_scratch:
            raise ConfigError(
                f"model.pretrained_path is empty: stage 2 ({model.config.name}) starts from a stage-1 "
                f"checkpoint (its local denoiser is frozen); set model.pretrained_path, or pass --from-scratch "
                f"to train it with the local denoiser frozen at initialization"
            )
        log.warning("--from-scratch: %s trains with its local denoiser frozen at initialization", model.config.name)
    return model


def _stage3_model(config: TrainConfig, fresh: bool) -> PRDiTSR:
    """Stage 3a (``base_model.finetune`` false): the base's weights are the ``model`` entry of
    ``base_model.checkpoint`` (as the official code loads them), frozen. Stage 3b (true):
    the whole wrapper's ``model`` weights come from ``sr_model.resume_checkpoint``."""
    cfg = config_from_official_sr(config.to_dict())
    finetune = config.base_model.finetune
    model = build_network(cfg)
    if fresh and finetune:
        source = config.sr_model.resume_checkpoint
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
    elif fresh:
        source = config.base_model.checkpoint
        if not source:
            raise ValueError(
                "stage 3a (base_model.finetune: false) refines a trained base: set base_model.checkpoint "
                "(a stage-1 or stage-2 checkpoint at data.base_image_size)"
            )
        loaded = load_checkpoint(source, ema=False, variant=cfg.base.name, input_size=cfg.base.input_size)
        model.base.load_state_dict(loaded.state_dict())
    model.set_base_trainable(finetune)
    return model


def load_pretrained(model: PRDiT, path: str | os.PathLike) -> list[str]:
    """Stage 2 from stage 1 (spec section 13): copy every tensor of the checkpoint's
    ``model`` weights (as the official code does; ``ema`` when there is no ``model``, or a
    bare state dict) whose name and shape match; the rest keeps its fresh initialization.
    ``path`` may name a stage-1 run folder or ``.../checkpoints/latest`` (its newest
    checkpoint). Raises ValueError when the coarse path is not fully covered (wrong file)."""
    path = resolve_checkpoint(path)
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
