"""What the measured rows mean at scale: GPU-hours of the paper's recipe and of sampling,
volumes per hour, MFU, FLOPs per step, and each row's ratios against the reference."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..diffusion import IaNDiffusion
from ..flops import flops_per_step
from ..models import create_model
from .setups import REFERENCE

# The paper's recipe (spec section 9): global batch 64, stage 1 then stage 2.
GLOBAL_BATCH = 64
STAGES = (("stage 1", "PRDiT-B/12/0", 104_000), ("stage 2", "PRDiT-B/12/4", 130_000))
PROJECTION_SIZE = 128  # the paper's headline resolution; the largest measured edge otherwise
SAMPLING_VOLUMES = 1000
SAMPLING_STEPS = 1000
SAMPLING_VARIANTS = ("PRDiT-B/12/4", "PRDiT-B/12/12")


def training_gpu_hours(steps: int, samples_per_s: float, global_batch: int = GLOBAL_BATCH) -> float:
    """GPU-hours to run ``steps`` optimizer steps of ``global_batch`` samples on GPUs that
    each process ``samples_per_s``: steps * global_batch / samples_per_s / 3600."""
    if samples_per_s <= 0:
        raise ValueError(f"samples_per_s must be > 0, got {samples_per_s}")
    return steps * global_batch / samples_per_s / 3600.0


def sampling_gpu_hours(volumes: int, steps: int, step_ms: float, batch: int) -> float:
    """GPU-hours to sample ``volumes`` volumes with ``steps`` sampler steps each, when one
    step for a batch of ``batch`` volumes takes ``step_ms``: ceil(volumes / batch) batches."""
    if step_ms <= 0 or batch < 1:
        raise ValueError(f"need step_ms > 0 and batch >= 1, got {step_ms}, {batch}")
    return math.ceil(volumes / batch) * steps * step_ms / 1e3 / 3600.0


def volumes_per_hour(step_ms: float, batch: int, steps: int = SAMPLING_STEPS) -> float:
    """Volumes one GPU samples per hour: batch volumes every ``steps`` steps of ``step_ms``."""
    if step_ms <= 0:
        raise ValueError(f"step_ms must be > 0, got {step_ms}")
    return batch * 3600.0 / (steps * step_ms / 1e3)


def model_flops_utilization(flop_per_item: float, items_per_s: float, peak_tflops: float) -> float:
    """Achieved FLOP/s (flop_per_item * items_per_s) as a fraction of ``peak_tflops``."""
    return flop_per_item * items_per_s / (peak_tflops * 1e12)


def step_flops(variant: str, size: int) -> dict[str, Any]:
    """FLOPs per volume of one model call and of one training step (forward + backward).

    The forward count is ``prdit_fast.flops.flops_per_step``; the training count comes from
    torch's FlopCounterMode on a model built on the meta device (nothing is computed), so
    it includes exactly the backward that runs (the frozen coarse path has none at depth > 0).
    """
    with torch.device("meta"):
        model = create_model(variant, size)
        x0 = torch.empty(1, model.config.in_channels, size, size, size)
    counter = FlopCounterMode(display=False)
    with counter:
        IaNDiffusion().training_losses(model, x0)["loss"].mean().backward()
    return {"forward": float(flops_per_step(model.config)), "train": float(counter.get_total_flops()),
            "source": "forward: prdit_fast.flops.flops_per_step; train: torch FlopCounterMode (meta device)"}


def ratio_to_reference(value: float | None, reference: float | None, higher_is_better: bool) -> float | None:
    if value is None or reference is None or value <= 0 or reference <= 0:
        return None
    return value / reference if higher_is_better else reference / value


def add_derived(rows: list[dict[str, Any]], flops: dict[tuple[str, int], dict[str, Any]],
                peak_tflops: float | None) -> None:
    """Volumes/hour, sampling GPU-hours, MFU and every ratio against the reference row of
    the same (variant, size, batch)."""
    refs = {(r["variant"], r["size"], r["batch"]): r for r in rows if r["backend"] == REFERENCE}
    for r in rows:
        ms, sps = r.get("sample_step_ms"), r.get("train_samples_per_s")
        f = flops.get((r["variant"], r["size"]), {})
        if ms:
            r["volumes_per_hour"] = volumes_per_hour(ms, r["batch"])
            if r.get("device_type") != "cpu":  # a CPU figure is no GPU-hour projection
                r["sample_1000_volumes_gpu_hours"] = sampling_gpu_hours(SAMPLING_VOLUMES, SAMPLING_STEPS, ms, r["batch"])
            if peak_tflops and f.get("forward"):
                r["sample_mfu"] = model_flops_utilization(f["forward"], r["batch"] / (ms / 1e3), peak_tflops)
        if sps and peak_tflops and f.get("train"):
            r["train_mfu"] = model_flops_utilization(f["train"], sps, peak_tflops)
        ref = refs.get((r["variant"], r["size"], r["batch"]), {})
        r["sample_speedup"] = ratio_to_reference(ms, ref.get("sample_step_ms"), higher_is_better=False)
        r["train_speedup"] = ratio_to_reference(sps, ref.get("train_samples_per_s"), higher_is_better=True)
        r["sample_memory_ratio"] = ratio_to_reference(r.get("sample_peak_memory_gib"), ref.get("sample_peak_memory_gib"), True)
        r["train_memory_ratio"] = ratio_to_reference(r.get("train_peak_memory_gib"), ref.get("train_peak_memory_gib"), True)


def _best(rows: list[dict[str, Any]], key: Callable[[dict], float | None]) -> dict[str, Any] | None:
    scored = [(key(r), r) for r in rows if key(r)]
    return max(scored, key=lambda kv: kv[0])[1] if scored else None


def projections(rows: list[dict[str, Any]], backends: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per backend: GPU-hours of the paper's recipe (stage 1 B/12/0 104k steps + stage 2
    B/12/4 130k steps, global batch 64) and of sampling 1,000 volumes at 1000 steps, from
    throughput measured at 128^3 (the paper's edge; never extrapolated from another
    edge), using the fastest batch measured. Ratios are reference hours / backend hours."""
    out = []
    for name in backends:
        mine = [r for r in rows if r["backend"] == name]
        proj: dict[str, Any] = {"backend": name}
        stage_sizes = [{r["size"] for r in mine if r["variant"] == v and r.get("train_samples_per_s")}
                       for _, v, _ in STAGES]
        both = set.intersection(*stage_sizes) if stage_sizes else set()
        if PROJECTION_SIZE in both:
            size = PROJECTION_SIZE
            total = 0.0
            for label, variant, steps in STAGES:
                best = _best([r for r in mine if r["variant"] == variant and r["size"] == size],
                             lambda r: r.get("train_samples_per_s"))
                hours = training_gpu_hours(steps, best["train_samples_per_s"])
                proj[label] = {"variant": variant, "steps": steps, "size": size, "batch": best["batch"],
                               "samples_per_s": best["train_samples_per_s"], "gpu_hours": hours}
                total += hours
            proj["training_gpu_hours"] = total
            proj["training_size"] = size
        else:
            proj["training_note"] = (f"needs training throughput of PRDiT-B/12/0 and PRDiT-B/12/4 at "
                                     f"{PROJECTION_SIZE}^3")
        sampling = {}
        for variant in SAMPLING_VARIANTS:
            measured = {r["size"] for r in mine if r["variant"] == variant and r.get("sample_step_ms")}
            if PROJECTION_SIZE not in measured:
                continue
            size = PROJECTION_SIZE
            best = _best([r for r in mine if r["variant"] == variant and r["size"] == size],
                         lambda r: r["batch"] / r["sample_step_ms"] if r.get("sample_step_ms") else None)
            sampling[variant] = {"size": size, "batch": best["batch"], "step_ms": best["sample_step_ms"],
                                 "gpu_hours": sampling_gpu_hours(SAMPLING_VOLUMES, SAMPLING_STEPS,
                                                                 best["sample_step_ms"], best["batch"])}
        proj["sampling_1000_volumes"] = sampling
        out.append(proj)
    ref = next((p for p in out if p["backend"] == REFERENCE), {})
    for p in out:
        p["training_speedup"] = ratio_to_reference(p.get("training_gpu_hours"), ref.get("training_gpu_hours"), False)
        for variant, s in p["sampling_1000_volumes"].items():
            rs = ref.get("sampling_1000_volumes", {}).get(variant)
            same_size = rs is not None and rs["size"] == s["size"]
            s["speedup"] = ratio_to_reference(s["gpu_hours"], rs["gpu_hours"], False) if same_size else None
    return out


def capacity_summary(capacity: list[dict[str, Any]]) -> dict[str, Any]:
    """Per backend: the largest edge with a batch of at least 1, and that batch."""
    out = {}
    for c in capacity:
        best = out.get(c["backend"])
        if c.get("max_batch", 0) >= 1 and (best is None or c["size"] > best["size"]):
            out[c["backend"]] = {"size": c["size"], "max_batch": c["max_batch"], "bounded_by": c.get("bounded_by")}
    return out
