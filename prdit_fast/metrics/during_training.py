"""FID / MMD every N training steps: the config's ``metrics`` section.

    metrics:
      weights: /models/resnet_50.pth   # MedicalNet weights; unset: no evaluation
      every: 5000                      # training steps between evaluations
      samples: 32                      # volumes sampled with the EMA model each time
      sample_steps: 100                # pc sampler (k = 2) steps per volume
      real_volumes: 256                # real volumes the statistics come from (the first of the set)
      batch_size: 4                    # sampling and feature batch
      cache_dir: null                  # real features (default ~/.cache/prdit_fast/real_features)

(defaults and ranges: ``prdit_fast.training.config.MetricsConfig``)

The real side is computed once and cached (keyed by the data files' contents, the edge
and the weights), so a resumed run does not recompute it. Every evaluation samples from
the same noise (seeded by ``training.seed``), so successive values differ by the model
only. With a few dozen volumes and 2048-d features FID is biased upward: compare it
across steps of one run, not with the paper's 1,000-volume numbers. FID is computed by
the QR-factor form (``fid_method="factors"``), and the official intensity-range check is
off here: early samples may span [-1, 1] while the data does not, which is a finding to
log, not a reason to stop training; both ranges are logged instead.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset

from .evaluate import FeatureEvaluator, default_cache_dir
from .volume_sets import files_key

def _real_key(dataset: Dataset, count: int, size: int) -> str:
    files = getattr(dataset, "files", None)
    if files is not None:
        root = Path(os.path.commonpath([str(Path(f).resolve().parent) for f in files[:count]]))
        return files_key([Path(f).resolve() for f in files[:count]], root, f"real-v1 pooled to {size}")
    # the phantom: a pure function of (edge, seed, index)
    return f"phantom size={size} seed={getattr(dataset, 'seed', None)} count={count}"


class TrainingEvaluation:
    """Callable ``(ema_model, step) -> record`` for the training log; see the module docstring."""

    def __init__(self, section: Mapping[str, Any], dataset: Dataset, image_size: int, device: torch.device, seed: int):
        self.every = int(section["every"])
        self.samples, self.sample_steps = int(section["samples"]), int(section["sample_steps"])
        self.batch_size = int(section["batch_size"])  # the config checks ranges (prdit_fast.training.config)
        count = min(int(section["real_volumes"]), len(dataset))
        if count < 2:
            raise ValueError(f"the training set has {len(dataset)} volume(s); FID and MMD need at least 2 real ones")
        self.device, self.size, self.seed = device, image_size, seed
        real = (torch.stack([dataset[i] for i in range(start, min(start + self.batch_size, count))])
                for start in range(0, count, self.batch_size))
        self.evaluator = FeatureEvaluator(
            real, section["weights"], self.batch_size, device, cache_dir=section["cache_dir"] or default_cache_dir(),
            real_key=_real_key(dataset, count, image_size), fid_method="factors",
        )

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        from ..diffusion import IaNDiffusion

        started = time.perf_counter()
        diffusion = IaNDiffusion()
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        was_training = model.training
        model.eval()
        volumes = []
        for start in range(0, self.samples, self.batch_size):
            shape = (min(self.batch_size, self.samples - start), 1) + (self.size,) * 3
            noise = diffusion.initial_noise(shape, generator=generator, device=self.device)
            _, x0 = diffusion.sample(model, noise, self.sample_steps, sampler="pc", k=2, generator=generator)
            volumes.append(x0.clamp(-1.0, 1.0).float())
        model.train(was_training)
        fake, _ = self.evaluator.scan_fake(volumes, check_ranges=False)
        record = {"step": step, **{f"eval_{k}": v for k, v in self.evaluator.distances(fake).items()}}
        record.update({
            "eval_samples": fake.count, "eval_real": self.evaluator.real.count,
            "eval_fake_min": fake.low, "eval_fake_max": fake.high,
            "eval_real_min": self.evaluator.real.low, "eval_real_max": self.evaluator.real.high,
            "eval_seconds": time.perf_counter() - started, "time": time.time(),
        })
        return record
