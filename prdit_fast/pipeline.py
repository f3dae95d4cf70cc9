"""``prdit_fast.Pipeline``: a pretrained model to CT volumes that know their geometry and
units, in three lines::

    pipe = prdit_fast.Pipeline.from_pretrained("path/to/model")  # model folder, checkpoint file or Hub id
    volumes = pipe(num_volumes=4, steps=100, seed=0)             # list of prdit_fast.volumes.Volume
    volumes[0].save("sample_0.nii.gz")                           # HU (where invertible) + affine in the header

The pipeline adds no sampling or unit logic of its own; its internals are the ones
``prdit-fast sample`` runs, so a volume of the pipeline is the volume of the command with
the same checkpoint, seed and settings:

- weights: ``prdit_fast.checkpoint.load_checkpoint`` (model folders, our checkpoints, the
  official release's), then ``prepare_for_sampling``: the fast backend (fused kernels,
  bf16) with CUDA graphs on a GPU, the fp32 reference on the CPU;
- sampling: ``prdit_fast.engine.Sampler`` with the Philox keys ``engine.keys_for(seed,
  indices)``: volume i depends on (checkpoint, settings, seed, i) only (up to rounding
  across batch sizes). IaN models return
  the clean prediction x0_hat of the last step, flow-matching models the final state;
- units and geometry: the checkpoint's ``volume`` record
  (``checkpoint.checkpoint_volume_metadata``) through ``data.recipes.output_units``: HU
  where the intensity recipe is invertible, else the model's normalized [0, 1], clamped to
  that range, at the training data's voxel size; or, with ``like=`` a preprocessed volume,
  ``data.preprocess.to_scanner``: that volume's HU range and its place in the scanner.

Model folders (``save_pretrained``; the Hugging Face layout): ``config.json`` (network
config, process, noise scale, volume record) and ``model.safetensors``, read and written by
``prdit_fast.checkpoint`` (``save_model_folder``); ``load_checkpoint`` and ``prdit-fast
sample --ckpt`` take them too. ``export_pretrained`` (``prdit-fast export``) turns an
official ``.pt`` (or any checkpoint) into one. Hub ids (``owner/name``) are fetched with
``huggingface_hub`` (an optional dependency: ``pip install huggingface_hub``), honouring its
cache and ``HF_HUB_OFFLINE``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .checkpoint import checkpoint_volume_metadata, is_model_folder, load_checkpoint, save_model_folder
from .data.recipes import OutputUnits, output_units
from .orientation import canonical_affine
from .sample_runs import batch_groups
from .volumes import Volume

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # compute dtypes by name
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BACKENDS = ("auto", "fast", "reference")


def fast_available() -> bool:
    """Whether the fast backend (``prdit_fast.fast``: Triton) can be imported."""
    try:
        import prdit_fast.fast  # noqa: F401
    except ImportError:
        return False
    return True


def prepare_for_sampling(model: torch.nn.Module, device: torch.device, backend: str = "auto",
                         dtype: str = "auto") -> tuple[torch.nn.Module, torch.dtype, str]:
    """A loaded reference model on ``device`` in the chosen backend -> (model, compute
    dtype, backend name). auto: the fast backend on CUDA when installed, else the
    reference; dtype auto: bf16 on CUDA, fp32 on the CPU (the sampler state is fp32)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {tuple(DTYPES)}, got {dtype!r}")
    if backend == "auto":
        backend = "fast" if device.type == "cuda" and fast_available() else "reference"
    compute = DTYPES[dtype] if dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = model.to(device)
    if backend == "fast":
        if not fast_available():
            raise ValueError("backend 'fast' needs prdit_fast.fast (Triton); use backend 'reference'")
        from .fast import accelerate  # here: the fast backend imports Triton, slow to start

        return accelerate(model, dtype=compute), compute, backend
    return model, compute, backend


def resolve_pretrained(name_or_path: str | os.PathLike, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """A local model folder or checkpoint file as given; otherwise a Hugging Face Hub id
    (``owner/name``) downloaded (or found in the cache) by ``huggingface_hub``."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if not _HUB_ID.match(name):
        raise FileNotFoundError(f"{name}: no such model folder or checkpoint file (nor a Hub id 'owner/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError(f"{name} is not a local path; loading it from the Hugging Face Hub needs huggingface_hub "
                          f"(pip install huggingface_hub)") from e
    folder = snapshot_download(repo_id=name, revision=revision, cache_dir=None if cache_dir is None else str(cache_dir),
                               allow_patterns=["config.json", "*.safetensors", "*.md"])
    return Path(folder)


class Pipeline:
    """A pretrained PRDiT ready to sample volumes with their geometry and units.

    model: a loaded (reference) PRDiT / PRDiT-SR; volume: its checkpoint's ``volume``
    record (``prdit_fast.data.recipes``; None: unknown, HU at 1 mm assumed with a
    warning). device: default CUDA when available, else the CPU; backend / dtype: see
    ``prepare_for_sampling``; cuda_graph: capture each sampler step (CUDA only).
    """

    def __init__(self, model: torch.nn.Module, volume: Mapping[str, Any] | None = None,
                 device: str | torch.device | None = None, backend: str = "auto", dtype: str = "auto",
                 cuda_graph: bool = True):
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.reference = model.eval()
        self.volume = dict(volume) if volume is not None else None
        self.units = output_units(self.volume)
        self.model, self.dtype, self.backend = prepare_for_sampling(model, self.device, backend, dtype)
        self.cuda_graph = cuda_graph
        self._engines: dict[tuple, Any] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                        backend: str = "auto", dtype: str = "auto", ema: bool = True, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, cuda_graph: bool = True) -> "Pipeline":
        """From a model folder (``save_pretrained``, ``prdit-fast export``), a checkpoint
        file (ours or official; EMA weights unless ``ema=False``) or a Hugging Face Hub id
        (``revision``, ``cache_dir`` passed to ``huggingface_hub.snapshot_download``)."""
        path = resolve_pretrained(name_or_path, revision, cache_dir)
        model = load_checkpoint(path, ema=ema)
        return cls(model, checkpoint_volume_metadata(path), device=device, backend=backend, dtype=dtype,
                   cuda_graph=cuda_graph)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the model folder (``config.json`` + ``model.safetensors``, with the volume
        record) that ``from_pretrained`` reads."""
        return save_model_folder(directory, self.reference, volume=self.volume)

    def _engine(self, batch_size: int, steps: int, sampler: str | None, k: int, eta: float, err_target: float):
        from .diffusion import diffusion_for
        from .engine import Sampler

        key = (batch_size, steps, sampler, k, eta, err_target)
        if key not in self._engines:
            flow = getattr(self.reference.config, "process", "ian") == "flow_matching"
            self._engines[key] = Sampler(
                self.model, batch_size=batch_size, steps=steps, sampler=sampler, k=k,
                dtype=None if self.backend == "fast" else self.dtype, cuda_graph=self.cuda_graph,
                diffusion=None if flow else diffusion_for(self.reference),
                **({"eta": eta, "err_target": err_target} if flow else {}),
            )
        return self._engines[key]

    @torch.no_grad()
    def __call__(self, num_volumes: int = 1, steps: int = 100, seed: int = 0, batch_size: int = 1,
                 sampler: str | None = None, k: int = 2, eta: float = 0.0, err_target: float = 1.0,
                 like: str | os.PathLike | Mapping[str, Any] | None = None) -> list[Volume]:
        """Sample volumes 0 .. num_volumes - 1 of run ``seed``.

        steps, sampler, k: IaN (sampler 'pc' (default) or 'cold', predictor step k);
        for flow-matching models sampler is the solver ('euler' default, 'heun', 'rk4',
        'pc', 'pc_heun'; eta, err_target for the pc ones). batch_size: volumes per engine
        call (the same volumes whatever it is, up to rounding). like: a preprocessed volume (its ``.npy``
        or sidecar, or the sidecar record) whose HU range and scanner placement the
        volumes take (``data.preprocess.to_scanner``). Returns one ``Volume`` each.
        ValueError for a volume with NaN or Inf values.
        """
        from .engine import keys_for

        if num_volumes < 1:
            raise ValueError(f"num_volumes must be >= 1, got {num_volumes}")
        if like is not None:
            from .data.preprocess import read_sidecar

            like = read_sidecar(like) if isinstance(like, (str, os.PathLike)) else dict(like)
        engine = self._engine(min(batch_size, num_volumes), steps, sampler, k, eta, err_target)
        flow = engine.flow
        volumes: list[Volume] = []
        for group in batch_groups(range(num_volumes), engine.batch_size):
            x, x0_hat = engine.sample(keys_for(seed, group))
            result = (x if flow else x0_hat).float().cpu()
            for j, index in enumerate(group):
                if not torch.isfinite(result[j]).all():
                    raise ValueError(f"volume {index} of seed {seed} has NaN or Inf values (the weights, or dtype "
                                     f"{self.dtype}); nothing returned")
                if result.shape[1] != 1:
                    raise ValueError(f"the model makes {result.shape[1]}-channel volumes; Pipeline returns CT volumes "
                                     f"of one channel")
                volumes.append(self._volume(result[j, 0].numpy(), like))
        return volumes

    def _volume(self, unit: np.ndarray, like: Mapping[str, Any] | None) -> Volume:
        return output_volume(unit, self.units, like)


def output_volume(unit: np.ndarray, units: OutputUnits, like: Mapping[str, Any] | None = None) -> Volume:
    """One model output (S, S, S) in [-1, 1] -> a Volume: in the checkpoint's ``units``
    (``data.recipes.output_units``), or, given the sidecar record ``like`` of a
    preprocessed volume, in HU placed where that scan lies (``data.preprocess.to_scanner``).
    ``prdit-fast sample`` writes what this returns."""
    if like is not None:
        from .data.preprocess import to_scanner

        return to_scanner(unit, like, value_range=(-1.0, 1.0))
    name = "HU" if units.hu_window is not None else "normalized [0, 1]"
    return Volume(units.convert(unit), canonical_affine(units.voxel_size_mm), name, units.description)


def export_pretrained(checkpoint: str | os.PathLike, directory: str | os.PathLike, ema: bool = True,
                      variant: str | None = None, input_size: int | None = None,
                      volume: Mapping[str, Any] | None = None) -> Path:
    """A checkpoint file (the official release's ``.pt``, ours, a bare state dict with
    ``variant`` and ``input_size``) -> a model folder at ``directory`` (EMA weights unless
    ``ema=False``). ``volume``: the volume record to store (voxel size, intensity recipe;
    ``prdit_fast.data.recipes``) when the checkpoint has none or it must be corrected;
    official checkpoints record none."""
    model = load_checkpoint(checkpoint, ema=ema, variant=variant, input_size=input_size)
    record = dict(volume) if volume is not None else checkpoint_volume_metadata(checkpoint)
    return save_model_folder(directory, model, volume=record)
