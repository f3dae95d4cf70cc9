"""The memory plan (prdit_fast.memory_plan): its count of one step's activation + workspace
bytes equals the CPU allocator's own peak, read from torch.profiler's allocation events, at
small sizes; and the meta-device plan (what the 256^3 table is computed with) equals the
count on real tensors."""
from __future__ import annotations

import pytest
import torch

from prdit_fast.memory_plan import LiveBytes, step_memory_plan, to_markdown

VARIANT, SIZE = "PRDiT-XS/16/1-s16", 32


def _allocator_peak(run) -> int:
    """Peak of the CPU allocator's bytes allocated during ``run()`` above what was allocated before."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("batch", [1, 3])
def test_count_equals_the_allocator_peak_of_a_forward(batch):
    from prdit_fast.models import create_model

    model = create_model(VARIANT, SIZE, out_channels=1).eval()
    x, t = torch.randn(batch, 1, SIZE, SIZE, SIZE), torch.full((batch,), 500.0)

    def forward():
        with torch.no_grad():
            out = model(x, t)
            del out

    measured = _allocator_peak(forward)
    with LiveBytes([*model.parameters(), *model.buffers(), x, t]) as counter:
        forward()
    assert counter.live == 0 and measured > 0
    assert counter.peak == pytest.approx(measured, rel=0.02), (counter.peak, measured)


def test_count_equals_the_allocator_peak_of_a_training_step():
    from prdit_fast.flow_matching import FlowMatching
    from prdit_fast.models import create_model

    model = create_model(VARIANT, SIZE, out_channels=1).train()
    x, noise, times = torch.randn(2, 1, SIZE, SIZE, SIZE), torch.randn(2, 1, SIZE, SIZE, SIZE), torch.rand(2)

    def step():
        loss = FlowMatching().training_losses(model, x, times, noise)["loss"].mean()
        loss.backward()
        del loss

    measured = _allocator_peak(step)
    model.zero_grad(set_to_none=True)
    with LiveBytes([*model.parameters(), *model.buffers(), x, noise, times]) as counter:
        step()
    assert counter.peak == pytest.approx(measured, rel=0.02), (counter.peak, measured)


@pytest.mark.parametrize("mode", ["sampling", "training"])
def test_meta_plan_equals_the_count_on_real_tensors(mode):
    meta = step_memory_plan(VARIANT, SIZE, 2, mode)
    real = step_memory_plan(VARIANT, SIZE, 2, mode, device="cpu")
    assert meta == real
    assert meta["total_bytes"] == meta["weights_bytes"] + meta["state_bytes"] + meta["step_peak_bytes"]
    assert meta["step_peak_bytes"] > 0 and meta["state_bytes"] >= 2 * SIZE**3 * 4  # at least x fp32, batch 2
    if mode == "sampling":
        assert meta["dtype"] == "bfloat16" and meta["state_bytes"] == 2 * SIZE**3 * 4  # x fp32, batch 2
        single = step_memory_plan(VARIANT, SIZE, 1, mode)
        # activations scale with the batch (the few per-call constants aside)
        assert 1.8 < meta["step_peak_bytes"] / single["step_peak_bytes"] <= 2.0


def test_the_table_and_bad_arguments():
    text = to_markdown([step_memory_plan(VARIANT, SIZE, 1)])
    assert "| PRDiT-XS/16/1-s16 | 32^3 | sampling | bfloat16 | 1 |" in text
    with pytest.raises(ValueError, match="mode must be"):
        step_memory_plan(VARIANT, SIZE, 1, "inference")
    with pytest.raises(ValueError, match="batch must be"):
        step_memory_plan(VARIANT, SIZE, 0)
