"""The ``Trainer``: one rank's training loop over a resolved ``TrainConfig``.

``train(config)`` runs on one device, or on every rank of a ``torchrun`` launch
(DistributedDataParallel; NCCL on GPU, gloo on CPU). ``training.batch_size`` is the
GLOBAL batch, as in the official configs: each of W ranks takes batch_size / W volumes
per micro-step (batch_size must be divisible by W); an optimizer step accumulates the
gradients of ``training.grad_accum_steps`` micro-steps, so the effective batch is
batch_size x grad_accum_steps.

The process follows the head (spec section 14): ``model.out_channels`` = in_channels
trains flow matching (``prdit_fast.flow_matching``), 2 in_channels (the default) IaN.
``training.amp`` is bf16 autocast, ``model.grad_checkpoint`` activation checkpointing.

Checkpoints (``<output.results_dir>/<output.checkpoint_dir>/<step:07d>.pt``, written by
rank 0 through ``prdit_fast.checkpoint.save_training_checkpoint``) have the official
layout of spec section 13 plus the data position and every rank's random state
(``data_order``), so ``--resume`` continues exactly, and ``load_checkpoint`` reads them.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset

from ..atomic import atomic_path, remove_stale_temps
from ..checkpoint import (
    CheckpointError,
    TrainingState,
    checkpoints_newest_first,
    link_latest,
    read_training_checkpoint,
    remove_training_checkpoints,
    resolve_checkpoint,
    save_training_checkpoint,
    training_checkpoint_path,
)
from ..data.feed import WAIT_WARNING, DataWait
from ..data.recipes import flip_axis
from ..diffusion import IaNDiffusion, default_noise_std
from ..flow_matching import FlowMatching
from ..models import PRDiT
from ..sr import PRDiTSR, sr_parameter_groups, training_losses_with_consistency
from .config import ConfigError, TrainConfig, resolve_config, run_identity
from .data_order import FLIP_PROBABILITY, StreamSampler, noise_seed, rng_state, seed_everything, set_rng_state
from .model import build_model, enable_activation_checkpointing
from .retention import checkpoints_to_remove, ema_decay_at, ema_warning

log = logging.getLogger("prdit_fast.train")


class Trainer:
    """One rank's training state. ``run()`` trains to ``training.total_steps`` and returns
    the last checkpoint's path. ``model`` (the PRDiT being trained) and ``ema`` are
    exposed for inspection.

    resume: continue from the latest readable checkpoint of ``output.results_dir`` (or
    from the checkpoint of this run that ``resume`` names, e.g. ``.../latest``);
    without it a results folder that already holds checkpoints is refused (it belongs
    to another run). from_scratch: allow a stage-2 model (depth > 0) without
    ``model.pretrained_path`` (its local denoiser stays frozen at initialization).
    dataset: a user dataset (e.g. MONAI, ``prdit_fast.data.user_datasets``) in place of
    the one the config names; items (C, S, S, S) in [-1, 1] in prdit_fast's axis order.
    """

    def __init__(self, config: Mapping[str, Any] | TrainConfig, resume: bool | str = False,
                 from_scratch: bool = False, dataset: Dataset | None = None):
        self.config = resolve_config(config)
        tr = self.config.training
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if tr.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("training.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        if tr.device != "cpu" and torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            self.device = torch.device("cpu")
        if tr.batch_size % self.world:
            raise ValueError(
                f"training.batch_size {tr.batch_size} is the global batch and must be divisible by the "
                f"number of ranks {self.world}"
            )
        self.global_batch = tr.batch_size  # per micro-step, over all ranks
        self.accum_steps = tr.grad_accum_steps
        self.samples_per_step = self.global_batch * self.accum_steps  # the effective batch
        self.run_dir = Path(self.config.output.results_dir)
        self.ckpt_dir = self.run_dir / self.config.output.checkpoint_dir
        candidates = checkpoints_newest_first(self.ckpt_dir)
        if isinstance(resume, (str, os.PathLike)) and str(resume) != "latest":
            chosen = resolve_checkpoint(resume).resolve()
            if chosen not in [c.resolve() for c in candidates]:
                raise ConfigError(f"--resume {resume}: {chosen} is not a checkpoint of this run ({self.ckpt_dir})")
            candidates = candidates[[c.resolve() for c in candidates].index(chosen):]
        if candidates and not resume:
            raise ConfigError(
                f"{self.ckpt_dir} already holds checkpoints of a run (latest {candidates[0].name}); pass --resume "
                f"to continue that run, or set output.results_dir to a new folder"
            )

        seed_everything(tr.seed)
        self.dataset: Dataset = self._dataset(dataset)
        n = len(self.dataset)
        per_epoch = math.ceil(n / self.samples_per_step)
        self.total_steps = int(tr.total_steps if tr.total_steps is not None else tr.epochs * per_epoch)
        warning = ema_warning(tr.ema_decay, self.total_steps, tr.ema_warmup)
        if warning and self.rank == 0:
            warnings.warn(warning, stacklevel=2)

        self.stage3 = self.config.stage3
        if resume and not candidates:
            self._info(f"--resume: no checkpoint in {self.ckpt_dir} yet; starting from step 0")
        self.model: PRDiT | PRDiTSR = build_model(self.config, fresh=not candidates, from_scratch=from_scratch)
        self.model.to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        ema_by_name = dict(self.ema.named_parameters())
        self.ema_params = [ema_by_name[n] for n, p in self.model.named_parameters() if p.requires_grad]

        net: nn.Module = self.model
        backend = self.config.model.backend
        if self.config.model.grad_checkpoint:
            if backend == "fast":
                warnings.warn("model.grad_checkpoint applies to the reference backend only; ignored", stacklevel=2)
            else:
                self._info(f"activation checkpointing on {enable_activation_checkpointing(self.model)} blocks")
        if backend == "fast":
            from ..fast import accelerate  # here: the fast backend imports Triton, slow to start

            net = accelerate(self.model, dtype=torch.bfloat16 if tr.amp else torch.float32)
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, gradient_as_bucket_view=True,
            )
        self.net = net
        # the head decides the process, as in the official code (spec section 14); the IaN noise
        # scale follows the network's norm (TF-PRDiT: 1.0, spec section 15)
        self.diffusion = (
            FlowMatching() if self.model.config.process == "flow_matching"
            else IaNDiffusion(noise_std=default_noise_std(self.model.config.norm))  # SR: its base network's
        )
        # one fused kernel on CUDA; elsewhere the multi-tensor (foreach) path, not a loop
        impl = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        groups = sr_parameter_groups(self.model, tr.learning_rate, tr.fine_tune_lr) if self.stage3 else self.trainable
        self.optimizer = torch.optim.AdamW(groups, lr=tr.learning_rate, weight_decay=tr.weight_decay, **impl)
        self.noise = torch.Generator(device=self.device)
        self.noise.manual_seed(noise_seed(tr.seed, self.rank))  # differs per rank: independent noise and t
        self.step = 0
        self.best_val: tuple[float, int] | None = None  # (EMA validation loss, step) of the best evaluation
        self.read_ms: float | None = None  # one core's time per sample, measured when the loader starts
        self.workers = self.config.data.num_workers  # this rank's loader workers; raised when the step waits
        self.position = 0  # samples of the training stream consumed (all ranks)
        self.monitor = None  # prdit_fast.monitor.RunMonitor, opened by run()
        self.val_set = self._validation_set()
        self.last_checkpoint: Path | None = None
        if candidates:
            self._restore_latest_readable(candidates)
        self.model.train()
        self.evaluation = None  # rank 0 only: FID / MMD of EMA samples every metrics.every steps
        if self.config.metrics.weights and self.rank == 0:
            from ..metrics.during_training import TrainingEvaluation

            self.evaluation = TrainingEvaluation(self.config.metrics.to_dict(), self.dataset,
                                                 self.config.data.image_size, self.device, tr.seed)

        n_train = sum(p.numel() for p in self.trainable)
        n_all = sum(p.numel() for p in self.model.parameters())
        self._info(
            f"{self.model.config.name} at {self.config.data.image_size}^3 on {self.world} x {self.device.type}: "
            f"{n_train:,} trainable / {n_all:,} parameters; dataset {n} volumes; "
            f"global batch {self.global_batch} x {self.accum_steps} accumulation steps; "
            f"{self.model.config.process} loss; step {self.step} of {self.total_steps}"
        )

    # ------------------------------------------------------------------ setup
    def _info(self, message: str) -> None:
        if self.rank == 0:
            log.info(message)

    def _dataset(self, user: Dataset | None) -> Dataset:
        """The training set, named in the log's first lines (the phantom says why): a user
        dataset, the training cache of the named files (``data.cache``), the files read
        directly, or the phantom. Sets ``config.volume`` (what the volumes are)."""
        from ..data.dataset import build_dataset, data_files
        from ..orientation import CANONICAL_AXCODES

        data = self.config.data.to_dict()
        channels = self.config.model.in_channels
        if user is not None:
            from ..data.user_datasets import volume_items

            self.train_files = None
            self.config.volume = {"voxel_size_mm": None, "intensity": "unknown", "axes": "".join(CANONICAL_AXCODES),
                                  "source": f"user dataset ({type(user).__name__})"}
            self._info(f"data: a user dataset ({type(user).__name__}), {len(user)} volumes")
            return volume_items(user, data["image_size"], channels)
        self.train_files = data_files(data, "train")
        self.config.volume = self._volume_metadata()
        if self.train_files is not None and data["cache"]:
            from ..data.cache import cached_split

            dataset = cached_split(self.train_files, data, channels, self.config.volume["intensity"], "train")
        else:
            dataset = build_dataset(data, channels, self.config.training.seed)
        if self.train_files is None:
            why = "data.dataset: phantom" if data["dataset"] == "phantom" else "the config names no data"
            self._info(f"data: the synthetic phantom, {len(dataset)} volumes ({why})")
        else:
            named = data["train_list"] or data["path"]
            self._info(f"data: {len(dataset)} volumes from {named} (first {self.train_files[0]})")
        return dataset

    def _validation_set(self) -> Dataset | None:
        """The set ``logging.eval_every`` evaluates on, or None when evaluation is off."""
        if self.config.logging.eval_every is None:
            return None
        from ..data.dataset import VolumeDataset, build_dataset

        data = self.config.data.to_dict()
        val = build_dataset(data, self.config.model.in_channels, self.config.training.seed, split="val")
        if isinstance(val, VolumeDataset) and data["cache"]:
            from ..data.cache import cached_split

            val = cached_split(val.files, data, self.config.model.in_channels, self.config.volume["intensity"], "val")
        if val is None:
            log.warning("logging.eval_every is set but data.val_list is not: no validation during training")
        return val

    def _volume_metadata(self) -> dict:
        from ..data.recipes import volume_metadata

        meta = volume_metadata(self.train_files, self.config.data.to_dict())
        self._info(f"volumes: {meta['voxel_size_mm']} mm voxels, intensity {meta['intensity']} ({meta['source']})")
        return meta

    def _loader(self) -> Iterator[torch.Tensor]:
        """This rank's batches on the device from the current stream position: gathered on
        the device from the cached set (``data.on_device``), else a prefetching loader."""
        from ..data.cache import CachedVolumes
        from ..data.feed import DeviceBatches, PrefetchedBatches, data_on_device, read_seconds, upload

        sampler = StreamSampler(len(self.dataset), self.global_batch, self.rank, self.world,
                                self.config.training.seed, self.position, augment=self.config.data.augment)
        draws, (flip_dim, _) = sampler.draws(), flip_axis(self.config.volume)
        per_rank, choice = self.global_batch // self.world, self.config.data.on_device
        if isinstance(self.dataset, CachedVolumes):
            on_device, why = data_on_device(choice, self.dataset.nbytes, self.device)
        elif choice is True:
            raise ConfigError("data.on_device: true needs the training cache: volume files and data.cache: true")
        else:
            on_device, why = False, "no training cache (data.cache: false, the phantom or a user dataset)"
        if on_device:
            self._info(f"data: the cached set on {self.device} ({why}); batches gathered there")
            return DeviceBatches(upload(self.dataset.array, self.device), draws, per_rank, flip_dim)
        if self.read_ms is None:
            self.read_ms = 1e3 * read_seconds(self.dataset)
        self._info(f"data: loader with {self.workers} workers, {self.read_ms:.1f} ms per sample on one core, next "
                   f"batch prefetched to {self.device} ({why})")
        return PrefetchedBatches(self.dataset, draws, per_rank, self.device, self.workers, flip_dim)

    def _more_workers(self, wait: dict, samples_per_s: float) -> bool:
        """After a window that waited for data more than 5% of the time: raise this rank's
        loader workers to what the measured read time needs at the step's rate without the
        wait (at most the cores this rank has). True when the loader is to be restarted (at
        the current stream position, so the sample order is unchanged)."""
        from ..data.feed import cores_per_rank, workers_needed

        first_window = self.step <= self.config.logging.log_every  # it holds the first batch's latency
        if self.read_ms is None or first_window or wait["data_wait_pct"] <= 100 * WAIT_WARNING:
            return False
        unhindered = samples_per_s / max(1.0 - wait["data_wait_pct"] / 100, 0.05)
        wanted = min(cores_per_rank(), workers_needed(self.read_ms / 1e3, unhindered))
        if wanted <= self.workers:
            return False
        self._info(f"data: loader workers {self.workers} -> {wanted} ({self.read_ms:.1f} ms per sample per core, the "
                   f"step takes {unhindered:.1f} samples/s per rank without waiting)")
        self.workers = wanted
        return True

    def _restore_latest_readable(self, candidates: list[Path]) -> None:
        """Resume from the newest checkpoint that reads; an unreadable one (a truncated
        copy, a disk error) is skipped with a warning."""
        for path in candidates:
            try:
                ckpt = read_training_checkpoint(path, map_location=self.device)
            except CheckpointError as e:
                log.warning("cannot read %s (%s); trying the previous checkpoint", path, e)
                continue
            self._restore(path, ckpt)
            return
        raise RuntimeError(f"--resume: none of the {len(candidates)} checkpoints in {self.ckpt_dir} can be read")

    def _restore(self, path: Path, ckpt: TrainingState) -> None:
        mine, theirs = run_identity(self.config.to_dict()), run_identity(ckpt.config)
        if mine != theirs:
            raise ValueError(
                f"cannot resume from {path}: it trains {', '.join(map(str, theirs))}; "
                f"the config asks for {', '.join(map(str, mine))}; use another output.results_dir"
            )
        self.model.load_state_dict(ckpt.model)
        self.ema.load_state_dict(ckpt.ema)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self._apply_config_hyperparameters()
        self.step = ckpt.train_steps
        self.position = ckpt.data_position if ckpt.data_position is not None else self.step * self.samples_per_step
        states = ckpt.rng
        if len(states) == self.world:
            set_rng_state(states[self.rank], self.noise)
        else:
            warnings.warn(
                f"{path} was written by {len(states)} ranks, this run has {self.world}: the data order continues, "
                f"the noise streams are reseeded",
                stacklevel=2,
            )
            self.noise.manual_seed(noise_seed(self.config.training.seed, self.rank, self.step))
        self.last_checkpoint = path
        self._info(f"resumed from {path} at step {self.step}")

    def _apply_config_hyperparameters(self) -> None:
        """The config's learning rate and weight decay win over the checkpoint's optimizer
        state (a resumed run may lower them); a change is logged and the checkpoint
        config records the new values."""
        tr = self.config.training
        for key, name in (("lr", "learning_rate"), ("weight_decay", "weight_decay")):
            # stage 3b: the base's group (the second) has its own learning rate
            names = [name] + [("fine_tune_lr" if key == "lr" else name)] * (len(self.optimizer.param_groups) - 1)
            for group, wanted in zip(self.optimizer.param_groups, names):
                value = getattr(tr, wanted)
                if group[key] != value:
                    self._info(f"resume: training.{wanted} changed from {group[key]} (checkpoint) to {value} (config)")
                    group[key] = value

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write ``<step>.pt`` (rank 0), all ranks meeting at barriers around the write."""
        path = training_checkpoint_path(self.ckpt_dir, self.step)
        states = [rng_state(self.noise)]
        if self.distributed:
            states = [None] * self.world
            dist.all_gather_object(states, rng_state(self.noise))
            dist.barrier()
        if self.rank == 0:
            save_training_checkpoint(
                path, self.model, self.ema, self.optimizer.state_dict(), self.config.to_dict(),
                train_steps=self.step, epoch=self.position // len(self.dataset), data_position=self.position,
                world_size=self.world, rng=states,
            )
            link_latest(path)
            self._apply_retention()
        if self.distributed:
            dist.barrier()
        self.last_checkpoint = path
        return path

    def _keep_best(self) -> None:
        """Under retention, an evaluation that sets a new best EMA validation loss writes
        this step's checkpoint (if not written yet), which retention then keeps."""
        tr = self.config.training
        new_best = [self.best_val is not None and self.best_val[1] == self.step]  # decided on rank 0
        if self.distributed:
            dist.broadcast_object_list(new_best, src=0)
        retention = tr.keep_last is not None or tr.keep_every is not None
        if new_best[0] and retention and not training_checkpoint_path(self.ckpt_dir, self.step).is_file():
            self._info(f"checkpoint {self.save()} (best EMA validation loss so far)")

    def _apply_retention(self) -> None:
        """Delete the checkpoints ``training.keep_last`` / ``keep_every`` do not keep
        (``prdit_fast.training.retention``); the best EMA validation one stays."""
        tr = self.config.training
        best = [self.best_val[1]] if self.best_val is not None else []
        gone = checkpoints_to_remove(checkpoints_newest_first(self.ckpt_dir), tr.keep_last, tr.keep_every, best)
        remove_training_checkpoints(gone)

    def _write_run_config(self) -> None:
        import yaml

        if self.rank == 0:
            with atomic_path(self.run_dir / "config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))

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

        from ..monitor import sample_sheet, validation_loss

        lg = self.config.logging
        started = time.perf_counter()
        loss = validation_loss(self.ema, self.diffusion, self.val_set, self.device, self.global_batch // self.world)
        self._log_metrics({"step": self.step, "val_loss": loss, "time": time.time()})
        if self.best_val is None or loss < self.best_val[0]:
            self.best_val = (loss, self.step)
        message = f"step {self.step}: validation loss {loss:.5f} (EMA, {min(len(self.val_set), 64)} volumes)"
        if lg.eval_samples:
            sheet = sample_sheet(self.ema, self.diffusion, lg.eval_samples, lg.eval_sample_steps, self.device)
            with atomic_path(self.run_dir / "eval" / f"step_{self.step:07d}.png") as tmp:
                Image.fromarray(np.rint(sheet * 255).astype(np.uint8)).save(tmp, format="PNG")
            self.monitor.image(self.step, "ema_samples", sheet)
            message += f"; {lg.eval_samples} EMA samples in {self.run_dir / 'eval'}"
        self._info(f"{message} ({time.perf_counter() - started:.1f} s)")

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def update_ema(self) -> None:
        # ema <- decay * ema + (1 - decay) * model, all tensors in one foreach kernel
        tr = self.config.training
        decay = ema_decay_at(tr.ema_decay, self.step, tr.ema_warmup)
        torch._foreach_lerp_(self.ema_params, [p.detach() for p in self.trainable], 1.0 - decay)

    def _micro_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The mean training loss of one micro-batch x (b, C, S, S, S), under autocast when asked."""
        tr = self.config.training
        bf16_autocast = tr.amp and self.config.model.backend == "reference"
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16_autocast else nullcontext()
        with autocast:
            if self.stage3 and tr.lowfreq_weight > 0:
                losses = training_losses_with_consistency(
                    self.diffusion, self.net, x, self.noise, tr.lowfreq_weight, self.model.config.factor
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
        tr = self.config.training
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
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, tr.gradient_clip if tr.gradient_clip > 0 else math.inf)
        if not math.isfinite(norm.item()):
            return loss.detach(), False
        self.optimizer.step()
        self.update_ema()
        return loss.detach(), True

    def run(self) -> Path:
        tr = self.config.training
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            folders = (self.run_dir, self.ckpt_dir, self.run_dir / "eval")
            stale = [p for folder in folders for p in remove_stale_temps(folder)]
            if stale:
                self._info(f"removed {len(stale)} unfinished files a killed run left (e.g. {stale[0].name})")
            self._write_run_config()
        from ..monitor import RunMonitor

        # W&B fails here, not later; a run resumed from a checkpoint continues its W&B run
        self.monitor = RunMonitor(self.run_dir, self.config.to_dict(), enabled=self.rank == 0, resumed=self.step > 0)
        if self.step >= self.total_steps:
            self._info(f"already at step {self.step} of {self.total_steps}; nothing to train")
            return self.last_checkpoint or self.save()
        if self.config.data.augment:
            self._info(f"data.augment on: each training sample flipped with p = {FLIP_PROBABILITY} along "
                       f"{flip_axis(self.config.volume)[1]}, as the official loader; validation unflipped")
        batches = self._loader()
        self.data_wait = DataWait()
        window_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        window_steps, bad_steps = 0, 0
        t_window = time.perf_counter()
        while self.step < self.total_steps:
            micro_batches = [self.data_wait.timed(batches) for _ in range(self.accum_steps)]
            loss, applied = self.train_step(micro_batches)
            self.position += self.samples_per_step
            if not applied:
                bad_steps += 1
                warnings.warn(f"step {self.step + 1}: non-finite gradient norm; optimizer step skipped", stacklevel=2)
                if bad_steps >= tr.max_bad_steps:
                    raise RuntimeError(
                        f"{bad_steps} consecutive steps with non-finite gradients at step {self.step + 1}: training "
                        f"diverged; lower training.learning_rate or check the data"
                    )
                continue
            bad_steps = 0
            self.step += 1
            window_loss += loss
            window_steps += 1
            if self.step % self.config.logging.log_every == 0 or self.step == self.total_steps:
                wait, rate = self._log_window(window_loss, window_steps, time.perf_counter() - t_window)
                if self._more_workers(wait, rate):
                    batches.close()
                    batches = self._loader()
                window_loss.zero_()
                window_steps = 0
                t_window = time.perf_counter()
            if self.step % self.config.logging.ckpt_every == 0 or self.step == self.total_steps:
                path = self.save()
                self._info(f"checkpoint {path}")
            if self.evaluation is not None and self.step % self.evaluation.every == 0:
                record = self.evaluation(self.ema, self.step)
                self._log_metrics(record)
                self._info(f"step {self.step}: FID x10^3 {record['eval_fid_x1e3']:.3f}  MMD {record['eval_mmd']:.4f} "
                           f"({record['eval_samples']} EMA samples, {record['eval_seconds']:.0f} s)")
            if self.val_set is not None and self.step % self.config.logging.eval_every == 0:
                self._evaluate()
                self._keep_best()
        if hasattr(batches, "close"):
            batches.close()
        self.monitor.close()
        return self.last_checkpoint

    def _log_window(self, loss_sum: torch.Tensor, steps: int, seconds: float) -> tuple[dict, float]:
        """Log the window's mean loss, throughput and data wait (rank 0); returns (this
        rank's data wait record, its samples/s)."""
        mean = loss_sum / steps
        if self.distributed:
            dist.all_reduce(mean)
            mean /= self.world
        mean = float(mean.item())
        steps_per_s = steps / max(seconds, 1e-9)
        remaining = self.total_steps - self.step
        hours_left = remaining / steps_per_s / 3600
        unit = "GPU" if self.device.type == "cuda" else "CPU-process"
        wait = self.data_wait.window(steps, seconds)
        if self.rank == 0:
            record = {
                "step": self.step, "loss": mean, "samples_per_s": steps_per_s * self.samples_per_step,
                "steps_per_s": steps_per_s, **wait, "hours_to_finish": hours_left,
                "device_hours_to_finish": hours_left * self.world, "world_size": self.world, "time": time.time(),
            }
            self._log_metrics(record)
            log.info(
                "step %d/%d  loss %.5f  %.2f samples/s  data wait %.1f ms (%.1f%%)  %.1f %s-hours to finish "
                "(%.2f h on %d)", self.step, self.total_steps, mean, record["samples_per_s"], wait["data_wait_ms"],
                wait["data_wait_pct"], record["device_hours_to_finish"], unit, hours_left, self.world,
            )
            if wait["data_wait_pct"] > 100 * WAIT_WARNING:
                self._warn_data_wait(wait, record["samples_per_s"] / self.world)
        return wait, steps_per_s * self.samples_per_step / self.world

    def _warn_data_wait(self, wait: dict, samples_per_s: float) -> None:
        from ..data.feed import workers_needed

        advice = "the data is on the device already"
        if self.read_ms is not None:
            need = workers_needed(self.read_ms / 1e3, samples_per_s)
            advice = (f"reading takes {self.read_ms:.1f} ms per sample per core, so {samples_per_s:.1f} samples/s need "
                      f"about {need} loader workers ({self.workers} now, at most one per core); the "
                      f"training cache (data.cache) and data.on_device remove most of that work")
        log.warning("the step waits for data %.1f%% of the time (%.1f ms per step, above %.0f%%): %s",
                    wait["data_wait_pct"], wait["data_wait_ms"], 100 * WAIT_WARNING, advice)


def train(config: Mapping[str, Any] | TrainConfig, resume: bool | str = False, from_scratch: bool = False,
          dataset: Dataset | None = None) -> Path:
    """Train as ``config`` says (see ``config.TrainConfig`` and ``Trainer``; ``dataset``: a
    user dataset in place of the configured one); under ``torchrun`` (WORLD_SIZE > 1)
    every rank calls this and the process group is set up here. Returns the last checkpoint."""
    config = resolve_config(config)
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        on_gpu = torch.cuda.is_available() and config.training.device != "cpu"
        backend = "nccl" if on_gpu else "gloo"
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        created = True
    try:
        return Trainer(config, resume=resume, from_scratch=from_scratch, dataset=dataset).run()
    finally:
        if created:
            dist.destroy_process_group()
