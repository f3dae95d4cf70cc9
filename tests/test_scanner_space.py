"""Preprocessing that can be undone, and DICOM series as scanners export them: series of
extension-less files one folder down (``dicom/0051/IM0000``), gantry-tilted series
(resampled, not sheared), and preprocess -> train -> sample -> back to HU and scanner
space on a tiny LPS series with an anisotropic voxel and a nonzero origin."""
from __future__ import annotations

import json

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
pytest.importorskip("scipy")

from test_data import INTERCEPT, write_dicom_series  # noqa: E402  (the suite's pydicom series writer)

from prdit_fast.cli import main  # noqa: E402
from prdit_fast.data.preprocess import read_sidecar, to_scanner  # noqa: E402
from prdit_fast.data.readers import VolumeReadError, find_volumes, read_volume_affine  # noqa: E402

ORIGIN_LPS = np.array([-40.0, 25.0, 100.0])  # ImagePositionPatient of the first slice
PIXEL, GAP = 0.7, 2.5
ROWS = COLS = 24
SLICES = 12


def _world_ras(affine, index) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.asarray(index, dtype=np.float64))


def _ball_series(root) -> tuple[np.ndarray, np.ndarray]:
    """A smooth ball (+400 HU on -1000 HU air) off the centre of a 12 x 24 x 24 series,
    written as extension-less files ``root/dicom/0051/IM0000``...; returns (stored
    pixel values (slice, row, column), the ball centre in RAS mm)."""
    k, r, c = np.meshgrid(np.arange(SLICES), np.arange(ROWS), np.arange(COLS), indexing="ij")
    centre = np.array([5.0, 10.0, 14.0])  # slice, row, column
    dist = np.sqrt(((k - centre[0]) * GAP) ** 2 + ((r - centre[1]) * PIXEL) ** 2 + ((c - centre[2]) * PIXEL) ** 2)
    hu = -1000.0 + 1400.0 / (1.0 + np.exp((dist - 4.0) / 0.8))
    stored = np.rint(hu - INTERCEPT).astype(np.uint16)
    positions = [ORIGIN_LPS + [0.0, 0.0, GAP * z] for z in range(SLICES)]
    write_dicom_series(root / "dicom" / "0051", stored, positions=positions, pixel_mm=PIXEL,
                       names=[f"IM{z:04d}" for z in range(SLICES)])
    centre_lps = ORIGIN_LPS + [centre[2] * PIXEL, centre[1] * PIXEL, centre[0] * GAP]
    return stored, centre_lps * [-1, -1, 1]


def _centroid_ras(array: np.ndarray, affine: np.ndarray, threshold: float) -> np.ndarray:
    index = np.argwhere(array > threshold).mean(axis=0)
    return _world_ras(affine, index)


def test_dicom_without_extensions_is_found_one_folder_down(tmp_path):
    _ball_series(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("not an image")  # extension-less, but no DICM mark
    assert find_volumes([tmp_path]) == [tmp_path / "dicom" / "0051"]
    volume, affine = read_volume_affine(tmp_path / "dicom" / "0051")
    assert volume.shape == (SLICES, ROWS, COLS)
    np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), [GAP, PIXEL, PIXEL], rtol=1e-6)


def test_gantry_tilt_is_resampled_not_sheared(tmp_path, caplog):
    """Slice k is shifted by k pixels along the rows (a 15.6 degree tilt at 2.5 mm slices
    of 0.7 mm pixels): a line straight along the patient axis is stored diagonally; read
    back, it is one voxel column and lies where the positions put it."""
    n = 8
    stored = np.zeros((n, 16, 16), np.uint16)
    for z in range(n):
        stored[z, 8 - z, 5] = 3000  # world-vertical line: slice z's row 8 - z sits at a fixed y
    positions = [ORIGIN_LPS + [0.0, z * PIXEL, z * GAP] for z in range(n)]
    write_dicom_series(tmp_path / "tilt", stored, positions=positions, pixel_mm=PIXEL,
                       names=[f"s{z}.dcm" for z in range(n)])
    with caplog.at_level("WARNING", logger="prdit_fast.data"):
        volume, affine = read_volume_affine(tmp_path / "tilt")
    assert "gantry tilt of 15.6" in caplog.text
    assert volume.shape == (n, 16 + n - 1, 16)
    bright = np.argwhere(volume > 1000)
    assert len(bright) == n and len({tuple(b[1:]) for b in bright}) == 1  # one (h, w) column
    expected = (ORIGIN_LPS + [5 * PIXEL, 8 * PIXEL, 0.0]) * [-1, -1, 1]  # row 8 of slice 0, in RAS
    for b in bright:
        np.testing.assert_allclose(_world_ras(affine, b)[:2], expected[:2], atol=1e-4)

    bent = [ORIGIN_LPS + [0.0, (z * z) * 0.3, z * GAP] for z in range(n)]  # positions off a line
    write_dicom_series(tmp_path / "bent", stored, positions=bent, pixel_mm=PIXEL)
    with pytest.raises(VolumeReadError, match="straight line"):
        read_volume_affine(tmp_path / "bent")
    write_dicom_series(tmp_path / "skew", stored, orientation=(1, 0, 0, 0.2, 0.98, 0), pixel_mm=PIXEL)
    with pytest.raises(VolumeReadError, match="not two orthogonal unit vectors"):
        read_volume_affine(tmp_path / "skew")


def test_preprocess_sample_back_to_hu_and_scanner_space(tmp_path):
    _, ball_ras = _ball_series(tmp_path / "scan")
    source, source_affine = read_volume_affine(tmp_path / "scan" / "dicom" / "0051")
    pre = tmp_path / "pre"
    assert main(["preprocess", str(tmp_path / "scan"), "--out", str(pre), "--dataset", "lidc", "--size", "32",
                 "--dtype", "float32", "--no-progress"]) == 0
    (npy,) = pre.glob("*.npy")
    sidecar = read_sidecar(npy)
    record = json.loads((pre / "manifest.json").read_text())["volumes"][0]
    assert all(record[k] == sidecar[k] for k in ("affine", "crop_offset", "hu_min", "hu_max", "source_affine"))
    np.testing.assert_allclose(sidecar["source_affine"], source_affine, atol=1e-6)
    assert sidecar["hu_min"] == -1000.0 and 200.0 < sidecar["hu_max"] <= 400.0

    # the preprocessed volume itself: HU again, and where the scanner put the ball
    back = to_scanner(np.load(npy), sidecar)
    assert back.units == "HU" and back.shape == (32, 32, 32)
    np.testing.assert_allclose(back.spacing, sidecar["spacing_mm"])
    assert back.array.min() == pytest.approx(-1000.0) and back.array.max() == pytest.approx(sidecar["hu_max"])
    np.testing.assert_allclose(_centroid_ras(back.array, back.affine, -300), ball_ras, atol=0.5)
    # ... and resampled onto the source's own grid: the source's voxels within a few HU
    on_source = to_scanner(np.load(npy), npy, grid="source")
    assert on_source.shape == source.shape
    np.testing.assert_allclose(on_source.affine, source_affine)
    inside = source < sidecar["hu_max"]  # the 99.9th-percentile clip changes the very top only
    assert np.abs(on_source.array - source)[inside].mean() < 5.0  # 2 HU here; 45 HU flipped in depth

    # a model trained on it, sampled at half the preprocessing edge, lands in the same field of view
    run = tmp_path / "run"
    import yaml

    config = {
        "data": {"image_size": 16, "num_workers": 0, "path": str(pre)},
        "model": {"name": "PRDiT-XS/10/0"},
        "training": {"batch_size": 1, "learning_rate": 1e-3, "total_steps": 1, "log_every": 1, "ckpt_every": 1,
                     "seed": 0, "ema_decay": 0.9, "device": "cpu"},
        "output": {"results_dir": str(run)},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "train.yaml")]) == 0
    (ckpt,) = (run / "checkpoints").glob("*.pt")
    samples = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(ckpt), "--num", "1", "--steps", "2", "--out", str(samples),
                 "--format", "npy", "--device", "cpu"]) == 0
    sample = to_scanner(np.load(samples / "sample_000000.npy"), npy)
    assert sample.shape == (16, 16, 16) and sample.units == "HU"
    np.testing.assert_allclose(sample.spacing, 2 * np.asarray(sidecar["spacing_mm"]), rtol=1e-6)
    assert sidecar["hu_min"] <= sample.array.min() <= sample.array.max() <= sidecar["hu_max"]
    centre_of = lambda v: _world_ras(v.affine, (np.asarray(v.shape) - 1) / 2)  # noqa: E731
    np.testing.assert_allclose(centre_of(sample), centre_of(back), atol=1e-6)
    written = nib.load(str(sample.save(tmp_path / "sample_hu.nii.gz")))
    assert nib.aff2axcodes(written.affine) == ("L", "P", "I")
    assert written.header["descrip"].tobytes().startswith(b"HU")
    np.testing.assert_allclose(_world_ras(written.affine, (np.asarray(written.shape) - 1) / 2), centre_of(back),
                               atol=1e-4)
    assert written.get_data_dtype() == np.int16

    # the command does the same with --like: HU and the scan's geometry in the NIfTI header
    assert main(["sample", "--ckpt", str(ckpt), "--num", "1", "--steps", "2", "--out", str(tmp_path / "like"),
                 "--device", "cpu", "--like", str(npy), "--no-png"]) == 0
    like = nib.load(str(tmp_path / "like" / "sample_000000.nii.gz"))
    np.testing.assert_allclose(like.affine, written.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(like.dataobj), np.asarray(written.dataobj))
    summary = json.loads((tmp_path / "like" / "summary.json").read_text())["runs"][0]
    assert summary["units"] == "HU" and summary["hu_range"] == [sidecar["hu_min"], sidecar["hu_max"]]
    assert main(["sample", "--ckpt", str(ckpt), "--num", "1", "--out", str(tmp_path / "bad"), "--like",
                 str(tmp_path / "scan")]) == 2  # not a preprocessed volume
