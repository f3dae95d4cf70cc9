"""Where a training run reports, besides ``RUN/log.jsonl`` (always written):

- TensorBoard event files in ``RUN/tensorboard/`` when the ``tensorboard`` package is
  installed (``logging.tensorboard``, default on; said once in the log when missing);
- Weights & Biases when the official config's ``wandb.enable`` is true (project,
  entity, tags from the same section); an error when enabled but not installed. The
  W&B run id is kept in ``RUN/wandb_run.json`` (``WANDB_RUN_FILE``), so a resumed
  training run (``--resume`` from a checkpoint) continues the same W&B run instead of
  starting a new one;
- every ``logging.eval_every`` steps (``evaluate``): the EMA model's loss on the
  validation set (``data.val_list``; a held-out phantom set when training on the
  phantom) at fixed noise and timesteps, so evaluations are comparable, and the
  axial / coronal / sagittal mid-slices of ``logging.eval_samples`` EMA samples, as
  images and as ``RUN/eval/step_<step>.png``.

Only rank 0 reports; every backend is imported only when used.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .atomic import write_json
from .flow_matching import FlowMatching

log = logging.getLogger("prdit_fast.train")

EVAL_SEED = 20_251_201  # fixed noise and timesteps: validation losses of one run are comparable
WANDB_RUN_FILE = "wandb_run.json"  # {"id": ...} of the W&B run a resumed training run continues


def saved_wandb_run_id(run_dir: Path) -> str | None:
    """The W&B run id recorded in ``run_dir`` by an earlier start of the run, or None."""
    path = Path(run_dir) / WANDB_RUN_FILE
    if not path.is_file():
        return None
    try:
        run_id = json.loads(path.read_text()).get("id")
    except (ValueError, AttributeError):
        log.warning("%s is unreadable; this run starts a new W&B run", path)
        return None
    return str(run_id) if run_id else None


class RunMonitor:
    """Scalars and images of one training run to TensorBoard and W&B (rank 0 only).

    resumed: the run continues from a checkpoint; W&B then continues the run whose id
    ``RUN/wandb_run.json`` records (a new run, said in the log, when none is recorded).
    """

    def __init__(self, run_dir: Path, config: Mapping[str, Any], enabled: bool = True, resumed: bool = False):
        self.run_dir = Path(run_dir)
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        if config["logging"]["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed: no event files (pip install tensorboard); log.jsonl has "
                         "every metric, `prdit-fast plot RUN` draws them")
            else:
                self.tensorboard = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        wb = config.get("wandb") or {}
        if wb.get("enable"):
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("wandb.enable is true but wandb is not installed; pip install wandb, "
                                   "or set wandb.enable: false") from e
            tags = wb.get("tags") or []
            run_id = saved_wandb_run_id(self.run_dir) if resumed else None
            if resumed and run_id is None:
                log.info("no %s in %s (a run started before prdit_fast kept it): the resumed run logs to a new "
                         "W&B run", WANDB_RUN_FILE, self.run_dir)
            # with an id, resume="allow" continues that run (or creates it under that id if it was deleted)
            self.wandb = wandb.init(
                project=wb.get("project") or None, entity=wb.get("entity") or None,
                tags=[t.strip() for t in tags.split(",")] if isinstance(tags, str) else list(tags),
                config=dict(config), dir=str(self.run_dir), name=self.run_dir.name, id=run_id, resume="allow",
            )
            if self.wandb.id != run_id:
                write_json(self.run_dir / WANDB_RUN_FILE, {"id": self.wandb.id})

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(dict(values), step=step)

    def image(self, step: int, name: str, picture: np.ndarray) -> None:
        """``picture``: (H, W) in [0, 1]."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(name, picture[None], step)
            self.tensorboard.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(picture)}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


@torch.no_grad()
def validation_loss(model: torch.nn.Module, diffusion, dataset, device: torch.device, batch_size: int,
                    max_volumes: int = 64) -> float:
    """The mean training loss (IaN or flow matching, as ``diffusion``) of ``model`` over (up to ``max_volumes`` of) ``dataset`` with
    timesteps and noise drawn from ``EVAL_SEED``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(EVAL_SEED)
    count = min(len(dataset), max_volumes)
    total = 0.0
    for start in range(0, count, batch_size):
        x = torch.stack([dataset[i] for i in range(start, min(start + batch_size, count))]).to(device)
        total += float(diffusion.training_losses(model, x, generator=generator)["loss"].sum())
    return total / count


@torch.no_grad()
def sample_sheet(model: torch.nn.Module, diffusion, count: int, steps: int, device: torch.device) -> np.ndarray:
    """``count`` samples of ``model`` (noise from ``EVAL_SEED``), their axial, coronal and
    sagittal mid-slices side by side, one sample per row: (rows, cols) in [0, 1]."""
    from .volumes import mid_slices

    cfg = model.config
    generator = torch.Generator(device=device)
    generator.manual_seed(EVAL_SEED)
    noise = diffusion.initial_noise((count, cfg.in_channels) + (cfg.input_size,) * 3, generator=generator,
                                    device=device)
    if isinstance(diffusion, FlowMatching):  # the final state: a velocity head predicts no clean volume
        volumes = diffusion.sample(model, noise, steps=steps, generator=generator)
    else:
        _, volumes = diffusion.sample(model, noise, steps=steps, generator=generator)
    rows = [np.concatenate(mid_slices(v[0].float().cpu().numpy()), axis=1) for v in volumes]
    return np.clip((np.concatenate(rows, axis=0) + 1) / 2, 0.0, 1.0)
