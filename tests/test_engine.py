"""The sampling engine against an explicit reference loop with the same Philox noise.

Tiny randomized PRDiT-XS/10/1 at S = 16 (8 tokens), 4 steps (the fewest where pc with
k = 2 makes a corrector step: grid 750, 500, 250, 0), fp32 on the CPU: these
check the engine's bookkeeping (step counter, timestep lookup, noise counters, padding),
not the network's numerics. The real fast backend runs a narrower network with the same
token grid (the Triton interpreter's cost grows with the token width).
"""
import logging

import pytest
import torch
from conftest import requires_cuda

from prdit_fast.testing import randomize_, randomized_model
from prdit_fast.diffusion import IaNDiffusion
from prdit_fast.engine import Sampler, keys_for
from prdit_fast.layout import volume_to_tokens
from prdit_fast.models import PRDiT, PRDiTConfig, unpatchify
from prdit_fast.ops.sampling import philox_normal

SIZE = 16
STEPS = 4
SEED = 7
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32, same ops in a different order (batched rows)


def tiny_model(variant: str = "PRDiT-XS/10/1", device: str = "cpu") -> torch.nn.Module:
    """A fresh PRDiT predicts exactly zero (spec section 12): randomize every weight."""
    return randomized_model(variant, SIZE, std=0.05).to(device)


def narrow_model() -> torch.nn.Module:
    """XS/10/1's token grid (8 tokens) and depth at a fifth of its token width (p 6, s 4,
    pad 1 at S = 8: tokens of 216 instead of 1000), randomized: the Triton interpreter's cost
    grows with the width, and tests/test_fast.py checks XS/10/1's own kernels."""
    torch.manual_seed(0)
    cfg = PRDiTConfig(hidden=64, heads=2, depth=1, patch=6, stride=4, pad=1, input_size=8)
    return randomize_(PRDiT(cfg), 0.05).eval()


@torch.no_grad()
def reference_sample(model, keys: torch.Tensor, steps: int, sampler: str, k: int = 2):
    """Spec section 7 step by step, with the Philox counters of notes/philox.md."""
    diffusion = IaNDiffusion()
    C, size = model.config.in_channels, model.config.input_size
    shape = (C,) + (size,) * 3
    x = 0.5 * philox_normal(keys, 0, shape).to(next(model.parameters()).device)
    x0_hat = None
    for n, st in enumerate(diffusion.schedule(steps, sampler, k)):
        out = model(x, torch.full((x.shape[0],), st.t, dtype=torch.long, device=x.device))
        eps_hat, x0_hat = out[:, :C], out[:, C:]
        x = x - st.move * (st.sin_i * x0_hat - st.cos_i * eps_hat)
        if st.corrector:
            x = st.a * x + st.sigma * philox_normal(keys, n + 1, shape).to(x.device)
    return x, x0_hat


def test_volume_to_tokens_inverts_unpatchify():
    tokens = torch.randn(2, 8, 8**3 * 2)
    volume = unpatchify(tokens, SIZE, 8, 2)
    assert torch.equal(volume_to_tokens(volume, 8), tokens)


@pytest.mark.parametrize("sampler", ["pc", "cold"])
def test_engine_matches_reference_loop(sampler):
    model = tiny_model()
    keys = keys_for(SEED, [0, 1])
    engine = Sampler(model, batch_size=2, steps=STEPS, sampler=sampler, k=2)
    x, x0_hat = engine.sample(keys)
    x_ref, x0_ref = reference_sample(model, keys, STEPS, sampler)
    assert x.shape == (2, 1, SIZE, SIZE, SIZE) and x.dtype == torch.float32
    assert x0_ref.abs().max() > 0.1  # the randomized network predicts something
    torch.testing.assert_close(x, x_ref, **TOL)
    torch.testing.assert_close(x0_hat, x0_ref, **TOL)


class TokensOnly(torch.nn.Module):
    """Stands in for the fast backend's interface (``token_parts``, ``config``, ``dtype``)
    over the reference network: the real fast backend under the Triton interpreter takes
    over a minute here, and tests/test_fast.py checks its numerics; this checks the
    engine's tokens path."""

    def __init__(self, reference):
        super().__init__()
        self.reference = reference
        self.config = reference.config
        self.dtype = torch.float32

    def token_parts(self, x, t):
        return volume_to_tokens(self.reference(x, t), self.config.stride), None


def test_tokens_path_matches_reference_loop():
    model = tiny_model()
    keys = keys_for(SEED, [3])
    engine = Sampler(TokensOnly(model), batch_size=1, steps=STEPS, sampler="pc")
    assert engine.uses_token_parts and engine.describe()["backend"] == "fast"
    x, x0_hat = engine.sample(keys)
    x_ref, x0_ref = reference_sample(model, keys, STEPS, "pc")
    torch.testing.assert_close(x, x_ref, **TOL)
    torch.testing.assert_close(x0_hat, x0_ref, **TOL)
    with pytest.raises(ValueError, match="built for"):
        Sampler(TokensOnly(model), 1, STEPS, dtype=torch.bfloat16)


def test_fast_backend_sampler_matches_reference_loop():
    """The real fast backend (every Triton op, the interpreter on the CPU) in the engine,
    against the reference network's loop with the same keys."""
    from prdit_fast.fast import accelerate

    model = narrow_model()
    keys = keys_for(SEED, [5])
    engine = Sampler(accelerate(model, dtype=torch.float32), batch_size=1, steps=STEPS, sampler="pc")
    assert engine.uses_token_parts
    x, x0_hat = engine.sample(keys)
    x_ref, x0_ref = reference_sample(model, keys, STEPS, "pc")
    assert x0_ref.abs().max() > 0.1  # the randomized network predicts something
    torch.testing.assert_close(x, x_ref, rtol=1e-3, atol=1e-4)  # fused kernels sum in another order
    torch.testing.assert_close(x0_hat, x0_ref, rtol=1e-3, atol=1e-4)


def test_pc_draws_corrector_noise():
    """Same keys, pc vs cold: the corrector noise (and the k = 2 predictor) change x."""
    assert any(st.corrector for st in IaNDiffusion().schedule(STEPS, "pc", 2))
    model = tiny_model("PRDiT-XS/10/0")
    keys = keys_for(SEED, [0])
    x_pc, _ = Sampler(model, 1, STEPS, "pc").sample(keys)
    x_cold, _ = Sampler(model, 1, STEPS, "cold").sample(keys)
    assert (x_pc - x_cold).abs().max() > 1e-3


def test_result_depends_only_on_key():
    """Batch size, position in the batch and padding of a partial batch do not matter."""
    model = tiny_model("PRDiT-XS/10/0")
    keys = keys_for(SEED, [0, 1, 2])
    single = Sampler(model, 1, STEPS, "pc")
    triple = Sampler(model, 3, STEPS, "pc")
    x1, x0_1 = single.sample(keys[1:2])
    x3, x0_3 = triple.sample(keys)
    x3_reordered, _ = triple.sample(keys[[2, 1, 0]])
    x_partial, _ = triple.sample(keys[1:2])  # one key in a batch of three: padded, trimmed
    assert x_partial.shape[0] == 1
    torch.testing.assert_close(x3[1:2], x1, **TOL)
    torch.testing.assert_close(x0_3[1:2], x0_1, **TOL)
    torch.testing.assert_close(x3_reordered[1:2], x1, **TOL)
    torch.testing.assert_close(x_partial, x1, **TOL)
    assert (x3[0] - x3[2]).abs().max() > 1e-2  # different keys, different volumes


def test_eager_fallback_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="prdit_fast"):
        engine = Sampler(tiny_model("PRDiT-XS/10/0"), 1, 2)
    assert not engine.cuda_graph
    assert "eager" in engine.graph_reason
    assert any("eager" in r.getMessage() for r in caplog.records)
    summary = engine.describe()
    assert summary["cuda_graph"] is False and summary["backend"] == "reference" and summary["dtype"] == "float32"


def test_bad_arguments_raise():
    model = tiny_model("PRDiT-XS/10/0")
    with pytest.raises(ValueError, match="sampler"):
        Sampler(model, 1, STEPS, sampler="ddim")
    with pytest.raises(ValueError, match="steps"):
        Sampler(model, 1, 0)
    with pytest.raises(ValueError, match="batch_size"):
        Sampler(model, 0, STEPS)
    with pytest.raises(ValueError, match="keys"):
        Sampler(model, 2, STEPS).sample(keys_for(SEED, [0, 1, 2]))


def test_keys_span_the_full_seed_range():
    """Seeds >= 2^31 set the sign bit of the int64 key; keys stay distinct per (seed, index)."""
    keys = keys_for(2**32 - 1, [0, 2**32 - 1])
    assert keys.dtype == torch.int64 and keys[0] != keys[1] and keys[1] == -1
    assert keys_for(0, [5]).item() == 5 and keys_for(1, [5]).item() == 2**32 + 5


# --------------------------------------------------------------------------- GPU
def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item()


@requires_cuda
@pytest.mark.parametrize("sampler", ["pc", "cold"])
def test_cuda_graph_matches_eager_and_reference(sampler):
    """The captured step replayed equals the eager step, and both equal the reference loop
    (fp32 reference network; same kernels, so only launch order could differ)."""
    model = tiny_model(device="cuda")
    keys = keys_for(SEED, [0, 1, 2])
    graphed = Sampler(model, 3, STEPS, sampler, cuda_graph=True)
    assert graphed.cuda_graph, graphed.graph_reason
    eager = Sampler(model, 3, STEPS, sampler, cuda_graph=False)
    x_g, x0_g = graphed.sample(keys)
    x_e, x0_e = eager.sample(keys)
    torch.testing.assert_close(x_g, x_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x0_g, x0_e, rtol=1e-5, atol=1e-6)
    x_ref, x0_ref = reference_sample(model, keys, STEPS, sampler)
    torch.testing.assert_close(x_g, x_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x0_g, x0_ref, rtol=1e-4, atol=1e-5)
    # a second run on the same graph starts afresh from the new keys' noise
    x_again, _ = graphed.sample(keys)
    torch.testing.assert_close(x_again, x_g, rtol=1e-5, atol=1e-6)
    x_partial, _ = graphed.sample(keys[2:])
    torch.testing.assert_close(x_partial, x_g[2:], rtol=1e-4, atol=1e-5)


@requires_cuda
def test_fast_backend_graph_bf16_close_to_reference():
    fast = pytest.importorskip("prdit_fast.fast")
    model = tiny_model(device="cuda")
    keys = keys_for(SEED, [0, 1])
    engine = Sampler(fast.accelerate(model, dtype=torch.bfloat16), 2, STEPS, "pc")
    assert engine.uses_token_parts and engine.cuda_graph, engine.graph_reason
    x, x0_hat = engine.sample(keys)
    x_ref, x0_ref = reference_sample(model, keys, STEPS, "pc")
    # bf16 GEMM inputs: ~1e-2 relative RMS per forward (tests/test_fast.py), 4 steps here
    assert relative_rms(x, x_ref) < 5e-2
    assert relative_rms(x0_hat, x0_ref) < 5e-2
    eager = Sampler(fast.accelerate(model, dtype=torch.bfloat16), 2, STEPS, "pc", cuda_graph=False)
    x_eager, _ = eager.sample(keys)
    assert relative_rms(x, x_eager) < 1e-3  # same kernels with and without the graph
    single = Sampler(fast.accelerate(model, dtype=torch.bfloat16), 1, STEPS, "pc")
    x1, _ = single.sample(keys[1:])
    assert relative_rms(x1, x[1:]) < 2e-2  # batch-invariant up to bf16 GEMM rounding
