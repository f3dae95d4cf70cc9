"""prdit_fast: the PRDiT reference network, IaN diffusion and a fast backend over the same weights.

    model = prdit_fast.create_model("PRDiT-B/12/4", input_size=128)      # reference (plain PyTorch)
    model = prdit_fast.load_checkpoint("ckpt.pt", backend="fast")         # official or ours
    fast = prdit_fast.accelerate(model, dtype=torch.bfloat16)             # same parameters, fused kernels
    x, x0_hat = prdit_fast.IaNDiffusion().sample(model, noise, steps=100) # reference sampler
    keys = prdit_fast.keys_for(run_seed=0, indices=range(4))             # volume i depends on (seed, i) only
    x = prdit_fast.FlowMatching().sample(fm_model, noise, steps=100, solver="euler")  # released 256^3 models
    x, x0_hat = prdit_fast.Sampler(fast, batch_size=4, steps=100).sample(keys)  # CUDA-graph engine
    volumes = prdit_fast.Pipeline.from_pretrained("model_dir")(num_volumes=4)  # Volumes: HU, affine

Heavy pieces (the fast backend, the engine, Triton) load on first use.
"""
from importlib import import_module

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .diffusion import IaNDiffusion
from .flops import flops_per_step
from .flow_matching import FlowMatching
from .models import PRDiT, PRDiTConfig, count_parameters, create_model, list_models
from .sr import PRDiTSR, SRConfig, create_sr_model
from .phantom import PhantomDataset, chest_phantom, hu_to_unit, unit_to_hu
from .schedules import SamplerStep, sampling_grid
from .volumes import load_volume, save_nifti, save_slices_png

__version__ = "0.1.0"

# name -> module, imported on first access: these import Triton (seconds of start-up)
_LAZY = {
    "accelerate": "prdit_fast.fast",
    "FastPRDiT": "prdit_fast.fast",
    "Sampler": "prdit_fast.engine",
    "keys_for": "prdit_fast.engine",
    "ImplUnavailable": "prdit_fast.ops.dispatch",
    "train": "prdit_fast.training",
    "Pipeline": "prdit_fast.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prdit_fast' has no attribute {name!r}")


__all__ = [
    "PRDiT",
    "PRDiTConfig",
    "IaNDiffusion",
    "FlowMatching",
    "SamplerStep",
    "sampling_grid",
    "create_model",
    "list_models",
    "create_sr_model",
    "PRDiTSR",
    "SRConfig",
    "count_parameters",
    "flops_per_step",
    "load_checkpoint",
    "save_checkpoint",
    "read_checkpoint",
    "CheckpointError",
    "chest_phantom",
    "PhantomDataset",
    "hu_to_unit",
    "unit_to_hu",
    "save_nifti",
    "save_slices_png",
    "load_volume",
    *_LAZY,
]
