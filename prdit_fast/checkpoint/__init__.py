"""Checkpoints: every layout on disk, ours and the official ones, written and resolved
here and nowhere else in the package; read by ``prdit_fast/checkpoint_read.py``, whose
names this package re-exports.

- ``prdit_fast.checkpoint_read`` (beside the package, not in it): reading any file
  (``read_checkpoint``), the layouts described; it imports nothing from the package, so
  any module may read through it, the models' ``load_coarse_checkpoint`` included;
- ``write``: ``save_checkpoint`` (our format, torch or safetensors), ``save_model_folder``,
  ``save_official_checkpoint`` (the official layout) and a training run's ``<step>.pt``
  files (``save_training_checkpoint``, ``read_training_checkpoint``, ``latest_checkpoint``);
- ``resolve``: which network a file holds (ours, official IaN / flow matching, official
  PRDiT-SR, TF-PRDiT, a bare state dict), decided in one place;
- ``load``: ``load_checkpoint`` in one pass: read -> resolve -> ``build_network`` (the one
  factory) -> check keys -> load strictly.
"""
from ..checkpoint_read import (
    FORMAT,
    FORMAT_VERSION,
    MODEL_CONFIG_FILE,
    MODEL_WEIGHTS_FILE,
    CheckpointError,
    checkpoint_volume_metadata,
    is_model_folder,
    read_checkpoint,
    read_lazily,
    read_model_folder_config,
    strip_wrapper_prefixes,
)
from ..state_dict import infer_architecture
from .write import (
    LATEST,
    checkpoints_newest_first,
    latest_checkpoint,
    link_latest,
    remove_training_checkpoints,
    resolve_checkpoint,
    TrainingState,
    read_training_checkpoint,
    save_checkpoint,
    save_model_folder,
    save_official_checkpoint,
    save_training_checkpoint,
    training_checkpoint_path,
)
from .load import MODEL_BACKENDS, build_network, copy_matching_weights, load_checkpoint, model_from_config
from .resolve import (
    Resolved,
    checkpoint_norm,
    checkpoint_process,
    config_from_official,
    config_from_official_sr,
    is_official_sr_config,
    official_sr_config,
    parse_config,
    resolve_network,
)

__all__ = [
    "build_network", "checkpoint_norm", "checkpoint_process", "checkpoint_volume_metadata", "CheckpointError",
    "checkpoints_newest_first", "config_from_official", "config_from_official_sr", "copy_matching_weights",
    "FORMAT", "FORMAT_VERSION", "infer_architecture", "is_model_folder", "is_official_sr_config", "LATEST",
    "latest_checkpoint", "link_latest", "load_checkpoint", "MODEL_BACKENDS", "MODEL_CONFIG_FILE",
    "model_from_config", "MODEL_WEIGHTS_FILE", "official_sr_config", "parse_config", "read_checkpoint",
    "read_lazily", "read_model_folder_config", "read_training_checkpoint", "remove_training_checkpoints",
    "resolve_checkpoint", "resolve_network", "Resolved", "save_checkpoint", "save_model_folder",
    "save_official_checkpoint", "save_training_checkpoint", "strip_wrapper_prefixes",
    "training_checkpoint_path", "TrainingState",
]
