"""Run hygiene: which checkpoints a run keeps, and an EMA that suits the run's length.

Retention (``training.keep_last`` / ``training.keep_every``; both unset keeps every
checkpoint, as the official code does). After each checkpoint the run keeps

- the newest ``keep_last`` checkpoints,
- every checkpoint whose step is a multiple of ``keep_every``,
- the checkpoint with the best EMA validation loss so far when ``logging.eval_every`` is
  on (a checkpoint is written at an evaluation that sets a new best),

and deletes the other ``<step>.pt`` files of its own checkpoint folder (through
``prdit_fast.checkpoint``, which owns checkpoint files). ``latest`` always points
at the newest.

EMA. After T optimizer steps from initialization, the EMA still holds a fraction
``ema_decay ** T`` of the initial (untrained) weights. The official 0.9999 over a
150-step test leaves 98.5% of the initialization: sampling from that EMA samples an
untrained network. ``ema_warning`` says so when more than ``EMA_INIT_LIMIT`` would remain
at the end; ``training.ema_warmup`` uses ``min(ema_decay, (1 + t) / (10 + t))`` at step t
(the usual warm-up), which averages over the run's own steps from the start.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

EMA_INIT_LIMIT = 0.1  # warn when the final EMA keeps more than this share of the initial weights


def ema_decay_at(decay: float, step: int, warmup: bool) -> float:
    """The EMA decay used at optimizer step ``step`` (0-based)."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


def ema_warning(decay: float, total_steps: int, warmup: bool) -> str | None:
    """A warning when the EMA at the end of ``total_steps`` would still be mostly the
    initialization; None when it is fine or warm-up is on."""
    left = decay ** total_steps
    if warmup or left <= EMA_INIT_LIMIT:
        return None
    suggested = EMA_INIT_LIMIT ** (1.0 / total_steps) if total_steps > 0 else 0.0
    return (f"training.ema_decay {decay} over {total_steps} steps leaves {left:.1%} of the initial weights in the EMA "
            f"(decay^steps), which sampling uses: set training.ema_warmup: true, or ema_decay <= "
            f"{math.floor(suggested * 1e4) / 1e4} for this run length")


def steps_to_keep(steps: Iterable[int], keep_last: int | None, keep_every: int | None,
                  protected: Iterable[int] = ()) -> set[int]:
    """Which of ``steps`` (the run's checkpoints) retention keeps (see the module docstring)."""
    steps = sorted(set(steps), reverse=True)
    if keep_last is None and keep_every is None:
        return set(steps)
    keep = set(steps[: keep_last or 1]) | set(protected)
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep & set(steps)


def checkpoints_to_remove(paths: Iterable[Path], keep_last: int | None, keep_every: int | None,
                          protected: Iterable[int] = ()) -> list[Path]:
    """The ``<step>.pt`` files among ``paths`` that retention deletes."""
    by_step = {int(Path(p).stem): Path(p) for p in paths}
    keep = steps_to_keep(by_step, keep_last, keep_every, protected)
    return [p for s, p in sorted(by_step.items()) if s not in keep]
