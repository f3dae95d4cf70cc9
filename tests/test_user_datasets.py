"""Bring-your-own pipelines (prdit_fast.data.user_datasets): the documented MONAI recipe
gives the built-in pipeline's items (axis order, pooling, intensity range) on a NIfTI
with real geometry and on the official identity-affine LIDC layout; bad items are named."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prdit_fast.data.dataset import VolumeDataset
from prdit_fast.data.user_datasets import monai_dataset, volume_items

nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")


def _unit(rng, shape=(32, 32, 32)) -> np.ndarray:
    v = rng.uniform(0, 1, shape).astype(np.float32)
    v[:4, :6, :8] = 1.0  # an asymmetric block: any flip or transpose moves it
    return v


def test_monai_recipe_equals_the_built_in_pipeline(tmp_path):
    rng = np.random.default_rng(0)
    # a real scanner-like geometry: axes permuted and flipped, 1 mm voxels
    oriented = tmp_path / "oriented.nii.gz"
    affine = np.array([[0, 0, -1.0, 10], [1.0, 0, 0, -5], [0, -1.0, 0, 3], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(_unit(rng), affine), str(oriented))
    ours = VolumeDataset([oriented], 16)[0]
    theirs = volume_items(monai_dataset([oriented], 16), 16, 1)[0]
    assert theirs.dtype == torch.float32 and theirs.shape == (1, 16, 16, 16)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # the official LIDC layout: identity affine, data stored in LAS
    lidc = tmp_path / "LIDC-IDRI-0001" / "processed.nii.gz"
    lidc.parent.mkdir()
    nib.save(nib.Nifti1Image(_unit(rng), np.eye(4)), str(lidc))
    ours = VolumeDataset([lidc], 16)[0]
    torch.testing.assert_close(volume_items(monai_dataset([lidc], 16, identity_affine_is_las=True), 16, 1)[0],
                               ours, atol=1e-5, rtol=0)
    plain = volume_items(monai_dataset([lidc], 16), 16, 1)[0]  # without the flip: mirrored left-right
    assert not torch.allclose(plain, ours, atol=1e-3)
    torch.testing.assert_close(plain.flip(-1), ours, atol=1e-5, rtol=0)


def test_user_items_are_checked():
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8, 8\), training needs \(1, 16, 16, 16\)"):
        volume_items([torch.zeros(1, 8, 8, 8)], 16, 1)
    with pytest.raises(ValueError, match=r"spans \[0, 255\]; training needs \[-1, 1\]"):
        volume_items([{"image": torch.full((1, 16, 16, 16), 255.0).index_fill_(1, torch.tensor([0]), 0)}], 16, 1)
    with pytest.raises(ValueError, match="without the key 'image'"):
        volume_items([{"ct": torch.zeros(1, 16, 16, 16)}], 16, 1)
    items = volume_items([{"image": np.zeros((1, 16, 16, 16))}], 16, 1)
    assert items[0].dtype == torch.float32
