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
from dataclasses import dataclass
from typing import Callable

import torch

from .measurements import Loss, guidance_gradient

NOISE_STD = 0.5  # PRDiT (spec section 7)
NOISE_STD_TF = 1.0  # TF-PRDiT, the reconstruction prior (spec section 15)
GUIDANCE_DECAYS = ("none", "cosine")


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
    sigma: float  # sqrt(max(0, 1 - a^2)) * noise_std (guided: * noise_weight)
    corrector: bool
    # guided sampling (spec section 15): x_pred -= guidance * dL/dx0_hat; 0 means no
    # gradient is taken at this step
    guidance: float = 0.0


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
        """The per-step scalars of ``sampler`` ('cold' or 'pc') for ``steps`` evaluations."""
        if sampler not in ("cold", "pc"):
            raise ValueError(f"sampler must be 'cold' or 'pc', got {sampler!r}")
        if sampler == "pc" and (not isinstance(k, int) or k < 1):
            raise ValueError(f"the predictor step k must be an integer >= 1, got {k!r}")
        return self._plan(steps, k, lambda i, t_pred: sampler == "pc" and t_pred > 0, self.noise_std)

    def _plan(
        self,
        steps: int,
        k: int,
        predicts: Callable[[int, int], bool],
        noise_scale: float,
        guidance: Callable[[int], float] = lambda i: 0.0,
    ) -> list[SamplerStep]:
        """The steps on the section 7 grid: where ``predicts(i, t_pred)`` the predictor-corrector
        step (corrector noise ``noise_scale``, guidance weight ``guidance(i)``), else Euler."""
        grid = sampling_grid(steps, self.num_timesteps)
        out = []
        for n, i in enumerate(grid):
            j = grid[n + 1] if n + 1 < len(grid) else 0
            h = (j - i) * (math.pi / 2) / self.num_timesteps
            b_i = self.beta(i)
            t_pred = i - k * (i - j)
            if predicts(i, t_pred):
                a = math.cos(self.beta(j)) / math.cos(self.beta(t_pred))
                sigma = math.sqrt(max(0.0, 1.0 - a * a)) * noise_scale
                out.append(SamplerStep(i, j, math.sin(b_i), math.cos(b_i), k * h, a, sigma, True, guidance(i)))
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

    # ----------------------------------------------------------------- guided sampling
    def guidance_decay(self, t: int, decay: str) -> float:
        """d(i) of spec section 15: 1 for "none", (1 + cos((1 - i/T) pi)) / 2 for "cosine"."""
        if decay == "cosine":
            return (1.0 + math.cos((1.0 - t / self.num_timesteps) * math.pi)) / 2.0
        return 1.0

    def guided_schedule(
        self,
        steps: int,
        k: int,
        guidance_scale: float,
        guidance_decay: str = "none",
        guidance_cutoff: int = 0,
        noise_weight: float = 1.0,
    ) -> list[SamplerStep]:
        """The per-step scalars of the guided sampler (spec section 15).

        Step i -> j takes the predictor-corrector branch when ``i - k (i - j) >= 0`` and
        ``i != 0`` (section 7's unguided sampler needs ``> 0``): ``move = k h``,
        ``a = cos(beta_j) / cos(beta_(i - k(i-j)))``, ``sigma = sqrt(max(0, 1 - a^2)) *
        noise_weight`` and ``guidance = guidance_scale * d(i)`` when ``i > guidance_cutoff``
        (else 0); otherwise the plain Euler step ``move = h`` without guidance or noise.
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"the predictor step k must be an integer >= 1, got {k!r}")
        if guidance_decay not in GUIDANCE_DECAYS:
            raise ValueError(f"guidance_decay must be one of {GUIDANCE_DECAYS}, got {guidance_decay!r}")
        if not (isinstance(guidance_scale, (int, float)) and guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
        if not (isinstance(noise_weight, (int, float)) and noise_weight >= 0):
            raise ValueError(f"noise_weight must be a number >= 0, got {noise_weight!r}")
        if not isinstance(guidance_cutoff, int) or guidance_cutoff < 0:
            raise ValueError(f"guidance_cutoff must be an integer step >= 0, got {guidance_cutoff!r}")

        def guidance(i: int) -> float:
            return guidance_scale * self.guidance_decay(i, guidance_decay) if i > guidance_cutoff else 0.0

        return self._plan(steps, k, lambda i, t_pred: t_pred >= 0 and i != 0, noise_weight, guidance)

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
