"""Readers, preprocessing and the training dataset on tiny synthetic volumes."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
pytest.importorskip("scipy")

from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from prdit_fast.cli import main  # noqa: E402
from prdit_fast.data import (  # noqa: E402
    VolumeDataset,
    VolumeReadError,
    average_pool,
    center_crop_or_pad,
    preprocess_lidc,
    read_volume,
    resample_isotropic,
)

ROWS = COLS = 24
NSLICES = 20
PIXEL_MM = 0.7
GAP_MM = 1.5
INTERCEPT = -1024.0


def _stored_slices(seed: int = 0) -> np.ndarray:
    """(NSLICES, ROWS, COLS) uint16 stored values; each slice distinct so order is checkable."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2000, size=(NSLICES, ROWS, COLS))
    base[:, :4, :] = 24  # a band of air (-1000 HU)
    return (base + 50 * np.arange(NSLICES)[:, None, None]).astype(np.uint16)


def write_dicom_series(folder, pixels: np.ndarray, series_uid: str | None = None, z_positions=None,
                       names=None, positions=None, orientation=(1, 0, 0, 0, 1, 0), pixel_mm: float = PIXEL_MM) -> list:
    """One file per slice, named in shuffled order so reading must sort by position.
    ``positions``: ImagePositionPatient per slice (default (-8, -8, z))."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    z_positions = list(GAP_MM * np.arange(len(pixels))) if z_positions is None else z_positions
    positions = [[-8.0, -8.0, float(z)] for z in z_positions] if positions is None else positions
    order = list(range(len(pixels)))
    random.Random(1).shuffle(order)
    paths = []
    for k in range(len(pixels)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = names[k] if names else f"img{order[k]:03d}.dcm"
        ds = FileDataset(str(folder / name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = [float(v) for v in positions[k]]
        ds.PixelSpacing = [pixel_mm, pixel_mm]
        ds.SliceThickness = GAP_MM
        ds.RescaleSlope = 1
        ds.RescaleIntercept = INTERCEPT
        ds.Rows, ds.Columns = pixels.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = pixels[k].tobytes()
        ds.save_as(folder / name, enforce_file_format=True)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom") / "patient1" / "series1"
    write_dicom_series(folder, _stored_slices())
    (folder / "annotations.xml").write_text("<xml/>")  # LIDC keeps XML next to the images
    return folder


def test_dicom_series_sorted_rescaled_and_spaced(dicom_dir):
    vol, spacing = read_volume(dicom_dir)
    expected = _stored_slices().astype(np.float32) + INTERCEPT
    # prdit_fast.orientation: slices superior->inferior (the series ascends in z, so reversed),
    # rows A->P and columns R->L as stored
    np.testing.assert_array_equal(vol, expected[::-1])
    assert vol.dtype == np.float32
    np.testing.assert_allclose(spacing, [GAP_MM, PIXEL_MM, PIXEL_MM], rtol=1e-6)


def test_dicom_errors(tmp_path):
    pixels = _stored_slices()[:6]
    mixed = tmp_path / "mixed"
    write_dicom_series(mixed, pixels[:3], names=["a0.dcm", "a1.dcm", "a2.dcm"])
    write_dicom_series(mixed, pixels[3:], z_positions=[10.0, 11.5, 13.0], names=["b0.dcm", "b1.dcm", "b2.dcm"])
    with pytest.raises(VolumeReadError, match="mixed series"):
        read_volume(mixed)

    dup = tmp_path / "dup"
    write_dicom_series(dup, pixels[:4], z_positions=[0.0, 1.5, 1.5, 3.0])
    with pytest.raises(VolumeReadError, match="duplicate slice position"):
        read_volume(dup)

    gap = tmp_path / "gap"
    write_dicom_series(gap, pixels[:5], z_positions=[0.0, 1.5, 3.0, 6.0, 7.5])  # slice at 4.5 missing
    with pytest.raises(VolumeReadError, match="uneven slice spacing"):
        read_volume(gap)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images")
    with pytest.raises(VolumeReadError, match="no DICOM images"):
        read_volume(empty)


def test_nifti_orientation_and_spacing(tmp_path):
    data = np.arange(20 * 18 * 10, dtype=np.float32).reshape(20, 18, 10) - 1000
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), path)
    vol, spacing = read_volume(path)
    # RAS+ voxel (i, j, k) -> (d, h, w) = (k toward I, j toward P, i toward L)
    np.testing.assert_array_equal(vol, data.transpose(2, 1, 0)[::-1, ::-1, ::-1])
    np.testing.assert_allclose(spacing, [2.0, 0.8, 0.8])

    # the same voxels stored LPS-flipped (as DICOM converters often write) read back identically
    flipped = nib.Nifti1Image(data[::-1, ::-1].copy(), np.diag([-0.8, -0.8, 2.0, 1.0]) @ _shift(19, 17))
    nib.save(flipped, tmp_path / "flipped.nii")
    vol2, _ = read_volume(tmp_path / "flipped.nii")
    np.testing.assert_array_equal(vol2, vol)


def _shift(i: int, j: int) -> np.ndarray:
    m = np.eye(4)
    m[0, 3], m[1, 3] = -i, -j
    return m


def test_lidc_recipe_on_dicom(dicom_dir):
    vol, spacing = read_volume(dicom_dir)
    iso = resample_isotropic(vol, spacing)
    assert iso.shape == (round(NSLICES * GAP_MM), round(ROWS * PIXEL_MM), round(COLS * PIXEL_MM))  # (30, 17, 17)
    out = preprocess_lidc(vol, spacing, size=32)
    assert out.shape == (32, 32, 32) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    # padding is air (-1000 HU), the minimum after clipping below -1000, so it maps to 0
    assert np.all(out[:, :7, :] == 0.0) and np.all(out[:, :, -7:] == 0.0)
    # the 99.9th percentile clip: at most 0.1% (+ ties) of voxels reach the top value
    assert (out == 1.0).mean() <= 0.002


def test_center_crop_or_pad():
    v = np.arange(5 * 8 * 3, dtype=np.float32).reshape(5, 8, 3)
    out = center_crop_or_pad(v, 4, fill=-7)
    assert out.shape == (4, 4, 4)
    # depth 5 -> crop [0, 4) (the odd voxel goes at the end), height 8 -> crop [2, 6),
    # width 3 -> pad 0 before and 1 after
    np.testing.assert_array_equal(out[:, :, :3], v[0:4, 2:6, :])
    np.testing.assert_array_equal(out[:, :, 3], -7)


def _snapshot(folder):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_preprocess_cli_resume_and_failures(tmp_path, dicom_dir, capsys):
    src = tmp_path / "src"
    src.mkdir()
    data = np.random.default_rng(0).uniform(-1100, 1500, size=(20, 20, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), src / "a.nii.gz")
    (src / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    before = _snapshot(src) | _snapshot(dicom_dir)
    out = tmp_path / "out"

    rc = main(["preprocess", str(src / "a.nii.gz"), str(src / "broken.nii.gz"), str(dicom_dir),
               "--out", str(out), "--dataset", "lidc", "--size", "16", "--workers", "2", "--no-progress"])
    assert rc == 1  # one volume failed
    err = capsys.readouterr().err
    assert "FAILED" in err and "broken.nii.gz" in err
    manifest = json.loads((out / "manifest.json").read_text())
    by_status = {v["status"]: v for v in manifest["volumes"]}
    assert sorted(v["status"] for v in manifest["volumes"]) == ["failed", "ok", "ok"]
    assert "broken" in by_status["failed"]["source"]
    nifti = next(v for v in manifest["volumes"] if v["source"].endswith("a.nii.gz"))
    assert nifti["original_spacing"] == [2.0, 0.8, 0.8] and nifti["original_shape"] == [12, 20, 20]
    arr = np.load(out / nifti["output"])
    assert arr.shape == (16, 16, 16) and arr.dtype == np.float16
    assert arr.min() == 0 and arr.max() == 1
    assert _snapshot(src) | _snapshot(dicom_dir) == before  # inputs untouched

    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    assert len(done) == 2
    rc = main(["preprocess", str(src), str(dicom_dir), "--out", str(out), "--dataset", "lidc", "--size", "16",
               "--workers", "1", "--no-progress"])
    assert rc == 1  # the broken file is retried and still fails
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")} == done  # skipped, not rewritten
    statuses = sorted(v["status"] for v in json.loads((out / "manifest.json").read_text())["volumes"])
    assert statuses == ["exists", "exists", "failed"]

    rc = main(["preprocess", str(src / "a.nii.gz"), "--out", str(out), "--dataset", "rad", "--size", "16",
               "--no-progress"])
    assert rc == 2 and "another --out" in capsys.readouterr().err


def test_rad_npz(tmp_path):
    ct = np.random.default_rng(1).uniform(-2000, 3000, size=(10, 12, 14)).astype(np.int16)
    np.savez_compressed(tmp_path / "trn00001.npz", ct=ct)
    vol, spacing = read_volume(tmp_path / "trn00001.npz")
    np.testing.assert_array_equal(vol, ct.astype(np.float32))
    np.testing.assert_array_equal(spacing, [1.0, 1.0, 1.0])
    rc = main(["preprocess", str(tmp_path / "trn00001.npz"), "--out", str(tmp_path / "out"), "--dataset", "rad",
               "--size", "8", "--dtype", "float32", "--workers", "1", "--no-progress"])
    assert rc == 0
    arr = np.load(tmp_path / "out" / "trn00001.npy")
    expected = (np.clip(ct, -1000, 1000)[1:9, 2:10, 3:11].astype(np.float32) + 1000) / 2000
    np.testing.assert_allclose(arr, expected, atol=1e-7)

    np.savez(tmp_path / "two.npz", a=ct, b=ct)
    with pytest.raises(VolumeReadError, match="'ct'"):
        read_volume(tmp_path / "two.npz")


def test_volume_dataset_pools_maps_and_checks(tmp_path):
    rng = np.random.default_rng(2)
    vols = [rng.uniform(0, 1, size=(16, 16, 16)).astype(np.float16) for _ in range(3)]
    for i, v in enumerate(vols):
        np.save(tmp_path / f"v{i}.npy", v)
    ds = VolumeDataset(tmp_path, image_size=8)
    assert len(ds) == 3
    item = ds[1]
    assert item.shape == (1, 8, 8, 8) and item.dtype == torch.float32
    pooled = vols[1].astype(np.float32).reshape(8, 2, 8, 2, 8, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(item[0].numpy(), pooled * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(average_pool(vols[0], 16), vols[0].astype(np.float32))

    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    batch = next(iter(loader))
    assert batch.shape == (3, 1, 8, 8, 8)
    assert torch.equal(batch[1], item)

    with pytest.raises(ValueError, match="must divide"):
        VolumeDataset(tmp_path, image_size=5)[0]
    bad = vols[0].astype(np.float32)
    bad[3, 3, 3] = np.nan
    np.save(tmp_path / "v9.npy", bad)
    with pytest.raises(ValueError, match=r"v9\.npy.*NaN"):
        VolumeDataset(tmp_path, image_size=8)[3]
    os.remove(tmp_path / "v9.npy")
    np.save(tmp_path / "raw.npy", (vols[0].astype(np.float32) * 2000 - 1000))
    with pytest.raises(ValueError, match="raw.npy.*expected \\[0, 1\\]"):
        VolumeDataset(tmp_path, image_size=8)[0]  # sorted first
