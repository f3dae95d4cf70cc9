"""The ways a model is run and compared (``prdit-fast bench --backends``): eager fp32, TF32,
bf16 autocast, torch.compile, the fast setup, the fast setup with CUDA graphs."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..diffusion import IaNDiffusion
from ..engine import Sampler, keys_for
from ..fast import accelerate
from ..models import PRDiT, PRDiTConfig
from ..ops.attention_backends import last_backend

REFERENCE = "eager-fp32"
LEARNING_RATE = 1e-4
GRAD_CLIP = 1.0


@dataclass(frozen=True)
class Setup:
    name: str
    description: str
    tf32: bool = False
    autocast_bf16: bool = False
    compiled: bool = False
    fast: bool = False
    cuda_graph: bool = False


SETUPS: tuple[Setup, ...] = (
    Setup(REFERENCE, "reference network, eager, fp32 with TF32 off (the official path)"),
    Setup("tf32", "reference network, eager, fp32 tensors with TF32 matmuls and convolutions", tf32=True),
    Setup("bf16-autocast", "reference network, eager, torch.autocast bf16", autocast_bf16=True),
    Setup("compile", "torch.compile of the reference network under bf16 autocast", autocast_bf16=True, compiled=True),
    Setup("fast", "prdit_fast.fast.accelerate(model, bf16): fused Triton kernels", fast=True),
    Setup("fast-cudagraph", "fast setup sampled by prdit_fast.engine.Sampler with a CUDA graph per step",
            fast=True, cuda_graph=True),
)
SETUP_NAMES = tuple(b.name for b in SETUPS)


def skip_reason(setup: Setup, device: torch.device, explicit: bool) -> str | None:
    """Why ``setup`` cannot (or, on CPU, should not) run here; None when it runs."""
    cpu = device.type != "cuda"
    if setup.tf32 and cpu:
        return "TF32 is an NVIDIA tensor-core mode; on CPU it would be the eager fp32 run again"
    if setup.compiled and cpu and not explicit:
        return ("torch.compile of a B-size model takes minutes on a few CPU cores (and needs a C++ "
                "toolchain); request it with --backends compile to run it anyway")
    if setup.cuda_graph and cpu:
        return "CUDA graphs need a CUDA GPU"
    if setup.fast and cpu:
        return ("the fast backend's Triton kernels run on CPU only under the Triton interpreter, "
                "which is orders of magnitude too slow to benchmark")
    return None


@contextlib.contextmanager
def numerics(setup: Setup) -> Iterator[None]:
    """TF32 on only for the tf32 backend; every other setup runs with it off. Restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = setup.tf32
    torch.backends.cudnn.allow_tf32 = setup.tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _autocast(setup: Setup, device: torch.device):
    if setup.autocast_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _compile_step_marker() -> Callable[[], None]:
    """Tell compiled CUDA graphs (mode max-autotune) that a new iteration starts, so
    outputs of the previous call may be overwritten."""
    return getattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)


class PreparedSetup:
    """A setup applied to one model copy on the device: builds sampling and training runs."""

    def __init__(self, setup: Setup, model: PRDiT, device: torch.device, compile_mode: str):
        self.setup = setup
        self.device = device
        self.config: PRDiTConfig = model.config
        self.diffusion = IaNDiffusion()
        self.engine = None
        if setup.fast:
            self.net = accelerate(model, dtype=torch.bfloat16, attention="auto")
        elif setup.compiled:
            torch.compiler.reset()  # a fresh cache per cell: never hit the recompile limit and fall back to eager
            self.net = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
        else:
            self.net = model
        self._mark_step = _compile_step_marker() if setup.compiled else (lambda: None)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._mark_step()
        with _autocast(self.setup, self.device):
            return self.net(x, t)

    def sampling_run(self, batch: int, steps: int) -> Callable[[], Any]:
        """A callable that samples ``batch`` volumes with ``steps`` pc (k=2) steps."""
        cfg = self.config
        if self.setup.cuda_graph:
            self.engine = Sampler(self.net, batch, steps, "pc", k=2, dtype=None, cuda_graph=True)
            keys = keys_for(0, range(batch))
            return lambda: self.engine.sample(keys)
        noise = self.diffusion.initial_noise((batch, cfg.in_channels) + (cfg.input_size,) * 3, device=self.device)
        generator = torch.Generator(self.device).manual_seed(0)
        return lambda: self.diffusion.sample(self.forward, noise, steps, "pc", 2, generator=generator)

    def training_run(self, batch: int) -> Callable[[], Any]:
        """A callable doing one training step on ``batch`` samples: IaN losses, backward,
        gradient clipping at 1.0 and an AdamW step over the trainable parameters (at
        depth > 0 only t_embedder.fine_head and the transformer, as in the reference)."""
        cfg = self.config
        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{self.setup.name}: the model has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
        x0 = torch.rand((batch, cfg.in_channels) + (cfg.input_size,) * 3, device=self.device) * 2 - 1
        generator = torch.Generator(self.device).manual_seed(0)

        def step() -> None:
            losses = self.diffusion.training_losses(self.forward, x0, generator=generator)
            losses["loss"].mean().backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def attention_backend(self) -> str | None:
        if self.engine is not None:
            return self.engine.describe().get("attention")
        if not self.setup.fast:
            return None
        return last_backend() or getattr(self.net, "attention", None)
