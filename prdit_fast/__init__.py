"""prdit_fast: the PRDiT reference network, IaN diffusion and a fast backend over the same weights."""
from .diffusion import IaNDiffusion, SamplerStep, sampling_grid
from .models import PRDiT, PRDiTConfig, count_parameters, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "PRDiT",
    "PRDiTConfig",
    "IaNDiffusion",
    "SamplerStep",
    "sampling_grid",
    "create_model",
    "list_models",
    "count_parameters",
]
