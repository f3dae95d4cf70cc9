"""Our modules driven the way the official scripts drive theirs (spec section 16): the
sampler's ``model(x, t, **model_kwargs)`` with ``model_kwargs = {"y": None}`` and 1-d,
0-d or int t, the bound ``forward`` passed as a function, the IaN cold sampler loop,
DDP wrapping (gloo, world size 1, CPU), the nn.Module methods the scripts call,
``torch.compile(model)``, and state dicts. The fast backend runs fp32 with its plain-torch op references
(``impl="torch"``; the Triton kernels have their own interpreter tests).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from prdit_fast.diffusion import IaNDiffusion
from prdit_fast.fast import FastPRDiT, accelerate
from conftest import requires_cuda
from prdit_fast.testing import randomized_model, rel_max, rel_rms

S = 16
FP32_TOL = 1e-4


def models(variant: str = "PRDiT-XS/10/1"):
    ref = randomized_model(variant, S, std=0.05)
    return ref, accelerate(ref, dtype=torch.float32, impl="torch")


def official_cold_loop(model_fn, x: torch.Tensor, steps: int, model_kwargs: dict, t_form: str):
    """The official IaN cold sampler's loop (spec section 7): evaluation points T - skip, ...,
    0, ``model_fn(x, t, **model_kwargs)`` with t built as the script builds it."""
    T = 1000
    skip = T // steps
    x0 = None
    for i in reversed(range(0, T, skip)):
        j = max(i - skip, 0)
        t = {"int": i, "0-d": torch.tensor(i), "1-d": torch.full((x.shape[0],), i, dtype=torch.long)}[t_form]
        eps, x0 = model_fn(x, t, **model_kwargs).chunk(2, dim=1)
        beta = i / T * math.pi / 2
        f = math.sin(beta) * x0 - math.cos(beta) * eps
        x = x - (j - i) * (math.pi / 2) / T * f
    return x, x0


@pytest.mark.parametrize("t_form", ["int", "0-d", "1-d"])
def test_official_cold_sampler_loop_with_the_bound_forward(t_form):
    ref, fast = models()
    noise = 0.5 * torch.randn(3, 1, S, S, S)
    with torch.no_grad():
        x_ours, x0_ours = IaNDiffusion().sample(ref, noise, steps=4, sampler="cold")
        for module in (ref, fast):
            x, x0 = official_cold_loop(module.forward, noise, 4, {"y": None}, t_form)  # the bound method
            assert rel_max(x, x_ours) < FP32_TOL and rel_max(x0, x0_ours) < FP32_TOL
            x, x0 = official_cold_loop(module, noise, 4, {"y": None}, t_form)  # the module itself
            assert rel_max(x0, x0_ours) < FP32_TOL


def test_model_kwargs_y_none_every_t_form():
    ref, fast = models()
    x = torch.randn(3, 1, S, S, S)
    with torch.no_grad():
        expected = ref(x, torch.full((3,), 250))
        for module in (ref, fast):
            for t in (torch.full((3,), 250), torch.tensor(250), 250):
                assert rel_max(module(x, t, **{"y": None}), expected) < FP32_TOL
                forward = module.forward
                assert rel_max(forward(x, t, **{"y": None}), expected) < FP32_TOL


def test_ddp_wrapping_trains_like_the_reference(tmp_path):
    """DDP(fast) (gloo, world size 1): forward with the official kwargs, encode mode through
    the wrapper, and a backward whose gradients are the reference's."""
    ref, fast = models("PRDiT-XS/10/8")
    ref.train()
    twin = copy.deepcopy(ref)
    x, t = torch.randn(3, 1, S, S, S), torch.tensor([10, 500, 990])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(fast)
        out = ddp(x, t, y=None)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        (out * weights).sum().backward()
        (twin(x, t) * weights).sum().backward()
        trained = [(n, p) for n, p in fast.named_parameters() if p.requires_grad]
        assert trained and all(n.startswith(("fine.", "t_embedder.fine_head.")) for n, _ in trained)
        twins = dict(twin.named_parameters())
        for name, p in trained:
            assert rel_max(p.grad, twins[name].grad) < FP32_TOL, name
        with torch.no_grad():
            assert ddp(x, mode="encode").shape == (3, (S // 8) ** 3, 192)
        assert list(ddp.module.state_dict()) == list(ref.state_dict())
        assert all(k.startswith("module.") for k in ddp.state_dict())
        ref_ddp = DistributedDataParallel(twin)  # the official code wraps its own model the same way
        with torch.no_grad():
            assert rel_max(ref_ddp(x, 500, y=None), ref(x, torch.full((3,), 500))) < FP32_TOL
    finally:
        dist.destroy_process_group()


def test_module_methods():
    ref, fast = models()
    x, t = torch.randn(3, 1, S, S, S), torch.tensor([1, 2, 3])
    assert fast.eval() is fast and not fast.training and not ref.training
    assert fast.train() is fast and fast.training and ref.training and ref.fine.training
    fast.eval()
    assert fast.requires_grad_(False) is fast and not any(p.requires_grad for p in ref.parameters())
    fast.requires_grad_(True)
    assert all(p.requires_grad for p in ref.parameters())  # shared parameters
    assert fast.to("cpu") is fast and isinstance(fast, FastPRDiT)
    with torch.no_grad():
        expected = ref(x, t)
        fast.half()  # the parameters (the reference's too) become fp16; the compute dtype stays fp32
        assert all(p.dtype == torch.float16 for p in ref.parameters())
        out = fast(x.half(), t)
        assert out.dtype == torch.float32 and rel_rms(out, expected) < 1e-2
        fast.to(torch.float32)
        assert rel_max(fast(x, t), expected) < 1e-2  # fp16-rounded weights


def test_state_dict_round_trip():
    ref, fast = models()
    other = randomized_model("PRDiT-XS/10/1", S, seed=3, std=0.05)
    assert list(fast.state_dict()) == list(ref.state_dict())
    missing, unexpected = fast.load_state_dict(other.state_dict(), strict=True)
    assert not missing and not unexpected
    x, t = torch.randn(1, 1, S, S, S), 77
    with torch.no_grad():
        assert rel_max(fast(x, t), other(x, torch.tensor([77]))) < FP32_TOL
    for key, value in fast.state_dict().items():
        assert torch.equal(value, other.state_dict()[key])


def test_fp8_training_says_what_to_use():
    ref = randomized_model("PRDiT-XS/10/1", S, std=0.05).train()
    fast = accelerate(ref, dtype=torch.float8_e4m3fn, impl="torch")
    with pytest.raises(RuntimeError, match="inference only"):
        fast(torch.randn(1, 1, S, S, S, requires_grad=True), 5)


def test_torch_compile_captures_the_fast_module_in_one_graph():
    """``torch.compile(fast)`` as a script would call it: Dynamo captures the whole forward
    and backward in one graph (``fullgraph=True`` raises on any break), and the compiled
    module's output and gradients are the eager ones. The ``aot_eager`` backend runs the
    captured graph with torch's own kernels: inductor's CPU compile takes minutes on a
    2-core machine, and inductor with the Triton kernels is the CUDA test below."""
    ref, fast = models()
    x, t = torch.randn(3, 1, S, S, S), torch.tensor([3, 300, 900])
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert rel_max(compiled(x, t, y=None), fast(x, t)) < FP32_TOL
        assert rel_max(compiled(x, 250, y=None), fast(x, 250)) < FP32_TOL  # an int t, as the official samplers
    fast.train()
    weights = torch.linspace(-1, 1, x.numel() * 2).view(3, 2, S, S, S)
    grads = []
    for module in (fast, compiled):
        fast.zero_grad()
        (module(x, t) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in fast.named_parameters() if p.requires_grad})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert rel_max(grads[1][name], grads[0][name]) < FP32_TOL, name


@requires_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 2e-2)])
def test_torch_compile_with_the_triton_kernels_on_cuda(dtype, tol):
    """``torch.compile(fast)`` with inductor over the Triton kernels (``impl="auto"``):
    the compiled module's output equals the eager fast module's within the dtype's
    tolerance (relative RMS; TF32 off). One compile per dtype (the GPU session caps its
    test stage); the call forms (int t, ``y=None``) are the CPU test's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = randomized_model("PRDiT-XS/12/2", 32, std=0.05).cuda().eval()
    fast = accelerate(ref, dtype=dtype)
    compiled = torch.compile(fast)
    x = torch.randn(3, 1, 32, 32, 32, device="cuda")
    t = torch.tensor([5, 300, 990], device="cuda")
    with torch.no_grad():
        assert rel_rms(compiled(x, t, y=None), fast(x, t)) < tol
