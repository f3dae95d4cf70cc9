"""``prdit-fast info``: variants, parameter count and GFLOP per step of one variant,
devices and the backends this installation can use."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
from typing import Any

import torch

from prdit_fast.flops import flops_breakdown
from prdit_fast.models import DEPTHS, PATCHES, SIZES, count_parameters, create_model, list_models, variant_config

DEFAULT_VARIANT = "PRDiT-B/12/4"
DEFAULT_SIZE = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", default=DEFAULT_VARIANT, help=f"variant to describe (default {DEFAULT_VARIANT})")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"volume edge S (default {DEFAULT_SIZE})")
    parser.add_argument(
        "--sr-size", type=int, default=None, metavar="S_HI",
        help="describe the PRDiT-SR wrapper (spec section 8, default head 768/12/8/2) refining the variant "
             "at --size to S_HI^3 (e.g. --size 128 --sr-size 256)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def sr_summary(name: str, size: int, sr_size: int) -> dict[str, Any]:
    """Parameter counts and per-step cost of the PRDiT-SR wrapper over ``name`` at ``size``
    refining to ``sr_size`` (default head)."""
    from prdit_fast.sr import create_sr_model

    with torch.device("meta"):
        model = create_sr_model(create_model(name, size), sr_size)
    cfg = model.config
    parts = flops_breakdown(cfg)
    head = cfg.head
    return {
        "variant": cfg.name,
        "input_size": sr_size,
        "base_input_size": size,
        "parameters": count_parameters(model),
        "head_parameters": sum(p.numel() for p in model.head_parameters()),
        "head": {"hidden": cfg.hidden, "patch": cfg.patch, "stride": cfg.stride, "pad": cfg.pad,
                 "tokens": head.num_tokens, "token_dim": head.token_dim},
        "gflop_per_step": sum(parts.values()) / 1e9,
        "gflop_base": sum(v for k, v in parts.items() if k.startswith("base.")) / 1e9,
        "gflop_head": sum(v for k, v in parts.items() if k.startswith("sr.")) / 1e9,
        "gflop_breakdown": {k: v / 1e9 for k, v in parts.items()},
    }


def variant_summary(name: str, size: int) -> dict[str, Any]:
    """Parameter count and per-step cost of one variant at volume edge ``size``."""
    cfg = variant_config(name, size)
    with torch.device("meta"):  # parameter count without allocating or initializing weights
        params = count_parameters(create_model(name, size))
    parts = flops_breakdown(cfg)
    return {
        "variant": cfg.name,
        "input_size": size,
        "hidden": cfg.hidden,
        "heads": cfg.heads,
        "depth": cfg.depth,
        "patch": cfg.patch,
        "tokens": cfg.num_tokens,
        "token_dim": cfg.token_dim,
        "parameters": params,
        "gflop_per_step": sum(parts.values()) / 1e9,
        "gflop_breakdown": {k: v / 1e9 for k, v in parts.items()},
    }


def _version(module: str) -> str | None:
    """The module's version if it imports, else None (a broken binary wheel or a missing
    optional dependency counts as absent)."""
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "installed"))


def _native_status() -> Any:
    if importlib.util.find_spec("prdit_fast.native") is None:
        return "not built"
    try:
        return importlib.import_module("prdit_fast.native").status()
    except Exception as e:  # report, do not fail: info must run on any installation
        return f"unavailable ({type(e).__name__}: {e})"


def environment() -> dict[str, Any]:
    """Devices and backends of this installation."""
    from prdit_fast.ops.common import interpreter_enabled, triton_importable

    cuda = [
        {"index": i, "name": torch.cuda.get_device_name(i), "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
        for i in range(torch.cuda.device_count())
    ] if torch.cuda.is_available() else []
    try:
        from prdit_fast.ops.attention import available_backends

        attention = available_backends()
    except ImportError:
        attention = None
    triton_version = _version("triton") if triton_importable() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": {"name": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "cuda": cuda,
        "backends": {
            "reference": True,
            "fast": _version("prdit_fast.fast") is not None,
            "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
            "triton": triton_version,
            "triton_interpreter": interpreter_enabled(),
            "flash_attn": _version("flash_attn"),
            "xformers": _version("xformers"),
            "attention": attention,
            "native": _native_status(),
        },
    }


def _variants_line() -> str:
    sizes = ", ".join(f"{s} {h}/{n}" for s, (h, n) in SIZES.items())
    return (
        f"PRDiT-{{{','.join(SIZES)}}}/{{{','.join(map(str, PATCHES))}}}/{{{','.join(map(str, DEPTHS))}}} "
        f"({len(list_models())} names; size = hidden/heads: {sizes})"
    )


def _gflop(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _yes(value: Any) -> str:
    if value is True:
        return "yes"
    if value in (None, False):
        return "no"
    return str(value)


def run(args: argparse.Namespace) -> int:
    try:
        summary = variant_summary(args.variant, args.size)
        sr = sr_summary(args.variant, args.size, args.sr_size) if args.sr_size is not None else None
    except ValueError as e:
        print(f"prdit-fast info: {e}", file=sys.stderr)
        return 2
    env = environment()
    if args.json:
        out = {"variants": list_models(), "model": summary, "environment": env}
        if sr is not None:
            out["sr"] = sr
        print(json.dumps(out, indent=2, default=str))
        return 0
    b = env["backends"]
    parts = summary["gflop_breakdown"]
    print(f"variants: {_variants_line()}")
    print(
        f"{summary['variant']} at {args.size}^3: {summary['parameters']:,} parameters, "
        f"{_gflop(summary['gflop_per_step'])} GFLOP per step per volume (forward), "
        f"{summary['tokens']} tokens of width {summary['token_dim']}"
    )
    print(
        f"  local denoiser {_gflop(parts['local_denoiser'])}, patch embedder {_gflop(parts['patch_embedder'])}, "
        f"DiT blocks {_gflop(parts['blocks_gemm'] + parts['blocks_attention'])} "
        f"(attention {_gflop(parts['blocks_attention'])}), final layer {_gflop(parts['final_layer'])} GFLOP"
    )
    if sr is not None:
        h = sr["head"]
        print(
            f"{sr['variant']} {args.size}^3 -> {sr['input_size']}^3: {sr['parameters']:,} parameters "
            f"({sr['head_parameters']:,} in the head), {_gflop(sr['gflop_per_step'])} GFLOP per step per volume "
            f"(base {_gflop(sr['gflop_base'])}, head {_gflop(sr['gflop_head'])}: {h['tokens']} tokens of width "
            f"{h['token_dim']}, patch {h['patch']}, stride {h['stride']}, pad {h['pad']})"
        )
    cpu = env["cpu"]
    print(f"devices: cpu ({cpu['cores']} cores, torch uses {cpu['torch_threads']} threads)", end="")
    print("".join(f"; cuda:{g['index']} {g['name']} (sm {g['capability']})" for g in env["cuda"]) or "; no CUDA GPU")
    triton = _yes(b["triton"]) + (" (interpreter on: kernels run on the CPU, slowly)" if b["triton"] and b["triton_interpreter"] else "")
    print(
        f"backends: reference yes; fast {_yes(b['fast'])}; SDPA {_yes(b['sdpa'])}; triton {triton}; "
        f"flash-attn {_yes(b['flash_attn'])}; xformers {_yes(b['xformers'])}"
    )
    if b["attention"] is not None:
        print(f"attention backends here: {', '.join(b['attention'])}")
    print(f"native CUDA library: {b['native'] if isinstance(b['native'], str) else json.dumps(b['native'], default=str)}")
    print(f"torch {env['torch']}, python {env['python']}")
    return 0
