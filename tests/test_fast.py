"""FastPRDiT (prdit_fast.fast) against the reference PRDiT: outputs, gradients, shared
parameters, state dicts and weight-cache invalidation.

CPU tests run in fp32 (``dtype=torch.float32``) with the adaLN and unfold Triton kernels
under the interpreter; the fused local denoiser is slow there (minutes per model), so
all but one test run the reference LocalDenoiser in its place (``REFERENCE_DENOISER``);
``test_all_triton_kernels_tiny`` runs every kernel. fp32 tolerance: 1e-4 of the largest
magnitude (only summation order differs). bf16 tests need a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import requires_cuda

from prdit_fast.testing import randomized_model, rel_max, rel_rms
from prdit_fast.fast import FastPRDiT, accelerate
from prdit_fast.models import unpatchify

FP32_TOL = 1e-4


# the reference LocalDenoiser inside FastPRDiT (the fused one has its own tests), every other op "auto"
REFERENCE_DENOISER = {"local_denoiser": "torch"}


def outputs_and_grads(model: nn.Module, trainable: list[nn.Parameter], x: torch.Tensor, t: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = model(x, t)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)  # a loss that sees every voxel
    grads = torch.autograd.grad((out * weights).sum(), [x] + trainable)
    return out.detach(), grads


def assert_matches_reference(variant: str, size: int, batch: int = 2, impl: str | dict = "auto") -> None:
    ref = randomized_model(variant, size).train()
    fst = accelerate(ref, dtype=torch.float32, impl=impl)
    trainable = [p for p in ref.parameters() if p.requires_grad]
    x = torch.randn(batch, 1, size, size, size)
    t = torch.randint(0, 1000, (batch,))
    out_r, grads_r = outputs_and_grads(ref, trainable, x, t)
    out_f, grads_f = outputs_and_grads(fst, trainable, x, t)
    assert out_f.dtype == torch.float32 and out_f.shape == (batch, 2, size, size, size)
    assert out_r.abs().max() > 1e-3  # randomized weights: a non-trivial output
    assert rel_max(out_f, out_r) < FP32_TOL
    names = ["x"] + [n for n, p in ref.named_parameters() if p.requires_grad]
    for name, gf, gr in zip(names, grads_f, grads_r):
        assert rel_max(gf, gr) < FP32_TOL, name


@pytest.mark.parametrize(
    "variant, size",
    [("PRDiT-XS/12/2", 24), ("PRDiT-XS/12/0", 16), ("PRDiT-S/10/1", 24), ("PRDiT-B/12/1", 16)],
)
def test_matches_reference_fp32(variant, size):
    """Output and the gradients of x and of every trainable parameter (the fine path when
    depth > 0, everything at depth 0)."""
    assert_matches_reference(variant, size, impl=REFERENCE_DENOISER)


def test_all_triton_kernels_tiny():
    """Every fused op on its Triton path (interpreter on the CPU), fused local denoiser included."""
    assert_matches_reference("PRDiT-XS/10/1", 16, batch=2)


def test_state_dict_and_shared_parameters():
    ref = randomized_model("PRDiT-XS/12/2", 16)
    fst = accelerate(ref, dtype=torch.float32, impl=REFERENCE_DENOISER)
    assert list(fst.state_dict()) == list(ref.state_dict())
    for (name_f, p_f), (name_r, p_r) in zip(fst.named_parameters(), ref.named_parameters()):
        assert name_f == name_r and p_f is p_r and p_f.data_ptr() == p_r.data_ptr()
    assert sum(p.numel() for p in fst.parameters()) == sum(p.numel() for p in ref.parameters())
    # an official-style state dict (another model's weights) loads into the FastPRDiT, strict
    other = randomized_model("PRDiT-XS/12/2", 16, seed=1)
    fst.load_state_dict(other.state_dict(), strict=True)
    x, t = torch.randn(1, 1, 16, 16, 16), torch.tensor([500])
    with torch.no_grad():
        assert rel_max(fst(x, t), other(x, t)) < FP32_TOL
        assert torch.equal(ref(x, t), other(x, t))  # it loaded into the shared parameters


def test_weight_changes_reach_the_next_forward():
    """The derived-weight cache (bf16 casts, [fc1; skip], all adaLN weights) is refreshed
    after in-place updates, load_state_dict and optimizer-style in-place steps."""
    dtype = torch.bfloat16
    ref = randomized_model("PRDiT-XS/12/2", 16).eval()
    fst = accelerate(ref, dtype=dtype, impl="torch")
    x, t = torch.randn(2, 1, 16, 16, 16), torch.tensor([10, 900])

    def fresh_output():  # a new FastPRDiT has an empty cache
        return accelerate(ref, dtype=dtype, impl="torch")(x, t)

    with torch.no_grad():
        before = fst(x, t)
        assert fst._derived._store  # inference filled the cache
        fine = ref.fine
        for p in (fine.blocks[1].adaLN_modulation[1].weight, fine.patch_embedder.skip.weight,
                  fine.blocks[0].attn.qkv.weight, ref.coarse.mlp_denoise.mlp1.fc2.weight):
            p.mul_(-1.5)
        after = fst(x, t)
        assert not torch.equal(after, before)
        assert torch.equal(after, fresh_output())
        fst.load_state_dict(randomized_model("PRDiT-XS/12/2", 16, seed=2).state_dict())
        assert torch.equal(fst(x, t), fresh_output())
    fst(x, t).square().mean().backward()
    with torch.no_grad():
        for p in fst.parameters():
            if p.grad is not None:
                p.sub_(0.5 * p.grad)  # what an SGD step does
        assert torch.equal(fst(x, t), fresh_output())


def test_forward_tokens_and_frozen_coarse_path():
    ref = randomized_model("PRDiT-XS/12/1", 16).train()
    fst = accelerate(ref, dtype=torch.float32, impl=REFERENCE_DENOISER)
    x, t = torch.randn(2, 1, 16, 16, 16), torch.tensor([1, 999])
    tokens = fst.forward_tokens(x, t)
    assert tokens.shape == (2, 8, 8**3 * 2) and tokens.dtype == torch.float32
    out = fst(x, t)
    assert torch.allclose(unpatchify(tokens, 16, 8, 2), out, atol=1e-6)
    out.square().mean().backward()
    assert all(p.grad is None for p in ref.coarse_parameters())  # stage 2: coarse path frozen
    assert all(p.grad is not None for p in ref.fine.parameters())


def test_accelerate_foreign_module_shares_parameters():
    """A module with the official structure (here DDP-like: everything under ``module.``)."""

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    ref = randomized_model("PRDiT-XS/12/1", 16)
    fst = accelerate(Wrapper(ref), dtype=torch.float32, impl=REFERENCE_DENOISER)  # S read from the pos_embed buffer
    assert fst.config.input_size == 16 and fst.config.depth == 1 and fst.config.patch == 12
    assert all(a is b for a, b in zip(fst.parameters(), ref.parameters()))
    x, t = torch.randn(1, 1, 16, 16, 16), torch.tensor([300])
    with torch.no_grad():
        assert rel_max(fst(x, t), ref(x, t)) < FP32_TOL
    again = accelerate(fst, dtype=torch.float32, attention="math", impl=REFERENCE_DENOISER)  # re-wrapping keeps the sharing
    assert again.attention == "math" and all(a is b for a, b in zip(again.parameters(), ref.parameters()))


def test_bad_arguments_raise_clear_errors():
    ref = randomized_model("PRDiT-XS/12/1", 16)
    with pytest.raises(ValueError, match="compute dtype"):
        accelerate(ref, dtype=torch.int8)
    with pytest.raises(ValueError, match="attention"):
        accelerate(ref, attention="fastest")
    with pytest.raises(ValueError, match="impl"):
        accelerate(ref, impl="cuda")
    with pytest.raises(ValueError, match="input_size"):
        accelerate(ref, input_size=32)
    with pytest.raises(ValueError, match="PRDiT structure"):
        accelerate(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="expects volumes"):
        accelerate(ref, dtype=torch.float32)(torch.randn(1, 1, 24, 24, 24), torch.tensor([0]))
    assert isinstance(accelerate(ref), FastPRDiT)


# --------------------------------------------------------------------------- GPU, bf16
@requires_cuda
@pytest.mark.parametrize("variant, size", [("PRDiT-B/12/4", 64), ("PRDiT-S/12/0", 32)])
def test_bf16_matches_fp32_reference_on_gpu(variant, size):
    """bf16 fast backend vs the fp32 reference (TF32 off): output relative RMS error
    < 3e-2, gradients < 5e-2."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = randomized_model(variant, size).cuda().train()
    fst = accelerate(ref, dtype=torch.bfloat16)
    trainable = [p for p in ref.parameters() if p.requires_grad]
    x = torch.randn(2, 1, size, size, size, device="cuda")
    t = torch.tensor([17, 803], device="cuda")
    out_r, grads_r = outputs_and_grads(ref, trainable, x, t)
    out_f, grads_f = outputs_and_grads(fst, trainable, x, t)
    assert out_f.dtype == torch.float32
    assert rel_rms(out_f, out_r) < 3e-2
    for gf, gr in zip(grads_f, grads_r):
        assert rel_rms(gf, gr) < 5e-2
    with torch.no_grad():  # inference path (cached bf16 weights) gives the same output
        assert rel_rms(fst(x, t), out_f) < 1e-2


@requires_cuda
def test_bf16_forward_tokens_capturable_in_cuda_graph():
    """The sampler captures forward_tokens in a CUDA graph; the cached weights make it static."""
    ref = randomized_model("PRDiT-XS/12/2", 32).cuda().eval()
    fst = accelerate(ref)
    x = torch.randn(2, 1, 32, 32, 32, device="cuda")
    t = torch.tensor([5, 600], device="cuda")
    with torch.no_grad():
        for _ in range(2):
            expected = fst.forward_tokens(x, t)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fst.forward_tokens(x, t)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured, expected)
