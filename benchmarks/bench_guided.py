"""Guided reconstruction cost (spec section 15): what guidance adds to a sampling step.

    python benchmarks/bench_guided.py --json guided.json                     # DiT-B/12/12 at 128^3, bf16
    python benchmarks/bench_guided.py --xray-views 2 --whole-steps 1000      # + a whole X-ray reconstruction

Rows, all at batch 1 on one TF-PRDiT prior (random weights: the cost does not depend on them):

* ``unguided``   ``engine.Sampler`` step (fast backend, CUDA graph): the reference cost;
* ``guided-sr``  ``engine.GuidedSampler`` step with ``Downsample(4)`` (the official
                 super-resolution operator): network + update + the operator's gradient
                 and the guidance update, in the same graph;
* ``official-sr`` the official code path's guided step: the reference network in fp32,
                 eager, then ``dL/dx0_hat`` through the loss and the update in plain torch
                 (``IaNDiffusion.sample_guided``'s loop body);
* ``guided-xray`` (``--xray-views N``, needs the ``xray`` extra) the GuidedSampler step with
                 ``XrayProjection(N)``.

With ``--whole-steps N`` the guided rows also time a whole N-step reconstruction of one
volume end to end (``whole_s_N``: x_T, every step, one volume).

``step_ms`` is the median of ``prdit_fast.bench.timing.time_call``; ``x_unguided`` the step-time
ratio to ``unguided`` in this run. On the CPU (``--device cpu``, tiny sizes: the tests)
the fast rows compute in fp32 with the plain-torch kernels and run eagerly.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from prdit_fast.atomic import write_json
from prdit_fast.bench.timing import time_call
from prdit_fast.devices import resolve_device
from prdit_fast.diffusion import IaNDiffusion
from prdit_fast.engine import GuidedSampler, Sampler, keys_for
from prdit_fast.measurements import TASK_SETTINGS, Downsample, guidance_gradient
from prdit_fast.testing import randomized_model


def _engine_row(name: str, engine: Sampler, device: torch.device, y: torch.Tensor | None) -> dict[str, Any]:
    keys = keys_for(0, [0])
    if y is None:
        engine.sample(keys)  # x_T and the warm step counter; timing below replays single steps
    else:
        engine.sample(keys, y)

    def step():
        engine.step.zero_()  # stay inside the step table however many reps run
        engine.advance()

    timing = time_call(step, device)
    return {"row": name, "step_ms": timing.median_ms, "reps": timing.reps, "cuda_graph": engine.cuda_graph,
            "cuda_graph_reason": engine.graph_reason or None}


def _official_row(model: torch.nn.Module, op: torch.nn.Module, y: torch.Tensor, device: torch.device) -> dict:
    """One step of the official guided loop: fp32 reference network, eager, then the gradient."""
    diffusion = IaNDiffusion(noise_std=1.0)
    settings = TASK_SETTINGS["super-resolution"]
    st = next(s for s in diffusion.guided_schedule(1000, **settings) if s.guidance)
    x = diffusion.initial_noise(y.shape[:2] + (model.config.input_size,) * 3, device=device)
    t = torch.full((1,), st.t, device=device, dtype=torch.long)

    def step():
        with torch.no_grad():
            out = model(x, t)
        eps_hat, x0_hat = out[:, :1], out[:, 1:]
        nxt = x - st.move * (st.sin_i * x0_hat - st.cos_i * eps_hat) - st.guidance * guidance_gradient(op, x0_hat, y)
        return st.a * nxt + st.sigma * torch.randn_like(nxt)

    timing = time_call(step, device)
    return {"row": "official-sr", "step_ms": timing.median_ms, "reps": timing.reps, "cuda_graph": False}


def _whole(engine: GuidedSampler, y: torch.Tensor, steps: int, device: torch.device) -> dict[str, Any]:
    """A whole ``steps``-step reconstruction of one volume (x_T drawn inside), timed once after a warm-up."""
    timing = time_call(lambda: engine.sample(keys_for(0, [0]), y), device, warmup=1, min_reps=1, max_reps=1,
                       budget_s=0.0)
    return {f"whole_s_{steps}": timing.median_ms / 1e3}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reference = randomized_model(args.variant, args.size).to(device)
    from prdit_fast.fast import accelerate

    fast = accelerate(reference, dtype=dtype, impl="auto" if device.type == "cuda" else "torch")
    diffusion = IaNDiffusion(noise_std=1.0)
    sr = Downsample(4)
    y = torch.randn(1, 1, *(args.size // 4,) * 3, device=device)
    rows = [_engine_row("unguided", Sampler(fast, 1, args.steps, k=2, diffusion=diffusion), device, None)]
    guided = GuidedSampler(fast, sr, 1, args.steps, diffusion=diffusion, **TASK_SETTINGS["super-resolution"])
    rows.append(_engine_row("guided-sr", guided, device, y))
    if args.whole_steps:  # a whole super-resolution reconstruction of one volume, end to end
        rows[-1].update(_whole(guided if args.whole_steps == args.steps else GuidedSampler(
            fast, sr, 1, args.whole_steps, diffusion=diffusion, **TASK_SETTINGS["super-resolution"]),
            y, args.whole_steps, device))
    rows.append(_official_row(reference, sr, y, device))
    if args.xray_views:
        from prdit_fast.measurements import XrayProjection

        xray = XrayProjection(args.xray_views, volume_size=args.size).to(device)
        with torch.no_grad():
            y_xray = xray(torch.zeros(1, 1, *(args.size,) * 3, device=device))
        engine = GuidedSampler(fast, xray, 1, args.whole_steps or args.steps, diffusion=diffusion,
                               **TASK_SETTINGS["xray"])
        rows.append(_engine_row("guided-xray", engine, device, y_xray))
        if args.whole_steps:
            rows[-1].update(_whole(engine, y_xray, args.whole_steps, device))
    base = rows[0]["step_ms"]
    for row in rows:
        row["x_unguided"] = row["step_ms"] / base
    return {"variant": args.variant, "size": args.size, "device": str(device), "dtype": str(dtype),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="DiT-B/12/12")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1000, help="length of the step table (the timed steps replay step 0)")
    parser.add_argument("--xray-views", type=int, default=0, help="also time X-ray guidance with N views (DiffDRR)")
    parser.add_argument("--whole-steps", type=int, default=0,
                        help="also time a whole reconstruction of this many steps (super-resolution, and X-ray with --xray-views)")
    parser.add_argument("--device", help="default cuda when available")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    result = run(args)
    for row in result["rows"]:
        print(f"{row['row']:<12} {row['step_ms']:10.3f} ms/step  x{row['x_unguided']:.3f}  graph={row['cuda_graph']}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
