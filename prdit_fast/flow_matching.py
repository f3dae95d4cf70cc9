"""Flow matching, the process of the released 256^3 PRDiT models (spec section 14).

    z ~ N(0, I),   x_t = (1 - t) z + t x,   v = x - z,   t ~ U(0, 1)

The network has the velocity head (``out_channels`` = C) and receives ``1000 t`` as a
float. Sampling integrates dx/dt = v(x, t) from x = z at t = 0 to t = 1 in ``steps``
steps of dt = 1/steps, t_i = i dt, with one of five solvers:

    solver    network evaluations per step
    euler     1    x <- x + dt v
    heun      2    x_e = x + dt v;  x <- x + dt (v + v(x_e, t_{i+1})) / 2
    rk4       4    classic Runge-Kutta
    pc        1    x_data = x + (1 - t_i) v, x_noise = x - t_i v refreshed with noise of
                   weight eta, x <- t_{i+1} x_data + (1 - t_{i+1}) x_noise (eta = 0: Euler)
    pc_heun   2    the same around the Heun state, with a per-sample noise weight gated by
                   the Heun/Euler disagreement relative to dt^2 err_target (eta = 0: Heun)

``solver_step`` is the one place these formulas live: the reference loop here
(``FlowMatching.sample``) calls it with Python-float times and ``torch.randn`` noise.
``fused_stages`` writes the same formulas as the linear stages of the fused update
(``prdit_fast.ops.flow_update``), which the CUDA-graph engine (``prdit_fast.engine.Sampler``)
runs with device-tensor times read at a device step counter and per-volume Philox noise;
pc_heun with eta > 0 (a per-sample gate from two reductions) has no fused form and the
engine runs ``solver_step`` for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch

from .schedules import step_times

TIME_SCALE = 1000.0  # the network sees 1000 t
# network evaluations per step of each solver
SOLVERS: dict[str, int] = {"euler": 1, "heun": 2, "rk4": 4, "pc": 1, "pc_heun": 2}
NOISY_SOLVERS = ("pc", "pc_heun")
DEFAULT_SOLVER = "euler"
DEFAULT_STEPS = 100  # the official default: 100 Euler steps
_RMS_FLOOR = 1e-6  # the official relative-error denominator's guard

# A time: a Python float (the reference loop) or a one-element device tensor that
# broadcasts against the volume (the engine, which reads it from a table on the device).
Time = Union[float, torch.Tensor]
Velocity = Callable[[torch.Tensor, Time], torch.Tensor]


def check_solver(steps: int, solver: str, eta: float = 0.0, err_target: float = 1.0) -> None:
    """ValueError with what to pass instead, for a bad steps / solver / eta / err_target."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {list(SOLVERS)}, got {solver!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    if eta != 0.0 and solver not in NOISY_SOLVERS:
        raise ValueError(f"eta applies to the solvers {list(NOISY_SOLVERS)} only; solver {solver!r} takes eta=0")
    if not isinstance(err_target, (int, float)) or isinstance(err_target, bool) or not err_target > 0.0:
        raise ValueError(f"err_target must be a number > 0, got {err_target!r}")
    if not math.isfinite(err_target):
        raise ValueError(f"err_target must be finite, got {err_target!r}")


def nfe(steps: int, solver: str) -> int:
    """Network evaluations of a ``steps``-step sample with ``solver``."""
    check_solver(steps, solver)
    return steps * SOLVERS[solver]


@dataclass(frozen=True)
class FusedStage:
    """One network evaluation of a solver step, as ``ops.flow_update`` runs it on three states:
    x (the sampler state), ``probe`` (the state a later evaluation reads) and ``acc`` (the
    accumulated update of heun / rk4).

    source: the state the network evaluates ("x" or "probe"), at ``schedules.stage_times`` column
    ``time``; then ``target = c_x base + c_v v + c_z z`` and, where ``accumulate`` names
    a state, ``acc = accumulate + c_acc v``; ``coef``: per step [c_x, c_v, c_z, c_acc];
    ``noisy``: c_z is nonzero somewhere (Philox noise at counter n + 1).
    """

    source: str
    time: int
    base: str
    target: str
    accumulate: str | None
    noisy: bool
    coef: tuple[tuple[float, float, float, float], ...]


def fused_stages(steps: int, solver: str, eta: float = 0.0, err_target: float = 1.0) -> list[FusedStage] | None:
    """``solver_step`` as fused stages (``FusedStage``), or None where it has none (pc_heun
    with eta > 0). Every stage's result equals ``solver_step``'s up to float rounding."""
    check_solver(steps, solver, eta, err_target)
    dt = 1.0 / steps

    def rows(c_x: float, c_v: float, c_acc: float = 0.0) -> tuple:
        return ((c_x, c_v, 0.0, c_acc),) * steps

    if solver == "pc_heun":
        if eta != 0.0:
            return None
        solver = "heun"  # eta = 0: Heun, as solver_step
    if solver == "euler" or (solver == "pc" and eta == 0.0):
        return [FusedStage("x", 0, "x", "x", None, False, rows(1.0, dt))]
    if solver == "pc":
        # t' x_data + (1 - t') (keep x_noise + eta z), x_data = x + (1 - t) v, x_noise = x - t v
        keep = math.sqrt(1.0 - eta * eta)
        coef = tuple((t_next + (1 - t_next) * keep, t_next * (1 - t) - (1 - t_next) * keep * t, (1 - t_next) * eta, 0.0)
                     for t, t_next in step_times(steps))
        return [FusedStage("x", 0, "x", "x", None, True, coef)]
    if solver == "heun":
        # probe = x + dt v; acc = x + dt/2 v; x = acc + dt/2 v'
        return [FusedStage("x", 0, "x", "probe", "x", False, rows(1.0, dt, dt / 2)),
                FusedStage("probe", 2, "acc", "x", None, False, rows(1.0, dt / 2))]
    # rk4: probes x + dt/2 k1, x + dt/2 k2, x + dt k3; acc = x + dt/6 k1 + dt/3 k2 + dt/3 k3; x = acc + dt/6 k4
    return [FusedStage("x", 0, "x", "probe", "x", False, rows(1.0, dt / 2, dt / 6)),
            FusedStage("probe", 1, "x", "probe", "acc", False, rows(1.0, dt / 2, dt / 3)),
            FusedStage("probe", 1, "x", "probe", "acc", False, rows(1.0, dt, dt / 3)),
            FusedStage("probe", 2, "acc", "x", None, False, rows(1.0, dt / 6))]


def _per_sample_rms(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) root mean square over everything but the batch."""
    return x.pow(2).mean(dim=tuple(range(1, x.dim()))).sqrt()


def _heun(x: torch.Tensor, v: torch.Tensor, v_next: torch.Tensor, dt: float) -> torch.Tensor:
    return x + dt * (v + v_next) / 2


def _refresh(x_data, x_noise, t_next: Time, keep, weight, noise: Callable[[], torch.Tensor]) -> torch.Tensor:
    """t_{i+1} x_data + (1 - t_{i+1}) (keep x_noise + weight z)."""
    x_noise = keep * x_noise + weight * noise()
    return t_next * x_data + (1 - t_next) * x_noise


def solver_step(
    velocity: Velocity,
    x: torch.Tensor,
    t: Time,
    t_next: Time,
    dt: float,
    solver: str,
    eta: float = 0.0,
    err_target: float = 1.0,
    noise: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One step of ``solver`` from x at time t to t_next = min(t + dt, 1) (spec section 14).

    velocity(x, t) -> v, x's shape and dtype; t, t_next: floats or one-element tensors on
    x's device; noise() -> a fresh N(0, I) tensor like x (pc / pc_heun with eta > 0 only,
    called once per step). Nothing is read back to the host: pc_heun's per-sample gate is
    computed on the device. Returns the new x.
    """
    if solver in ("euler", "pc") and (solver == "euler" or eta == 0.0):
        return x + dt * velocity(x, t)
    if solver == "pc":
        v = velocity(x, t)
        return _refresh(x + (1 - t) * v, x - t * v, t_next, math.sqrt(1.0 - eta * eta), eta, noise)
    if solver == "rk4":
        half = t + dt / 2
        k1 = velocity(x, t)
        k2 = velocity(x + dt / 2 * k1, half)
        k3 = velocity(x + dt / 2 * k2, half)
        k4 = velocity(x + dt * k3, t_next)
        return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    if solver not in ("heun", "pc_heun"):
        raise ValueError(f"solver must be one of {list(SOLVERS)}, got {solver!r}")
    v = velocity(x, t)
    x_euler = x + dt * v
    v_next = velocity(x_euler, t_next)
    x_heun = _heun(x, v, v_next, dt)
    if solver == "heun" or eta == 0.0:
        return x_heun
    # per sample: the Heun/Euler disagreement, relative to the state and to dt^2 err_target
    err = _per_sample_rms(x_heun - x_euler) / (_per_sample_rms(x_heun) + _RMS_FLOOR)
    eta_t = eta * torch.clamp(err / (dt * dt) / err_target, max=1.0) * (1 - t_next)  # (B,)
    eta_t = eta_t.view(-1, *([1] * (x.dim() - 1)))
    keep = torch.sqrt(torch.clamp(1 - eta_t * eta_t, min=0.0))
    return _refresh(x_heun + (1 - t_next) * v_next, x_heun - t_next * v_next, t_next, keep, eta_t, noise)


class FlowMatching:
    """The flow-matching process: forward interpolation, training loss and the solvers."""

    time_scale = TIME_SCALE

    def initial_noise(self, shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32):
        """The sampler's start z ~ N(0, I) (std 1, unlike IaN's 0.5)."""
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def interpolate(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) z + t x. x, noise: (B, ...); t: (B,) in [0, 1]."""
        tb = t.to(device=x.device, dtype=torch.float32).view(-1, *([1] * (x.dim() - 1)))
        return ((1 - tb) * noise + tb * x).to(x.dtype)

    def training_losses(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses, each (B,): ``velocity_loss`` mean((v_hat - (x - z))^2) over
        C, D, H, W, and ``loss`` (the same: flow matching has one term).

        x: (B, C, S, S, S) data; t (B,) defaults to U(0, 1) and noise z to N(0, I), both
        drawn from ``generator`` when given. The model sees (x_t, 1000 t).
        """
        B = x.shape[0]
        if t is None:
            t = torch.rand((B,), generator=generator, device=x.device)
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},) (one time in [0, 1] per sample), got {tuple(t.shape)}")
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        v_hat = model(self.interpolate(x, t, noise), TIME_SCALE * t.float())
        target = x.float() - noise.float()
        velocity = (v_hat.float() - target).pow(2).mean(dim=tuple(range(1, x.dim())))
        return {"loss": velocity, "velocity_loss": velocity}

    @torch.no_grad()
    def sample(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise: torch.Tensor,
        steps: int = DEFAULT_STEPS,
        solver: str = DEFAULT_SOLVER,
        eta: float = 0.0,
        err_target: float = 1.0,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Integrate from x = ``noise`` (B, C, S, S, S), e.g. ``initial_noise``, at t = 0 to
        t = 1 and return the final x (data scale [-1, 1]).

        Everything stays on ``noise``'s device: no trajectory is kept, nothing is copied to
        or read back by the host inside the loop. pc / pc_heun noise is drawn from
        ``generator`` (on that device). ``nfe(steps, solver)`` network evaluations.
        """
        check_solver(steps, solver, eta, err_target)
        x = noise
        B = x.shape[0]

        def velocity(state: torch.Tensor, t: float) -> torch.Tensor:
            time = torch.full((B,), TIME_SCALE * t, device=state.device, dtype=torch.float32)
            return model(state, time).to(state.dtype)

        def fresh_noise() -> torch.Tensor:
            return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

        plan = step_times(steps)
        if progress:
            from tqdm.auto import tqdm

            plan = tqdm(plan, desc=f"{solver} sampling", unit="step")
        dt = 1.0 / steps
        for t, t_next in plan:
            x = solver_step(velocity, x, t, t_next, dt, solver, eta, err_target, fresh_noise)
        return x
