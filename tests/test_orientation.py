"""One axis convention end to end: a DICOM series and a NIfTI file with a non-trivial
affine go read -> preprocess -> dataset -> write and come out with the same world
orientation (nibabel axis codes of the written file, correlation of the anatomy in RAS)."""
from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
ndimage = pytest.importorskip("scipy.ndimage")

from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from prdit_fast.data import VolumeDataset, preprocess_volumes  # noqa: E402
from prdit_fast.orientation import CANONICAL_AXCODES, NIFTI_AXCODES  # noqa: E402
from prdit_fast.volumes import save_nifti  # noqa: E402

EDGE = 16  # preprocessed edge (1 mm)
IMAGE_SIZE = 8  # what the model sees: 2 mm voxels


def anatomy(shape, seed=0) -> np.ndarray:
    """A smooth random HU field with no symmetry: any flip or axis swap decorrelates it."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    field = (field - field.mean()) / field.std()
    return (field * 150 - 200).astype(np.float32)  # within [-1024, ...): stored as uint16 + 1024


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def write_series(folder, hu: np.ndarray) -> None:
    """hu[k, r, c]: slice k at z = k mm (ascending, toward the head), standard axial
    ImageOrientationPatient, 1 mm pixels; files named in reverse order of position."""
    folder.mkdir(parents=True)
    uid = generate_uid()
    stored = np.rint(hu + 1024).astype(np.uint16)
    for k in range(hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{hu.shape[0] - k:03d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = uid, "CT"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # columns toward L, rows toward P
        ds.ImagePositionPatient = [-100.0, -120.0, 40.0 + k]
        ds.PixelSpacing = [1.0, 1.0]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.PixelData = stored[k].tobytes()
        ds.save_as(path, enforce_file_format=True)


def through_the_pipeline(source, tmp_path) -> nib.Nifti1Image:
    """preprocess (LIDC recipe, 16^3) -> dataset (pooled to 8^3) -> the sample writer."""
    prep = tmp_path / "prep"
    manifest = preprocess_volumes([source], prep, "lidc", size=EDGE, dtype="float32", progress=False)
    assert [v["status"] for v in manifest["volumes"]] == ["ok"], manifest
    item = VolumeDataset(prep, IMAGE_SIZE)[0]
    out = tmp_path / "sample.nii.gz"
    save_nifti(out, item[0].numpy(), spacing=(2.0, 2.0, 2.0), dtype="float32")
    return nib.load(str(out))


def check_same_world(written: nib.Nifti1Image, expected_ras: np.ndarray) -> None:
    assert nib.aff2axcodes(written.affine) == NIFTI_AXCODES
    assert written.header.get_zooms()[:3] == (2.0, 2.0, 2.0)
    got = np.asarray(nib.as_closest_canonical(written).dataobj, dtype=np.float32)
    assert got.shape == expected_ras.shape
    r = correlation(got, expected_ras)
    assert r > 0.97, r
    for axis in range(3):  # the check has teeth: any one mirrored axis fails it
        assert correlation(np.flip(got, axis), expected_ras) < 0.6, axis


def test_dicom_series_round_trip(tmp_path):
    hu = anatomy((EDGE,) * 3)  # [slice, row, column]
    write_series(tmp_path / "series", hu)
    # RAS+ (as_closest_canonical): i toward R = columns reversed, j toward A = rows reversed,
    # k toward S = slices in the series' ascending z order
    expected = hu.transpose(2, 1, 0)[::-1, ::-1, :]
    expected = expected.reshape(8, 2, 8, 2, 8, 2).mean(axis=(1, 3, 5))
    check_same_world(through_the_pipeline(tmp_path / "series", tmp_path), expected)


def test_nifti_with_a_permuted_flipped_anisotropic_affine_round_trip(tmp_path):
    data = anatomy((EDGE, EDGE // 2, EDGE), seed=1)
    affine = np.array([  # i -> toward P, j -> toward S at 2 mm, k -> toward L; an arbitrary origin
        [0.0, 0.0, -1.0, 30.0],
        [-1.0, 0.0, 0.0, 12.0],
        [0.0, 2.0, 0.0, -50.0],
        [0.0, 0.0, 0.0, 1.0],
    ])
    source = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(source))
    assert nib.aff2axcodes(affine) == ("P", "S", "L")
    canon = nib.as_closest_canonical(nib.load(str(source)))  # RAS+, zooms (1, 1, 2)
    expected = ndimage.zoom(np.asarray(canon.dataobj, dtype=np.float32), (0.5, 0.5, 1.0), order=1)
    check_same_world(through_the_pipeline(source, tmp_path), expected)


def test_canonical_axcodes_are_the_written_axes_reversed():
    # v[d, h, w] is written as NIfTI (x, y, z) = (w, h, d)
    assert tuple(reversed(CANONICAL_AXCODES)) == NIFTI_AXCODES
