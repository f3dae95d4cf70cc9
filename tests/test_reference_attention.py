"""The reference network's two attention forms: ``F.scaled_dot_product_attention`` (the
default, as the official code runs it) and the hand-written form (scale on q, scores
materialized) compute the same function with the same parameters.

Tolerances: fp32 on the CPU, relative RMS error below 1e-5 on outputs and gradients (the
two differ only in summation order and where the scale is applied); measured here ~1e-7.
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_, rel_rms

from prdit_fast.models import ATTENTION_FORMS, Attention, PRDiTConfig, PRDiT, set_attention_form

TOLERANCE = 1e-5


@pytest.mark.parametrize("batch, tokens, hidden, heads", [(1, 1, 12, 1), (3, 37, 48, 4), (2, 65, 60, 5)])
def test_forms_agree_forward_and_backward(batch, tokens, hidden, heads):
    sdpa = randomize_(Attention(hidden, heads))
    handwritten = copy.deepcopy(sdpa)
    handwritten.form = "handwritten"
    x = torch.randn(batch, tokens, hidden)
    grad_out = torch.randn(batch, tokens, hidden)
    results = []
    for module in (sdpa, handwritten):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        out.backward(grad_out)
        results.append((out.detach(), xi.grad, module.qkv.weight.grad, module.proj.bias.grad))
    for ours, ref in zip(*results):
        assert rel_rms(ours, ref) < TOLERANCE


def test_whole_network_forms_agree_and_share_the_state_dict():
    cfg = PRDiTConfig(hidden=48, heads=4, depth=2, patch=10, input_size=16, in_channels=1)
    model = randomize_(PRDiT(cfg)).eval()
    assert {m.form for m in model.modules() if isinstance(m, Attention)} == {"sdpa"}
    keys = list(model.state_dict())
    x, t = torch.randn(2, 1, 16, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():
        by_sdpa = model(x, t)
        assert set_attention_form(model, "handwritten") is model
        by_hand = model(x, t)
    assert {m.form for m in model.modules() if isinstance(m, Attention)} == {"handwritten"}
    assert list(model.state_dict()) == keys
    assert rel_rms(by_sdpa, by_hand) < TOLERANCE


def test_unknown_form_is_refused():
    assert ATTENTION_FORMS == ("sdpa", "handwritten")
    with pytest.raises(ValueError, match=r"attention form must be one of \['sdpa', 'handwritten'\]"):
        Attention(12, 2, form="flash")
    with pytest.raises(ValueError, match="attention form"):
        set_attention_form(Attention(12, 2), "math")
