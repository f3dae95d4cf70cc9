"""IaN diffusion against spec section 7: forward process, losses, the sampling grid, and
both samplers checked with an analytic denoiser that knows the answer."""
import math

import pytest
import torch

from prdit_fast.diffusion import NOISE_STD, IaNDiffusion
from prdit_fast.schedules import sampling_grid

T = 1000


def beta(t: int) -> float:
    return t / T * math.pi / 2


# --------------------------------------------------------------------------- forward process and losses
def test_q_sample_is_cos_x0_plus_sin_eps():
    diffusion = IaNDiffusion()
    x0, eps = torch.randn(3, 1, 4, 4, 4), 0.5 * torch.randn(3, 1, 4, 4, 4)
    t = torch.tensor([0, 500, 999])
    got = diffusion.q_sample(x0, t, eps)
    for b, step in enumerate(t.tolist()):
        want = math.cos(beta(step)) * x0[b] + math.sin(beta(step)) * eps[b]
        torch.testing.assert_close(got[b], want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[0], x0[0])  # t = 0 is the clean volume


def test_default_noise_has_standard_deviation_one_half():
    diffusion = IaNDiffusion()
    x0 = torch.zeros(4, 1, 16, 16, 16)
    xt = diffusion.q_sample(x0, torch.full((4,), 999))
    # x0 = 0: x_t = sin(beta) eps; 16384 samples, std error ~0.6%
    assert xt.std().item() == pytest.approx(NOISE_STD * math.sin(beta(999)), rel=0.02)


def test_training_losses_on_a_known_model():
    diffusion = IaNDiffusion()
    x0, eps = torch.randn(2, 1, 4, 4, 4), 0.5 * torch.randn(2, 1, 4, 4, 4)
    t = torch.tensor([250, 750])

    def model(x, t_in):  # eps_hat = x_t, x0_hat = 2 x_t
        assert torch.equal(t_in, t)
        return torch.cat([x, 2 * x], dim=1)

    losses = diffusion.training_losses(model, x0, t=t, noise=eps)
    xt = diffusion.q_sample(x0, t, eps)
    image = ((2 * xt - x0) ** 2).mean(dim=(1, 2, 3, 4))
    noise = ((xt - eps) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(losses["image_loss"], image)
    torch.testing.assert_close(losses["noise_loss"], noise)
    torch.testing.assert_close(losses["loss"], image + noise)
    assert losses["loss"].shape == (2,)


def test_training_losses_draw_t_and_noise_from_the_generator():
    diffusion = IaNDiffusion()
    x0 = torch.randn(4, 1, 4, 4, 4)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    a = diffusion.training_losses(model, x0, generator=torch.Generator().manual_seed(3))
    b = diffusion.training_losses(model, x0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(seen[0], seen[1]) and torch.equal(a["loss"], b["loss"])
    assert 0 <= seen[0].min() and seen[0].max() < T
    # zero predictions: noise loss = mean(eps^2), about 0.25 for std 0.5 (256 samples: loose bound)
    assert 0.15 < a["noise_loss"].mean().item() < 0.35


# --------------------------------------------------------------------------- sampling grid
@pytest.mark.parametrize(
    "steps, grid",
    [
        (1, [0]),
        (3, [666, 333, 0]),
        (7, [857, 714, 571, 428, 285, 142, 0]),
        (10, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
    ],
)
def test_sampling_grid(steps, grid):
    assert sampling_grid(steps, T) == grid


@pytest.mark.parametrize("steps", [2, 3, 7, 250, 333, 999, 1000])
def test_sampling_grid_has_exactly_steps_points_descending_to_zero(steps):
    grid = sampling_grid(steps, T)
    assert len(grid) == steps and grid[-1] == 0
    assert all(a > b for a, b in zip(grid, grid[1:]))
    if T % steps == 0:  # the official T - skip, ..., skip, 0
        assert grid == list(range(T - T // steps, -1, -(T // steps)))


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, "10"])
def test_sampling_grid_rejects_bad_step_counts(steps):
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 1000\]"):
        sampling_grid(steps, T)


@pytest.mark.parametrize("sampler, k", [("cold", 1), ("pc", 2), ("pc", 3)])
@pytest.mark.parametrize("steps", [3, 7])
def test_sampler_evaluates_the_model_exactly_steps_times_on_the_grid(sampler, k, steps):
    diffusion = IaNDiffusion()
    calls = []

    def model(x, t):
        calls.append(int(t[0]))
        assert torch.all(t == t[0])
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    diffusion.sample(model, torch.randn(2, 1, 4, 4, 4), steps, sampler=sampler, k=k)
    assert calls == sampling_grid(steps, T)


# --------------------------------------------------------------------------- samplers against an oracle
def oracle(volume: torch.Tensor):
    """The exact denoiser of a one-point data set: x0_hat = volume, and eps_hat the noise
    that x_t implies, (x_t - cos(beta) x0) / sin(beta) (0 at t = 0, where it is unused)."""

    def model(x, t):
        b = beta(int(t[0]))
        x0 = volume.expand_as(x)
        eps = (x - math.cos(b) * x0) / math.sin(b) if t[0] > 0 else torch.zeros_like(x)
        return torch.cat([eps, x0], dim=1)

    return model


@pytest.mark.parametrize("sampler, k", [("cold", 1), ("pc", 1), ("pc", 2), ("pc", 3)])
@pytest.mark.parametrize("steps, tol", [(10, 0.03), (100, 1e-3)])
def test_samplers_recover_the_volume_of_an_exact_denoiser(sampler, k, steps, tol):
    """Euler in beta leaves the circle by O(h^2) per step, so the final state converges to
    the target as steps grow (measured max abs error: 0.014 at 10 steps, 1.2e-4 at 100,
    for target values in [-1, 1])."""
    diffusion = IaNDiffusion()
    target = torch.rand(1, 1, 8, 8, 8) * 2 - 1
    noise = diffusion.initial_noise((2, 1, 8, 8, 8), generator=torch.Generator().manual_seed(1))
    x, x0_hat = diffusion.sample(oracle(target), noise, steps, sampler=sampler, k=k, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x0_hat, target.expand_as(x0_hat))
    err = (x - target).abs().max().item()
    assert err < tol, err
    assert (noise - target).abs().max().item() > 0.5  # the start was far away


def test_pc_with_k_1_is_the_cold_sampler():
    """k = 1 lands the predictor on j itself: a = 1 and the corrector adds no noise."""
    diffusion = IaNDiffusion()
    target = torch.rand(1, 1, 4, 4, 4)
    noise = diffusion.initial_noise((1, 1, 4, 4, 4), generator=torch.Generator().manual_seed(0))
    cold, _ = diffusion.sample(oracle(target), noise, 20, sampler="cold")
    pc, _ = diffusion.sample(oracle(target), noise, 20, sampler="pc", k=1, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(pc, cold, rtol=0, atol=1e-6)


def spec_pc_sampler(model, x, steps, k, generator):
    """Spec 7's hot predictor-corrector sampler, written from the text."""
    grid = sampling_grid(steps, T)
    x0_hat = None
    for n, i in enumerate(grid):
        j = grid[n + 1] if n + 1 < len(grid) else 0
        out = model(x, torch.full((x.shape[0],), i))
        eps_hat, x0_hat = out[:, :1], out[:, 1:]
        f = math.sin(beta(i)) * x0_hat - math.cos(beta(i)) * eps_hat
        h = (j - i) * (math.pi / 2) / T
        t_pred = i - k * (i - j)
        if t_pred > 0:
            x_pred = x - k * h * f
            a = math.cos(beta(j)) / math.cos(beta(t_pred))
            x = a * x_pred + math.sqrt(max(0.0, 1 - a * a)) * 0.5 * torch.randn(x.shape, generator=generator)
        else:
            x = x - h * f
    return x, x0_hat


@pytest.mark.parametrize("k, steps", [(2, 10), (3, 7)])
def test_pc_sampler_follows_the_spec_step_by_step(k, steps):
    torch.manual_seed(0)
    w = torch.randn(2, 1, 1, 1, 1)

    def model(x, t):  # any smooth, t-dependent network will do
        return torch.cat([torch.tanh(w[0] * x), torch.sin(w[1] * x + t.view(-1, 1, 1, 1, 1) / T)], dim=1)

    x = 0.5 * torch.randn(2, 1, 4, 4, 4)
    got = IaNDiffusion().sample(model, x, steps, "pc", k, generator=torch.Generator().manual_seed(9))
    want = spec_pc_sampler(model, x, steps, k, torch.Generator().manual_seed(9))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_schedule_scalars_for_ten_steps_and_k_2():
    plan = IaNDiffusion().schedule(10, "pc", 2)
    assert [s.t for s in plan] == sampling_grid(10, T)
    # predictor lands at i - 200 > 0 for i >= 300: 7 corrector steps, then plain Euler
    assert [s.corrector for s in plan] == [True] * 7 + [False] * 3
    first = plan[0]
    h = -100 * math.pi / 2 / T
    assert first.move == pytest.approx(2 * h)
    assert first.a == pytest.approx(math.cos(beta(800)) / math.cos(beta(700)))
    assert first.sigma == pytest.approx(math.sqrt(1 - first.a**2) * 0.5)
    assert plan[-1].t == 0 and plan[-1].move == 0.0


def test_sampling_is_reproducible_with_a_generator():
    diffusion = IaNDiffusion()
    model = oracle(torch.rand(1, 1, 4, 4, 4))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        noise = diffusion.initial_noise((1, 1, 4, 4, 4), generator=g)
        return diffusion.sample(model, noise, 10, "pc", 2, generator=g)[0]

    assert torch.equal(run(4), run(4))
    assert not torch.equal(run(4), run(5))


# --------------------------------------------------------------------------- errors
def test_invalid_sampler_k_and_steps_are_rejected():
    diffusion = IaNDiffusion()
    model = oracle(torch.zeros(1, 1, 4, 4, 4))
    x = torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="sampler must be 'cold' or 'pc'"):
        diffusion.sample(model, x, 5, sampler="hot")
    for k in (0, -1, 1.5):
        with pytest.raises(ValueError, match="predictor step k must be an integer >= 1"):
            diffusion.sample(model, x, 5, sampler="pc", k=k)
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="steps must be an integer"):
            diffusion.sample(model, x, steps)
