"""The step schedules of every sampler, in one place (spec sections 7, 14 and 15).

    IaN (angular, beta_t = (t / T) (pi / 2))
        sampling_grid      evaluation points floor(n T / steps), n = steps-1 .. 0
        ian_schedule       the per-step scalars of the cold (Euler) and pc samplers
        guided_schedule    the same for the measurement-guided pc sampler (``Guidance``, d(i) ``decay_weight``)
    flow matching
        step_times         (t_i, t_{i+1}) with t_i = i / steps
        stage_times        (t_i, t_i + dt/2, t_{i+1}): the times of the fused solver stages
    the engine's device tables (read at a device step counter, so a CUDA graph replays them)
        step_table / build_step_table   (steps, 5) fp32 [sin_i, cos_i, move, a, sigma]
        time_table                      (steps, 3) fp32 (t_i, t_i + dt/2, t_{i+1})

``IaNDiffusion`` (the reference loops), ``FlowMatching``, the engine and the fused update
kernel all read their steps from here. Imports only torch: a low layer that
``prdit_fast.ops`` may use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

NOISE_STD = 0.5  # PRDiT (spec section 7)
NOISE_STD_TF = 1.0  # TF-PRDiT, the reconstruction prior (spec section 15)
GUIDANCE_DECAYS = ("none", "cosine")
IAN_SAMPLERS = ("cold", "pc")


@dataclass(frozen=True)
class SamplerStep:
    """The scalars of one sampler step, shared by the reference loop and the fused update.

    Whatever the sampler, the update is
        f      = sin_i * x0_hat - cos_i * eps_hat
        x_pred = x - move * f
        x_next = a * x_pred + sigma * z,   z ~ N(0, I), drawn only when ``corrector``
    """

    t: int  # i, where the model is evaluated
    t_next: int  # j, the next lower grid point (0 at the end)
    sin_i: float
    cos_i: float
    move: float  # k h for a predictor step, h for an Euler step (h <= 0)
    a: float  # corrector contraction cos(beta_j) / cos(beta_t_pred), 1 without corrector
    sigma: float  # sqrt(max(0, 1 - a^2)) * noise_std (guided: * noise_weight)
    corrector: bool
    # guided sampling (spec section 15): x_pred -= guidance * dL/dx0_hat; 0 means no
    # gradient is taken at this step
    guidance: float = 0.0


# --------------------------------------------------------------------------- #
# IaN
# --------------------------------------------------------------------------- #
def sampling_grid(steps: int, num_timesteps: int) -> list[int]:
    """Descending evaluation points floor(n T / steps), n = steps-1 .. 0.

    For steps dividing T this is T-skip, ..., skip, 0 with skip = T / steps. For other
    counts the points are unevenly spaced by at most one step; exactly ``steps`` model
    evaluations are made (nothing is rounded to a divisor of T).
    """
    if not isinstance(steps, int) or steps < 1 or steps > num_timesteps:
        raise ValueError(f"steps must be an integer in [1, {num_timesteps}], got {steps!r}")
    return [n * num_timesteps // steps for n in range(steps - 1, -1, -1)]


def _beta(t: float, num_timesteps: int) -> float:
    return t / num_timesteps * (math.pi / 2)


def _plan(
    steps: int,
    num_timesteps: int,
    k: int,
    predicts: Callable[[int, int], bool],
    noise_scale: float,
    guidance: Callable[[int], float] = lambda i: 0.0,
) -> list[SamplerStep]:
    """The steps on the section 7 grid: where ``predicts(i, t_pred)`` the predictor-corrector
    step (corrector noise ``noise_scale``, guidance weight ``guidance(i)``), else Euler."""
    grid = sampling_grid(steps, num_timesteps)
    out = []
    for n, i in enumerate(grid):
        j = grid[n + 1] if n + 1 < len(grid) else 0
        h = (j - i) * (math.pi / 2) / num_timesteps
        b_i = _beta(i, num_timesteps)
        t_pred = i - k * (i - j)
        if predicts(i, t_pred):
            a = math.cos(_beta(j, num_timesteps)) / math.cos(_beta(t_pred, num_timesteps))
            sigma = math.sqrt(max(0.0, 1.0 - a * a)) * noise_scale
            out.append(SamplerStep(i, j, math.sin(b_i), math.cos(b_i), k * h, a, sigma, True, guidance(i)))
        else:
            out.append(SamplerStep(i, j, math.sin(b_i), math.cos(b_i), h, 1.0, 0.0, False))
    return out


def ian_schedule(
    steps: int, num_timesteps: int, noise_std: float, sampler: str = "pc", k: int = 2
) -> list[SamplerStep]:
    """The per-step scalars of ``sampler`` ('cold' or 'pc') for ``steps`` evaluations of a
    ``num_timesteps``-step IaN process with noise scale ``noise_std``."""
    if sampler not in IAN_SAMPLERS:
        raise ValueError(f"sampler must be 'cold' or 'pc', got {sampler!r}")
    if sampler == "pc" and (not isinstance(k, int) or k < 1):
        raise ValueError(f"the predictor step k must be an integer >= 1, got {k!r}")
    return _plan(steps, num_timesteps, k, lambda i, t_pred: sampler == "pc" and t_pred > 0, noise_std)


def decay_weight(t: int, num_timesteps: int, decay: str) -> float:
    """d(i) of spec section 15: 1 for "none", (1 + cos((1 - i/T) pi)) / 2 for "cosine"."""
    if decay == "cosine":
        return (1.0 + math.cos((1.0 - t / num_timesteps) * math.pi)) / 2.0
    return 1.0


@dataclass(frozen=True)
class Guidance:
    """The settings of the measurement-guided sampler (spec section 15), checked on creation:
    weight ``scale`` d(i) with the ``decay`` of ``decay_weight`` at steps i > ``cutoff``,
    corrector noise ``noise_weight``."""

    scale: float
    decay: str = "none"
    cutoff: int = 0
    noise_weight: float = 1.0

    def __post_init__(self):
        if self.decay not in GUIDANCE_DECAYS:
            raise ValueError(f"guidance_decay must be one of {GUIDANCE_DECAYS}, got {self.decay!r}")
        if not (isinstance(self.scale, (int, float)) and self.scale >= 0):
            raise ValueError(f"guidance_scale must be a number >= 0, got {self.scale!r}")
        if not (isinstance(self.noise_weight, (int, float)) and self.noise_weight >= 0):
            raise ValueError(f"noise_weight must be a number >= 0, got {self.noise_weight!r}")
        if not isinstance(self.cutoff, int) or self.cutoff < 0:
            raise ValueError(f"guidance_cutoff must be an integer step >= 0, got {self.cutoff!r}")


def guided_schedule(steps: int, num_timesteps: int, k: int, guidance: Guidance) -> list[SamplerStep]:
    """The per-step scalars of the guided sampler (spec section 15).

    Step i -> j takes the predictor-corrector branch when ``i - k (i - j) >= 0`` and
    ``i != 0`` (section 7's unguided sampler needs ``> 0``): ``move = k h``,
    ``a = cos(beta_j) / cos(beta_(i - k(i-j)))``, ``sigma = sqrt(max(0, 1 - a^2)) *
    noise_weight`` and ``guidance = scale * d(i)`` when ``i > cutoff`` (else 0); otherwise
    the plain Euler step ``move = h`` without guidance or noise.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"the predictor step k must be an integer >= 1, got {k!r}")

    def weight(i: int) -> float:
        return guidance.scale * decay_weight(i, num_timesteps, guidance.decay) if i > guidance.cutoff else 0.0

    return _plan(steps, num_timesteps, k, lambda i, t_pred: t_pred >= 0 and i != 0, guidance.noise_weight, weight)


# --------------------------------------------------------------------------- #
# Flow matching
# --------------------------------------------------------------------------- #
def step_times(steps: int) -> list[tuple[float, float]]:
    """(t_i, t_{i+1}) of each step: t_i = i dt, t_{i+1} = min(t_i + dt, 1), dt = 1 / steps."""
    dt = 1.0 / steps
    return [(i * dt, min(i * dt + dt, 1.0)) for i in range(steps)]


def stage_times(steps: int) -> list[tuple[float, float, float]]:
    """(t_i, t_i + dt/2, t_{i+1}) of each step: the times a fused solver stage evaluates at
    (a ``prdit_fast.flow_matching.FusedStage``'s ``time`` is the column)."""
    dt = 1.0 / steps
    return [(t, t + dt / 2, t_next) for t, t_next in step_times(steps)]


# --------------------------------------------------------------------------- #
# The engine's device tables
# --------------------------------------------------------------------------- #
class HasSchedule(Protocol):
    """Anything with ``IaNDiffusion.schedule``'s signature."""

    def schedule(self, steps: int, sampler: str = "pc", k: int = 2) -> list[SamplerStep]: ...


def step_table(plan: Sequence[SamplerStep], device: torch.device | str | None = None) -> torch.Tensor:
    """(len(plan), 5) fp32 rows [sin_i, cos_i, move, a, sigma] of a schedule (``ian_schedule``
    or ``guided_schedule``); rows without a corrector have a = 1, sigma = 0."""
    rows = [
        [st.sin_i, st.cos_i, st.move, st.a if st.corrector else 1.0, st.sigma if st.corrector else 0.0]
        for st in plan
    ]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def build_step_table(
    diffusion: HasSchedule, steps: int, sampler: str = "pc", k: int = 2, device: torch.device | str | None = None
) -> torch.Tensor:
    """(steps, 5) fp32 rows [sin_i, cos_i, move, a, sigma] of ``diffusion.schedule(steps, sampler, k)``
    (an ``IaNDiffusion``); rows without a corrector have a = 1, sigma = 0."""
    return step_table(diffusion.schedule(steps, sampler, k), device)


def time_table(steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(steps, 3) fp32 rows (t_i, t_i + dt/2, t_{i+1}) of ``stage_times``: the flow-matching
    engine's table, read at its device step counter."""
    return torch.tensor(stage_times(steps), dtype=torch.float32, device=device)
