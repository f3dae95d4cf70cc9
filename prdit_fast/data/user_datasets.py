"""Bring your own data pipeline (MONAI or any ``torch.utils.data.Dataset``).

``prdit_fast.train(config, dataset=...)`` trains on a user dataset in place of the
built-in one. An item must be what the built-in ``VolumeDataset`` gives: a float tensor
(C, S, S, S) with S = ``data.image_size``, values in [-1, 1], in prdit_fast's axis order
(``prdit_fast.orientation``: ``v[d, h, w]`` toward inferior, posterior, patient left,
i.e. MONAI ``Orientation(axcodes="IPL")``). A dict item (MONAI's dictionary transforms)
is read under the key ``"image"``. ``volume_items`` checks the first item and says what
is wrong.

``data.augment`` applies to a user dataset as to the built-in data: its items go through
the same batch path (``prdit_fast.data.feed``), which flips each drawn sample with p = 0.5
along w (patient right-left, the last axis; the recipe of a user dataset is unknown, see
``prdit_fast.data.recipes.flip_axis``). Leave random flips out of the dataset's own
transforms when it is on, or the flips compound; a random transform inside the dataset
is outside the training stream that a resume reproduces.

The MONAI recipe that reproduces the built-in pipeline for files already in [0, 1]
(``monai_transforms``; the test compares both)::

    LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys),
    Orientationd(keys, axcodes="IPL"),                       # our axis order
    Resized(keys, spatial_size=(S, S, S), mode="area"),      # = average pooling when S divides the edge
    ScaleIntensityRanged(keys, a_min=0, a_max=1, b_min=-1, b_max=1),   # [0, 1] -> [-1, 1]
    EnsureTyped(keys, dtype=torch.float32, track_meta=False)

One exception: the official LIDC-IDRI ``processed.nii.gz`` files carry an identity affine
although dicom2nifti stored them in LAS (see ``prdit_fast.orientation``); MONAI reads
an identity affine as RAS, so for those files ``identity_affine_is_las=True`` adds
``Flipd(keys, spatial_axis=2)`` after the orientation (patient right <-> left). For raw
HU data, put the intensity recipe first (e.g. ``ScaleIntensityRanged(a_min=-1000,
a_max=1000, b_min=-1, b_max=1, clip=True)`` for RAD's window in place of the [0, 1] map).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from ..orientation import CANONICAL_AXCODES

IMAGE_KEY = "image"
_RANGE_SLACK = 1e-2
_NIBABEL_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # axis codes as nibabel (and our orientation) read them


def monai_transforms(image_size: int, keys: Sequence[str] = (IMAGE_KEY,), identity_affine_is_las: bool = False):
    """The MONAI ``Compose`` of the module docstring's recipe."""
    from monai import transforms as mt

    keys = list(keys)
    steps = [mt.LoadImaged(keys, image_only=True), mt.EnsureChannelFirstd(keys),
             mt.Orientationd(keys, axcodes="".join(CANONICAL_AXCODES), labels=_NIBABEL_LABELS)]
    if identity_affine_is_las:
        steps.append(mt.Flipd(keys, spatial_axis=2))
    steps += [mt.Resized(keys, spatial_size=(image_size,) * 3, mode="area"),
              mt.ScaleIntensityRanged(keys, a_min=0.0, a_max=1.0, b_min=-1.0, b_max=1.0),
              mt.EnsureTyped(keys, dtype=torch.float32, track_meta=False)]
    return mt.Compose(steps)


def monai_dataset(files: Sequence[Any], image_size: int, identity_affine_is_las: bool = False,
                  cache: bool = False) -> Dataset:
    """A MONAI dataset over ``files`` with the recipe (``cache``: MONAI's ``CacheDataset``,
    which keeps every transformed volume in memory)."""
    from monai.data import CacheDataset
    from monai.data import Dataset as MonaiDataset

    data = [{IMAGE_KEY: str(f)} for f in files]
    transform = monai_transforms(image_size, identity_affine_is_las=identity_affine_is_las)
    return CacheDataset(data, transform, progress=False) if cache else MonaiDataset(data, transform)


class VolumeItems(Dataset):
    """A user dataset seen as the trainer sees its data: item i -> float32 tensor (C, S, S, S)."""

    def __init__(self, dataset: Dataset, key: str = IMAGE_KEY):
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            item = item[self.key]
        return torch.as_tensor(item).float()


def volume_items(dataset: Dataset, image_size: int, in_channels: int) -> VolumeItems:
    """``dataset`` wrapped for training, after checking its first item: a (C, S, S, S)
    tensor (or a dict holding one under "image") in [-1, 1]; ValueError saying what differs."""
    items = VolumeItems(dataset)
    if len(items) == 0:
        raise ValueError("the dataset given to train() is empty")
    raw = dataset[0]
    if isinstance(raw, Mapping) and IMAGE_KEY not in raw:
        raise ValueError(f"the dataset's items are dicts without the key {IMAGE_KEY!r} (keys: {sorted(raw)})")
    first = items[0]
    want = (in_channels,) + (image_size,) * 3
    if tuple(first.shape) != want:
        raise ValueError(f"the dataset's items have shape {tuple(first.shape)}, training needs {want} "
                         f"(model.in_channels, data.image_size^3); see prdit_fast.data.user_datasets")
    lo, hi = float(first.min()), float(first.max())
    if lo < -1 - _RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise ValueError(f"the dataset's first item spans [{lo:.4g}, {hi:.4g}]; training needs [-1, 1] "
                         f"(e.g. ScaleIntensityRanged(a_min=0, a_max=1, b_min=-1, b_max=1))")
    return items
