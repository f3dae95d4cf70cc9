"""IaN diffusion with the angular schedule (spec section 7).

    beta_t = (t / T) (pi / 2),   x_t = cos(beta_t) x0 + sin(beta_t) eps,   eps = 0.5 N(0, I)

The model predicts [eps_hat, x0_hat] along channels. Sampling evaluates the model
on the grid i_n = floor(n T / steps), n = steps-1 .. 0, and moves x with the cold
Euler sampler or the hot predictor-corrector sampler of step k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

NOISE_STD = 0.5


def sampling_grid(steps: int, num_timesteps: int) -> list[int]:
    """Descending evaluation points floor(n T / steps), n = steps-1 .. 0.

    For steps dividing T this is T-skip, ..., skip, 0 with skip = T / steps. For other
    counts the points are unevenly spaced by at most one step; exactly ``steps`` model
    evaluations are made (nothing is rounded to a divisor of T).
    """
    if not isinstance(steps, int) or steps < 1 or steps > num_timesteps:
        raise ValueError(f"steps must be an integer in [1, {num_timesteps}], got {steps!r}")
    return [n * num_timesteps // steps for n in range(steps - 1, -1, -1)]


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
    sigma: float  # sqrt(max(0, 1 - a^2)) * 0.5
    corrector: bool


class IaNDiffusion:
    """IaN diffusion: forward process, training losses and the two samplers."""

    def __init__(self, num_timesteps: int = 1000):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = num_timesteps

    def beta(self, t: torch.Tensor | float) -> torch.Tensor | float:
        """beta_t = (t / T) (pi / 2); float in, float out; tensor in, fp32 tensor out."""
        if isinstance(t, torch.Tensor):
            return t.float() * (math.pi / 2 / self.num_timesteps)
        return t / self.num_timesteps * (math.pi / 2)

    # ----------------------------------------------------------------- training
    def initial_noise(self, shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32):
        """The sampler's start x_T = 0.5 N(0, I)."""
        return NOISE_STD * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = cos(beta_t) x0 + sin(beta_t) eps. x0: (B, ...), t: (B,) int."""
        if noise is None:
            noise = NOISE_STD * torch.randn_like(x0)
        beta = self.beta(t).to(x0.device).view(-1, *([1] * (x0.dim() - 1)))
        return (torch.cos(beta) * x0 + torch.sin(beta) * noise).to(x0.dtype)

    def training_losses(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses, each (B,): ``image_loss`` mean((x0_hat - x0)^2),
        ``noise_loss`` mean((eps_hat - eps)^2) and their sum ``loss``.

        t defaults to U{0..T-1} per sample and noise to 0.5 N(0, I), both drawn from
        ``generator`` when given.
        """
        B, C = x0.shape[:2]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (B,), generator=generator, device=x0.device)
        if noise is None:
            noise = NOISE_STD * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        out = model(self.q_sample(x0, t, noise), t)
        eps_hat, x0_hat = out[:, :C].float(), out[:, C:].float()
        dims = tuple(range(1, x0.dim()))
        image = (x0_hat - x0.float()).pow(2).mean(dims)
        noise_loss = (eps_hat - noise.float()).pow(2).mean(dims)
        return {"loss": image + noise_loss, "image_loss": image, "noise_loss": noise_loss}

    # ----------------------------------------------------------------- sampling
    def schedule(self, steps: int, sampler: str = "pc", k: int = 2) -> list[SamplerStep]:
        """The per-step scalars of ``sampler`` ('cold' or 'pc') for ``steps`` evaluations."""
        if sampler not in ("cold", "pc"):
            raise ValueError(f"sampler must be 'cold' or 'pc', got {sampler!r}")
        if sampler == "pc" and (not isinstance(k, int) or k < 1):
            raise ValueError(f"the predictor step k must be an integer >= 1, got {k!r}")
        grid = sampling_grid(steps, self.num_timesteps)
        out = []
        for n, i in enumerate(grid):
            j = grid[n + 1] if n + 1 < len(grid) else 0
            h = (j - i) * (math.pi / 2) / self.num_timesteps
            b_i = self.beta(i)
            t_pred = i - k * (i - j)
            if sampler == "pc" and t_pred > 0:
                a = math.cos(self.beta(j)) / math.cos(self.beta(t_pred))
                sigma = math.sqrt(max(0.0, 1.0 - a * a)) * NOISE_STD
                out.append(SamplerStep(i, j, math.sin(b_i), math.cos(b_i), k * h, a, sigma, True))
            else:
                out.append(SamplerStep(i, j, math.sin(b_i), math.cos(b_i), h, 1.0, 0.0, False))
        return out

    @torch.no_grad()
    def sample(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise: torch.Tensor,
        steps: int,
        sampler: str = "pc",
        k: int = 2,
        generator: torch.Generator | None = None,
        progress: bool = False,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the sampler from x_T = ``noise`` (B, C, S, S, S), e.g. ``initial_noise``.

        Returns (x, x0_hat): the final state and the x0 prediction of the last model
        call (at t = 0). Everything stays on ``noise``'s device; the corrector noise is
        drawn from ``generator`` (on that device). ``callback(step, x, x0_hat)``, if
        given, sees each step's result; nothing else is kept.
        """
        x = noise
        C = x.shape[1]
        x0_hat = None
        plan = self.schedule(steps, sampler, k)
        if progress:
            from tqdm.auto import tqdm

            plan = tqdm(plan, desc=f"{sampler} sampling", unit="step")
        for n, st in enumerate(plan):
            t = torch.full((x.shape[0],), st.t, device=x.device, dtype=torch.long)
            out = model(x, t)
            eps_hat, x0_hat = out[:, :C].to(x.dtype), out[:, C:].to(x.dtype)
            f = st.sin_i * x0_hat - st.cos_i * eps_hat
            x = x - st.move * f
            if st.corrector:
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = st.a * x + st.sigma * z
            if callback is not None:
                callback(n, x, x0_hat)
        return x, x0_hat
