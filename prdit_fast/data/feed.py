"""Feeding training batches to the device without making the step wait.

Two paths, one sample order: both take (index, flip) draws from the same stream (the
trainer's ``StreamSampler.draws``), ``per_rank`` at a time, and flip the drawn samples
(``data.augment``) on the device once the batch is there (``flip_samples``), so for the
same seed and position they give the same batches, bit for bit.

- ``DeviceBatches`` (``data.on_device``): the whole pooled set lives in device memory in
  its stored dtype (the training cache's float16), and a batch is one ``index_select``
  on the device, cast to float32: no DataLoader, no host copy per step.
- ``PrefetchedBatches`` otherwise: a ``DataLoader`` (pinned host memory when the device
  is CUDA) whose next batch a background thread takes from the workers and copies to
  the device with a non-blocking copy on a side stream while the current step runs.

``data.on_device: auto`` puts the data on the device when it is a CUDA device and the
pooled set needs at most ``ON_DEVICE_FRACTION`` (a quarter) of the device's free memory
measured when the data is placed, i.e. after the model and optimizer (1,000 LIDC volumes
at 128^3 in float16 are 4.2 GB; a quarter of an H100's ~75 GB free is ~19 GB). On the CPU
``auto`` keeps the loader; ``true`` there holds the set in RAM (what the tests compare).

``timed_batches`` measures the data wait: the time the loop spends blocked on its next
batch. The trainer synchronizes the device once per step (it reads the gradient norm),
so time blocked on data is time the device sits idle.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger("prdit_fast.data")

ON_DEVICE_FRACTION = 0.25  # the most of the free device memory data.on_device: auto gives the data
ON_DEVICE_CHOICES = ("auto", True, False)
WAIT_WARNING = 0.05  # warn when the step waits for data more than this fraction of the time
_UPLOAD_CHUNK_BYTES = 256 << 20


def data_on_device(choice, nbytes: int, device: torch.device) -> tuple[bool, str]:
    """Whether ``data.on_device`` = ``choice`` ('auto', true, false) puts a set of
    ``nbytes`` on ``device``, and why (for the log)."""
    if choice not in ON_DEVICE_CHOICES:
        raise ValueError(f"data.on_device must be auto, true or false, got {choice!r}")
    if choice is not True and choice is not False:
        if device.type != "cuda":
            return False, f"data.on_device: auto keeps the loader on {device.type}"
        free, _ = torch.cuda.mem_get_info(device)
        fits = nbytes <= ON_DEVICE_FRACTION * free
        verb = "fits in" if fits else "exceeds"
        return fits, (f"data.on_device: auto: the set ({nbytes / 1e9:.2f} GB) {verb} {ON_DEVICE_FRACTION:.0%} of the "
                      f"free device memory ({free / 1e9:.1f} GB)")
    return bool(choice), f"data.on_device: {str(choice).lower()}"


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A (memory-mapped) array as one tensor on ``device``, in its own dtype, copied in
    chunks so host memory never holds a second whole copy."""
    out = torch.empty(array.shape, dtype=torch.from_numpy(np.zeros(0, array.dtype)).dtype, device=device)
    per_item = max(1, array[0].nbytes if len(array) else 1)
    step = max(1, _UPLOAD_CHUNK_BYTES // per_item)
    for start in range(0, len(array), step):
        out[start:start + step].copy_(torch.from_numpy(np.array(array[start:start + step])))  # chunk: writable copy
    return out


Draw = tuple[int, bool]  # (dataset index, flip the sample): one position of the training stream


def flip_samples(batch: torch.Tensor, flipped: Sequence[bool], dim: int) -> torch.Tensor:
    """``batch`` (B, C, S, S, S) with the samples marked in ``flipped`` (B host booleans)
    reversed along ``dim``: in place by one gather and one scatter on the batch's device
    when some are marked, a new tensor when all are."""
    rows = [i for i, flip in enumerate(flipped) if flip]
    if not rows:
        return batch
    if len(rows) == len(batch):
        return batch.flip(dim)
    index = torch.tensor(rows, dtype=torch.long).to(batch.device, non_blocking=True)
    return batch.index_copy_(0, index, batch.index_select(0, index).flip(dim))


class DeviceBatches:
    """Batches of ``per_rank`` volumes gathered on the device from ``data`` (N, C, S, S, S)
    in the order of ``draws``, as float32, the flipped ones reversed along ``flip_dim``."""

    def __init__(self, data: torch.Tensor, draws: Iterable[Draw], per_rank: int, flip_dim: int = -1):
        self.data, self.draws, self.per_rank, self.flip_dim = data, iter(draws), per_rank, flip_dim

    def __iter__(self) -> "DeviceBatches":
        return self

    def __next__(self) -> torch.Tensor:
        drawn = [next(self.draws) for _ in range(self.per_rank)]
        chosen = torch.tensor([index for index, _ in drawn], dtype=torch.long)
        batch = self.data.index_select(0, chosen.to(self.data.device, non_blocking=True)).float()
        return flip_samples(batch, [flip for _, flip in drawn], self.flip_dim)


class _DrawnItems(Dataset):
    """``dataset`` read by draws: item (index, flip) -> (volume, flip), so the flip bits
    travel through the loader beside their batch."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, draw: Draw) -> tuple[torch.Tensor, bool]:
        index, flip = draw
        return self.dataset[index], flip


class PrefetchedBatches:
    """The batches of a DataLoader over ``dataset`` (in the order of ``draws``), each copied
    to ``device`` ahead of use by a background thread (``depth`` batches in flight): pinned
    memory and a side-stream non-blocking copy on CUDA; the flipped samples are reversed
    along ``flip_dim`` there. Worker errors are raised by ``next``."""

    def __init__(self, dataset: Dataset, draws: Iterable[Draw], per_rank: int, device: torch.device,
                 workers: int, flip_dim: int = -1, depth: int = 2):
        cuda = device.type == "cuda"
        # a private generator for the workers' base seed: the loader draws nothing from the global
        # RNG, so both paths leave the training's random state alike
        loader = DataLoader(_DrawnItems(dataset), batch_size=per_rank, sampler=draws, num_workers=workers,
                            pin_memory=cuda, persistent_workers=workers > 0, drop_last=False,
                            generator=torch.Generator().manual_seed(0))
        self.batches = iter(loader)  # here, not in the thread: worker start-up errors surface now
        self.device, self.flip_dim = device, flip_dim
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._fill, name="prdit-prefetch", daemon=True)
        self.thread.start()

    def _fill(self) -> None:
        try:
            for batch, flipped in self.batches:
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        batch = flip_samples(batch.to(self.device, non_blocking=True), flipped.tolist(), self.flip_dim)
                        event = torch.cuda.Event()
                        event.record(self.stream)
                else:
                    batch, event = flip_samples(batch.to(self.device), flipped.tolist(), self.flip_dim), None
                while not self.stop.is_set():
                    try:
                        self.ready.put((batch, event, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self.ready.put((None, None, e))

    def __iter__(self) -> "PrefetchedBatches":
        return self

    def __next__(self) -> torch.Tensor:
        batch, event, error = self.ready.get()
        if error is not None:
            raise error
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            batch.record_stream(stream)  # the side stream's allocation is used on this stream
        return batch

    def close(self) -> None:
        self.stop.set()


def cores_per_rank() -> int:
    """CPU cores this process may use, shared among the local ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def read_seconds(dataset: Dataset, samples: int = 2) -> float:
    """Seconds one core takes to produce one item of ``dataset`` (the mean of the first
    ``samples`` items, read in this process)."""
    count = min(samples, len(dataset))
    started = time.perf_counter()
    for i in range(count):
        dataset[i]
    return (time.perf_counter() - started) / max(count, 1)


def workers_needed(seconds_per_sample: float, samples_per_s: float, headroom: float = 1.25) -> int:
    """Loader workers that read ``samples_per_s`` when one takes ``seconds_per_sample``."""
    return max(1, math.ceil(seconds_per_sample * samples_per_s * headroom))


class DataWait:
    """Accumulates the time a loop spends blocked on its batches (``timed``) over a
    logging window."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, batches: Iterator[torch.Tensor]) -> torch.Tensor:
        started = time.perf_counter()
        batch = next(batches)
        self.seconds += time.perf_counter() - started
        return batch

    def window(self, steps: int, window_seconds: float) -> dict[str, float]:
        """``data_wait_ms`` (per step) and ``data_wait_pct`` (of the window), then reset."""
        record = {"data_wait_ms": 1e3 * self.seconds / max(steps, 1),
                  "data_wait_pct": 100.0 * self.seconds / max(window_seconds, 1e-9)}
        self.seconds = 0.0
        return record
