"""Feeding batches (prdit_fast.data.feed): the on-device path (run here with device=cpu)
gives exactly the loader path's batches for the same seed and position, the cached
batches equal the direct read within the float16 bound in the same order, and the data
wait is measured."""
from __future__ import annotations

import time

import pytest
import torch

from prdit_fast.data.cache import FLOAT16_ERROR, cached_split
from prdit_fast.data.dataset import VolumeDataset
from prdit_fast.data.feed import DataWait, DeviceBatches, PrefetchedBatches, data_on_device, upload, workers_needed
from prdit_fast.training import StreamSampler

from test_official_layouts import lidc_root

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("feed")
    files = lidc_root(folder, cases=5)
    return files, cached_split(files, {"image_size": 16, "cache_dir": folder / "c"}, 1, "lidc")


@pytest.mark.parametrize("world, position, workers", [(1, 0, 0), (2, 6, 1)])
def test_on_device_batches_equal_the_loader_path(volumes, world, position, workers):
    files, cached = volumes
    on_device = upload(cached.array, CPU)
    assert on_device.dtype == torch.float16 and on_device.shape == (5, 1, 16, 16, 16)
    for rank in range(world):
        sampler = lambda: StreamSampler(len(cached), 4, rank, world, seed=3, position=position)  # noqa: E731
        device = DeviceBatches(on_device, sampler(), 4 // world)
        loader = PrefetchedBatches(cached, sampler(), 4 // world, CPU, workers=workers)
        direct = PrefetchedBatches(VolumeDataset(files, 16), sampler(), 4 // world, CPU, workers=0)
        for _ in range(4):  # 16 samples: crosses three epochs of 5
            a, b, c = next(device), next(loader), next(direct)
            assert a.dtype == b.dtype == torch.float32 and a.shape == (4 // world, 1, 16, 16, 16)
            assert torch.equal(a, b)
            assert 0 < float((a - c).abs().max()) <= FLOAT16_ERROR
        loader.close()
        direct.close()


def test_loader_errors_reach_the_step(tmp_path):
    broken = tmp_path / "broken.npy"
    broken.write_bytes(b"not an array")
    batches = PrefetchedBatches(VolumeDataset([broken], 16), iter([0]), 1, CPU, workers=0)
    with pytest.raises(ValueError):
        next(batches)


def test_on_device_choice():
    assert data_on_device("auto", 10, CPU)[0] is False  # the CPU keeps the loader unless told
    assert data_on_device(True, 10, CPU) == (True, "data.on_device: true")
    with pytest.raises(ValueError, match="data.on_device must be auto, true or false"):
        data_on_device("yes", 10, CPU)


def test_data_wait_is_measured():
    def slow():
        while True:
            time.sleep(0.02)
            yield torch.zeros(1)

    wait, batches = DataWait(), slow()
    started = time.perf_counter()
    for _ in range(3):
        wait.timed(batches)
        time.sleep(0.02)  # the "step"
    record = wait.window(3, time.perf_counter() - started)
    assert record["data_wait_ms"] >= 20 and 30 <= record["data_wait_pct"] <= 70, record
    assert wait.window(1, 1.0)["data_wait_ms"] == 0  # reset per window
    assert workers_needed(0.4, 121) == 61 and workers_needed(0.001, 10) == 1
