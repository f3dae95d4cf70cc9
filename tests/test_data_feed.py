"""Feeding batches (prdit_fast.data.feed): the on-device path (run here with device=cpu)
gives exactly the loader path's batches for the same seed and position, with and without
data.augment's flips, the cached batches equal the direct read within the float16 bound in
the same order, a flipped sample is torch.flip of the unflipped one along the axis the
official loader flips, and the data wait is measured."""
from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
import torch

from prdit_fast.data.cache import FLOAT16_ERROR, cached_split
from prdit_fast.data.dataset import VolumeDataset, read_unit_volume
from prdit_fast.data.feed import (
    DataWait,
    DeviceBatches,
    PrefetchedBatches,
    data_on_device,
    flip_samples,
    upload,
    workers_needed,
)
from prdit_fast.data.recipes import flip_axis, volume_metadata
from prdit_fast.training import StreamSampler

from test_official_layouts import lidc_root, rad_root

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("feed")
    files = lidc_root(folder, cases=5)
    return files, cached_split(files, {"image_size": 16, "cache_dir": folder / "c"}, 1, "lidc")


@pytest.mark.parametrize("world, position, workers, augment", [(1, 0, 0, False), (2, 6, 1, False),
                                                                (1, 0, 0, True), (2, 6, 1, True)])
def test_on_device_batches_equal_the_loader_path(volumes, world, position, workers, augment):
    files, cached = volumes
    on_device = upload(cached.array, CPU)
    assert on_device.dtype == torch.float16 and on_device.shape == (5, 1, 16, 16, 16)
    flip_dim = flip_axis(volume_metadata(files, {"image_size": 16}))[0]
    flipped = 0
    for rank in range(world):
        sampler = lambda a=augment: StreamSampler(len(cached), 4, rank, world, 3, position, augment=a)  # noqa: E731
        device = DeviceBatches(on_device, sampler().draws(), 4 // world, flip_dim)
        loader = PrefetchedBatches(cached, sampler().draws(), 4 // world, CPU, workers, flip_dim)
        direct = PrefetchedBatches(VolumeDataset(files, 16), sampler().draws(), 4 // world, CPU, 0, flip_dim)
        plain = DeviceBatches(on_device, sampler(False).draws(), 4 // world, flip_dim)  # the same samples, unflipped
        draws = sampler().draws()
        for _ in range(4):  # 16 samples: crosses three epochs of 5
            a, b, c, unflipped = next(device), next(loader), next(direct), next(plain)
            assert a.dtype == b.dtype == torch.float32 and a.shape == (4 // world, 1, 16, 16, 16)
            assert torch.equal(a, b)
            assert 0 < float((a - c).abs().max()) <= FLOAT16_ERROR
            for sample, original in zip(a, unflipped):
                flip = next(draws)[1]
                assert torch.equal(sample, torch.flip(original, [flip_dim]) if flip else original)
                assert not torch.equal(sample, torch.flip(original, [flip_dim]) if not flip else original)
                flipped += flip
        loader.close()
        direct.close()
    assert (0 < flipped < 16) if augment else flipped == 0  # 16 samples over all ranks


def test_flips_follow_the_official_loaders_axis(tmp_path):
    # both official loaders flip the stored array's last axis: read in our axis order, that is
    # d (superior-inferior) for LIDC's LAS processed.nii.gz and w for RAD-ChestCT's .npz
    lidc, rad = lidc_root(tmp_path, cases=1)[0], rad_root(tmp_path, cases=1)[0]
    stored = np.asarray(nib.load(str(lidc)).dataobj)
    nib.save(nib.Nifti1Image(np.flip(stored, -1).copy(), np.eye(4)), str(tmp_path / "lidc_flipped.nii.gz"))
    array = np.load(rad)["volume"]
    np.savez_compressed(tmp_path / "rad_flipped.npz", volume=np.flip(array, -1))
    for source, flipped, (dim, name) in (
        (lidc, tmp_path / "lidc_flipped.nii.gz", (-3, "d (superior-inferior)")),
        (rad, tmp_path / "rad_flipped.npz", (-1, "w (patient right-left)")),
    ):
        assert flip_axis(volume_metadata([source], {"image_size": 16})) == (dim, name)
        ours = torch.from_numpy(np.ascontiguousarray(read_unit_volume(source)))
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(read_unit_volume(flipped))), torch.flip(ours, [dim]))
    assert flip_axis(None) == flip_axis({"intensity": "unknown"}) == (-1, "w (patient right-left)")  # user datasets


def test_flip_samples_flips_only_the_marked_ones():
    batch = torch.arange(3 * 8, dtype=torch.float32).reshape(3, 1, 2, 2, 2)
    for marks in ([False, False, False], [True, False, True], [True, True, True]):
        out = flip_samples(batch.clone(), marks, -1)
        for sample, original, mark in zip(out, batch, marks):
            assert torch.equal(sample, original.flip(-1) if mark else original)


def test_loader_errors_reach_the_step(tmp_path):
    broken = tmp_path / "broken.npy"
    broken.write_bytes(b"not an array")
    batches = PrefetchedBatches(VolumeDataset([broken], 16), iter([(0, False)]), 1, CPU, workers=0)
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
