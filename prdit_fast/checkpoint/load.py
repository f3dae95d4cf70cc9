"""Loading a checkpoint in one pass: read the file (``read``), resolve which network it
holds (``resolve``), build it through the one factory (``build_network``), check the keys
and load them strictly."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..models import PRDiT, PRDiTConfig
from ..sr import PRDiTSR, SRConfig, build_sr_model
from ..checkpoint_read import CheckpointError, read_checkpoint, strip_wrapper_prefixes
from .resolve import parse_config, resolve_network

# what ``load_checkpoint(backend=...)`` and training's ``model.backend`` build
MODEL_BACKENDS = ("reference", "fast")
_LISTED = 5  # how many offending keys an error message names


def build_network(cfg: PRDiTConfig | SRConfig, device: torch.device | str | None = None) -> PRDiT | PRDiTSR:
    """A freshly initialized network for a resolved config, on ``device`` (default CPU):
    the one factory checkpoints are loaded into."""
    if isinstance(cfg, SRConfig):
        return build_sr_model(cfg, device)
    with torch.device(device or "cpu"):
        return PRDiT(cfg)


def model_from_config(config: Mapping[str, Any]) -> PRDiT | PRDiTSR:
    """A freshly initialized PRDiT (or PRDiT-SR) from a config dict: ours
    (``PRDiTConfig.to_dict()``, ``SRConfig.to_dict()``) or the official nested one
    (``{"model": {"name": ...}, "data": {"image_size": ...}}``, or stage 3's sections)."""
    return build_network(parse_config(config))


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
    path = Path(path)
    ckpt = read_checkpoint(path, map_location)
    cfg, state, which, noise_std = resolve_network(ckpt, path, ema, variant, input_size, norm)
    device = torch.device(map_location) if isinstance(map_location, (str, torch.device)) else torch.device("cpu")
    model = build_network(cfg, device)
    _check_keys(model, state, path, cfg)
    model.load_state_dict(state, strict=True)
    model.eval()
    model.checkpoint_weights = which
    model.noise_std = noise_std
    if backend == "fast":
        from ..fast import accelerate  # here: the fast backend imports Triton, slow to start

        return accelerate(model, **backend_kwargs)
    return model


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
