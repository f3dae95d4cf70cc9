"""The fused sampler update and its Philox noise (prdit_fast.ops.sampling).

Tolerances: the Philox words are integers and must match Triton's ``tl.randint4x``
exactly; the normals go through log / cos, whose fp32 results differ between libraries
by an ulp or two: <= 1e-6 absolute for |z| < 5.7 on the CPU (numpy under the
interpreter vs torch), 5e-6 on a GPU (libdevice vs torch's CUDA math). The update
differs from the reference only through that noise times sigma <= 0.5, plus fp32
contraction (FMA) on a GPU: 1e-6 on the CPU, 4e-6 on a GPU. A wrong counter, key or
row would be off by O(1).
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import requires_cuda
from prdit_fast.diffusion import NOISE_STD, IaNDiffusion
from prdit_fast.models import unpatchify
from prdit_fast.ops import sampling as sampler_update_module
from prdit_fast.ops.sampling import (
    initial_noise,
    philox4x32,
    philox_normal,
    sample_key,
    sampler_update,
    sampler_update_reference,
)
from prdit_fast.schedules import build_step_table

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NOISE_ATOL = 5e-6 if torch.cuda.is_available() else 1e-6
UPDATE_ATOL = 4e-6 if torch.cuda.is_available() else 1e-6
STRIDE = 8


@triton.jit(do_not_specialize=["step"])  # step == 1 must stay a tensor, not a constexpr
def _philox_probe(KEYS, WORDS, NORMAL, step, n, BLOCK: tl.constexpr):
    # counters 0 .. n - 1 of each key: the four words and tl.randn
    b = tl.program_id(1)
    v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = v < n
    key = tl.load(KEYS + b)
    offset = v.to(tl.int64) + (step.to(tl.int64) << 32)
    r0, r1, r2, r3 = tl.randint4x(key, offset)
    base = WORDS + b * 4 * n + v
    tl.store(base, r0.to(tl.int64) & 0xFFFFFFFF, mask=ok)
    tl.store(base + n, r1.to(tl.int64) & 0xFFFFFFFF, mask=ok)
    tl.store(base + 2 * n, r2.to(tl.int64) & 0xFFFFFFFF, mask=ok)
    tl.store(base + 3 * n, r3.to(tl.int64) & 0xFFFFFFFF, mask=ok)
    tl.store(NORMAL + b * n + v, tl.randn(key, offset), mask=ok)


def _probe(keys: torch.Tensor, step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    words = torch.zeros(len(keys), 4, n, dtype=torch.int64, device=keys.device)
    normal = torch.zeros(len(keys), n, device=keys.device)
    _philox_probe[(triton.cdiv(n, 1024), len(keys))](keys, words, normal, step, n, BLOCK=1024)
    return words, normal


KEYS = [sample_key(0, 0), sample_key(2**32 - 1, 5), sample_key(12345, 2**32 - 1), sample_key(7, 3)]


@pytest.mark.parametrize("step", [0, 1, 9, 2**31 + 3])
def test_philox_matches_triton(step):
    keys = torch.tensor(KEYS, dtype=torch.int64, device=DEVICE)
    n = 3000
    words, normal = _probe(keys, step, n)
    assert torch.equal(torch.stack(philox4x32(keys, torch.arange(n, device=DEVICE), step), 1), words)
    torch.testing.assert_close(philox_normal(keys, step, (n,)), normal, rtol=0, atol=NOISE_ATOL)


def test_philox_normal_is_independent_of_its_chunking(monkeypatch):
    keys = torch.tensor(KEYS[:2], dtype=torch.int64, device=DEVICE)
    whole = philox_normal(keys, 5, (2, 500))
    monkeypatch.setattr(sampler_update_module, "_CHUNK", 96)  # not a divisor of 1000
    assert torch.equal(philox_normal(keys, 5, (2, 500)), whole)


def test_philox_normal_statistics_and_independence():
    keys = torch.tensor([sample_key(3, 1), sample_key(3, 2)])
    z = philox_normal(keys, 1, (100_000,))
    for row in z:
        assert abs(row.mean().item()) < 0.016  # 5 standard errors of the mean
        assert abs(row.std().item() - 1.0) < 0.012  # 5 standard errors of the std
        assert row.abs().max().item() < 6.0  # u1 >= 1e-7 bounds |z| by 5.68
    assert abs(torch.corrcoef(z)[0, 1].item()) < 0.016  # two keys
    other_step = philox_normal(keys[:1], 2, (100_000,))[0]
    assert abs(torch.corrcoef(torch.stack([z[0], other_step]))[0, 1].item()) < 0.016  # two counters
    # a key's stream does not depend on the other keys of the batch
    assert torch.equal(philox_normal(keys[1:], 1, (1000,))[0], z[1, :1000])


def test_sample_key_and_initial_noise():
    assert sample_key(1, 2) == (1 << 32) | 2
    assert sample_key(2**32 - 1, 2**32 - 1) == -1  # two's complement of 2^64 - 1
    torch.tensor([sample_key(2**32 - 1, 0)], dtype=torch.int64)  # fits int64
    with pytest.raises(ValueError, match="index"):
        sample_key(0, 2**32)
    with pytest.raises(ValueError, match="run_seed"):
        sample_key(-1, 0)
    keys = torch.tensor([sample_key(5, 0), sample_key(5, 1)])
    noise = initial_noise(keys, (1, 8, 8, 8), impl="torch")
    assert noise.shape == (2, 1, 8, 8, 8) and noise.dtype == torch.float32
    assert torch.equal(noise, NOISE_STD * philox_normal(keys, 0, (1, 8, 8, 8)))


@pytest.mark.parametrize("shape", [(1, 8, 8, 8), (2, 5, 7, 3)])
def test_initial_noise_kernel_matches_plain_torch(device, shape):
    # B = 3 keys, volumes of 512 and 210 voxels: a partial block and several programs per key
    keys = torch.tensor(KEYS[:3], dtype=torch.int64, device=device)
    got = initial_noise(keys, shape, impl="triton")
    want = initial_noise(keys, shape, impl="torch")
    assert got.shape == (3, *shape) and got.dtype == torch.float32 and got.device == keys.device
    torch.testing.assert_close(got, want, rtol=0, atol=NOISE_STD * NOISE_ATOL)
    # a key's noise does not depend on the other keys of the batch
    torch.testing.assert_close(initial_noise(keys[1:2], shape, impl="triton")[0], got[1], rtol=0, atol=0)


@pytest.mark.parametrize("sampler,k", [("cold", 1), ("pc", 2)])
def test_step_table_follows_the_schedule(sampler, k):
    diffusion = IaNDiffusion()
    table = build_step_table(diffusion, 10, sampler, k, "cpu")
    plan = diffusion.schedule(10, sampler, k)
    assert table.shape == (10, 5) and table.dtype == torch.float32
    for row, st in zip(table.tolist(), plan):
        assert row[:3] == pytest.approx([st.sin_i, st.cos_i, st.move], abs=1e-7)
        if st.corrector:
            assert row[3:] == pytest.approx([st.a, st.sigma], abs=1e-7) and row[4] > 0
        else:
            assert row[3:] == [1.0, 0.0]
    assert any(st.corrector for st in plan) == (sampler == "pc")


def _inputs(B: int, C: int = 1, S: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    N = (S // STRIDE) ** 3
    tokens = torch.randn(B, N, STRIDE**3 * 2 * C, generator=g).to(DEVICE)
    residual = torch.randn(B, N, STRIDE**3 * 2 * C, generator=g).to(DEVICE)
    x = torch.randn(B, C, S, S, S, generator=g).to(DEVICE)
    keys = torch.tensor([sample_key(11, i) for i in range(B)], device=DEVICE)
    return tokens, residual, x, keys


@pytest.mark.parametrize("sampler,k", [("cold", 1), ("pc", 2)])
def test_update_matches_reference_on_every_row(sampler, k):
    steps = 4  # pc, k=2: rows 0 and 1 correct, rows 2 and 3 are Euler steps (the last with h = 0)
    table = build_step_table(IaNDiffusion(), steps, sampler, k, DEVICE)
    tokens, residual, x, keys = _inputs(2, C=2)
    for n in range(steps):
        step = torch.tensor([n], device=DEVICE)
        got = sampler_update(tokens, x, table, step, keys, residual=residual, impl="triton")
        want = sampler_update_reference(tokens, x, table, step, keys, residual=residual)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=UPDATE_ATOL)
        assert torch.equal(got[1], want[1])


def test_reference_is_the_spec_step():
    """x_next = a (x - move f) + sigma z, f = sin_i x0_hat - cos_i eps_hat, z from counter n + 1."""
    diffusion = IaNDiffusion()
    plan = diffusion.schedule(4, "pc", 2)
    table = build_step_table(diffusion, 4, "pc", 2, DEVICE)
    tokens, _, x, keys = _inputs(2)
    out = unpatchify(tokens, 16, STRIDE, 2)
    eps_hat, x0_hat = out[:, :1].double(), out[:, 1:].double()
    for n in (0, 3):
        st = plan[n]
        x_next, x0 = sampler_update_reference(tokens, x, table, torch.tensor([n], device=DEVICE), keys)
        want = x.double() - st.move * (st.sin_i * x0_hat - st.cos_i * eps_hat)
        if st.corrector:
            want = st.a * want + st.sigma * philox_normal(keys, n + 1, x.shape[1:]).double()
        torch.testing.assert_close(x_next.double(), want, rtol=0, atol=1e-5)
        assert torch.equal(x0, out[:, 1:])


def test_batch_invariance():
    """A volume's update depends on its key, not on the batch around it."""
    table = build_step_table(IaNDiffusion(), 4, "pc", 2, DEVICE)
    step = torch.tensor([0], device=DEVICE)  # a corrector row: noise is drawn
    assert table[0, 4] > 0
    tokens, residual, x, keys = _inputs(3)
    batch = sampler_update(tokens, x, table, step, keys, residual=residual, impl="triton")
    single = sampler_update(tokens[1:2], x[1:2], table, step, keys[1:2], residual=residual[1:2], impl="triton")
    assert torch.equal(batch[0][1:2], single[0]) and torch.equal(batch[1][1:2], single[1])
    moved = sampler_update(
        tokens.flip(0), x.flip(0), table, step, keys.flip(0), residual=residual.flip(0), impl="triton"
    )
    assert torch.equal(moved[0][1], batch[0][1]) and torch.equal(moved[0][0], batch[0][2])


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_in_place_update_and_device_counter(index_dtype):
    table = build_step_table(IaNDiffusion(), 4, "pc", 2, DEVICE)
    tokens, _, x, keys = _inputs(2)
    step = torch.zeros(1, dtype=index_dtype, device=DEVICE)
    state, x0 = x.clone(), torch.empty_like(x)
    for n in range(3):
        want = sampler_update_reference(tokens, state, table, torch.tensor([n], device=DEVICE), keys)
        got = sampler_update(tokens, state, table, step, keys, x_out=state, x0_out=x0, advance=True, impl="triton")
        assert got[0] is state and got[1] is x0
        torch.testing.assert_close(state, want[0], rtol=0, atol=UPDATE_ATOL)
        assert int(step.item()) == n + 1 and step.dtype == index_dtype


def test_out_of_range_step():
    table = build_step_table(IaNDiffusion(), 4, "cold", 1, DEVICE)
    tokens, _, x, keys = _inputs(1)
    step = torch.tensor([4], device=DEVICE)
    assert torch.isnan(sampler_update(tokens, x, table, step, keys, impl="triton")[0]).all()
    with pytest.raises(ValueError, match="outside the step table"):
        sampler_update_reference(tokens, x, table, step, keys)


def test_bad_arguments_raise_clear_errors():
    table = build_step_table(IaNDiffusion(), 4, "pc", 2, DEVICE)
    tokens, _, x, keys = _inputs(2)
    step = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="tokens must be"):
        sampler_update(tokens[:, :4], x, table, step, keys)
    with pytest.raises(ValueError, match="fp32 volume"):
        sampler_update(tokens, x.half(), table, step, keys)
    with pytest.raises(ValueError, match="table"):
        sampler_update(tokens, x, table[:, :4], step, keys)
    with pytest.raises(ValueError, match="step_index"):
        sampler_update(tokens, x, table, step.float(), keys)
    with pytest.raises(ValueError, match="keys"):
        sampler_update(tokens, x, table, step, keys[:1])
    with pytest.raises(ValueError, match="x_out"):
        sampler_update(tokens, x, table, step, keys, x_out=torch.empty(2, 1, 8, 8, 8, device=DEVICE))
    with pytest.raises(ValueError, match="steps"):
        build_step_table(IaNDiffusion(), 0, "pc", 2, DEVICE)
    with pytest.raises(ValueError, match="step"):
        philox_normal(keys, -1, (4,))


# --------------------------------------------------------------------------- GPU
@requires_cuda
def test_bf16_tokens_on_gpu():
    table = build_step_table(IaNDiffusion(), 4, "pc", 2, "cuda")
    tokens, residual, x, keys = _inputs(2, S=64)
    tokens, residual = tokens.bfloat16(), residual.bfloat16()
    step = torch.tensor([1], device="cuda")
    got = sampler_update(tokens, x, table, step, keys, residual=residual, impl="triton")
    want = sampler_update_reference(tokens, x, table, step, keys, residual=residual)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=UPDATE_ATOL)
    assert torch.equal(got[1], want[1])


@requires_cuda
def test_cuda_graph_replays_successive_steps():
    steps = 5
    table = build_step_table(IaNDiffusion(), steps, "pc", 2, "cuda")
    tokens, residual, x, keys = _inputs(2, S=32)
    state, x0 = x.clone(), torch.empty_like(x)
    step = torch.zeros(1, dtype=torch.int64, device="cuda")
    sampler_update(tokens, state, table, step, keys, residual=residual, x_out=state, x0_out=x0)  # compile
    state.copy_(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sampler_update(tokens, state, table, step, keys, residual=residual, x_out=state, x0_out=x0, advance=True)
    state.copy_(x)
    step.zero_()
    expected = x.clone()
    for n in range(steps):
        graph.replay()
        expected = sampler_update_reference(
            tokens, expected, table, torch.tensor([n], device="cuda"), keys, residual=residual
        )[0]
        torch.testing.assert_close(state, expected, rtol=0, atol=UPDATE_ATOL * (n + 1))
    assert int(step.item()) == steps
    assert math.isfinite(state.abs().max().item())
