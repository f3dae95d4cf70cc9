"""``prdit-fast demo``: PRDiT end to end on a machine with no data, no weights, no GPU.

Trains a small PRDiT on the synthetic chest-CT phantom (``prdit_fast.phantom``) in the
paper's two stages, for a fixed number of optimizer steps (the same result on every
machine; only the time differs): stage 1 the local denoiser alone (PRDiT-XS/10/0), stage 2
a one-block global DiT over the frozen stage-1 coarse path (PRDiT-XS/10/1, initialized
from the stage-1 EMA weights). Then samples volumes with the hot predictor-corrector
sampler (k = 2), judges them against fresh phantoms (``prdit_fast.metrics.phantom_quality``:
token-seam ratio per axis, HU histogram distance, body and lung fractions) and writes,
into ``--out``:

* ``sample_NNN.nii.gz`` (HU, int16, 1 mm voxels) and ``sample_NNN.png`` (mid-slices);
* ``phantom_example.nii.gz`` / ``.png``: one training volume, for comparison;
* ``checkpoint.pt``: the stage-2 EMA weights (``prdit_fast.load_checkpoint`` reads it);
* ``quality.json``: the verdict, also printed.

The default step counts take about 10 minutes on 2 CPU cores (a whole run is recorded in
``benchmarks/results/cpu-shared-2core-2026-12-01/demo_steps.md``).

Every file is written atomically: Ctrl-C leaves complete files or none.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from prdit_fast.checkpoint import copy_matching_weights, save_checkpoint
from prdit_fast.atomic import write_json
from prdit_fast.diffusion import IaNDiffusion
from prdit_fast.errors import UsageError
from prdit_fast.models import PRDiT, count_parameters, create_model
from prdit_fast.phantom import PhantomDataset, unit_to_hu
from prdit_fast.volumes import save_nifti, save_slices_png

STAGE1 = "PRDiT-XS/10/0"
STAGE2 = "PRDiT-XS/10/1"
STAGE1_STEPS = 1200
STAGE2_STEPS = 2500
EMA_DECAY = 0.995
WARMUP_STEPS = 10
JUDGE_PHANTOMS = 16  # fresh phantoms (other seeds than the training pool) the samples are judged against
QUICK = {"size": 16, "pool": 4, "batch_size": 2, "stage1_steps": 2, "stage2_steps": 2, "steps": 3, "num": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default ./demo_out)")
    parser.add_argument("--size", type=int, default=32, help="volume edge S, a multiple of 8 (default 32)")
    parser.add_argument("--stage1-steps", type=int, default=STAGE1_STEPS,
                        help=f"optimizer steps of stage 1 (default {STAGE1_STEPS})")
    parser.add_argument("--stage2-steps", type=int, default=STAGE2_STEPS,
                        help=f"optimizer steps of stage 2 (default {STAGE2_STEPS})")
    parser.add_argument("--steps", type=int, default=100, help="sampler steps (model evaluations) per volume (default 100)")
    parser.add_argument("--num", type=int, default=4, help="volumes to sample (default 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch (default 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of stage 1; stage 2 uses 0.8x (default 1e-3)")
    parser.add_argument("--pool", type=int, default=192, help="phantom volumes generated for training (default 192)")
    parser.add_argument("--seed", type=int, default=0, help="seed of phantoms, training and sampling (default 0)")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long smoke run (S=16, 2 steps per stage, 3 sampler steps, 2 volumes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _say(message: str) -> None:
    print(message, flush=True)


def _validate(args: argparse.Namespace) -> None:
    if args.size < 16 or args.size % 8:
        raise UsageError(f"--size must be a multiple of 8 and at least 16, got {args.size}")
    for name in ("steps", "num", "batch_size", "pool", "stage1_steps", "stage2_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")


def train_stage(
    model: PRDiT,
    data: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    label: str,
    progress: bool = True,
) -> PRDiT:
    """Train ``model`` for ``steps`` AdamW steps (gradient clip 1.0) on random batches of
    ``data`` (P, 1, S, S, S); returns the EMA copy.

    The EMA decay warms up as min(EMA_DECAY, (1 + n) / (10 + n)) so that a run of a few
    hundred steps is not dominated by the initialization."""
    from tqdm.auto import tqdm

    diffusion = IaNDiffusion()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema_by_name = dict(ema.named_parameters())
    ema_trainable = [ema_by_name[n] for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: min(1.0, (n + 1) / WARMUP_STEPS))
    model.train()
    _say(f"{label}: {model.config.name}, {sum(p.numel() for p in trainable):,} trainable of "
         f"{count_parameters(model):,} parameters, batch {batch_size}, {steps} steps")
    bar = tqdm(total=steps, desc=label, unit="step", disable=not progress, dynamic_ncols=True)
    started, loss_sum, logged = time.perf_counter(), 0.0, 0
    for step in range(1, steps + 1):
        x = data[torch.randint(0, data.shape[0], (batch_size,), generator=generator)]
        loss = diffusion.training_losses(model, x, generator=generator)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_trainable, [p.detach() for p in trainable], 1.0 - decay)
        loss_sum += loss.item()
        bar.update(1)
        if step % 50 == 0 or step == steps:  # the mean loss since the last update
            bar.set_postfix(loss=f"{loss_sum / (step - logged):.4f}")
            loss_sum, logged = 0.0, step
    bar.close()
    seconds = time.perf_counter() - started
    _say(f"  {label}: {steps} steps in {seconds:.0f} s ({steps / seconds:.1f} steps/s)")
    model.eval()
    return ema


def _write_volume(out: Path, stem: str, volume_hu) -> list[Path]:
    return [save_nifti(out / f"{stem}.nii.gz", volume_hu), save_slices_png(out / f"{stem}.png", volume_hu)]


def demo(args: argparse.Namespace) -> list[Path]:
    """Run the demo as ``args`` say; returns the files written."""
    from prdit_fast.metrics.phantom_quality import format_quality, phantom_quality

    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    _validate(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    total_start = time.perf_counter()
    progress = not args.no_progress
    _say(f"prdit-fast demo: {STAGE1} then {STAGE2} on synthetic chest-CT phantoms at {args.size}^3, "
         f"CPU ({torch.get_num_threads()} threads), {args.stage1_steps} + {args.stage2_steps} training steps; "
         f"output in {out}/")

    t0 = time.perf_counter()
    phantoms = PhantomDataset(args.size, args.pool, seed=args.seed)
    data = torch.stack([phantoms[i] for i in range(len(phantoms))])  # (P, 1, S, S, S) in [-1, 1]
    _say(f"generated {args.pool} phantoms in {time.perf_counter() - t0:.1f} s")
    written += _write_volume(out, "phantom_example", unit_to_hu(data[0, 0]).numpy())

    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the weight initialization
    stage1 = create_model(STAGE1, args.size)
    ema1 = train_stage(stage1, data, args.stage1_steps, args.batch_size, args.lr, generator, "stage 1", progress)

    stage2 = create_model(STAGE2, args.size)
    copied = copy_matching_weights(stage2, ema1.state_dict())
    _say(f"stage 2 starts from the stage-1 EMA: {len(copied)} tensors copied, coarse path frozen")
    del stage1, ema1
    ema2 = train_stage(stage2, data, args.stage2_steps, args.batch_size, 0.8 * args.lr, generator, "stage 2", progress)

    ckpt = save_checkpoint(out / "checkpoint.pt", ema2, extra={"weights": "ema", "demo": {
        "size": args.size, "stage1_steps": args.stage1_steps, "stage2_steps": args.stage2_steps,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "stage1": STAGE1,
    }})
    written.append(ckpt)
    _say(f"checkpoint (EMA weights): {ckpt}")

    diffusion = IaNDiffusion()
    t0 = time.perf_counter()
    _say(f"sampling {args.num} volumes: pc sampler, k = 2, {args.steps} steps")
    samples_hu = []
    for first in range(0, args.num, 4):
        count = min(4, args.num - first)
        noise = diffusion.initial_noise((count, 1) + (args.size,) * 3, generator=generator)
        _, x0 = diffusion.sample(ema2, noise, args.steps, sampler="pc", k=2, generator=generator, progress=progress)
        for i in range(count):
            samples_hu.append(unit_to_hu(x0[i, 0]).numpy())
            written += _write_volume(out, f"sample_{first + i:03d}", samples_hu[-1])
    _say(f"sampled in {time.perf_counter() - t0:.1f} s")

    # judged against phantoms the model never saw: seeds after the training pool's
    fresh = PhantomDataset(args.size, args.pool + JUDGE_PHANTOMS, seed=args.seed)
    reference_hu = np.stack([unit_to_hu(fresh[i][0]).numpy() for i in range(args.pool, len(fresh))])
    quality = phantom_quality(np.stack(samples_hu), reference_hu, period=ema2.config.stride)
    quality.update({"stage1_steps": args.stage1_steps, "stage2_steps": args.stage2_steps, "sampler_steps": args.steps,
                    "size": args.size, "seed": args.seed})
    write_json(out / "quality.json", quality)
    written.append(out / "quality.json")
    _say(format_quality(quality))
    _say(f"total {time.perf_counter() - total_start:.0f} s")
    return written


def run(args: argparse.Namespace) -> int:
    written = demo(args)  # bad options raise UsageError; prdit_fast.cli reports it and Ctrl-C
    _say("wrote:")
    for path in written:
        _say(f"  {path}")
    _say("open the .nii.gz files in any NIfTI viewer (3D Slicer, ITK-SNAP, FSLeyes); the .png files show mid-slices "
         "(top row lung window, bottom row mediastinal)")
    return 0
