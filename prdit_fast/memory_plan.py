"""The per-step memory plan: weights, sampler state and the activation + workspace peak of
one sampling or training step, computed without a GPU.

    python -m prdit_fast.memory_plan                         # B/16/12-s16 at 256^3, batch 1 and 2
    python -m prdit_fast.memory_plan --variant PRDiT-B/12/4 --size 128 --batch 4 --out plan.md

How: the network runs on the meta device (shapes and dtypes only, nothing allocated) under
``LiveBytes``, a dispatch mode that adds the bytes of every storage an operator creates and
subtracts them when the last tensor on that storage is freed; its peak is the step's
activation + workspace memory above what existed before (weights, inputs). On real CPU
tensors the same count equals the CPU allocator's own peak (tests/test_memory_plan.py
checks it against torch.profiler's allocation events at small sizes), so at 256^3 the plan
is what eager PyTorch allocates, not a formula's guess. It is computed, not measured on a
GPU: CUDA allocator rounding (512-byte blocks, 2 MiB segments), cuBLAS / SDPA workspaces
and fragmentation come on top.

What is counted:

* sampling: the reference network's forward in ``dtype`` (bf16: weights and activations,
  SDPA attention, as the engine runs it under autocast; the fast backend fuses several of
  these passes, so its peak is at most this) plus the engine's state for Euler: x fp32,
  and for a flow-matching model nothing else (the fused update writes x in place);
  IaN adds the x0_hat buffer.
* training: one fp32 step without autocast and without activation checkpointing (an upper
  bound of the official amp + checkpointing recipe): the forward of the flow-matching loss
  at ``batch``, its backward (the gradients of the trainable parameters are created inside
  and counted), plus AdamW's two fp32 moments per trainable parameter (counted from the
  parameter count: they are made at the first optimizer step, outside the counted step).
"""
from __future__ import annotations

import argparse
import sys
import weakref
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

GIB = 2**30
VARIANT, SIZE, BATCHES = "PRDiT-B/16/12-s16", 256, (1, 2)
_ADAM_BYTES_PER_PARAM = 8  # exp_avg + exp_avg_sq, fp32


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that operators create while the mode is on, live and peak.

    A storage counts from the first operator output on it until the last tensor object on
    it is freed (views count as references). Storages of ``existing`` tensors (weights,
    inputs) are never counted, also when an operator returns a view of them.
    """

    def __init__(self, existing: Sequence[torch.Tensor] = ()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage id -> [bytes, tensor references]
        self._seen = WeakIdKeyDictionary()
        self._existing = {t.untyped_storage()._cdata for t in existing}

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor in self._seen:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._existing:
            return
        self._seen[tensor] = True
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [storage.nbytes(), 0]
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _model(variant: str, size: int, out_channels: int | None, device: str) -> torch.nn.Module:
    from .models import create_model

    with torch.device(device):
        extra = {} if out_channels is None else {"out_channels": out_channels}
        return create_model(variant, size, **extra)


def step_memory_plan(
    variant: str = VARIANT,
    size: int = SIZE,
    batch: int = 1,
    mode: str = "sampling",
    dtype: torch.dtype = torch.bfloat16,
    out_channels: int | None = 1,
    device: str = "meta",
) -> dict[str, Any]:
    """The memory of one step of ``mode`` ("sampling" or "training") at ``batch``, in bytes.

    Returns {variant, size, batch, mode, dtype, weights_bytes, state_bytes, step_peak_bytes
    (activations + workspace above weights and state), total_bytes, and the GiB of each}.
    ``device="cpu"`` runs the same count on real tensors (the tests' check); "meta" costs
    no memory at any size. ``out_channels=1``: the flow-matching velocity head (None: the
    variant's default, IaN).
    """
    if mode not in ("sampling", "training"):
        raise ValueError(f"mode must be 'sampling' or 'training', got {mode!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    dtype = dtype if mode == "sampling" else torch.float32
    model = _model(variant, size, out_channels, device).to(dtype)
    cfg = model.config
    flow = getattr(cfg, "process", "ian") == "flow_matching"
    shape = (batch, cfg.in_channels) + (size,) * 3
    with torch.device(device):
        x = torch.randn(shape, dtype=torch.float32)
        t = torch.full((batch,), 500.0 if flow else 500)
    weights = _nbytes(model.parameters()) + _nbytes(model.buffers())
    state = _nbytes([x])  # the sampler state x (fp32), or the training batch
    if mode == "sampling":
        model.eval()
        if not flow:
            state *= 2  # the x0_hat buffer of the IaN update
        with torch.no_grad(), LiveBytes([*model.parameters(), *model.buffers(), x, t]) as counter:
            out = model(x.to(dtype), t)
            del out
        optimizer_state = 0
    else:
        from .flow_matching import FlowMatching

        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer_state = _ADAM_BYTES_PER_PARAM * sum(p.numel() for p in trainable)
        with torch.device(device):
            noise = torch.randn(shape)
            times = torch.rand(batch)
        with LiveBytes([*model.parameters(), *model.buffers(), x, noise, times]) as counter:
            loss = FlowMatching().training_losses(model, x, times, noise)["loss"].mean()
            loss.backward()
            del loss
        state += optimizer_state
    plan = {"variant": cfg.name, "size": size, "batch": batch, "mode": mode,
            "dtype": str(dtype).replace("torch.", ""), "weights_bytes": weights, "state_bytes": state,
            "optimizer_state_bytes": optimizer_state, "step_peak_bytes": counter.peak}
    plan["total_bytes"] = weights + state + counter.peak
    for key in ("weights", "state", "step_peak", "total"):
        plan[f"{key}_gib"] = plan[f"{key}_bytes"] / GIB
    return plan


def to_markdown(plans: list[dict[str, Any]]) -> str:
    """One table row per plan."""
    lines = ["| variant | size | mode | dtype | batch | weights GiB | state GiB | activations + workspace GiB | "
             "total GiB |", "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for p in plans:
        lines.append(f"| {p['variant']} | {p['size']}^3 | {p['mode']} | {p['dtype']} | {p['batch']} | "
                     f"{p['weights_gib']:.3f} | {p['state_gib']:.3f} | {p['step_peak_gib']:.3f} | {p['total_gib']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default=VARIANT)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--modes", nargs="+", choices=("sampling", "training"), default=["sampling", "training"])
    parser.add_argument("--ian", action="store_true", help="the IaN head (2C outputs) instead of the velocity head")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    plans = [step_memory_plan(args.variant, args.size, b, mode, out_channels=None if args.ian else 1)
             for mode in args.modes for b in args.batch]
    text = to_markdown(plans)
    if args.out:
        from .atomic import atomic_path

        with atomic_path(args.out) as tmp:
            tmp.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
