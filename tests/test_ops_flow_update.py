"""The fused flow-matching update (prdit_fast.ops.flow_update) and the solvers' fused stages
(prdit_fast.flow_matching.fused_stages), in fp32 under the Triton interpreter on the CPU.

Tolerances: the kernel and the reference compute the same fp32 expression; they differ by
the Philox normals' log / cos (an ulp, <= 1e-6 absolute, times c_z <= 1) and, on a GPU, by
FMA contraction: 2e-6 on the CPU, 1e-5 on a GPU. The chained stages differ from
``solver_step`` by the order of fp32 additions (x + dt/2 v + dt/2 v' vs x + dt (v + v')/2):
1e-5 relative. A wrong row, token index or counter is off by O(1).
"""
from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from prdit_fast import models
from prdit_fast.engine import keys_for
from prdit_fast.layout import volume_to_tokens
from prdit_fast.flow_matching import SOLVERS, fused_stages, solver_step
from prdit_fast.schedules import stage_times
from prdit_fast.ops.flow_update import flow_update, flow_update_reference
from prdit_fast.ops.sampling import philox_normal

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = 1e-5 if torch.cuda.is_available() else 2e-6


def _tokens(x_shape, stride, dtype=torch.float32):
    B, C, S = x_shape[:3]
    return torch.randn(B, (S // stride) ** 3, stride**3 * C, device=DEVICE).to(dtype)


@pytest.mark.parametrize("batch,channels,size,stride", [(1, 1, 15, 5), (3, 2, 9, 3), (3, 1, 16, 16)])
@pytest.mark.parametrize("parts", ["tokens", "tokens+residual+acc+noise"])
def test_kernel_matches_reference(batch, channels, size, stride, parts):
    shape = (batch, channels, size, size, size)
    x = torch.randn(shape, device=DEVICE)
    tokens = _tokens(shape, stride)
    full = parts != "tokens"
    residual = _tokens(shape, stride, torch.bfloat16) if full else None
    acc = torch.randn(shape, device=DEVICE) if full else None
    keys = keys_for(4, range(10, 10 + batch)).to(DEVICE) if full else None
    coef = torch.randn(5, 4, device=DEVICE)
    step = torch.tensor([3], device=DEVICE)
    got, got_acc = flow_update(tokens, x, coef, step, stride=stride, residual=residual, acc=acc,
                               acc_out=torch.full(shape, float("nan"), device=DEVICE) if full else None,
                               keys=keys, impl="triton")
    want, want_acc = flow_update_reference(tokens, x, coef, step, stride=stride, residual=residual, acc=acc,
                                           acc_out=torch.empty(shape, device=DEVICE) if full else None, keys=keys)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    # the same thing spelled out: c_x x + c_v v (+ c_z z), acc + c_acc v
    total = tokens.float() + (residual.float() if full else 0)
    v = models.unpatchify(total, size, stride, channels)
    c_x, c_v, c_z, c_acc = coef[3].tolist()
    spelled = c_x * x + c_v * v + (c_z * philox_normal(keys, 4, shape[1:]).to(DEVICE) if full else 0)
    torch.testing.assert_close(got, spelled, rtol=1e-5, atol=1e-5)
    if full:
        torch.testing.assert_close(got_acc, want_acc, rtol=0, atol=ATOL)
        torch.testing.assert_close(got_acc, acc + c_acc * v, rtol=1e-6, atol=1e-6)
    else:
        assert got_acc is None


def test_in_place_and_noise_only_where_the_row_has_it():
    shape = (2, 1, 8, 8, 8)
    x = torch.randn(shape, device=DEVICE)
    tokens = _tokens(shape, 4)
    coef = torch.tensor([[0.5, 2.0, 0.0, 0.0], [0.5, 2.0, 0.3, 0.0]], device=DEVICE)
    keys = keys_for(1, [0, 1]).to(DEVICE)
    v = models.unpatchify(tokens, 8, 4, 1)
    quiet = x.clone()
    flow_update(tokens, quiet, coef, torch.tensor([0], device=DEVICE), stride=4, out=quiet, keys=keys, impl="triton")
    torch.testing.assert_close(quiet, 0.5 * x + 2.0 * v, rtol=1e-6, atol=1e-6)  # c_z = 0: no noise drawn
    noisy, _ = flow_update(tokens, x, coef, torch.tensor([1], device=DEVICE), stride=4, keys=keys, impl="triton")
    z = philox_normal(keys, 2, shape[1:]).to(DEVICE)
    torch.testing.assert_close(noisy, 0.5 * x + 2.0 * v + 0.3 * z, rtol=1e-5, atol=ATOL)


def test_a_counter_outside_the_table_writes_nan_and_the_reference_raises():
    shape = (1, 1, 4, 4, 4)
    x, tokens, coef = torch.randn(shape, device=DEVICE), _tokens(shape, 2), torch.ones(2, 4, device=DEVICE)
    out, _ = flow_update(tokens, x, coef, torch.tensor([2], device=DEVICE), stride=2, impl="triton")
    assert torch.isnan(out).all()
    with pytest.raises(ValueError, match="outside the coefficient table"):
        flow_update_reference(tokens, x, coef, torch.tensor([2], device=DEVICE), stride=2)


def test_argument_errors():
    shape = (2, 1, 8, 8, 8)
    x, tokens, coef, step = torch.randn(shape), _tokens(shape, 4).cpu(), torch.ones(3, 4), torch.tensor([0])
    with pytest.raises(ValueError, match="velocity tokens must be"):
        flow_update(tokens[:, :-1], x, coef, step, stride=4)
    with pytest.raises(ValueError, match="coef must be a"):
        flow_update(tokens, x, torch.ones(3, 5), step, stride=4)
    with pytest.raises(ValueError, match="acc and acc_out go together"):
        flow_update(tokens, x, coef, step, stride=4, acc=x)
    with pytest.raises(ValueError, match="keys must be"):
        flow_update(tokens, x, coef, step, stride=4, keys=torch.tensor([1]))


# --------------------------------------------------------------------------- the solvers' stages
def _velocity(stride):
    """A nonlinear velocity field: as tokens for the fused stages, as a volume for solver_step."""
    def volume(x, t):
        return torch.sin(3 * x) - (1.0 + 2.0 * t) * x

    def tokens(x, t):
        return volume_to_tokens(volume(x, t), stride)

    return volume, tokens


@pytest.mark.parametrize("solver,eta", [("euler", 0.0), ("heun", 0.0), ("rk4", 0.0), ("pc", 0.0), ("pc", 0.7),
                                        ("pc_heun", 0.0)])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_stages_equal_solver_step(solver, eta, batch):
    """Chaining the stages with the Triton update, as the engine does, gives solver_step's
    state after every step, pc's Philox noise included."""
    steps, size, stride = 3, 6, 3
    volume, tokens = _velocity(stride)
    keys = keys_for(9, range(batch)).to(DEVICE)
    x = torch.randn(batch, 1, size, size, size, device=DEVICE)
    states = {"x": x.clone(), "probe": torch.zeros_like(x), "acc": torch.zeros_like(x)}
    stages = fused_stages(steps, solver, eta)
    assert len(stages) == SOLVERS["heun" if solver == "pc_heun" else solver]
    want = x
    for n, (t, t_half, t_next) in enumerate(stage_times(steps)):
        step = torch.tensor([n], device=DEVICE)
        for st in stages:
            v = tokens(states[st.source], (t, t_half, t_next)[st.time])
            flow_update(v, states[st.base], torch.tensor(st.coef, device=DEVICE), step, stride=stride,
                        out=states[st.target], acc=states.get(st.accumulate),
                        acc_out=states["acc"] if st.accumulate else None, keys=keys if st.noisy else None,
                        impl="triton")
        want = solver_step(volume, want, t, t_next, 1.0 / steps, solver, eta,
                           noise=lambda n=n: philox_normal(keys, n + 1, x.shape[1:]).to(DEVICE))
        torch.testing.assert_close(states["x"], want, rtol=1e-5, atol=1e-5)


def test_pc_heun_with_noise_has_no_fused_form():
    assert fused_stages(4, "pc_heun", eta=0.5) is None
    assert fused_stages(4, "pc", eta=0.5)[0].noisy and not fused_stages(4, "euler")[0].noisy
    with pytest.raises(ValueError, match="solver must be one of"):
        fused_stages(4, "midpoint")


@requires_cuda
def test_gpu_bf16_tokens_at_the_released_geometry():
    """B/16/12-s16's update geometry (stride 16, C = 1) at 64^3 with bf16 tokens, batch 2."""
    shape = (2, 1, 64, 64, 64)
    x, tokens = torch.randn(shape, device="cuda"), _tokens(shape, 16, torch.bfloat16)
    residual = _tokens(shape, 16, torch.bfloat16)
    coef, step = torch.randn(4, 4, device="cuda"), torch.tensor([1], device="cuda")
    got, _ = flow_update(tokens, x, coef, step, stride=16, residual=residual, impl="triton")
    want, _ = flow_update_reference(tokens, x, coef, step, stride=16, residual=residual)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
