"""What a model's voxels mean: voxel size and intensity recipe, from the preprocessing
through training into the checkpoint and out of ``prdit-fast sample``.

``prdit-fast preprocess`` records in its ``manifest.json`` the spacing of its output
(``spacing_mm``) and the intensity recipe (``dataset``: 'lidc' or 'rad'). Training
copies them into the checkpoint config's ``volume`` section (``volume_metadata``):

- ``voxel_size_mm``: the preprocessing spacing x stored edge / ``image_size`` (average
  pooling 256^3 at 1 mm to 128^3 gives 2 mm voxels), or None when unknown;
- ``intensity``: the recipe name (``RECIPES``); only a recipe with a fixed HU window can
  be inverted, so only those samples are written in HU;
- ``axes``: the axis order (``prdit_fast.orientation.CANONICAL_AXCODES``).

Files of the official preprocessing carry no manifest; their recipe is known from the
official scripts: LIDC-IDRI ``processed.nii.gz`` at 1 mm with a per-volume min-max,
RAD-ChestCT ``.npz`` with a window, a 99.5th-percentile clip and a min-max (not
invertible) and no recorded spacing.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..orientation import CANONICAL_AXCODES

log = logging.getLogger("prdit_fast.data")

MANIFEST = "manifest.json"
PHANTOM_FIELD_OF_VIEW_MM = 256.0  # the phantom spans the field of view of the 256^3, 1 mm preprocessing


@dataclass(frozen=True)
class Recipe:
    description: str
    hu_window: tuple[float, float] | None = None  # [0, 1] <-> this HU range linearly; None: not invertible


RECIPES: dict[str, Recipe] = {
    "lidc": Recipe("per-volume min-max of HU clipped to [-1000, 99.9th percentile]"),
    "rad": Recipe("HU clipped to [-1000, 1000], linear", (-1000.0, 1000.0)),
    "phantom": Recipe("synthetic phantom, HU clipped to [-1000, 1000], linear", (-1000.0, 1000.0)),
    "official-rad": Recipe("RAD-ChestCT official: HU clipped to [-1000, 1000] and its 99.5th percentile, min-max"),
    "unknown": Recipe("unknown preprocessing"),
}


def recipe_manifest(dataset: str, size: int) -> dict[str, Any]:
    """The manifest fields ``prdit-fast preprocess`` writes for ``dataset`` ('lidc'
    resamples to 1 mm; 'rad' keeps the source spacing, recorded per volume)."""
    return {
        "intensity": dataset,
        "intensity_description": RECIPES[dataset].description,
        "spacing_mm": [1.0, 1.0, 1.0] if dataset == "lidc" else None,
        "edge": size,
        "axes": "".join(CANONICAL_AXCODES),
    }


def _manifest_for(files: list[Path], root: str | None) -> tuple[Path, dict] | None:
    for folder in ([Path(root)] if root else []) + [files[0].parent]:
        path = folder / MANIFEST
        if path.is_file():
            return path, json.loads(path.read_text())
    return None


def _stored_edge(path: Path) -> int:
    name = path.name.lower()
    if name.endswith(".npy"):
        return int(np.load(path, mmap_mode="r").shape[-1])
    if name.endswith(".npz"):
        with np.load(path) as archive:
            key = next((k for k in ("volume", "ct") if k in archive.files), archive.files[0])
            return int(archive[key].shape[-1])
    import nibabel as nib

    return int(nib.load(str(path)).shape[0])


def volume_metadata(files: list[Path] | None, data: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint config's ``volume`` section for training on ``files`` (None: the
    phantom) at ``data['image_size']``; see the module docstring."""
    size = int(data["image_size"])
    if files is None:
        return {"voxel_size_mm": [PHANTOM_FIELD_OF_VIEW_MM / size] * 3, "intensity": "phantom",
                "axes": "".join(CANONICAL_AXCODES), "source": "synthetic phantom"}
    found = _manifest_for(files, data.get("path"))
    spacing: list[float] | None = None
    if found is not None:
        path, manifest = found
        recipe = manifest.get("intensity") or manifest.get("dataset") or "unknown"
        edge = int(manifest.get("edge") or manifest.get("size") or _stored_edge(files[0]))
        spacing = manifest.get("spacing_mm")
        if spacing is None:  # per-volume spacing (RAD keeps the source's): one value only if all agree
            spacings = {tuple(v["output_spacing"]) for v in manifest.get("volumes", []) if v.get("output_spacing")}
            spacing = list(spacings.pop()) if len(spacings) == 1 else None
        source = str(path)
    else:
        name = files[0].name.lower()
        edge = _stored_edge(files[0])
        if name.endswith((".nii", ".nii.gz")):
            recipe, spacing, source = "lidc", [1.0, 1.0, 1.0], "official LIDC-IDRI preprocessing (processed.nii.gz)"
        elif name.endswith(".npz"):
            recipe, source = "official-rad", "official RAD-ChestCT preprocessing (.npz)"
        else:
            recipe, source = "unknown", f"no {MANIFEST} next to the data"
    if recipe not in RECIPES:
        recipe = "unknown"
    voxel = [float(s) * edge / size for s in spacing] if spacing is not None else None
    if voxel is None:
        log.warning("the voxel size of the training data is unknown (%s); samples will say so", source)
    return {"voxel_size_mm": voxel, "intensity": recipe, "axes": "".join(CANONICAL_AXCODES), "source": source}


@dataclass(frozen=True)
class OutputUnits:
    """How ``sample`` writes a model's volumes: HU (int16) or the model's normalized
    intensities in [0, 1] (float32), with the voxel size and a header description."""

    hu_window: tuple[float, float] | None
    voxel_size_mm: tuple[float, float, float]
    description: str  # NIfTI descrip, at most 80 characters
    summary: dict[str, Any]

    def convert(self, unit: np.ndarray) -> np.ndarray:
        """Model output in [-1, 1] -> HU (clipped to the window) or [0, 1]."""
        x = np.clip((np.asarray(unit, dtype=np.float32) + 1) / 2, 0.0, 1.0)
        if self.hu_window is None:
            return x
        lo, hi = self.hu_window
        return (x * (hi - lo) + lo).astype(np.float32)


def output_units(metadata: Mapping[str, Any] | None) -> OutputUnits:
    """The units ``sample`` writes for a checkpoint whose config has ``metadata`` as its
    ``volume`` section; None (checkpoints from before this metadata): HU through the
    [-1000, 1000] window at 1 mm, with a warning."""
    if metadata is None:
        log.warning("the checkpoint records no voxel size or intensity recipe (written before prdit_fast kept "
                    "them): writing HU through the [-1000, 1000] window at 1 mm voxels, as before")
        return OutputUnits((-1000.0, 1000.0), (1.0, 1.0, 1.0), "HU (assumed; no recipe recorded) 1 mm (assumed)",
                           {"units": "HU", "voxel_size_mm": [1.0, 1.0, 1.0], "assumed": True})
    recipe = RECIPES.get(str(metadata.get("intensity")), RECIPES["unknown"])
    voxel = metadata.get("voxel_size_mm")
    known = voxel is not None
    voxel_t = tuple(float(v) for v in voxel) if known else (1.0, 1.0, 1.0)
    size_text = "x".join(f"{v:g}" for v in voxel_t) + " mm" if known else "voxel size unknown"
    if recipe.hu_window is not None:
        units, text = "HU", "HU"
    else:
        units, text = "normalized", f"normalized [0,1], not HU ({metadata.get('intensity')})"
    summary = {"units": units, "voxel_size_mm": list(voxel_t) if known else None,
               "intensity": metadata.get("intensity"), "intensity_description": recipe.description}
    return OutputUnits(recipe.hu_window, voxel_t, f"{text}; {size_text}"[:80], summary)
