"""Flow matching on the fast side: the blocked unfold of the stride-16 geometry, the fast
backend against the reference on an -s16 variant at 32^3 (fp32, Triton interpreter),
the device-counter Philox noise, and the sampling engine with all five solvers."""
import pytest
import torch
from conftest import randomize_, rel_rms, requires_cuda

from prdit_fast import models
from prdit_fast.engine import Sampler, keys_for
from prdit_fast.fast import accelerate
from prdit_fast.flow_matching import SOLVERS, FlowMatching, solver_step
from prdit_fast.models import create_model
from prdit_fast.ops.sampling import initial_noise, philox_normal, step_noise
from prdit_fast.ops.unfold import unfold3d
from prdit_fast.schedules import step_times

ETA = {"euler": 0.0, "heun": 0.0, "rk4": 0.0, "pc": 0.6, "pc_heun": 0.9}


def fm_model(name: str = "PRDiT-XS/4/0", size: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(create_model(name, size, out_channels=1)).eval()


# --------------------------------------------------------------------------- blocked unfold
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_overlapping_unfold_is_a_blocked_copy(dtype):
    x = torch.randn(2, 2, 32, 16, 48, requires_grad=True)
    got = unfold3d(x, 16, 16, 0, out_dtype=dtype)
    want = models.unfold3d(x, 16, 16, 0)
    assert got.dtype == dtype and torch.equal(got, want.to(dtype))
    grad = torch.randn(want.shape).to(dtype)  # the gradient arrives in the tokens' dtype
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad.float())[0])


# --------------------------------------------------------------------------- fast vs reference
def test_fast_matches_reference_on_an_s16_variant_at_32():
    """PRDiT-XS/16/1-s16 at 32^3: p = s = 16, pad 0, tokens of width 4096, velocity head.
    The local denoiser runs impl "gemm", the composition bf16 CUDA runs (GEMMs, Triton
    LayerNorm / SwiGLU-gate passes): the all-Triton fused GEMMs take minutes per call at
    D = 4096 under the interpreter (the GPU session runs them at this width)."""
    model = fm_model("PRDiT-XS/16/1-s16", 32)
    cfg = model.config
    assert (cfg.token_dim, cfg.out_token_dim, cfg.process) == (4096, 4096, "flow_matching")
    fast = accelerate(model, dtype=torch.float32, impl={"local_denoiser": "gemm"})
    x = torch.randn(2, 1, 32, 32, 32)
    t = torch.tensor([130.5, 870.25])  # 1000 t: continuous
    ref = model(x, t)
    out = fast(x, t)
    assert out.shape == (2, 1, 32, 32, 32) and out.dtype == torch.float32
    # fp32: only the summation order differs (fast.py's stated bound: 1e-4 of the largest magnitude)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    # gradients of what trains in stage 2 (t_embedder.fine_head and the transformer)
    trained = [p for p in model.parameters() if p.requires_grad]
    grad_ref = torch.autograd.grad(ref.square().mean(), trained)
    grad_fast = torch.autograd.grad(out.square().mean(), trained)
    for g_fast, g_ref in zip(grad_fast, grad_ref):
        assert rel_rms(g_fast, g_ref) < 1e-4


# --------------------------------------------------------------------------- device-counter noise
def test_step_noise_reads_its_counter_on_the_device():
    keys = keys_for(7, [0, 1, 5])
    for n in (0, 3):
        got = step_noise(keys, torch.tensor([n]), (1, 6, 5, 4))
        want = philox_normal(keys, n + 1, (1, 6, 5, 4))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # log / cos to an ulp
    # a volume's noise depends on its key alone
    assert torch.equal(step_noise(keys[2:], torch.tensor([3]), (1, 6, 5, 4))[0], got[2])
    with pytest.raises(ValueError, match="step_index must be a one-element"):
        step_noise(keys, torch.tensor([1.0]), (4,))


# --------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_engine_runs_every_solver_as_the_reference_loop(solver):
    """Sampler (CPU eager path: the same step a CUDA graph captures) against a loop of
    ``solver_step`` with the same start, times and per-volume Philox noise."""
    model = fm_model()
    keys = keys_for(3, [0, 1])
    engine = Sampler(model, batch_size=2, steps=4, sampler=solver, eta=ETA[solver], err_target=0.5)
    x, x0_hat = engine.sample(keys)
    assert x0_hat is None and engine.nfe == 4 * SOLVERS[solver]
    described = engine.describe()
    assert (described["process"], described["sampler"], described["nfe"]) == ("flow_matching", solver, engine.nfe)

    z = initial_noise(keys, (1, 8, 8, 8), std=1.0)
    assert z.std().item() == pytest.approx(1.0, abs=0.1)  # std 1, not IaN's 0.5
    want = z
    with torch.no_grad():
        for n, (t, t_next) in enumerate(step_times(4)):
            def velocity(state, time):
                return model(state, torch.full((2,), 1000 * float(time), dtype=torch.float32))

            def noise(n=n):
                return philox_normal(keys, n + 1, (1, 8, 8, 8))

            want = solver_step(velocity, want, t, t_next, 0.25, solver, ETA[solver], 0.5, noise)
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)
    if solver in ("euler", "heun", "rk4"):  # deterministic: also the FlowMatching loop itself
        reference = FlowMatching().sample(model, z, 4, solver)
        torch.testing.assert_close(x, reference, rtol=1e-5, atol=1e-5)


def test_engine_batch_invariance_with_noisy_pc():
    """pc at eta > 0 draws fresh noise every step; from the per-volume keys, so volume 5
    is the same alone, in a batch of 3, and in another position."""
    model = fm_model("PRDiT-XS/10/1", 16)
    alone, _ = Sampler(model, batch_size=1, steps=3, sampler="pc", eta=0.8).sample(keys_for(11, [5]))
    batch, _ = Sampler(model, batch_size=3, steps=3, sampler="pc", eta=0.8).sample(keys_for(11, [2, 5, 9]))
    torch.testing.assert_close(batch[1], alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1], atol=1e-2)
    deterministic, _ = Sampler(model, batch_size=1, steps=3, sampler="pc", eta=0.0).sample(keys_for(11, [5]))
    assert not torch.allclose(deterministic, alone, atol=1e-3)  # the noise does enter


def test_engine_argument_errors():
    fm, ian = fm_model(), create_model("PRDiT-XS/4/0", 8)
    with pytest.raises(ValueError, match="solver must be one of"):
        Sampler(fm, batch_size=1, steps=4, sampler="cold")
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
        Sampler(fm, batch_size=1, steps=4, sampler="pc", eta=2.0)
    with pytest.raises(ValueError, match="err_target must be a number > 0"):
        Sampler(fm, batch_size=1, steps=4, sampler="pc_heun", eta=0.5, err_target=0.0)
    with pytest.raises(ValueError, match="is an IaN model"):
        Sampler(ian, batch_size=1, steps=4, sampler="rk4")
    with pytest.raises(ValueError, match="apply to flow-matching models"):
        Sampler(ian, batch_size=1, steps=4, sampler="pc", eta=0.5)


# --------------------------------------------------------------------------- GPU (bf16, graphs)
@requires_cuda
def test_gpu_fast_bf16_on_an_s16_variant_within_the_stated_bounds():
    """fast.py's bf16 bounds (3e-2 relative RMS on the output, 5e-2 on gradients) hold for
    the stride-16 geometry and the velocity head, with the default implementations."""
    model = fm_model("PRDiT-XS/16/2-s16", 64).cuda()
    x, t = torch.randn(2, 1, 64, 64, 64, device="cuda"), torch.tensor([130.5, 870.25], device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = model(x, t)
    out = accelerate(model, dtype=torch.bfloat16)(x, t)
    assert rel_rms(out, ref) < 3e-2
    trained = [p for p in model.parameters() if p.requires_grad]
    for g_fast, g_ref in zip(torch.autograd.grad(out.square().mean(), trained),
                             torch.autograd.grad(ref.square().mean(), trained)):
        assert rel_rms(g_fast, g_ref) < 5e-2


@requires_cuda
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_gpu_engine_graph_runs_every_solver_as_eager(solver):
    """A multi-evaluation step (heun, rk4, pc_heun) is captured as one graph; the replay
    gives what the same step gives eagerly, and batch invariance holds on the GPU."""
    fast = accelerate(fm_model("PRDiT-XS/16/1-s16", 64).cuda(), dtype=torch.bfloat16)
    keys = keys_for(0, [0, 1])
    graph = Sampler(fast, batch_size=2, steps=4, sampler=solver, eta=ETA[solver], err_target=0.5)
    assert graph.cuda_graph, graph.graph_reason
    eager = Sampler(fast, batch_size=2, steps=4, sampler=solver, eta=ETA[solver], err_target=0.5, cuda_graph=False)
    x_graph, x_eager = graph.sample(keys)[0], eager.sample(keys)[0]
    assert rel_rms(x_graph, x_eager) < 1e-3
    alone = Sampler(fast, batch_size=1, steps=4, sampler=solver, eta=ETA[solver], err_target=0.5).sample(keys[1:])[0]
    assert rel_rms(alone[0], x_graph[1]) < 1e-2  # bf16 GEMMs of another batch size round differently


@requires_cuda
def test_gpu_fused_local_denoiser_at_token_width_4096():
    """The all-Triton fused adaptive-SwiGLU GEMMs (impl "triton", what fp32 CUDA runs) at
    D = 4096, against the reference in fp32 (too slow for the CPU interpreter)."""
    model = fm_model("PRDiT-XS/16/1-s16", 32).cuda()
    x, t = torch.randn(2, 1, 32, 32, 32, device="cuda"), torch.tensor([130.5, 870.25], device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = model(x, t)
    out = accelerate(model, dtype=torch.float32, impl={"local_denoiser": "triton"})(x, t)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
