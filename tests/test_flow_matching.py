"""Flow matching (spec section 14): the loss, the five solvers against the exact velocity
of Gaussian data, and their errors."""
import math

import pytest
import torch

from prdit_fast import FlowMatching
from prdit_fast.flow_matching import SOLVERS, check_solver, nfe, solver_step
from prdit_fast.schedules import step_times

SIGMA = 0.5  # data std of the analytic case


def gaussian_velocity(sigma: float = SIGMA):
    """The exact velocity of data x ~ N(0, sigma^2 I) as a 'model' taking (x, 1000 t):
    v*(x, t) = (t s^2 - (1 - t)) / ((1 - t)^2 + t^2 s^2) x. Its flow maps z to sigma z."""

    def model(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        t = (time.double() / 1000).view(-1, *([1] * (x.dim() - 1)))
        return ((t * sigma**2 - (1 - t)) / ((1 - t) ** 2 + t**2 * sigma**2) * x).to(x.dtype)

    return model


def final_error(solver: str, steps: int) -> float:
    """max |x(1) / z - sigma|: the flow is linear, so the relative error is the same for every z."""
    z = torch.randn(3, 1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = FlowMatching().sample(gaussian_velocity(), z, steps, solver)
    return (x / z - SIGMA).abs().max().item()


# --------------------------------------------------------------------------- deterministic solvers
def test_euler_with_many_steps_ends_at_std_sigma():
    z = torch.randn(8, 1, 16, 16, 16, dtype=torch.float64)
    x = FlowMatching().sample(gaussian_velocity(), z, 1000, "euler")
    assert (x / z - SIGMA).abs().max().item() < 1e-3  # first order: relative error ~ 0.6 / steps
    assert x.std().item() == pytest.approx(SIGMA * z.std().item(), rel=2e-3)
    assert x.std().item() == pytest.approx(SIGMA, rel=0.01)  # 32768 samples


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2), ("rk4", 4)])
def test_solvers_converge_at_their_order(solver, order):
    coarse, fine = final_error(solver, 16), final_error(solver, 32)
    # halving dt divides the error by about 2^order (measured 16 -> 32 steps: 1.96, 3.6, 4.3;
    # rk4 is still far from its asymptote there, but 3 orders of magnitude below Heun)
    assert coarse / fine > {1: 1.9, 2: 3.2, 4: 4.0}[order]
    assert fine < {1: 0.03, 2: 5e-4, 4: 1e-7}[order]


def test_heun_and_rk4_beat_euler_at_equal_cost():
    assert final_error("heun", 50) < final_error("euler", 100) / 10
    assert final_error("rk4", 25) < final_error("heun", 50) / 10


def test_eta_zero_pc_is_euler_and_pc_heun_is_heun_exactly():
    fm, model = FlowMatching(), gaussian_velocity()
    z = torch.randn(2, 1, 8, 8, 8)
    for noisy, plain in (("pc", "euler"), ("pc_heun", "heun")):
        assert torch.equal(fm.sample(model, z, 7, noisy, eta=0.0), fm.sample(model, z, 7, plain))


# --------------------------------------------------------------------------- noisy solvers, transcribed
def pc_loop(model, z, steps, eta, noises):
    """Spec section 14's pc, written out."""
    x, dt = z, 1.0 / steps
    for i in range(steps):
        t, t1 = i * dt, min(i * dt + dt, 1.0)
        v = model(x, torch.full((x.shape[0],), 1000 * t))
        x_data, x_noise = x + (1 - t) * v, x - t * v
        x_noise = math.sqrt(1 - eta**2) * x_noise + eta * noises[i]
        x = t1 * x_data + (1 - t1) * x_noise
    return x


def pc_heun_loop(model, z, steps, eta, err_target, noises):
    """Spec section 14's pc_heun, written out per sample."""
    x, dt = z.clone(), 1.0 / steps
    for i in range(steps):
        t, t1 = i * dt, min(i * dt + dt, 1.0)
        v = model(x, torch.full((x.shape[0],), 1000 * t))
        x_e = x + dt * v
        v2 = model(x_e, torch.full((x.shape[0],), 1000 * t1))
        x_h = x + dt * (v + v2) / 2
        for b in range(x.shape[0]):
            rms = lambda a: a.pow(2).mean().sqrt()  # noqa: E731
            err = rms(x_h[b] - x_e[b]) / (rms(x_h[b]) + 1e-6)
            eta_t = eta * min(err.item() / dt**2 / err_target, 1.0) * (1 - t1)
            x_data, x_noise = x_h[b] + (1 - t1) * v2[b], x_h[b] - t1 * v2[b]
            x_noise = math.sqrt(max(1 - eta_t**2, 0.0)) * x_noise + eta_t * noises[i][b]
            x[b] = t1 * x_data + (1 - t1) * x_noise
    return x


def recorded_noises(steps, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_pc_matches_the_spec(eta):
    z = torch.randn(2, 1, 6, 6, 6, dtype=torch.float64)
    got = FlowMatching().sample(gaussian_velocity(), z, 9, "pc", eta=eta, generator=torch.Generator().manual_seed(4))
    want = pc_loop(gaussian_velocity(), z, 9, eta, recorded_noises(9, z.shape, 4))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta, err_target", [(0.8, 1.0), (1.0, 0.01)])
def test_pc_heun_matches_the_spec_per_sample(eta, err_target):
    # two samples at different scales: the gate is per sample
    z = torch.randn(2, 1, 6, 6, 6, dtype=torch.float64) * torch.tensor([1.0, 3.0], dtype=torch.float64).view(2, 1, 1, 1, 1)
    model = gaussian_velocity()
    got = FlowMatching().sample(model, z, 6, "pc_heun", eta, err_target, generator=torch.Generator().manual_seed(2))
    want = pc_heun_loop(model, z, 6, eta, err_target, recorded_noises(6, z.shape, 2))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    heun = FlowMatching().sample(model, z, 6, "heun")
    assert not torch.allclose(got, heun)  # the noise does enter


def test_pc_heun_gate_scales_with_err_target():
    # a huge err_target closes the gate (eta_t ~ 0): Heun up to the tiny noise weight
    model, z = gaussian_velocity(), torch.randn(2, 1, 6, 6, 6, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    closed = FlowMatching().sample(model, z, 5, "pc_heun", eta=1.0, err_target=1e12, generator=g)
    torch.testing.assert_close(closed, FlowMatching().sample(model, z, 5, "heun"), rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- device residency
def test_sample_keeps_no_trajectory_and_reads_nothing_back(monkeypatch):
    """The loop never calls .item() / .cpu() / .tolist() on a tensor (each would be a host
    sync on a GPU) and returns the final state only."""
    calls = []
    for name in ("item", "cpu", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    z = torch.randn(2, 1, 4, 4, 4)
    for solver in SOLVERS:
        eta = 0.5 if solver in ("pc", "pc_heun") else 0.0
        out = FlowMatching().sample(gaussian_velocity(), z, 3, solver, eta=eta)
        assert out.shape == z.shape
    assert calls == []


# --------------------------------------------------------------------------- NFE, times, errors
def test_nfe_per_solver():
    assert {s: nfe(100, s) for s in SOLVERS} == {"euler": 100, "heun": 200, "rk4": 400, "pc": 100, "pc_heun": 200}


def test_model_evaluations_and_times_of_one_sample():
    seen = []

    def model(x, time):
        seen.append(time.clone())
        return torch.zeros_like(x)

    FlowMatching().sample(model, torch.zeros(2, 1, 4, 4, 4), 4, "rk4")
    assert len(seen) == nfe(4, "rk4")
    assert all(t.dtype == torch.float32 and t.shape == (2,) for t in seen)
    want = [1000 * u for t, t1 in step_times(4) for u in (t, t + 0.125, t + 0.125, t1)]
    assert [t[0].item() for t in seen] == pytest.approx(want)
    assert step_times(3)[-1][1] == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"solver": "ddim"}, "solver must be one of"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 2.5}, "steps must be an integer >= 1"),
        ({"solver": "pc", "eta": 1.5}, r"eta must be a number in \[0, 1\]"),
        ({"solver": "pc", "eta": -0.1}, r"eta must be a number in \[0, 1\]"),
        ({"solver": "euler", "eta": 0.5}, "eta applies to the solvers"),
        ({"solver": "pc_heun", "eta": 0.5, "err_target": 0.0}, "err_target must be a number > 0"),
        ({"solver": "pc_heun", "err_target": -1.0}, "err_target must be a number > 0"),
    ],
)
def test_bad_solver_arguments_are_clear_errors(kwargs, match):
    args = {"steps": 10, "solver": "euler", "eta": 0.0, "err_target": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        check_solver(**args)
    with pytest.raises(ValueError, match=match):
        FlowMatching().sample(gaussian_velocity(), torch.zeros(1, 1, 2, 2, 2), **args)


def test_solver_step_rejects_an_unknown_solver():
    with pytest.raises(ValueError, match="solver must be one of"):
        solver_step(gaussian_velocity(), torch.zeros(1, 1, 2, 2, 2), 0.0, 0.5, 0.5, "midpoint")


# --------------------------------------------------------------------------- training loss
def test_training_loss_is_the_velocity_mse_per_sample():
    x, z = torch.randn(3, 1, 4, 4, 4), torch.randn(3, 1, 4, 4, 4)
    t = torch.tensor([0.0, 0.3, 0.9])
    seen = {}

    def model(x_t, time):
        seen["x_t"], seen["time"] = x_t, time
        return 2 * x_t

    out = FlowMatching().training_losses(model, x, t, z)
    tb = t.view(3, 1, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"], (1 - tb) * z + tb * x)
    torch.testing.assert_close(seen["time"], 1000 * t)
    want = (2 * seen["x_t"] - (x - z)).pow(2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(out["velocity_loss"], want)
    assert torch.equal(out["loss"], out["velocity_loss"]) and out["loss"].shape == (3,)


def test_the_exact_velocity_minimizes_the_loss():
    g = torch.Generator().manual_seed(0)
    x = SIGMA * torch.randn(256, 1, 4, 4, 4, generator=g, dtype=torch.float64)
    fm = FlowMatching()
    exact = fm.training_losses(gaussian_velocity(), x, generator=torch.Generator().manual_seed(1))["loss"].mean()
    biased = lambda xt, time: 1.1 * gaussian_velocity()(xt, time)  # noqa: E731
    other = fm.training_losses(biased, x, generator=torch.Generator().manual_seed(1))["loss"].mean()
    assert exact < other
