"""Two-stage PRDiT training: stage 1 (depth 0, local denoiser) and stage 2 (depth > 0,
global residual DiT over a frozen stage-1 coarse path), spec sections 7, 9, 12 and 13;
and stage 3, the PRDiT-SR refinement of section 8 (a config with a ``base_model``
section: 3a trains the head over a frozen base, 3b fine-tunes the base too).

One job per module:

- ``config``: the YAML config as one dataclass per section (``resolve_config``,
  ``TrainConfig``), the other names official configs use, every type and range check;
- ``data_order``: the sample order (``StreamSampler``) and the random state a resume restores;
- ``model``: ``build_model``, the one function that builds the network to train;
- ``trainer``: the ``Trainer`` loop and ``train``.

Checkpoint files are written and read by ``prdit_fast.checkpoint``.
"""
from ..checkpoint import checkpoints_newest_first, latest_checkpoint
from .config import ConfigError, TrainConfig, apply_overrides, load_config, resolve_config
from .data_order import StreamSampler
from .model import build_model, enable_activation_checkpointing, load_pretrained
from .trainer import Trainer, train

__all__ = [
    "ConfigError", "StreamSampler", "TrainConfig", "Trainer", "apply_overrides", "build_model",
    "checkpoints_newest_first", "enable_activation_checkpointing", "latest_checkpoint", "load_config",
    "load_pretrained", "resolve_config", "train",
]
