"""The fast PRDiT-SR backend (prdit_fast.sr_fast) against the reference wrapper, and the
sampling engine through it.

fp32 on the CPU: every Triton op of the base and the head runs under the interpreter
(impl="auto"). Tolerance 1e-4 of the largest magnitude (summation order only).
Tiny shapes (the interpreter pays per operation): a randomized PRDiT-XS/10/1 base at 8^3
(one token), a head of hidden 64 / p 6 / s 4 / pad 1 at 16^3 (64 tokens of width 216),
batch 3.
"""
from __future__ import annotations

import pytest
import torch
from conftest import randomize_, requires_cuda

from prdit_fast import create_model, create_sr_model, load_checkpoint, save_checkpoint
from prdit_fast.diffusion import IaNDiffusion
from prdit_fast.engine import Sampler, keys_for
from prdit_fast.fast import FAST_OPS, accelerate
from prdit_fast.ops.sampling import philox_normal, sampler_update, sampler_update_reference
from prdit_fast.ops.sr_assemble import sr_assemble_reference
from prdit_fast.schedules import build_step_table
from prdit_fast.sr import PRDiTSR
from prdit_fast.sr_fast import FastPRDiTSR

LO, HI = 8, 16
HEAD = {"hidden": 64, "patch": 6, "stride": 4, "pad": 1}
FP32_TOL = 1e-4


def tiny_sr(base: str = "PRDiT-XS/10/1") -> PRDiTSR:
    model = create_sr_model(create_model(base, LO), HI, **HEAD)
    with torch.no_grad():  # modest weights: O(1) outputs, every part contributing
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def test_fast_matches_reference_fp32_forward_and_head_gradients():
    ref = randomize_(tiny_sr())
    fst = accelerate(ref, dtype=torch.float32)  # every Triton op (the interpreter on the CPU) ...
    assert isinstance(fst, FastPRDiTSR)
    # ... except the base's fused local denoiser at width 1000, minutes under the interpreter
    # (tests/test_fast.py::test_all_triton_kernels_tiny covers it); the head's (width 216) runs
    fst.base._local_denoiser = lambda tokens, c: fst.base.coarse.mlp_denoise(tokens, c)
    x, t = torch.randn(3, 1, HI, HI, HI), torch.tensor([0, 411, 999])
    head = list(ref.head_parameters())
    outs, grads = [], []
    for model in (ref, fst):
        xg = x.clone().requires_grad_(True)
        out, base_out = model(xg, t, return_base=True)
        assert base_out.grad_fn is None  # the frozen base keeps no graph
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        grads.append(torch.autograd.grad((out * weights).sum(), [xg] + head))
        outs.append((out.detach(), base_out))
    (out_r, base_r), (out_f, base_f) = outs
    assert out_f.dtype == torch.float32 and out_f.shape == (3, 2, HI, HI, HI)
    assert rel_err(base_f, base_r) < FP32_TOL and rel_err(out_f, out_r) < FP32_TOL
    names = ["x"] + [n for n, _ in ref.named_parameters() if not n.startswith("base.")]
    for name, gf, gr in zip(names, *grads):
        assert rel_err(gf, gr) < FP32_TOL, name
    # inference: the Triton assembly pass, as a volume (forward) and as tokens (the engine's);
    # the network's ops in plain torch here: their Triton forms ran above (the head's kernels
    # are the same with and without autograd, the frozen base ran without), and running the
    # head under the interpreter twice more would only repeat them
    from prdit_fast.models import unpatchify

    inference = accelerate(ref, dtype=torch.float32, impl={**{op: "torch" for op in FAST_OPS}, "sr_assemble": "triton"})
    with torch.no_grad():
        assert rel_err(inference(x, t), out_r) < FP32_TOL
        tokens, rest = inference.token_parts(x, t)
    assert rest is None and tokens.dtype == torch.float32
    assert rel_err(unpatchify(tokens, HI, 4, 2), out_r) < FP32_TOL


def test_fast_wrapper_shares_parameters_and_state_dict(tmp_path):
    ref = tiny_sr()
    fst = accelerate(ref, dtype=torch.float32, impl="torch")
    assert list(fst.state_dict()) == list(ref.state_dict())
    assert all(a is b for a, b in zip(fst.parameters(), ref.parameters()))
    assert accelerate(fst, dtype=torch.float32).reference is ref
    path = save_checkpoint(tmp_path / "sr.pt", ref)
    loaded = load_checkpoint(path, backend="fast", dtype=torch.float32, impl="torch")
    assert isinstance(loaded, FastPRDiTSR) and loaded.config == ref.config
    fst.set_base_trainable(True)  # stage 3b through the fast form: the base's fine path trains
    assert ref.base.fine.blocks[0].attn.qkv.weight.requires_grad
    assert not ref.base.coarse.mlp_denoise.linear_final.weight.requires_grad


@pytest.mark.parametrize(
    "batch, channels, lo, size, stride",
    [(3, 1, 8, 16, 4), (1, 2, 5, 10, 5), (3, 1, 3, 6, 2)],  # odd grids, a 3x factor
)
@pytest.mark.parametrize("head_dtype", [torch.float32, torch.bfloat16])
def test_update_reads_the_base_prediction_itself(batch, channels, lo, size, stride, head_dtype):
    """sampler_update(head, base=) in Triton (the interpreter) against its reference and
    against the two-pass path it replaces (sr_assemble to fp32 tokens, then the update),
    fp32, with corrector noise: 2e-6 (the trilinear products' rounding, the normals' ulp)."""
    base = torch.randn(batch, 2 * channels, lo, lo, lo)
    head = torch.randn(batch, (size // stride) ** 3, stride**3 * 2 * channels).to(head_dtype)
    x = torch.randn(batch, channels, size, size, size)
    table = build_step_table(IaNDiffusion(), 4, "pc", 2)
    corrector = int((table[:, 4] != 0).nonzero()[0])  # a row that draws noise (sigma != 0)
    keys, step = keys_for(5, range(batch)), torch.tensor([corrector])
    got = sampler_update(head, x, table, step, keys, stride=stride, base=base, impl="triton")
    want = sampler_update_reference(head, x, table, step, keys, stride=stride, base=base)
    assembled = sr_assemble_reference(base, size, stride, head, "tokens")
    two_pass = sampler_update_reference(assembled, x, table, step, keys, stride=stride)
    for g, w, t in zip(got, want, two_pass):
        torch.testing.assert_close(g, w, rtol=0, atol=2e-6)
        torch.testing.assert_close(g, t, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="base must be the fp32"):
        sampler_update(head, x, table, step, keys, stride=stride, base=base.repeat(2, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="multiple"):
        sampler_update(head, x, table, step, keys, stride=stride, base=torch.randn(batch, 2 * channels, 4, 4, 4)
                       if size % 4 else torch.randn(batch, 2 * channels, 7, 7, 7))


STEPS = 4  # pc with k = 2 makes a corrector step (grid 750, 500, 250, 0)


@torch.no_grad()
def reference_sample(model, keys: torch.Tensor, steps: int):
    """Spec section 7 step by step with the engine's Philox counters, at the target size."""
    shape = (1, HI, HI, HI)
    x = 0.5 * philox_normal(keys, 0, shape)
    for n, st in enumerate(IaNDiffusion().schedule(steps, "pc", 2)):
        out = model(x, torch.full((x.shape[0],), st.t, dtype=torch.long))
        x0_hat = out[:, 1:]
        x = x - st.move * (st.sin_i * x0_hat - st.cos_i * out[:, :1])
        if st.corrector:
            x = st.a * x + st.sigma * philox_normal(keys, n + 1, shape)
    return x, x0_hat


def test_engine_through_the_wrapper_matches_reference_and_is_batch_invariant():
    ref = tiny_sr().eval()
    keys = keys_for(7, [0, 1, 2])
    x_ref, x0_ref = reference_sample(ref, keys[1:2], STEPS)
    # the network's ops in plain torch (bookkeeping under test); the engine's update (Triton)
    # reads the head's tokens and upsamples the base's prediction itself
    fast = accelerate(ref, dtype=torch.float32, impl={**{op: "torch" for op in FAST_OPS}, "sr_assemble": "triton"})
    single = Sampler(fast, batch_size=1, steps=STEPS)
    triple = Sampler(fast, batch_size=3, steps=STEPS)
    assert single.uses_token_parts and single.uses_sr_parts and single.describe()["backend"] == "fast"
    x1, x0_1 = single.sample(keys[1:2])
    x3, x0_3 = triple.sample(keys[[2, 1, 0]])
    assert x1.shape == (1, 1, HI, HI, HI)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x1, x_ref, **tol)
    torch.testing.assert_close(x0_1, x0_ref, **tol)
    torch.testing.assert_close(x3[1:2], x1, **tol)  # position and batch size do not matter
    torch.testing.assert_close(x0_3[1:2], x0_1, **tol)
    assert (x3[0] - x3[2]).abs().max() > 1e-2
    # the reference wrapper in the engine (volume output) gives the same volumes
    x_eng, _ = Sampler(ref, batch_size=1, steps=STEPS).sample(keys[1:2])
    torch.testing.assert_close(x_eng, x_ref, **tol)


@requires_cuda
def test_gpu_bf16_close_to_fp32_reference_and_graph_capture():
    ref = create_sr_model(create_model("PRDiT-B/12/2", 32), 64).cuda()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.02)
    fast = accelerate(ref, dtype=torch.bfloat16)
    x, t = torch.randn(2, 1, 64, 64, 64, device="cuda"), torch.tensor([100, 900], device="cuda")
    with torch.no_grad():
        out_r, out_f = ref(x, t), fast(x, t)
    rms = ((out_f - out_r).pow(2).mean().sqrt() / out_r.pow(2).mean().sqrt()).item()
    assert rms < 3e-2, rms  # the FastPRDiT bound of tests/test_fast.py
    engine = Sampler(fast, batch_size=2, steps=4)
    assert engine.cuda_graph, engine.graph_reason
    x_s, _ = engine.sample(keys_for(0, [0, 1]))
    assert torch.isfinite(x_s).all()
