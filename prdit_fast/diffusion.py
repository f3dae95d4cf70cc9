"""IaN diffusion with the angular schedule (spec section 7).

    beta_t = (t / T) (pi / 2),   x_t = cos(beta_t) x0 + sin(beta_t) eps,   eps = noise_std N(0, I)

noise_std is 0.5 for PRDiT and 1.0 for the TF-PRDiT reconstruction prior (spec section 15).
The model predicts [eps_hat, x0_hat] along channels. Sampling evaluates the model
on the grid i_n = floor(n T / steps), n = steps-1 .. 0, and moves x with the cold
Euler sampler or the hot predictor-corrector sampler of step k; ``sample_guided`` is the
measurement-guided predictor-corrector sampler of spec section 15.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .measurements import Loss, guidance_gradient
from .schedules import NOISE_STD, NOISE_STD_TF, Guidance, SamplerStep, decay_weight, guided_schedule, ian_schedule


def default_noise_std(norm: str) -> float:
    """The IaN noise scale of the official work of each network variant: 0.5 for PRDiT
    (norm "layer"), 1.0 for TF-PRDiT (norm "rms")."""
    return NOISE_STD_TF if norm == "rms" else NOISE_STD


def diffusion_for(model: torch.nn.Module) -> "IaNDiffusion":
    """The IaN process a network was trained with: the ``noise_std`` ``load_checkpoint`` gave
    it (a fast backend: its reference's), else the default of its norm."""
    network = getattr(model, "reference", model)  # FastPRDiT wraps the loaded PRDiT
    noise_std = getattr(network, "noise_std", None)
    if noise_std is None:
        config = network.config
        noise_std = default_noise_std(getattr(config, "base", config).norm)  # PRDiT-SR: its base network's
    return IaNDiffusion(noise_std=noise_std)


class IaNDiffusion:
    """IaN diffusion: forward process, training losses and the samplers.

    noise_std: the standard deviation of eps and of the sampler's start (0.5 PRDiT, 1.0
    TF-PRDiT; ``default_noise_std``); a checkpoint's is ``load_checkpoint(...).noise_std``.
    """

    def __init__(self, num_timesteps: int = 1000, noise_std: float = NOISE_STD):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        if not (isinstance(noise_std, (int, float)) and noise_std > 0):
            raise ValueError(f"noise_std must be a positive number (0.5 PRDiT, 1.0 TF-PRDiT), got {noise_std!r}")
        self.num_timesteps = num_timesteps
        self.noise_std = float(noise_std)

    def beta(self, t: torch.Tensor | float) -> torch.Tensor | float:
        """beta_t = (t / T) (pi / 2); float in, float out; tensor in, fp32 tensor out."""
        if isinstance(t, torch.Tensor):
            return t.float() * (math.pi / 2 / self.num_timesteps)
        return t / self.num_timesteps * (math.pi / 2)

    # ----------------------------------------------------------------- training
    def initial_noise(self, shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32):
        """The sampler's start x_T = noise_std N(0, I)."""
        return self.noise_std * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = cos(beta_t) x0 + sin(beta_t) eps. x0: (B, ...), t: (B,) int."""
        if noise is None:
            noise = self.noise_std * torch.randn_like(x0)
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

        t defaults to U{0..T-1} per sample and noise to noise_std N(0, I), both drawn from
        ``generator`` when given.
        """
        B, C = x0.shape[:2]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (B,), generator=generator, device=x0.device)
        if noise is None:
            noise = self.noise_std * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        out = model(self.q_sample(x0, t, noise), t)
        eps_hat, x0_hat = out[:, :C].float(), out[:, C:].float()
        dims = tuple(range(1, x0.dim()))
        image = (x0_hat - x0.float()).pow(2).mean(dims)
        noise_loss = (eps_hat - noise.float()).pow(2).mean(dims)
        return {"loss": image + noise_loss, "image_loss": image, "noise_loss": noise_loss}

    # ----------------------------------------------------------------- sampling
    def schedule(self, steps: int, sampler: str = "pc", k: int = 2) -> list[SamplerStep]:
        """The per-step scalars of ``sampler`` ('cold' or 'pc') for ``steps`` evaluations
        (``prdit_fast.schedules.ian_schedule``)."""
        return ian_schedule(steps, self.num_timesteps, self.noise_std, sampler, k)

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

    # ----------------------------------------------------------------- guided sampling
    def guidance_decay(self, t: int, decay: str) -> float:
        """d(i) of spec section 15: 1 for "none", (1 + cos((1 - i/T) pi)) / 2 for "cosine"."""
        return decay_weight(t, self.num_timesteps, decay)

    def guided_schedule(
        self,
        steps: int,
        k: int,
        guidance_scale: float,
        guidance_decay: str = "none",
        guidance_cutoff: int = 0,
        noise_weight: float = 1.0,
    ) -> list[SamplerStep]:
        """The per-step scalars of the guided sampler (spec section 15;
        ``prdit_fast.schedules.guided_schedule``)."""
        guidance = Guidance(guidance_scale, guidance_decay, guidance_cutoff, noise_weight)
        return guided_schedule(steps, self.num_timesteps, k, guidance)

    def sample_guided(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise: torch.Tensor,
        loss: Loss,
        y: torch.Tensor,
        steps: int,
        k: int,
        guidance_scale: float,
        guidance_decay: str = "none",
        guidance_cutoff: int = 0,
        noise_weight: float = 1.0,
        generator: torch.Generator | None = None,
        progress: bool = False,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Measurement-guided predictor-corrector sampling (spec section 15).

        noise: x_T (B, C, S, S, S), e.g. ``initial_noise``. loss: a
        ``prdit_fast.measurements.MeasurementOperator`` A (the loss is then
        ``||A(x0_hat) - y||_2`` per volume, summed over the batch: for one volume exactly the
        spec's one norm over all elements) or any differentiable ``(x0_hat, y) -> scalar or
        (B,)`` callable. y: the observations, batch first. At each step the network runs
        without gradients; ``g = dL/dx0_hat`` goes through the loss only, and
        ``x_pred = x - k h f - guidance_scale d(i) g`` (see ``guided_schedule``), then
        ``x <- a x_pred + sqrt(max(0, 1 - a^2)) noise_weight N(0, I)`` (noise from
        ``generator``). Returns (x, x0_hat): the final state and the x0 prediction of the
        last model call, the reconstruction.
        """
        plan = self.guided_schedule(steps, k, guidance_scale, guidance_decay, guidance_cutoff, noise_weight)
        x = noise
        C = x.shape[1]
        x0_hat = None
        if progress:
            from tqdm.auto import tqdm

            plan = tqdm(plan, desc="guided sampling", unit="step")
        for n, st in enumerate(plan):
            t = torch.full((x.shape[0],), st.t, device=x.device, dtype=torch.long)
            with torch.no_grad():
                out = model(x, t)
            eps_hat, x0_hat = out[:, :C].to(x.dtype), out[:, C:].to(x.dtype)
            f = st.sin_i * x0_hat - st.cos_i * eps_hat
            x = x - st.move * f
            if st.guidance:
                x = x - st.guidance * guidance_gradient(loss, x0_hat, y)
            if st.corrector:
                x = st.a * x
                if st.sigma:  # noise_weight 0: deterministic, nothing drawn
                    x = x + st.sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if callback is not None:
                callback(n, x, x0_hat)
        return x, x0_hat
