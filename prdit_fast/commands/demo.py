"""``prdit-fast demo``: PRDiT end to end on a machine with no data, no weights, no GPU.

Trains a small PRDiT on the synthetic chest-CT phantom (``prdit_fast.phantom``) in the
paper's two stages, for a fixed wall-clock budget: stage 1 the local denoiser alone
(PRDiT-XS/10/0), stage 2 a one-block global DiT over the frozen stage-1 coarse path
(PRDiT-XS/10/1, initialized from the stage-1 EMA weights). Then samples volumes with
the hot predictor-corrector sampler (k = 2) and writes, into ``--out``:

* ``sample_NNN.nii.gz`` (HU, int16, 1 mm voxels) and ``sample_NNN.png`` (mid-slices);
* ``phantom_example.nii.gz`` / ``.png``: one training volume, for comparison;
* ``checkpoint.pt``: the stage-2 EMA weights (``prdit_fast.load_checkpoint`` reads it).

Every file is written atomically: Ctrl-C leaves complete files or none.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from prdit_fast.checkpoint import copy_matching_weights, save_checkpoint
from prdit_fast.diffusion import IaNDiffusion
from prdit_fast.models import PRDiT, count_parameters, create_model
from prdit_fast.phantom import PhantomDataset, unit_to_hu
from prdit_fast.volumes import save_nifti, save_slices_png

STAGE1 = "PRDiT-XS/10/0"
STAGE2 = "PRDiT-XS/10/1"
STAGE1_SHARE = 0.5  # fraction of the training budget spent on stage 1
EMA_DECAY = 0.995
WARMUP_STEPS = 10
LOG_SECONDS = 10.0
QUICK = {"size": 16, "pool": 4, "batch_size": 2, "train_steps": 2, "steps": 3, "num": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default ./demo_out)")
    parser.add_argument("--size", type=int, default=32, help="volume edge S, a multiple of 8 (default 32)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget, both stages (default 5)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="optimizer steps per stage instead of the time budget (reproducible runs)")
    parser.add_argument("--steps", type=int, default=100, help="sampler steps (model evaluations) per volume (default 100)")
    parser.add_argument("--num", type=int, default=4, help="volumes to sample (default 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch (default 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of stage 1; stage 2 uses 0.8x (default 1e-3)")
    parser.add_argument("--pool", type=int, default=192, help="phantom volumes generated for training (default 192)")
    parser.add_argument("--seed", type=int, default=0, help="seed of phantoms, training and sampling (default 0)")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long smoke run (S=16, 2 steps per stage, 3 sampler steps, 2 volumes)")


def _say(message: str) -> None:
    print(message, flush=True)


def _validate(args: argparse.Namespace) -> None:
    if args.size < 16 or args.size % 8:
        raise ValueError(f"--size must be a multiple of 8 and at least 16, got {args.size}")
    for name in ("steps", "num", "batch_size", "pool"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_steps is not None and args.train_steps < 1:
        raise ValueError(f"--train-steps must be >= 1, got {args.train_steps}")
    if not args.minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")


def train_stage(
    model: PRDiT,
    data: torch.Tensor,
    seconds: float,
    max_steps: int | None,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    label: str,
) -> PRDiT:
    """Train ``model`` on random batches of ``data`` (P, 1, S, S, S) with AdamW (gradient
    clip 1.0) until ``seconds`` pass or ``max_steps`` steps are done; returns the EMA copy.

    The EMA decay warms up as min(EMA_DECAY, (1 + n) / (10 + n)) so that a run of a few
    hundred steps is not dominated by the initialization."""
    diffusion = IaNDiffusion()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema_by_name = dict(ema.named_parameters())
    ema_trainable = [ema_by_name[n] for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: min(1.0, (n + 1) / WARMUP_STEPS))
    model.train()
    _say(f"{label}: {model.config.name}, {sum(p.numel() for p in trainable):,} trainable of "
         f"{count_parameters(model):,} parameters, batch {batch_size}")
    start = last_log = time.perf_counter()
    step, window_loss, window_steps = 0, 0.0, 0
    while True:
        elapsed = time.perf_counter() - start
        if (max_steps is not None and step >= max_steps) or (max_steps is None and elapsed >= seconds):
            break
        x = data[torch.randint(0, data.shape[0], (batch_size,), generator=generator)]
        loss = diffusion.training_losses(model, x, generator=generator)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_trainable, [p.detach() for p in trainable], 1.0 - decay)
        window_loss += loss.item()
        window_steps += 1
        now = time.perf_counter()
        if now - last_log >= LOG_SECONDS or step == max_steps:
            budget = f"step {step}/{max_steps}" if max_steps is not None else f"{now - start:.0f}/{seconds:.0f} s"
            _say(f"  {label} step {step:5d}  loss {window_loss / window_steps:.4f}  "
                 f"{window_steps / (now - last_log):.2f} steps/s  [{budget}]")
            last_log, window_loss, window_steps = now, 0.0, 0
    if window_steps:
        _say(f"  {label} step {step:5d}  loss {window_loss / window_steps:.4f}")
    model.eval()
    return ema


def _write_volume(out: Path, stem: str, volume_hu) -> list[Path]:
    return [save_nifti(out / f"{stem}.nii.gz", volume_hu), save_slices_png(out / f"{stem}.png", volume_hu)]


def demo(args: argparse.Namespace) -> list[Path]:
    """Run the demo as ``args`` say; returns the files written."""
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    _validate(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    total_start = time.perf_counter()
    budget = args.minutes * 60
    _say(f"prdit-fast demo: {STAGE1} then {STAGE2} on synthetic chest-CT phantoms at {args.size}^3, "
         f"CPU ({torch.get_num_threads()} threads), "
         + (f"{args.train_steps} steps per stage" if args.train_steps else f"{args.minutes:g} min of training")
         + f"; output in {out}/")

    t0 = time.perf_counter()
    phantoms = PhantomDataset(args.size, args.pool, seed=args.seed)
    data = torch.stack([phantoms[i] for i in range(len(phantoms))])  # (P, 1, S, S, S) in [-1, 1]
    _say(f"generated {args.pool} phantoms in {time.perf_counter() - t0:.1f} s")
    written += _write_volume(out, "phantom_example", unit_to_hu(data[0, 0]).numpy())

    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the weight initialization
    stage1 = create_model(STAGE1, args.size)
    seconds1 = budget * STAGE1_SHARE
    ema1 = train_stage(stage1, data, seconds1, args.train_steps, args.batch_size, args.lr, generator, "stage 1")

    stage2 = create_model(STAGE2, args.size)
    copied = copy_matching_weights(stage2, ema1.state_dict())
    _say(f"stage 2 starts from the stage-1 EMA: {len(copied)} tensors copied, coarse path frozen")
    del stage1, ema1
    seconds2 = max(0.0, budget - (time.perf_counter() - total_start))
    ema2 = train_stage(stage2, data, seconds2, args.train_steps, args.batch_size, 0.8 * args.lr, generator, "stage 2")

    ckpt = save_checkpoint(out / "checkpoint.pt", ema2, extra={"weights": "ema", "demo": {
        "size": args.size, "minutes": args.minutes, "train_steps": args.train_steps, "batch_size": args.batch_size,
        "lr": args.lr, "seed": args.seed, "stage1": STAGE1,
    }})
    written.append(ckpt)
    _say(f"checkpoint (EMA weights): {ckpt}")

    diffusion = IaNDiffusion()
    t0 = time.perf_counter()
    _say(f"sampling {args.num} volumes: pc sampler, k = 2, {args.steps} steps")
    for first in range(0, args.num, 4):
        count = min(4, args.num - first)
        noise = diffusion.initial_noise((count, 1) + (args.size,) * 3, generator=generator)
        _, x0 = diffusion.sample(ema2, noise, args.steps, sampler="pc", k=2, generator=generator)
        for i in range(count):
            written += _write_volume(out, f"sample_{first + i:03d}", unit_to_hu(x0[i, 0]).numpy())
    _say(f"sampled in {time.perf_counter() - t0:.1f} s; total {time.perf_counter() - total_start:.0f} s")
    return written


def run(args: argparse.Namespace) -> int:
    try:
        written = demo(args)
    except ValueError as e:
        print(f"prdit-fast demo: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: files already written are complete, nothing partial was left", file=sys.stderr)
        return 130
    _say("wrote:")
    for path in written:
        _say(f"  {path}")
    _say("open the .nii.gz files in any NIfTI viewer (3D Slicer, ITK-SNAP, FSLeyes); the .png files show mid-slices "
         "(top row lung window, bottom row mediastinal)")
    return 0
