"""The sampling engine: one denoising step captured once in a CUDA graph, replayed ``steps`` times.

Per batch, everything a step needs lives in static device buffers:

    x        (B, C, S, S, S) fp32   the sampler state, updated in place
    x0_hat   (B, C, S, S, S) fp32   the clean prediction of the latest model call
    keys     (B,) int64             per-volume Philox keys, ``sample_key(run_seed, index)``
    step     (1,) int64             the step counter n, advanced inside the step
    grid_t   (steps,) int64         the timestep of each step, read at ``step`` on device
    table    (steps, 5) fp32        [sin_i, cos_i, move, a, sigma] of each step

so a step takes no host input and the same graph serves every step. The initial noise
(Philox counter 0) and the corrector noise of step n (counter n + 1) come from each
volume's key alone, so a volume's result depends only on its key, not on the batch size
or its position in the batch (up to the float rounding of batched GEMMs).

A flow-matching model (velocity head, spec section 14) runs the same way with one of
the solvers of ``prdit_fast.flow_matching``: x starts as N(0, I) (counter 0), the table
holds (t_i, t_i + dt/2, t_{i+1}) per step, and a step is the solver's ``fused_stages``: per
network evaluation, one fused update (``prdit_fast.ops.flow_update``) reads the velocity
tokens and writes the next state (and heun / rk4's probe and accumulator buffers), every
evaluation of a multi-evaluation step inside the one captured graph; pc draws its noise at
counter n + 1 inside the update. pc_heun with eta > 0 has no fused form: its step is
``solver_step`` on velocity volumes with ``step_noise``.

Where graphs are unavailable (CPU, ``cuda_graph=False``, or a failed capture) the same
step runs eagerly; the reason is logged to ``logging.getLogger("prdit_fast")``.

``GuidedSampler`` runs the measurement-guided sampler of spec section 15 the same way: the
guidance gradient (through the loss and its operator only, never the network) and its
update join the step, inside the same graph when the operator is capturable.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Sequence

import torch

from .diffusion import IaNDiffusion
from .flow_matching import DEFAULT_SOLVER, SOLVERS, TIME_SCALE, check_solver, fused_stages, nfe, solver_step
from .layout import volume_to_tokens
from .measurements import Loss, MeasurementOperator, guidance_gradient
from .ops.attention_backends import last_backend
from .ops.flow_update import flow_update
from .ops.sampling import initial_noise, sample_key, sampler_update, step_noise
from .schedules import SamplerStep, build_step_table, sampling_grid, step_table, time_table

log = logging.getLogger("prdit_fast")

_WARMUP_STEPS = 2  # the first call compiles / autotunes Triton kernels; the second runs them warm


def keys_for(run_seed: int, indices: Sequence[int]) -> torch.Tensor:
    """Per-volume Philox keys (len(indices),) int64 for volumes ``indices`` of run ``run_seed``."""
    return torch.tensor([sample_key(run_seed, int(i)) for i in indices], dtype=torch.int64)


class Sampler:
    """Sample PRDiT volumes in batches of ``batch_size`` with ``steps`` model evaluations.

    ``model`` is a reference ``PRDiT`` or a fast backend (``prdit_fast.fast.accelerate``;
    anything with ``token_parts(x, t) -> (tokens, more tokens or None)``, each
    (B, N, s^3 Cout), whose fp32 sum is the output, and ``config``; a fast PRDiT-SR's
    ``sr_parts(x, t) -> (head tokens, base prediction (B, 2C, S_lo^3))`` is read instead,
    the update upsampling the base), already on
    its device and in eval mode. For an IaN model ``sampler`` is 'cold' or 'pc' (the
    default) with predictor step ``k``; for a flow-matching model (``config.process``) it
    is a solver of ``prdit_fast.flow_matching.SOLVERS`` (default 'euler') with ``eta`` and
    ``err_target`` (pc / pc_heun).
    ``dtype`` is the compute dtype of a reference network (autocast; None: its parameter
    dtype); a fast backend computes in the dtype it was built with. The sampler state x and
    the returned volumes are fp32.

    ``sample(keys)`` -> (x, x0_hat), each (len(keys), C, S, S, S) fp32 on the model's
    device: the final state and the clean prediction of the last model call (t = 0);
    x0_hat is None for flow matching (the velocity head predicts no clean volume).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch_size: int,
        steps: int,
        sampler: str | None = None,
        k: int = 2,
        dtype: torch.dtype | None = None,
        cuda_graph: bool = True,
        diffusion: IaNDiffusion | None = None,
        eta: float = 0.0,
        err_target: float = 1.0,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.process = getattr(model.config, "process", "ian")
        self.flow = self.process == "flow_matching"
        if self.flow:
            sampler = sampler or DEFAULT_SOLVER
            check_solver(steps, sampler, eta, err_target)  # clear errors for every argument
            self.diffusion = None
            self.timesteps = None
        else:
            sampler = sampler or "pc"
            if sampler in SOLVERS and sampler != "pc":
                raise ValueError(
                    f"solver {sampler!r} is for flow-matching models; this {model.config.name} is an IaN model "
                    f"(sampler 'cold' or 'pc')"
                )
            if (eta, err_target) != (0.0, 1.0):
                raise ValueError("eta and err_target apply to flow-matching models (pc / pc_heun) only")
            self.diffusion = diffusion or IaNDiffusion()
            # validates steps, sampler and k with clear errors
            self.timesteps = sampling_grid(steps, self.diffusion.num_timesteps)
            self.diffusion.schedule(steps, sampler, k)
        self.eta = float(eta)
        self.err_target = float(err_target)
        self.model = model
        self.config = model.config
        self.batch_size = batch_size
        self.steps = steps
        self.sampler = sampler
        self.k = k
        self.device = _model_device(model)
        self.uses_token_parts = callable(getattr(model, "token_parts", None))
        # a fast PRDiT-SR: the head's tokens and the base's low-resolution prediction
        self.uses_sr_parts = callable(getattr(model, "sr_parts", None))
        self.param_dtype = next(model.parameters()).dtype
        if self.uses_token_parts:
            own = getattr(model, "dtype", None)
            if dtype is not None and own is not None and dtype != own:
                raise ValueError(
                    f"the fast backend was built for {own}; got dtype={dtype}. Build it with "
                    f"accelerate(model, dtype={dtype}) or leave dtype=None"
                )
            self.dtype = own if own is not None else dtype
        else:
            self.dtype = dtype or self.param_dtype

        cfg = self.config
        shape = (batch_size, cfg.in_channels) + (cfg.input_size,) * 3
        dev = self.device
        self.volume_shape = shape[1:]
        self.x = torch.zeros(shape, device=dev, dtype=torch.float32)
        self.keys = torch.zeros(batch_size, device=dev, dtype=torch.int64)
        self.step = torch.zeros(1, device=dev, dtype=torch.int64)
        if self.flow:
            self.x0_hat = None
            self.grid_t = None
            # (steps, 3) fp32 rows (t_i, t_i + dt/2, t_{i+1}), read at the device step counter
            self.table = time_table(steps, dev)
            self.stages = fused_stages(steps, sampler, eta, err_target)  # None: solver_step, unfused
            self.coefs = [torch.tensor(st.coef, device=dev, dtype=torch.float32) for st in self.stages or ()]
            used = {name for st in self.stages or () for name in (st.source, st.target, st.accumulate)}
            self.probe = torch.zeros(shape, device=dev, dtype=torch.float32) if "probe" in used else None
            self.acc = torch.zeros(shape, device=dev, dtype=torch.float32) if self.stages and len(self.stages) > 1 else None
        else:
            self.x0_hat = torch.zeros(shape, device=dev, dtype=torch.float32)
            self.grid_t = torch.tensor(self.timesteps, device=dev, dtype=torch.int64)
            self.table = self._step_table()

        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_reason = self._prepare(cuda_graph)

    # ------------------------------------------------------------------ the step
    def _autocast(self):
        if self.uses_token_parts or self.dtype == self.param_dtype:
            return contextlib.nullcontext()
        # the weight-cast cache must stay off where the step is captured in a graph
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)

    def _network(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The IaN model at the current step: (tokens, residual tokens or None, a PRDiT-SR base's
        low-resolution prediction or None), summed (the base upsampled) by the update."""
        t = self.grid_t.index_select(0, self.step).expand(self.batch_size)
        with torch.no_grad(), self._autocast():
            if self.uses_sr_parts:
                # the base is upsampled inside the update kernel: no full-resolution assembly
                head, base = self.model.sr_parts(self.x, t)
                return head, None, base
            if self.uses_token_parts:
                # the coarse + fine sum happens in the update kernel, in fp32: no pass of its own
                return (*self.model.token_parts(self.x, t), None)
            # autocast casts what the Linears read; the network's own input must match its weights
            out = self.model(self.x.to(self.param_dtype), t)
            return volume_to_tokens(out, self.config.stride), None, None

    def _step(self) -> None:
        """One denoising step on the static buffers; no host input, no host sync."""
        if self.flow:
            self._flow_step()
            return
        tokens, residual, base = self._network()
        # in place (each voxel is read before it is written) and the counter advanced on device
        sampler_update(
            tokens, self.x, self.table, self.step, self.keys, stride=self.config.stride,
            residual=residual, base=base, x_out=self.x, x0_out=self.x0_hat, advance=True,
        )

    def _velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's velocity at x (B, C, S, S, S) fp32 and device time t (1,) in [0, 1]."""
        time = (TIME_SCALE * t).expand(self.batch_size)
        with torch.no_grad(), self._autocast():
            if self.uses_token_parts:
                out = self.model(x, time)  # the fast backend sums its token parts in fp32
            else:
                out = self.model(x.to(self.param_dtype), time)
        return out.float()

    def _velocity_tokens(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's velocity at x and device time t (1,) as (tokens, residual tokens or
        None), each (B, N, s^3 C), summed in fp32 by the fused update."""
        time = (TIME_SCALE * t).expand(self.batch_size)
        with torch.no_grad(), self._autocast():
            if self.uses_token_parts:
                return self.model.token_parts(x, time)
            out = self.model(x.to(self.param_dtype), time)
            return volume_to_tokens(out, self.config.stride), None

    def _flow_step(self) -> None:
        """One flow-matching solver step (all its network evaluations) on the static buffers."""
        if self.stages is None:
            self._unfused_flow_step()
            return
        states = {"x": self.x, "probe": self.probe, "acc": self.acc}
        times = self.table.index_select(0, self.step)  # (1, 3): no host read
        for stage, coef in zip(self.stages, self.coefs):
            tokens, residual = self._velocity_tokens(states[stage.source], times[:, stage.time])
            flow_update(
                tokens, states[stage.base], coef, self.step, stride=self.config.stride, residual=residual,
                out=states[stage.target], acc=states.get(stage.accumulate),
                acc_out=self.acc if stage.accumulate else None, keys=self.keys if stage.noisy else None,
            )
        self.step.add_(1)

    def _unfused_flow_step(self) -> None:
        """``solver_step`` on velocity volumes: pc_heun with eta > 0 (its per-sample gate)."""
        times = self.table.index_select(0, self.step)  # (1, 3): no host read
        t, t_next = times[:, 0], times[:, 2]  # (1,) each: broadcast against the volumes

        def noise() -> torch.Tensor:
            return step_noise(self.keys, self.step, self.volume_shape)

        with torch.no_grad():
            x_next = solver_step(
                self._velocity, self.x, t, t_next, 1.0 / self.steps, self.sampler, self.eta, self.err_target, noise
            )
            self.x.copy_(x_next)
            self.step.add_(1)

    def _step_table(self) -> torch.Tensor:
        """(steps, 5) fp32 scalars of the update kernel, on the device."""
        return build_step_table(self.diffusion, self.steps, self.sampler, self.k, self.device)

    # ------------------------------------------------------------------ graph capture
    def _prepare(self, cuda_graph: bool) -> str:
        """Capture the step in a CUDA graph when possible; returns why not otherwise ('' if captured)."""
        if not cuda_graph or self.device.type != "cuda":
            reason = (
                "CUDA graphs disabled (cuda_graph=False)" if not cuda_graph else f"no CUDA graphs on device {self.device}"
            ) + "; running eagerly"
            log.info(reason)
            return reason
        try:
            self._reset(torch.zeros(self.batch_size, dtype=torch.int64))
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            # warm-up off the default stream, as torch.cuda.graph requires: compiles and
            # autotunes kernels and settles allocator state before capture
            with torch.cuda.stream(side):
                for _ in range(_WARMUP_STEPS):
                    self.step.zero_()  # stay inside the step table whatever `steps` is
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=torch.cuda.graph_pool_handle()):
                self._step()
            torch.cuda.synchronize(self.device)
        except Exception as err:  # any capture problem: run the identical step eagerly
            reason = f"CUDA graph capture failed ({type(err).__name__}: {err}); running eagerly"
            log.warning(reason)
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
            return reason
        self.graph = graph
        return ""

    @property
    def cuda_graph(self) -> bool:
        """True when steps replay a captured CUDA graph."""
        return self.graph is not None

    # ------------------------------------------------------------------ sampling
    def _reset(self, keys: torch.Tensor) -> None:
        self.keys.copy_(keys)
        # flow matching starts from N(0, I), IaN from noise_std N(0, I) (0.5 PRDiT, 1.0 TF-PRDiT)
        std = 1.0 if self.flow else self.diffusion.noise_std
        self.x.copy_(initial_noise(self.keys, self.volume_shape, std=std))
        self.step.zero_()

    def advance(self) -> None:
        """One denoising step on the current buffers (the graph replay when captured, else the
        same step eagerly); the device step counter moves on by one. ``sample`` is ``steps``
        of these after drawing x_T."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    @torch.no_grad()
    def sample(
        self,
        keys: torch.Tensor | Sequence[int],
        callback: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample one volume per key.

        keys: up to ``batch_size`` int64 Philox keys (``sample_key(run_seed, index)``);
        a shorter list is padded (the padding is computed and dropped).
        ``callback(n)`` runs on the host after step n is queued (progress bars; it must not
        read the buffers if timing matters).
        Returns (x, x0_hat): (len(keys), C, S, S, S) fp32 each, new tensors.
        """
        keys = torch.as_tensor(keys, dtype=torch.int64).reshape(-1).cpu()
        n = keys.numel()
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"sample() takes 1..{self.batch_size} keys (the batch size), got {n}")
        if n < self.batch_size:
            keys = torch.cat([keys, keys[-1:].expand(self.batch_size - n)])
        self._reset(keys)
        for i in range(self.steps):
            self.advance()
            if callback is not None:
                callback(i)
        return self.x[:n].clone(), None if self.x0_hat is None else self.x0_hat[:n].clone()

    def _attention_backend(self) -> str | None:
        if self.config.depth == 0:
            return None  # the local denoiser alone has no attention
        if not self.uses_token_parts:
            return "reference"
        chosen = getattr(self.model, "attention", None)
        if chosen == "auto":  # resolved at the first call (the warm-up, or the first step)
            return last_backend() or chosen
        return chosen

    def describe(self) -> dict:
        """What the summary of a run reports about the engine."""
        return {
            "device": str(self.device),
            "backend": "fast" if self.uses_token_parts else "reference",
            "attention": self._attention_backend(),
            "dtype": str(self.dtype).replace("torch.", ""),
            "cuda_graph": self.cuda_graph,
            "cuda_graph_reason": self.graph_reason or None,
            "batch_size": self.batch_size,
            "process": self.process,
            "steps": self.steps,
            "sampler": self.sampler,
            "k": self.k if self.sampler == "pc" and not self.flow else None,
            "eta": self.eta if self.flow else None,
            "err_target": self.err_target if self.sampler == "pc_heun" else None,
            "nfe": self.nfe,
            "noise_std": 1.0 if self.flow else self.diffusion.noise_std,
        }

    @property
    def nfe(self) -> int:
        """Network evaluations per volume of one ``sample()``."""
        return nfe(self.steps, self.sampler) if self.flow else self.steps


def _model_device(model: torch.nn.Module) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


class GuidedSampler(Sampler):
    """Measurement-guided sampling (spec section 15, ``IaNDiffusion.sample_guided``) in the engine.

    One step: the network (no gradients), the fused update ``a (x - k h f) + sigma z``, then
    ``x -= a rho d(i) g`` with ``g = dL/dx0_hat`` through ``loss`` only (the guided update
    ``a (x - k h f - rho d(i) g) + sigma z`` rearranged), all on static buffers. The
    gradient is taken at every step, with weight 0 where the schedule has no guidance, so
    one CUDA graph serves every step. The graph is tried only for a ``MeasurementOperator``
    whose ``capturable`` is True (a plain callable loss, or an operator that says it is not
    capturable, runs eagerly with the reason logged).

    loss: a ``MeasurementOperator`` (its measurement shape is found by applying it to a
    zero volume) or a callable ``(x0_hat, y) -> scalar or (B,)``, which then needs
    ``observation_shape`` (the shape of one volume's y). ``noise_weight`` scales the
    corrector noise (the start x_T is ``diffusion.noise_std`` N(0, I)).

    ``sample(keys, y)`` -> (x, x0_hat), each (len(keys), C, S, S, S) fp32; x0_hat of the
    last model call is the reconstruction.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: Loss,
        batch_size: int,
        steps: int,
        k: int,
        guidance_scale: float,
        guidance_decay: str = "none",
        guidance_cutoff: int = 0,
        noise_weight: float = 1.0,
        dtype: torch.dtype | None = None,
        cuda_graph: bool = True,
        diffusion: IaNDiffusion | None = None,
        observation_shape: Sequence[int] | None = None,
    ):
        diffusion = diffusion or IaNDiffusion()
        # validates the guidance settings with clear errors before anything is allocated
        self.plan: list[SamplerStep] = diffusion.guided_schedule(
            steps, k, guidance_scale, guidance_decay, guidance_cutoff, noise_weight
        )
        self.loss = loss
        self.guidance = {
            "guidance_scale": guidance_scale, "guidance_decay": guidance_decay,
            "guidance_cutoff": guidance_cutoff, "noise_weight": noise_weight,
        }
        device = _model_device(model)
        cfg = model.config
        volume = (batch_size, cfg.in_channels) + (cfg.input_size,) * 3
        if isinstance(loss, MeasurementOperator):
            loss.to(device)
            with torch.no_grad():
                observation_shape = tuple(loss(torch.zeros(volume, device=device)).shape[1:])
        elif not callable(loss):
            raise TypeError(f"loss must be a MeasurementOperator or a callable (x0_hat, y) -> scalar, got {type(loss).__name__}")
        elif observation_shape is None:
            raise ValueError("a callable loss needs observation_shape= (the shape of one volume's observation y)")
        self.observation_shape = tuple(observation_shape)
        self.y = torch.zeros((batch_size, *self.observation_shape), device=device, dtype=torch.float32)
        # per step: a * rho d(i) where the schedule guides, else 0
        self.guidance_weight = torch.tensor(
            [st.a * st.guidance if st.corrector else 0.0 for st in self.plan], device=device, dtype=torch.float32
        )
        if cuda_graph and not (isinstance(loss, MeasurementOperator) and loss.capturable):
            reason = (
                f"{type(loss).__name__} is not capturable" if isinstance(loss, MeasurementOperator)
                else "a plain callable loss is not known to be capturable"
            )
            log.info("guided sampling runs eagerly: %s (make it a MeasurementOperator with capturable=True)", reason)
            self._eager_reason = reason
            cuda_graph = False
        else:
            self._eager_reason = None
        super().__init__(model, batch_size, steps, sampler="pc", k=k, dtype=dtype, cuda_graph=cuda_graph, diffusion=diffusion)
        if self._eager_reason is not None:
            self.graph_reason = f"{self._eager_reason}; running eagerly"

    def _step_table(self) -> torch.Tensor:
        return step_table(self.plan, self.device)

    def _step(self) -> None:
        tokens, residual, base = self._network()
        sampler_update(
            tokens, self.x, self.table, self.step, self.keys, stride=self.config.stride,
            residual=residual, base=base, x_out=self.x, x0_out=self.x0_hat, advance=False,
        )
        grad = guidance_gradient(self.loss, self.x0_hat, self.y)
        weight = self.guidance_weight.index_select(0, self.step)  # (1,), read on the device
        self.x.sub_(grad * weight)
        self.step.add_(1)

    @torch.no_grad()
    def sample(
        self,
        keys: torch.Tensor | Sequence[int],
        y: torch.Tensor | None = None,
        callback: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct one volume per key from its observation: y (len(keys), *observation_shape)."""
        if y is None:
            raise ValueError("GuidedSampler.sample needs the observations y (one per key)")
        n = torch.as_tensor(keys).numel()
        if tuple(y.shape) != (n, *self.observation_shape):
            raise ValueError(
                f"y must have shape ({n}, {', '.join(map(str, self.observation_shape))}) (one observation per key), "
                f"got {tuple(y.shape)}"
            )
        self.y[:n].copy_(y)
        if n < self.batch_size:
            self.y[n:].copy_(y[-1:].expand(self.batch_size - n, *self.observation_shape))
        return super().sample(keys, callback)

    def describe(self) -> dict:
        out = super().describe()
        out.update(self.guidance)
        out["loss"] = type(self.loss).__name__
        return out
