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

The recipe also says which axis ``data.augment`` flips (``flip_axis``): the one the official
loader of such data flips. Both official loaders reverse the stored array's last axis; for
LIDC-IDRI's ``processed.nii.gz`` (dicom2nifti's LAS, see ``prdit_fast.orientation``) that is
z, superior-inferior, which prdit_fast's order holds first (d, dim -3 of (C, d, h, w));
RAD-ChestCT arrays are read as stored, so theirs stays w (patient right-left, dim -1). The
phantom, unknown recipes and user datasets flip w, the last axis of what the trainer sees.
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
    flip_dim: int = -1  # data.augment flips this dim of (C, d, h, w) (module docstring)


RECIPES: dict[str, Recipe] = {
    "lidc": Recipe("per-volume min-max of HU clipped to [-1000, 99.9th percentile]", flip_dim=-3),
    "rad": Recipe("HU clipped to [-1000, 1000], linear", (-1000.0, 1000.0)),
    "phantom": Recipe("synthetic phantom, HU clipped to [-1000, 1000], linear", (-1000.0, 1000.0)),
    "official-rad": Recipe("RAD-ChestCT official: HU clipped to [-1000, 1000] and its 99.5th percentile, min-max"),
    "unknown": Recipe("unknown preprocessing"),
}


FLIP_AXES = {-3: "d (superior-inferior)", -1: "w (patient right-left)"}


def flip_axis(metadata: Mapping[str, Any] | None) -> tuple[int, str]:
    """The dim of a (C, d, h, w) sample that ``data.augment`` flips for volumes described by
    ``metadata`` (a config's ``volume`` section), and its name for the log."""
    recipe = RECIPES.get(str((metadata or {}).get("intensity")), RECIPES["unknown"])
    return recipe.flip_dim, FLIP_AXES[recipe.flip_dim]


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


def lidc_hu_range(volume: np.ndarray, air_hu: float = -1000.0) -> tuple[float, float]:
    """The LIDC recipe's per-volume window: (HU of 0, HU of 1) = the minimum and maximum of
    the volume clipped below at air and above at its own 99.9th percentile."""
    clipped = np.maximum(np.asarray(volume), air_hu)
    hi = float(np.percentile(clipped, 99.9))
    return float(clipped.min()), hi


@dataclass(frozen=True)
class ValueRange:
    """Values ``lo`` .. ``hi`` in ``units`` <-> the model's [-1, 1], linearly (values
    outside the range are clipped to it, as the intensity recipe does)."""

    lo: float
    hi: float
    units: str  # 'HU' or 'normalized [0, 1]' / 'normalized [-1, 1]'

    @property
    def per_model_unit(self) -> float:
        """How much of ``units`` one unit of the model's [-1, 1] scale is (errors convert by it)."""
        return (self.hi - self.lo) / 2

    def to_model(self, values: np.ndarray) -> np.ndarray:
        return (np.clip((np.asarray(values, dtype=np.float32) - self.lo) / (self.hi - self.lo), 0, 1) * 2 - 1
                ).astype(np.float32)

    def from_model(self, unit: np.ndarray) -> np.ndarray:
        return (self.lo + (np.clip(np.asarray(unit, dtype=np.float32), -1, 1) + 1) / 2 * (self.hi - self.lo)
                ).astype(np.float32)


INPUT_UNITS = ("auto", "hu", "unit01", "unit11")
_NORMALIZED = {"unit01": (0.0, 1.0), "unit11": (-1.0, 1.0)}


def measurement_ranges(metadata: Mapping[str, Any] | None, values: np.ndarray, declared: str = "auto",
                       sidecar: Mapping[str, Any] | None = None, what: str = "--input") -> tuple[ValueRange, ValueRange]:
    """(how a measurement's values map into the model's [-1, 1], how the model's output
    maps back to the units written) for a prior whose checkpoint ``volume`` section is
    ``metadata`` (``checkpoint_volume_metadata``).

    declared: 'hu' (through the checkpoint's recipe: its fixed window, or for the
    per-volume LIDC recipe this volume's own window, so the result maps back to HU);
    'unit01' / 'unit11' (already in the model's intensities, [0, 1] or [-1, 1]; written
    back in the same units); 'auto': a preprocessed volume with its ``sidecar`` is
    [0, 1] of that preprocessing and is written back in HU through the sidecar's window,
    anything else must look like HU. ValueError (a usage error) when the values cannot
    fit: out of the declared range, normalized-looking values taken as HU, HU for a
    recipe that cannot map them, or a sidecar of another recipe than the prior's.
    """
    from ..errors import UsageError

    lo, hi = float(np.min(values)), float(np.max(values))
    recipe_name = str(metadata.get("intensity")) if metadata else None
    if sidecar is not None and declared in ("auto", "unit01"):
        if recipe_name not in (None, "unknown") and sidecar.get("intensity") != recipe_name:
            raise UsageError(f"{what} was preprocessed with the {sidecar.get('intensity')!r} recipe, the prior was "
                             f"trained on {recipe_name!r} data: preprocess the input with --dataset {recipe_name}")
        declared = "unit01"
        out = ValueRange(float(sidecar["hu_min"]), float(sidecar["hu_max"]), "HU")
    else:
        out = None
    if declared == "auto":
        if lo >= -1.001 and hi <= 1.001:
            raise UsageError(f"{what} holds values in [{lo:.3g}, {hi:.3g}], not HU: declare what they are with "
                             f"--input-units unit01 or unit11 (or give the preprocessed .npy with its sidecar .json)")
        declared = "hu"
    if declared in _NORMALIZED:
        a, b = _NORMALIZED[declared]
        if lo < a - 1e-3 or hi > b + 1e-3:
            raise UsageError(f"{what} holds values in [{lo:.4g}, {hi:.4g}], outside the declared [{a:g}, {b:g}]")
        given = ValueRange(a, b, f"normalized [{a:g}, {b:g}]")
        return given, out or given
    if declared != "hu":
        raise UsageError(f"--input-units must be one of {', '.join(INPUT_UNITS)}, got {declared!r}")
    if hi - lo < 10.0 or (lo >= -2.0 and hi <= 2.0):
        raise UsageError(f"{what} holds values in [{lo:.4g}, {hi:.4g}], which is not a CT in HU: give "
                         f"--input-units unit01 or unit11 for normalized input")
    if metadata is None:
        log.warning("the checkpoint records no intensity recipe: %s is mapped through the [-1000, 1000] HU window "
                    "(assumed)", what)
        window = ValueRange(-1000.0, 1000.0, "HU")
        return window, window
    recipe = RECIPES.get(recipe_name, RECIPES["unknown"])
    if recipe.hu_window is not None:
        window = ValueRange(*recipe.hu_window, "HU")
    elif recipe_name == "lidc":  # per volume: this volume's own window, so the output maps back to HU
        window = ValueRange(*lidc_hu_range(values), "HU")
    else:
        raise UsageError(f"the prior was trained on {recipe_name!r} data ({recipe.description}), which HU input "
                         f"cannot be mapped into: give {what} preprocessed the same way, with --input-units unit01")
    return window, window
