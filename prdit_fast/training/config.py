"""The training config: one dataclass per YAML section, every key's type, default and
range in its field, and one table of the other names a config may use.

The YAML layout is the official one (spec section 13): sections ``data``, ``model``,
``training``, ``logging``, ``output`` (and ``metrics``, ``wandb``); a stage-3 config
(PRDiT-SR, spec section 8) adds ``base_model`` and ``sr_model`` and needs no
``model.name``. ``resolve_config`` turns such a mapping into a ``TrainConfig`` read by
attribute (``config.training.learning_rate``): defaults filled in, numbers parsed (YAML
1.1 reads ``1e-4`` as a string) and range-checked, booleans and choices checked, the
cross-key rules applied; ``ConfigError`` names the key. ``TrainConfig.to_dict()`` is the
official layout again: what ``config.yaml`` and every checkpoint's ``config`` hold.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..checkpoint import MODEL_BACKENDS, config_from_official_sr, is_official_sr_config
from ..data.cache import DTYPES as CACHE_DTYPES
from ..data.feed import ON_DEVICE_CHOICES
from ..errors import UsageError
from ..models import canonical_name, variant_config

DEVICES = ("auto", "cuda", "cpu")


class ConfigError(UsageError):
    """A training config value that is missing, of the wrong type or out of range; the
    message names the key."""


# Keys a config may hold that are not fields below: prdit_fast's earlier names of official
# keys (read as the key named; giving both with different values is an error) and official
# keys that prdit_fast does not use (None; accepted without a warning).
OTHER_NAMES: dict[str, str | None] = {
    "training.bf16": "training.amp",
    "training.grad_checkpointing": "model.grad_checkpoint",
    "training.log_every": "logging.log_every",  # read in one place: config.yaml lists each once
    "training.ckpt_every": "logging.ckpt_every",
    "data.val_frac": None,
    "data.normalize": None,
    "model.num_classes": None,
    "model.checkpoint": None,
    "model.flash_attn": None,
    "training.compile_model": None,
    "training.compile_mode": None,
}


def key(default: Any = None, *, required: bool = False, number: type | None = None, low: float | None = None,
        high: float | None = None, above: bool = False, optional: bool = False, choices: tuple | None = None,
        empty_is_none: bool = False) -> Any:
    """A config field. number: int or float (numeric strings parsed), >= low (> low when
    ``above``), <= high; optional: None allowed. choices: the allowed values. A bool
    default makes a boolean key. empty_is_none: "" reads as None (the official configs
    write unset paths as "")."""
    check = dict(required=required, number=number, low=low, high=high, above=above, optional=optional,
                 choices=choices, empty_is_none=empty_is_none)
    return field(default=default, metadata=check)


class Section:
    """Base of the section dataclasses: ``to_dict`` gives the YAML mapping."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class DataConfig(Section):
    image_size: int = key(required=True, number=int, low=1)  # the edge S the model sees; volumes are pooled to it
    base_image_size: int | None = key(number=int, low=1, optional=True)  # stage 3: the base network's edge
    path: str | None = key(empty_is_none=True)  # folder / list of volumes, or the root of the list entries
    train_list: str | None = key(empty_is_none=True)  # official split file, one volume per line
    val_list: str | None = key(empty_is_none=True)  # validation split (logging.eval_every)
    dataset: str | None = key(choices=(None, "phantom"))  # "phantom": the synthetic phantom
    task: str | None = None  # the official configs' dataset name ("lidc", "rad_chestct"); recorded
    num_workers: int = key(4, number=int, low=0)
    cache_dir: str | None = key(empty_is_none=True)  # training cache folder (prdit_fast.data.cache); None: the default
    cache_dtype: str = key("auto", choices=CACHE_DTYPES)  # auto: float16 for the known CT recipes
    cache: bool = True  # volume files go through the training cache (prdit_fast.data.cache); false: read each step
    on_device: Any = key("auto", choices=ON_DEVICE_CHOICES)  # the cached set in device memory (prdit_fast.data.feed)
    phantom_length: int = key(64, number=int, low=1)  # phantom volumes when no data is named
    augment: bool = False  # flip each training sample with p = 0.5 (data_order.StreamSampler, data.recipes.Recipe)


@dataclass
class ModelConfig(Section):
    name: str | None = key(required=True)  # PRDiT-B/12/0 (stage 1), PRDiT-B/12/4 (stage 2); stage 3: unset
    in_channels: int = key(1, number=int, low=1)
    out_channels: int | None = key(number=int, low=1, optional=True)  # 2C: IaN, C: flow matching (section 14)
    pretrained_path: str | None = key(empty_is_none=True)  # the stage-1 checkpoint stage 2 starts from
    backend: str = key("reference", choices=MODEL_BACKENDS)  # "fast": prdit_fast.fast.accelerate
    grad_checkpoint: bool = False  # recompute DiT / SwiGLU blocks in backward (reference backend)


@dataclass
class TrainingSection(Section):
    batch_size: int = key(required=True, number=int, low=1)  # the GLOBAL batch over all ranks
    learning_rate: float = key(required=True, number=float, low=0, above=True)
    total_steps: int | None = key(number=int, low=1, optional=True)  # None: epochs x steps per epoch
    epochs: int | None = key(number=int, low=1, optional=True)
    gradient_clip: float | None = key(1.0, number=float, low=0, optional=True)  # max grad norm; 0 / None: off
    ema_decay: float = key(0.9999, number=float, low=0, high=1)
    ema_warmup: bool = False  # decay min(ema_decay, (1 + t) / (10 + t)) at optimizer step t (retention module)
    keep_last: int | None = key(number=int, low=1, optional=True)  # checkpoints kept: the newest N (None: all) ...
    keep_every: int | None = key(number=int, low=1, optional=True)  # ... plus every step divisible by this
    weight_decay: float = key(0.0, number=float, low=0)
    seed: int = key(0, number=int, low=0)
    amp: bool = False  # bf16 autocast (reference backend) / bf16 GEMMs (fast backend)
    grad_accum_steps: int = key(1, number=int, low=1)  # micro-batches of batch_size per optimizer step
    device: str = key("auto", choices=DEVICES)  # "auto": CUDA when available
    max_bad_steps: int = key(10, number=int, low=1)  # consecutive non-finite gradients before giving up
    fine_tune_lr: float | None = key(number=float, low=0, optional=True)  # stage 3b: the base's learning rate
    lowfreq_weight: float = key(0.0, number=float, low=0)  # stage 3: low-frequency consistency term


@dataclass
class LoggingConfig(Section):
    log_every: int = key(100, number=int, low=1)
    ckpt_every: int = key(1000, number=int, low=1)
    eval_every: int | None = key(number=int, low=1, optional=True)  # validation loss + EMA samples (monitor)
    eval_samples: int = key(2, number=int, low=0)  # EMA samples drawn at each evaluation
    eval_sample_steps: int = key(50, number=int, low=1)  # sampler steps of those samples
    tensorboard: bool = True  # event files in the run folder when tensorboard is installed


@dataclass
class OutputConfig(Section):
    results_dir: str = "results"
    checkpoint_dir: str = "checkpoints"


@dataclass
class MetricsConfig(Section):
    """FID / MMD every N steps (prdit_fast.metrics.during_training)."""

    weights: str | None = None  # MedicalNet weights; unset: no evaluation
    every: int | None = key(number=int, low=1, optional=True)
    samples: int = key(32, number=int, low=2)
    sample_steps: int = key(100, number=int, low=1)
    real_volumes: int = key(256, number=int, low=2)
    batch_size: int = key(4, number=int, low=1)
    cache_dir: str | None = None


@dataclass
class WandbConfig(Section):
    enable: bool = False
    project: str = ""
    entity: str = ""
    tags: Any = ""  # "a,b" or a list


@dataclass
class BaseModelConfig(Section):
    """Stage 3: the base network the wrapper refines."""

    name: str = key(required=True)
    in_channels: int = key(1, number=int, low=1)
    out_channels: int | None = key(number=int, low=1, optional=True)
    checkpoint: str | None = key(empty_is_none=True)  # stage 3a: the trained base
    finetune: bool = False  # stage 3b: the base trains too


@dataclass
class SRModelConfig(Section):
    """Stage 3: the refinement head (spec section 8 defaults)."""

    hidden_size: int = key(768, number=int, low=1)
    patch_size: int = key(12, number=int, low=1)
    stride: int = key(8, number=int, low=1)
    padding: int = key(2, number=int, low=0)
    resume_checkpoint: str | None = key(empty_is_none=True)  # stage 3b: the stage-3a checkpoint


SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig, "model": ModelConfig, "training": TrainingSection, "logging": LoggingConfig,
    "output": OutputConfig, "metrics": MetricsConfig, "wandb": WandbConfig,
}
STAGE3_SECTIONS: dict[str, type[Section]] = {"base_model": BaseModelConfig, "sr_model": SRModelConfig}


@dataclass
class TrainConfig:
    """A resolved training config (``resolve_config``)."""

    data: DataConfig
    model: ModelConfig
    training: TrainingSection
    logging: LoggingConfig
    output: OutputConfig
    metrics: MetricsConfig
    wandb: WandbConfig
    base_model: BaseModelConfig | None = None  # stage 3 only
    sr_model: SRModelConfig | None = None  # stage 3 only
    volume: dict[str, Any] | None = None  # what the trainer found about the volumes (prdit_fast.data.recipes)

    @property
    def stage3(self) -> bool:
        return self.base_model is not None

    def to_dict(self) -> dict[str, Any]:
        """The official nested layout (what config.yaml and checkpoints hold)."""
        out = {name: getattr(self, name).to_dict() for name in SECTIONS}
        if self.stage3:
            out.update({name: getattr(self, name).to_dict() for name in STAGE3_SECTIONS})
        if self.volume is not None:
            out["volume"] = copy.deepcopy(self.volume)
        return out


# --------------------------------------------------------------------------- reading
def load_config(path: str | os.PathLike) -> dict:
    """The YAML mapping at ``path`` (ConfigError for a missing or malformed file)."""
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


def apply_overrides(config: Mapping[str, Any], overrides: list[str]) -> dict:
    """``["training.batch_size=8", "data.path=/x"]`` -> a copy of config with those keys
    set; values are parsed as YAML (numbers, booleans, null, lists)."""
    import yaml

    out = copy.deepcopy(dict(config))
    for item in overrides:
        name, sep, value = item.partition("=")
        parts = name.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. training.batch_size=8")
        section = out.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"override {item!r}: config section {parts[0]!r} is not a mapping")
        section[parts[1]] = yaml.safe_load(value)
    return out


def _field(section: str, name: str) -> dataclasses.Field:
    cls = {**SECTIONS, **STAGE3_SECTIONS}[section]
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _check(value: Any, spec: dataclasses.Field, where: str) -> Any:
    """``value`` of the key ``where`` as its field says (the one place values are checked)."""
    meta = spec.metadata
    if meta.get("empty_is_none") and value == "":
        return None
    if isinstance(spec.default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if meta.get("choices") is not None:
        if value not in meta["choices"]:
            raise ConfigError(f"{where} must be one of {meta['choices']}, got {value!r}")
        return value
    if meta.get("number") is not None:
        return _number(value, meta, where)
    return value


def _number(value: Any, meta: Mapping[str, Any], where: str) -> int | float | None:
    kind, low, high, above = meta["number"], meta["low"], meta["high"], meta["above"]
    if value is None or value == "":
        if meta["optional"]:
            return None
        raise ConfigError(f"{where} must be set (a number {'>' if above else '>='} {low:g}), got {value!r}")
    what = ("an integer" if kind is int else "a number") + f" {'>' if above else '>='} {low:g}"
    if high is not None:
        what = f"in [{low:g}, {high:g}]"
    parsed = value
    if isinstance(value, str):
        try:
            parsed = float(value.strip())
        except ValueError:
            raise ConfigError(f"{where} must be {what}, got {value!r}") from None
    if isinstance(parsed, bool) or not isinstance(parsed, (int, float)) or not math.isfinite(parsed):
        raise ConfigError(f"{where} must be {what}, got {value!r}")
    if kind is int:
        if float(parsed) != int(parsed):
            raise ConfigError(f"{where} must be {what}, got {value!r}")
        parsed = int(parsed)
    else:
        parsed = float(parsed)
    if parsed < low or (above and parsed == low) or (high is not None and parsed > high):
        raise ConfigError(f"{where} must be {what}, got {value!r}")
    return parsed


def _apply_other_names(config: Mapping[str, Any]) -> dict:
    """A copy of ``config`` with the renamed keys of OTHER_NAMES under their official names
    (each value checked under the name it was given); ConfigError when both names disagree."""
    out = {section: dict(values) if isinstance(values, Mapping) else values for section, values in config.items()}
    for old, new in OTHER_NAMES.items():
        if new is None:
            continue
        (old_section, old_key), (section, name) = old.split("."), new.split(".")
        given = out.get(old_section)
        if not isinstance(given, Mapping) or old_key not in given:
            continue
        spec = _field(section, name)
        value = _check(given.pop(old_key), spec, old)
        target = out.setdefault(section, {})
        if not isinstance(target, dict):
            continue  # reported as a bad section by resolve_config
        if name in target and _check(target[name], spec, new) != value:
            raise ConfigError(f"{old} ({value!r}) is the former name of {new} ({target[name]!r}); set only {new}")
        target[name] = value
    return out


def resolve_config(config: Mapping[str, Any] | TrainConfig) -> TrainConfig:
    """The typed, complete ``TrainConfig`` of a config mapping (see the module docstring).
    Unknown keys draw a warning; keys of OTHER_NAMES are read as the key they name."""
    if isinstance(config, TrainConfig):
        return copy.deepcopy(config)
    config = _apply_other_names(config)
    stage3 = is_official_sr_config(config)
    classes = {**SECTIONS, **STAGE3_SECTIONS} if stage3 else SECTIONS
    for section, values in config.items():
        if not isinstance(values, Mapping):
            if section in classes:
                raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
            warnings.warn(f"unknown config key {section!r} ignored", stacklevel=2)
            continue
        names = {f.name for f in dataclasses.fields(classes[section])} if section in classes else set()
        for name in values:
            if name not in names and f"{section}.{name}" not in OTHER_NAMES:
                warnings.warn(f"unknown config key {section}.{name} ignored", stacklevel=2)
    missing = [
        f"{section}.{f.name}" for section, cls in classes.items() for f in dataclasses.fields(cls)
        if f.metadata.get("required") and (config.get(section) or {}).get(f.name) is None
        and not (stage3 and (section, f.name) == ("model", "name"))  # the wrapper is named by base_model.name
    ]
    if missing:
        raise ConfigError(
            f"training config lacks {', '.join(missing)}; set them in the YAML or on the command line "
            f"(e.g. prdit-fast train --config FILE data.image_size=128)"
        )
    sections = {}
    for section, cls in classes.items():
        given = config.get(section) or {}
        sections[section] = cls(**{
            f.name: _check(given[f.name], f, f"{section}.{f.name}") if f.name in given else copy.copy(f.default)
            for f in dataclasses.fields(cls)
        })
    out = TrainConfig(**sections)
    _check_across_keys(out)
    return out


def _check_across_keys(config: TrainConfig) -> None:
    """The rules between keys."""
    tr, model = config.training, config.model
    tr.gradient_clip = tr.gradient_clip or 0.0
    if config.metrics.weights and config.metrics.every is None:
        raise ConfigError("metrics.weights is set but metrics.every is not: set the steps between evaluations")
    if tr.total_steps is None and tr.epochs is None:
        raise ConfigError("set training.total_steps (or training.epochs)")
    if model.out_channels is not None and model.out_channels not in (model.in_channels, 2 * model.in_channels):
        raise ConfigError(
            f"model.out_channels {model.out_channels} must be 2 * in_channels = {2 * model.in_channels} "
            f"(IaN: noise and clean predictions) or in_channels = {model.in_channels} (flow matching: the velocity)"
        )
    if config.stage3:
        _check_stage3(config)
    else:  # the network must exist at this edge (e.g. an edge the stride divides)
        try:
            variant_config(model.name, config.data.image_size, model.in_channels, model.out_channels)
        except ValueError as e:
            raise ConfigError(f"model.name / data.image_size: {e}") from e


def _check_stage3(config: TrainConfig) -> None:
    """Stage-3 consistency: the wrapper's geometry, the base's learning rate, no stage-2 keys."""
    if config.model.pretrained_path:
        raise ConfigError("stage 3 loads its base from base_model.checkpoint; remove model.pretrained_path")
    if config.data.base_image_size is None:
        raise ConfigError("a stage-3 config (base_model section) needs data.base_image_size, the base's volume edge")
    try:
        config_from_official_sr(config.to_dict())
    except ValueError as e:
        raise ConfigError(str(e)) from e
    config.model.in_channels = config.base_model.in_channels  # what the data loader reads
    if config.base_model.finetune and not config.training.fine_tune_lr:
        raise ConfigError("stage 3b (base_model.finetune: true) needs training.fine_tune_lr > 0 for the base's parameter group")


def run_identity(config: Mapping[str, Any]) -> tuple:
    """What a checkpoint's config (a mapping in the official layout) must share with this
    run's to resume it: the network (for stage 3 also the base, both sizes and the
    stage), the volume edge, the channels and the process."""
    if is_official_sr_config(config):
        cfg = config_from_official_sr(config)
        stage = "3b" if config["base_model"].get("finetune") else "3a"
        return (cfg.name, f"{cfg.base.input_size}^3 -> {cfg.input_size}^3", cfg.in_channels, f"stage {stage}")
    model, data = config.get("model") or {}, config.get("data") or {}
    channels = model.get("in_channels", 1)
    process = "flow matching" if model.get("out_channels") == channels else "IaN"  # the head (spec section 14)
    try:
        name = canonical_name(model.get("name"))
    except ValueError:
        name = None
    return (name, data.get("image_size"), channels, process)
