"""Measurement-guided sampling (spec section 15): operators, the guided schedule, the
reference sampler on a linear-Gaussian toy with an exact denoiser, and the engine."""
import logging
import math

import pytest
import torch
from conftest import requires_cuda

from prdit_fast.testing import randomized_model
from prdit_fast.diffusion import IaNDiffusion
from prdit_fast.engine import GuidedSampler, keys_for
from prdit_fast.measurements import (
    TASK_SETTINGS,
    Downsample,
    GaussianBlur,
    Mask,
    MeasurementOperator,
    data_consistency,
    guidance_gradient,
    view_angles,
    view_poses,
)
from prdit_fast.ops.sampling import philox_normal

T = 1000
# engine vs reference, fp32: the same ops batched differently; the guidance gradient is
# normalised by the residual's norm, which amplifies those roundings a little
ENGINE_TOL = dict(rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- #
# Operators
# --------------------------------------------------------------------------- #
def explicit_downsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Trilinear, align_corners=False, integer factor: output o samples input position
    scale (o + 1/2) - 1/2, i.e. the mean of the two central voxels of each block per axis
    for even scales and the central voxel for odd ones."""
    centre = [scale // 2 - 1, scale // 2] if scale % 2 == 0 else [scale // 2]
    B, C, S = x.shape[:3]
    blocks = x.reshape(B, C, S // scale, scale, S // scale, scale, S // scale, scale)
    idx = torch.tensor(centre)
    return blocks[:, :, :, idx][:, :, :, :, :, idx][..., idx].mean(dim=(3, 5, 7))


def operators():
    mask = torch.rand(12, 12, 12, generator=torch.Generator().manual_seed(3)) > 0.6
    return {
        "downsample2": Downsample(2), "downsample4": Downsample(4), "downsample3": Downsample(3),
        "mask": Mask(mask), "blur": GaussianBlur(5, 2.0),
    }


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_downsample_is_the_trilinear_operator(scale):
    x = torch.randn(2, 1, 12, 12, 12)
    torch.testing.assert_close(Downsample(scale)(x), explicit_downsample(x, scale), rtol=1e-5, atol=1e-6)


def test_blur_matches_a_dense_3d_convolution():
    x = torch.randn(1, 2, 9, 10, 11)
    taps = GaussianBlur(5, 2.0).taps.double()
    dense = torch.einsum("i,j,k->ijk", taps, taps, taps)
    want = torch.nn.functional.conv3d(x.double(), dense.expand(2, 1, 5, 5, 5).contiguous(), padding=2, groups=2)
    torch.testing.assert_close(GaussianBlur(5, 2.0)(x).double(), want, rtol=1e-5, atol=1e-6)
    assert taps.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["downsample2", "downsample4", "downsample3", "mask", "blur"])
def test_adjoint_and_guidance_gradient_against_autograd(name):
    op = operators()[name].double()
    x = torch.randn(2, 1, 12, 12, 12, dtype=torch.float64)
    r = torch.randn_like(op(x))
    # the adjoint (hand-written for Mask and GaussianBlur) against autograd's vector-Jacobian product
    vjp = torch.autograd.functional.vjp(op, x, r)[1]
    adjoint = op.adjoint(r, x.shape)
    torch.testing.assert_close(adjoint, vjp, rtol=1e-10, atol=1e-12)
    # <A x, r> = <x, A^T r>
    assert torch.dot(op(x).flatten(), r.flatten()).item() == pytest.approx(torch.dot(x.flatten(), adjoint.flatten()).item())
    # g = A^T (A x - y) / ||A x - y|| per volume, and autograd agrees with finite differences
    y = op(torch.randn_like(x))
    residual = op(x) - y
    norms = residual.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(guidance_gradient(op, x, y), op.adjoint(residual / norms, x.shape), rtol=1e-10, atol=1e-12)
    small = x[:1, :, :, :, :].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: data_consistency(op, v, y[:1]).sum(), (small,), eps=1e-6, atol=1e-5,
                                    fast_mode=True)


def test_guidance_gradient_of_a_callable_loss_and_of_a_user_operator():
    class Sum(MeasurementOperator):  # a user-defined operator: total intensity per volume
        def forward(self, x):
            return x.sum(dim=(1, 2, 3, 4)).unsqueeze(1)

    x = torch.randn(3, 1, 4, 4, 4)
    y = torch.randn(3, 1)
    sign = torch.sign(Sum()(x) - y).view(3, 1, 1, 1, 1)
    torch.testing.assert_close(guidance_gradient(Sum(), x, y), sign.expand_as(x))

    def mse(x0, target):
        return (x0 - target).pow(2).mean(dim=(1, 2, 3, 4))

    target = torch.randn_like(x)
    torch.testing.assert_close(guidance_gradient(mse, x, target), 2 * (x - target) / x[0].numel())
    # the network is never differentiated: the input keeps no graph and gets no gradient
    leaf = x.clone().requires_grad_(True)
    assert guidance_gradient(mse, leaf * 2, target).grad_fn is None and leaf.grad is None


def test_xray_geometry_and_missing_extra():
    assert view_angles(1) == [0.0]
    assert view_angles(2) == [0.0, 90.0]
    assert view_angles(4) == [0.0, 45.0, 90.0, 135.0]
    rotations, translations = view_poses(view_angles(2), 850.0)
    assert rotations.tolist() == [[0.0, 0.0, 0.0], [90.0, 0.0, 0.0]]
    assert translations.tolist() == [[0.0, 850.0, 0.0]] * 2
    with pytest.raises(ValueError, match=">= 1"):
        view_angles(0)
    try:
        import diffdrr  # noqa: F401
    except ImportError:
        from prdit_fast.measurements import XrayProjection

        with pytest.raises(ImportError, match=r"prdit_fast\[xray\]"):
            XrayProjection(2, volume_size=16)


# --------------------------------------------------------------------------- #
# The guided schedule and the reference sampler
# --------------------------------------------------------------------------- #
def test_guided_schedule_follows_section_15():
    diffusion = IaNDiffusion(noise_std=1.0)
    plan = diffusion.guided_schedule(4, k=2, guidance_scale=3.0, guidance_decay="cosine", guidance_cutoff=500,
                                     noise_weight=0.9)
    # grid 750, 500, 250, 0; predictor-corrector when i - k (i - j) >= 0 and i != 0
    assert [st.t for st in plan] == [750, 500, 250, 0]
    assert [st.corrector for st in plan] == [True, True, False, False]
    assert [st.corrector for st in diffusion.schedule(4, "pc", 2)] == [True, False, False, False]  # section 7: > 0
    decay = (1 + math.cos((1 - 750 / T) * math.pi)) / 2
    assert plan[0].guidance == pytest.approx(3.0 * decay) and plan[1].guidance == 0.0  # 500 is not > cutoff 500
    a = math.cos(500 / T * math.pi / 2) / math.cos(250 / T * math.pi / 2)
    assert plan[0].a == pytest.approx(a) and plan[0].sigma == pytest.approx(0.9 * math.sqrt(1 - a * a))
    assert plan[0].move == pytest.approx(2 * (-250) * (math.pi / 2) / T)
    with pytest.raises(ValueError, match="guidance_decay"):
        diffusion.guided_schedule(4, 2, 1.0, guidance_decay="linear")
    with pytest.raises(ValueError, match="noise_weight"):
        diffusion.guided_schedule(4, 2, 1.0, noise_weight=-1)


def exact_denoiser(s: float, noise_std: float):
    """The posterior means of x0 ~ N(0, s^2 I) and eps ~ N(0, noise_std^2 I) given x_t."""
    def model(x, t):
        beta = t.float().view(-1, 1, 1, 1, 1) * (math.pi / 2 / T)
        c, si = torch.cos(beta), torch.sin(beta)
        var = c**2 * s**2 + si**2 * noise_std**2
        return torch.cat([si * noise_std**2 / var * x, c * s**2 / var * x], dim=1)
    return model


def test_toy_guidance_reduces_the_residual_and_noise_weight_zero_is_deterministic():
    s = 0.6
    diffusion = IaNDiffusion(noise_std=1.0)
    x0 = s * torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    A = Downsample(4)
    y = A(x0)
    noise = diffusion.initial_noise(x0.shape, generator=torch.Generator().manual_seed(1))

    def run(rho, weight, seed):
        return diffusion.sample_guided(
            exact_denoiser(s, 1.0), noise, A, y, steps=50, k=2, guidance_scale=rho, guidance_cutoff=0,
            noise_weight=weight, generator=torch.Generator().manual_seed(seed),
        )[1]

    unguided, guided = run(0.0, 0.9, 2), run(5.0, 0.9, 2)
    r_unguided, r_guided = data_consistency(A, unguided, y), data_consistency(A, guided, y)
    assert (r_guided < 0.5 * r_unguided).all(), (r_guided, r_unguided)
    # w = 0: no noise is drawn after x_T, so the generator does not matter
    assert torch.equal(run(5.0, 0.0, 3), run(5.0, 0.0, 4))
    assert not torch.equal(run(5.0, 0.9, 3), run(5.0, 0.9, 4))


# --------------------------------------------------------------------------- #
# The engine
# --------------------------------------------------------------------------- #
SIZE = 16
STEPS = 4


@pytest.fixture(scope="module")
def prior():
    return randomized_model("DiT-XS/10/1", SIZE, std=0.05)


def test_engine_matches_the_reference_guided_sampler(prior):
    diffusion = IaNDiffusion(noise_std=1.0)
    op = Downsample(2)
    y = torch.randn(2, 1, 8, 8, 8)
    settings = dict(k=2, guidance_scale=4.0, guidance_decay="cosine", guidance_cutoff=0, noise_weight=0.0)
    engine = GuidedSampler(prior, op, batch_size=2, steps=STEPS, diffusion=diffusion, **settings)
    keys = keys_for(5, [0, 1])
    x, x0_hat = engine.sample(keys, y)
    start = philox_normal(keys, 0, (1, SIZE, SIZE, SIZE))  # the engine's x_T, noise_std 1
    with torch.no_grad():
        x_ref, x0_ref = diffusion.sample_guided(prior, start, op, y, steps=STEPS, **settings)
    torch.testing.assert_close(x0_hat, x0_ref, **ENGINE_TOL)
    torch.testing.assert_close(x, x_ref, **ENGINE_TOL)
    unguided = GuidedSampler(prior, op, batch_size=2, steps=STEPS, diffusion=diffusion,
                             **{**settings, "guidance_scale": 0.0}).sample(keys, y)[1]
    assert (data_consistency(op, x0_hat, y) < data_consistency(op, unguided, y)).all()


def test_engine_guided_batch_invariance(prior, caplog):
    diffusion = IaNDiffusion(noise_std=1.0)
    op = Downsample(2)
    y = torch.randn(3, 1, 8, 8, 8)
    settings = dict(k=2, guidance_scale=4.0, guidance_cutoff=0, noise_weight=0.9, diffusion=diffusion)
    batched = GuidedSampler(prior, op, batch_size=3, steps=STEPS, **settings)
    x, x0_hat = batched.sample(keys_for(9, [0, 1, 2]), y)
    single = GuidedSampler(prior, op, batch_size=2, steps=STEPS, **settings)  # padded batch
    x1, x0_1 = single.sample(keys_for(9, [1]), y[1:2])
    torch.testing.assert_close(x0_1[0], x0_hat[1], **ENGINE_TOL)
    torch.testing.assert_close(x1[0], x[1], **ENGINE_TOL)
    # a plain callable loss runs eagerly, and says so
    with caplog.at_level(logging.INFO, logger="prdit_fast"):
        eager = GuidedSampler(prior, lambda x0, obs: (op(x0) - obs).flatten(1).norm(dim=1), batch_size=1,
                              steps=STEPS, observation_shape=(1, 8, 8, 8), **settings)
    assert "not known to be capturable" in eager.describe()["cuda_graph_reason"]
    assert "capturable" in caplog.text
    torch.testing.assert_close(eager.sample(keys_for(9, [1]), y[1:2])[1][0], x0_hat[1], **ENGINE_TOL)
    with pytest.raises(ValueError, match="y must have shape"):
        batched.sample(keys_for(9, [0]), y)


def test_task_settings_are_the_official_ones():
    assert TASK_SETTINGS["xray"] == {"k": 4, "guidance_scale": 0.7, "guidance_decay": "cosine",
                                     "guidance_cutoff": 20, "noise_weight": 0.95}
    assert TASK_SETTINGS["super-resolution"] == {"k": 2, "guidance_scale": 20.0, "guidance_decay": "none",
                                                 "guidance_cutoff": 100, "noise_weight": 0.9}


def test_bench_guided_runs_on_the_cpu(tmp_path):
    """benchmarks/bench_guided.py (the GPU measurement of guided vs unguided steps) at a tiny size."""
    from benchmarks import bench_guided as guided_bench
    out = tmp_path / "guided.json"
    assert guided_bench.main(["--variant", "DiT-XS/10/1", "--size", "16", "--steps", "2", "--device", "cpu",
                              "--json", str(out)]) == 0
    import json

    rows = {row["row"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"unguided", "guided-sr", "official-sr"}
    assert rows["unguided"]["x_unguided"] == 1.0 and all(row["step_ms"] > 0 for row in rows.values())


@requires_cuda
def test_guided_engine_cuda_graph_matches_eager():
    """On a GPU the guided step (network, update, operator gradient, guidance) is one
    captured graph, and replaying it equals the eager step (fp32, same kernels)."""
    prior = randomized_model("DiT-XS/10/1", SIZE, std=0.05).cuda()
    settings = dict(k=2, guidance_scale=4.0, guidance_cutoff=0, noise_weight=0.9, diffusion=IaNDiffusion(noise_std=1.0))
    y = torch.randn(2, 1, 8, 8, 8, device="cuda")
    graphed = GuidedSampler(prior, Downsample(2), batch_size=2, steps=STEPS, **settings)
    eager = GuidedSampler(prior, Downsample(2), batch_size=2, steps=STEPS, cuda_graph=False, **settings)
    assert graphed.cuda_graph, graphed.graph_reason
    keys = keys_for(3, [0, 1])
    for got, want in zip(graphed.sample(keys, y), eager.sample(keys, y)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", ["super-resolution", "infill"])
def test_per_voxel_guidance_pulls_each_voxel_alike_at_any_size(task):
    """The official rho's pull per measured voxel falls as 1 / sqrt(M); the per-voxel
    parametrization keeps it at the official setting's, whatever the size or mask."""
    from prdit_fast.measurements import (Downsample, Mask, OFFICIAL_SIZE, effective_guidance_scale,
                                         guidance_gradient, official_measured_values)

    official, per_voxel = {}, {}
    for size, known in ((16, 0.3), (32, 0.6), (64, 0.9)):
        gen = torch.Generator().manual_seed(size)
        truth = torch.rand(1, 1, size, size, size, generator=gen) * 2 - 1
        x0 = truth + 0.1 * torch.randn(truth.shape, generator=gen)
        if task == "super-resolution":
            op = Downsample(2)
            measured = (size // 2) ** 3
            where = torch.ones(size, size, size, dtype=torch.bool)
        else:
            where = torch.rand(size, size, size, generator=gen) < known
            op, measured = Mask(where), int(where.sum())
        g = guidance_gradient(op, x0, op(truth))[0, 0][where]
        rms = float(g.pow(2).mean().sqrt())
        official[size] = 20.0 * rms
        per_voxel[size] = effective_guidance_scale(20.0, task, measured, "per-voxel") * rms
    assert official[16] > 4 * official[64]  # 8x or more measured values: the official pull drops
    assert max(per_voxel.values()) < 1.15 * min(per_voxel.values()), per_voxel
    # and at the official size and setting the two are the same rho
    assert effective_guidance_scale(20.0, task, official_measured_values(task), "per-voxel") == 20.0
    assert OFFICIAL_SIZE == 128


def test_guidance_parametrization_defaults():
    from prdit_fast.measurements import guidance_parametrization

    assert guidance_parametrization("super-resolution", 128, 4) == "official"
    assert guidance_parametrization("deblur", 128, 4) == "official"
    assert guidance_parametrization("xray", 32, 4) == "official"  # X-rays keep the official scale
    assert guidance_parametrization("super-resolution", 128, 2) == "per-voxel"
    assert guidance_parametrization("super-resolution", 32, 4) == "per-voxel"
    assert guidance_parametrization("infill", 64, 4) == "per-voxel"
    assert guidance_parametrization("infill", 64, 4, "official") == "official"
    with pytest.raises(ValueError, match="parametrization"):
        guidance_parametrization("infill", 64, 4, "strong")
