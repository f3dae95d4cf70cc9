"""The synthetic chest phantom and the volume writers (NIfTI, PNG, atomic writes)."""
import multiprocessing
import os
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from prdit_fast.atomic import atomic_path, remove_stale_temps, temp_target
from prdit_fast.phantom import PhantomDataset, chest_phantom, hu_to_unit, unit_to_hu
from prdit_fast.volumes import WINDOWS, load_volume, mid_slices, save_nifti, save_slices_png


@pytest.fixture(scope="module")
def phantom64():
    return chest_phantom(64, 7)


# --------------------------------------------------------------------------- phantom
def test_phantom_has_air_lungs_soft_tissue_and_bone(phantom64):
    v = phantom64
    assert v.shape == (64, 64, 64) and v.dtype == np.float32
    assert v.min() >= -1000.0 and v.max() < 1500.0
    # outside the body: air, exactly -1000 HU in the corners of every axial slice
    assert np.all(v[:, 0, 0] == -1000.0) and np.all(v[:, -1, -1] == -1000.0)
    mid = v[32]  # axial slice through the chest
    left, right = mid[24:40, 8:32], mid[24:40, 32:56]  # the two halves of the thorax
    for lung_side in (left, right):
        assert np.mean((lung_side > -950) & (lung_side < -700)) > 0.2  # aerated lung, not outside air
    assert np.mean((v > -200) & (v < 120)) > 0.15  # fat, muscle, heart, liver
    bone = v > 300
    assert 0.002 < bone.mean() < 0.05
    # the spine is posterior and midline: bone in the posterior half near the middle column
    assert bone[:, 32:, 28:36].sum() > 0.5 * bone[:, :, 28:36].sum()


def test_phantom_is_deterministic_per_seed_and_varies_between_seeds():
    a, b, c = chest_phantom(32, 3), chest_phantom(32, 3), chest_phantom(32, 4)
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 20.0  # different anatomy, not just different noise
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    assert np.array_equal(chest_phantom(16, g1), chest_phantom(16, g2))


def test_phantom_is_fast():
    start = time.perf_counter()
    chest_phantom(64, 0)
    # ~0.07 s on an idle core; a generous bound so that a loaded CI machine passes
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize("size", [4, 7.5, "32"])
def test_phantom_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="phantom size must be an integer >= 8"):
        chest_phantom(size, 0)


def test_hu_unit_mapping_is_the_clipped_window():
    hu = np.array([-3000.0, -1000.0, -850.0, 0.0, 40.0, 700.0, 1000.0, 2500.0], dtype=np.float32)
    unit = hu_to_unit(hu)
    np.testing.assert_allclose(unit, [-1.0, -1.0, -0.85, 0.0, 0.04, 0.7, 1.0, 1.0], atol=1e-7)
    np.testing.assert_allclose(unit_to_hu(unit), np.clip(hu, -1000, 1000), atol=1e-4)
    t = torch.tensor([-1.5, -1.0, 0.25, 1.0, 2.0])
    assert torch.allclose(unit_to_hu(t), torch.tensor([-1000.0, -1000.0, 250.0, 1000.0, 1000.0]))


def test_phantom_dataset_items():
    ds = PhantomDataset(16, 5, seed=2)
    assert len(ds) == 5
    x = ds[3]
    assert x.shape == (1, 16, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() == -1.0
    assert torch.equal(ds[3], x) and not torch.equal(ds[2], x)
    assert torch.equal(ds[-1], ds[4])
    with pytest.raises(IndexError):
        ds[5]
    assert not torch.equal(PhantomDataset(16, 5, seed=3)[3], x)
    with pytest.raises(ValueError, match="length must be >= 1"):
        PhantomDataset(16, 0)


# --------------------------------------------------------------------------- NIfTI
def test_nifti_round_trip_with_1mm_spacing_and_orientation(tmp_path, phantom64):
    path = save_nifti(tmp_path / "v.nii.gz", phantom64)
    image = nib.load(str(path))
    assert image.header.get_zooms() == (1.0, 1.0, 1.0)
    assert image.get_data_dtype() == np.int16
    assert nib.aff2axcodes(image.affine) == ("L", "P", "I")
    assert image.shape == (64, 64, 64)
    np.testing.assert_array_equal(load_volume(path), np.rint(phantom64))
    # axis order on disk is (x, y, z) = (width, height, depth)
    np.testing.assert_array_equal(np.asarray(image.dataobj)[:, :, 5], np.rint(phantom64[5]).T)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii.gz"]


def test_nifti_float32_and_anisotropic_spacing(tmp_path):
    v = np.random.default_rng(0).normal(size=(8, 10, 12)).astype(np.float32)
    path = save_nifti(tmp_path / "f.nii", torch.from_numpy(v)[None, None], spacing=(2.0, 1.0, 0.5), dtype="float32")
    image = nib.load(str(path))
    assert image.header.get_zooms() == (0.5, 1.0, 2.0)  # (x, y, z) = (width, height, depth)
    np.testing.assert_array_equal(load_volume(path), v)


def test_load_volume_reorients_other_orientations(tmp_path):
    v = np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32)
    # the same volume stored RAS (every axis flipped relative to ours)
    ras = np.ascontiguousarray(v.transpose(2, 1, 0)[::-1, ::-1, ::-1])
    affine = np.eye(4)
    affine[:3, 3] = (-3.0, -3.5, -4.0)  # a real origin: the affine is geometry, not a placeholder
    nib.save(nib.Nifti1Image(ras, affine), str(tmp_path / "ras.nii.gz"))
    np.testing.assert_array_equal(load_volume(tmp_path / "ras.nii.gz"), v)
    # an identity affine is a placeholder: read as dicom2nifti's LAS (the official LIDC files)
    las = np.ascontiguousarray(v.transpose(2, 1, 0)[:, ::-1, ::-1])
    nib.save(nib.Nifti1Image(las, np.eye(4)), str(tmp_path / "processed.nii.gz"))
    np.testing.assert_array_equal(load_volume(tmp_path / "processed.nii.gz"), v)
    np.save(tmp_path / "v.npy", v)
    np.testing.assert_array_equal(load_volume(tmp_path / "v.npy"), v)


def test_volume_writers_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match="end in .nii or .nii.gz"):
        save_nifti(tmp_path / "v.nrrd", np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match=r"expected one volume of shape \(D, H, W\)"):
        save_nifti(tmp_path / "v.nii.gz", np.zeros((2, 1, 4, 4, 4)))
    with pytest.raises(ValueError, match="spacing must be three positive"):
        save_nifti(tmp_path / "v.nii.gz", np.zeros((4, 4, 4)), spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="unknown window 'soft'"):
        save_slices_png(tmp_path / "v.png", np.zeros((4, 4, 4)), windows=("soft",))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- PNG
def test_png_shows_the_three_mid_slices_in_two_windows(tmp_path, phantom64):
    path = save_slices_png(tmp_path / "v.png", phantom64)
    image = Image.open(path)
    assert image.mode == "L"
    scale = 3  # 64-voxel panels enlarged to >= 192 pixels
    gap = 3
    assert image.size == (3 * 64 * scale + 2 * gap, 2 * 64 * scale + gap)
    pixels = np.asarray(image)
    lo, hi = WINDOWS["lung"]
    axial = mid_slices(phantom64)[0]
    want = np.rint(np.clip((axial - lo) / (hi - lo), 0, 1) * 255)
    np.testing.assert_array_equal(pixels[: 64 * scale : scale, : 64 * scale : scale], want)
    assert pixels.min() == 0 and pixels.max() == 255


# --------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_nothing(tmp_path, error):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(error):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a file")
            raise error()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_the_old_file_only_when_complete(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new but broken")
            raise RuntimeError
    assert target.read_text() == "old"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and temp_target(tmp.name) == "a.txt"
        tmp.write_text("new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def _killed_mid_write(target):
    """A child process that dies (os._exit, as under SIGKILL) in the middle of an atomic write."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"\x93NUMPY half a file")
        os._exit(9)


@pytest.mark.parametrize("name, globs", [
    ("v01.npy", ["*.npy", "v*"]),
    ("0000100.pt", ["*.pt", "0*"]),
    ("sample_000003.nii.gz", ["sample_*.nii.gz", "*.nii.gz", "sample_*"]),
    ("sample_000003.png", ["*.png", "sample_*"]),
])
def test_killed_write_leaves_a_temp_no_reader_takes_and_the_next_run_removes(tmp_path, name, globs):
    child = multiprocessing.get_context("fork").Process(target=_killed_mid_write, args=(tmp_path / name,))
    child.start()
    child.join()
    assert child.exitcode == 9
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(f".{name}.tmp-")  # hidden, and no extension of its own
    for pattern in globs:
        assert not list(tmp_path.glob(pattern)), pattern
    # a temp being written right now (after the cleanup's cutoff) is left alone
    assert remove_stale_temps(tmp_path, before=leftover.stat().st_mtime - 1) == []
    assert remove_stale_temps(tmp_path, owned=lambda target: target != name) == []
    assert remove_stale_temps(tmp_path) == [leftover]
    assert list(tmp_path.iterdir()) == []
