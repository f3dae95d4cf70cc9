"""The order in which training sees its data and draws its noise, and how both resume.

The training stream is the concatenation of per-epoch permutations of the dataset (epoch
e shuffled by ``(training.seed, e)``); micro-step m consumes stream positions
[m B, (m + 1) B), rank r the slice [m B + r B / W, m B + (r + 1) B / W). The position is
stored in every checkpoint, so a resumed run continues the stream exactly where it
stopped. The random state of each rank (torch CPU and CUDA, numpy, python ``random`` and
the diffusion noise generator) is stored too, so on one CPU process the resumed run is
bit-for-bit the uninterrupted one.

With ``data.augment`` each stream position also carries a flip bit (``FLIP_PROBABILITY``),
a function of ``(training.seed, e)`` and the position like the permutation, drawn from no
global random state: a resumed run and any number of ranks flip the same samples, and a
run without augmentation draws nothing for it.
"""
from __future__ import annotations

import random
from typing import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import Sampler


FLIP_PROBABILITY = 0.5  # data.augment: the official loaders flip a training sample when rand() > 0.5
_FLIP_STREAM = 0x666C6970  # a third seed word: the flip bits are a stream of their own beside the permutation


class StreamSampler(Sampler[int]):
    """This rank's indices of the endless training stream from ``position`` on (see the
    module docstring): per step, the global batch's slice [rank b, (rank + 1) b).
    ``draws`` gives each index with its flip bit (all False unless ``augment``)."""

    def __init__(self, length: int, global_batch: int, rank: int, world: int, seed: int, position: int,
                 augment: bool = False):
        self.length, self.global_batch, self.rank, self.world = length, global_batch, rank, world
        self.per_rank = global_batch // world
        self.seed, self.position, self.augment = seed, position, augment

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.length)

    def flips(self, epoch: int) -> np.ndarray:
        """(length,) bool: which positions of ``epoch``'s permutation are flipped."""
        if not self.augment:
            return np.zeros(self.length, dtype=bool)
        return np.random.default_rng([self.seed, epoch, _FLIP_STREAM]).random(self.length) < FLIP_PROBABILITY

    def draws(self) -> Iterator[tuple[int, bool]]:
        """(dataset index, flip) of this rank's stream positions, in order."""
        start = self.position
        epoch, perm, flips = -1, None, None
        while True:
            for j in range(self.per_rank):
                e, i = divmod(start + self.rank * self.per_rank + j, self.length)
                if e != epoch:
                    epoch, perm, flips = e, self.permutation(e), self.flips(e)
                yield int(perm[i]), bool(flips[i])
            start += self.global_batch

    def __iter__(self) -> Iterator[int]:
        return (index for index, _ in self.draws())


def seed_everything(seed: int) -> None:
    """The same initialization on every rank: torch, numpy and python ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def noise_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a rank's diffusion-noise generator (noise and t differ per rank); a
    resume onto another number of ranks reseeds it at ``step``."""
    return (seed * 1_000_003 + rank) ^ (step << 20)


def rng_state(generator: torch.Generator) -> dict:
    """This rank's random state, in types ``torch.load(weights_only=True)`` reads back."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,  # this rank's device
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
        "noise": generator.get_state(),
    }


def set_rng_state(state: Mapping, generator: torch.Generator) -> None:
    """Restore what ``rng_state`` recorded (the noise generator into ``generator``)."""
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available() and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu())
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(state["noise"].cpu())
