"""``prdit-fast info``: variants, parameter count and GFLOP per step of one variant (or
of the network a checkpoint holds, with its process), devices and the backends this
installation can use."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from typing import Any

import torch

from prdit_fast.flops import flops_breakdown
from prdit_fast.models import (
    DEPTHS,
    PATCHES,
    SIZES,
    STRIDE16_VARIANTS,
    PRDiTConfig,
    count_parameters,
    create_model,
    list_models,
    variant_config,
)

DEFAULT_VARIANT = "PRDiT-B/12/4"
DEFAULT_SIZE = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", help=f"variant to describe (default {DEFAULT_VARIANT}); with --ckpt: the variant "
                                          f"of a bare state dict (or a check)")
    parser.add_argument("--size", type=int, help=f"volume edge S (default {DEFAULT_SIZE}); with --ckpt: that of a "
                                                 f"bare state dict")
    parser.add_argument(
        "--sr-size", type=int, default=None, metavar="S_HI",
        help="describe the PRDiT-SR wrapper (spec section 8, default head 768/12/8/2) refining the variant "
             "at --size to S_HI^3 (e.g. --size 128 --sr-size 256)",
    )
    parser.add_argument(
        "--out-channels", type=int, default=None,
        help="output channels: 2C (default) for IaN, C (1 for CT) for the flow-matching velocity head",
    )
    parser.add_argument(
        "--ckpt", help="describe the network of this checkpoint (variant, size, process); a bare state dict needs "
                       "--variant and --size"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


_PROCESS_NAMES = {"ian": "IaN diffusion ([eps_hat, x0_hat] head)", "flow_matching": "flow matching (velocity head)"}


def sr_summary(name: str, size: int, sr_size: int) -> dict[str, Any]:
    """Parameter counts and per-step cost of the PRDiT-SR wrapper over ``name`` at ``size``
    refining to ``sr_size`` (default head)."""
    from prdit_fast.sr import create_sr_model

    with torch.device("meta"):
        return sr_model_summary(create_sr_model(create_model(name, size), sr_size))


def sr_model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter counts and per-step cost of a PRDiT-SR wrapper (``prdit_fast.sr.PRDiTSR``)."""
    cfg = model.config
    parts = flops_breakdown(cfg)
    head = cfg.head
    return {
        "variant": cfg.name,
        "input_size": cfg.input_size,
        "base_input_size": cfg.base.input_size,
        "parameters": count_parameters(model),
        "head_parameters": sum(p.numel() for p in model.head_parameters()),
        "head": {"hidden": cfg.hidden, "patch": cfg.patch, "stride": cfg.stride, "pad": cfg.pad,
                 "tokens": head.num_tokens, "token_dim": head.token_dim},
        "gflop_per_step": sum(parts.values()) / 1e9,
        "gflop_base": sum(v for k, v in parts.items() if k.startswith("base.")) / 1e9,
        "gflop_head": sum(v for k, v in parts.items() if k.startswith("sr.")) / 1e9,
        "gflop_breakdown": {k: v / 1e9 for k, v in parts.items()},
    }


def variant_summary(name: str, size: int, out_channels: int | None = None) -> dict[str, Any]:
    """Parameter count and per-step cost of one variant at volume edge ``size``."""
    return config_summary(variant_config(name, size, out_channels=out_channels))


def config_summary(cfg: PRDiTConfig) -> dict[str, Any]:
    """Parameter count, process and per-evaluation cost of the network ``cfg`` describes."""
    from prdit_fast.models import PRDiT

    with torch.device("meta"):  # parameter count without allocating or initializing weights
        params = count_parameters(PRDiT(cfg))
    parts = flops_breakdown(cfg)
    return {
        "variant": cfg.name,
        "input_size": cfg.input_size,
        "hidden": cfg.hidden,
        "heads": cfg.heads,
        "depth": cfg.depth,
        "patch": cfg.patch,
        "stride": cfg.stride,
        "pad": cfg.pad,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "process": cfg.process,
        "tokens": cfg.num_tokens,
        "token_dim": cfg.token_dim,
        "parameters": params,
        "gflop_per_step": sum(parts.values()) / 1e9,
        "gflop_breakdown": {k: v / 1e9 for k, v in parts.items()},
    }


def checkpoint_summary(path: str, variant: str | None = None, size: int | None = None) -> dict[str, Any]:
    """``config_summary`` of the network in a checkpoint file, plus which weights it holds;
    for a PRDiT-SR checkpoint that of its base, with the wrapper's under ``sr``.
    ``variant`` / ``size``: needed for a bare state dict (else checks)."""
    from prdit_fast.checkpoint import load_checkpoint
    from prdit_fast.sr import PRDiTSR

    model = load_checkpoint(path, variant=variant, input_size=size)
    if isinstance(model, PRDiTSR):
        summary = config_summary(model.base.config)
        summary["sr"] = sr_model_summary(model)
    else:
        summary = config_summary(model.config)
    summary["checkpoint"] = str(path)
    summary["weights"] = model.checkpoint_weights
    return summary


def _version(module: str) -> str | None:
    """The module's version if it imports, else None (a broken binary wheel or a missing
    optional dependency counts as absent)."""
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "installed"))


def environment() -> dict[str, Any]:
    """Devices and backends of this installation."""
    # here, not at the top: these import Triton, which `prdit-fast info --variant` never needs
    from prdit_fast.ops.attention_backends import available_backends
    from prdit_fast.ops.common import interpreter_enabled, triton_importable
    from prdit_fast.ops.dispatch import OP_IMPLS, default_impl

    cuda = [
        {"index": i, "name": torch.cuda.get_device_name(i), "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
        for i in range(torch.cuda.device_count())
    ] if torch.cuda.is_available() else []
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
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
            "attention": available_backends(),
            # what impl="auto" runs for each op on this machine's default device and dtype
            "impl_auto": {"device": device, "dtype": str(dtype).replace("torch.", ""),
                          "ops": {op: default_impl(op, device, dtype) for op in OP_IMPLS}},
        },
    }


def _variants_line() -> str:
    sizes = ", ".join(f"{s} {h}/{n}" for s, (h, n) in SIZES.items())
    return (
        f"PRDiT-{{{','.join(SIZES)}}}/{{{','.join(map(str, PATCHES))}}}/{{{','.join(map(str, DEPTHS))}}}[-s{{stride}}] "
        f"(stride 8 unless -s; {len(list_models())} listed names incl. {', '.join(STRIDE16_VARIANTS)} and "
        f"PRDiT-XS/4/0; size = hidden/heads: {sizes})"
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
        if args.ckpt:
            summary = checkpoint_summary(args.ckpt, args.variant, args.size)
            sr = summary.pop("sr", None)
        else:
            variant, size = args.variant or DEFAULT_VARIANT, args.size or DEFAULT_SIZE
            summary = variant_summary(variant, size, args.out_channels)
            sr = sr_summary(variant, size, args.sr_size) if args.sr_size is not None else None
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # CheckpointError included
        print(f"error: {e}", file=sys.stderr)
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
    if args.ckpt:
        print(f"checkpoint {summary['checkpoint']}: {summary['weights']} weights")
    print(
        f"{summary['variant']} at {summary['input_size']}^3: {summary['parameters']:,} parameters "
        f"({summary['parameters'] / 1e6:.1f}M), {_gflop(summary['gflop_per_step'])} GFLOP per step per volume "
        f"(one network evaluation, forward), {summary['tokens']} tokens of width {summary['token_dim']} "
        f"(p {summary['patch']}, stride {summary['stride']}, pad {summary['pad']})"
    )
    print(f"  process: {_PROCESS_NAMES[summary['process']]}; output channels {summary['out_channels']}")
    print(
        f"  local denoiser {_gflop(parts['local_denoiser'])}, patch embedder {_gflop(parts['patch_embedder'])}, "
        f"DiT blocks {_gflop(parts['blocks_gemm'] + parts['blocks_attention'])} "
        f"(attention {_gflop(parts['blocks_attention'])}), final layer {_gflop(parts['final_layer'])} GFLOP"
    )
    if sr is not None:
        h = sr["head"]
        print(
            f"{sr['variant']} {sr['base_input_size']}^3 -> {sr['input_size']}^3: {sr['parameters']:,} parameters "
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
    print(f"attention backends here: {', '.join(b['attention'])}")
    auto = b["impl_auto"]
    print(f"ops with impl='auto' on {auto['device']} {auto['dtype']}: "
          + ", ".join(f"{op} {impl}" for op, impl in auto["ops"].items()))
    print(f"torch {env['torch']}, python {env['python']}")
    return 0
