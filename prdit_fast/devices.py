"""Device selection shared by the commands and benchmarks."""
from __future__ import annotations

import torch

from .errors import UsageError


def resolve_device(requested: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """The device to run on: ``requested`` if given, else this rank's GPU, else the CPU.

    A CUDA device always carries its index, because torch.cuda's memory queries refuse a
    bare ``torch.device("cuda")``.
    """
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as e:
        raise UsageError(f"--device {str(requested)!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {str(requested)!r} asked for, but no CUDA device is available; use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {str(requested)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device
