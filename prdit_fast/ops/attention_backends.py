"""Full (non-causal) multi-head attention on the packed qkv layout, over several backends.

``attention(qkv)`` takes ``qkv`` of shape (B, N, 3, H, D), the layout that ``attn.qkv``
produces after a reshape (spec section 5), and returns (B, N, H, D) with softmax scale
D^-0.5. Backends:

========== ============================================================== =============
name       implementation                                                 runs on
========== ============================================================== =============
flash4     flash-attn-4 (``flash_attn.cute.flash_attn_func``)             sm90 / sm100
flash3     FlashAttention-3 (``flash_attn_interface``)                    sm90
flash2     FlashAttention-2 (``flash_attn.flash_attn_qkvpacked_func``)    sm80+
sdpa_cudnn PyTorch SDPA restricted to the cuDNN backend                   sm80+
sdpa_flash PyTorch SDPA restricted to the FlashAttention backend          sm80+
xformers   ``xformers.ops.memory_efficient_attention``                    CUDA
math       plain torch (QK^T, softmax, AV; fp32 accumulation)             anywhere
========== ============================================================== =============

All but ``xformers`` and ``math`` need fp16/bf16 inputs. Every backend has a backward.

``backend="auto"`` rule: on CUDA, try the backends that can run there (importable, right
GPU generation, half-precision dtype where needed) in the order of the table above and use
the first one that accepts the call; a backend that raises for a given (device, dtype,
heads, head_dim, needs-grad) is skipped from then on for that key and the winner is cached
for it. On the CPU, ``math``. ``last_backend()`` tells which backend ran the last call.
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch
import torch.nn.functional as F

from .dispatch import announce

ATTENTION_BACKENDS = ("flash4", "flash3", "flash2", "sdpa_cudnn", "sdpa_flash", "xformers", "math")
_HALF = (torch.float16, torch.bfloat16)
_FLOAT_ANY = (torch.float16, torch.bfloat16, torch.float32)

_last_backend: str | None = None
# (device, dtype, heads, head_dim, needs_grad) -> backend chosen by "auto"
_auto_choice: dict[tuple, str] = {}
_auto_rejected: set[tuple] = set()


def last_backend() -> str | None:
    """Name of the backend that ran the most recent ``attention`` call (None before any)."""
    return _last_backend


# --------------------------------------------------------------------------- #
# Backend implementations: qkv (B, N, 3, H, D) -> (B, N, H, D)
# --------------------------------------------------------------------------- #
def _first(result):
    """Some flash-attn releases return (out, softmax_lse); keep the output."""
    return result[0] if isinstance(result, (tuple, list)) else result


def _math(qkv: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv.float().unbind(2)  # each (B, N, H, D)
    scale = qkv.shape[-1] ** -0.5
    scores = torch.einsum("bnhd,bmhd->bhnm", q * scale, k)
    return torch.einsum("bhnm,bmhd->bnhd", scores.softmax(dim=-1), v).to(qkv.dtype)


def _sdpa(qkv: torch.Tensor, backend_name: str) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = getattr(SDPBackend, backend_name, None)
    if kernel is None:
        raise RuntimeError(f"this torch ({torch.__version__}) has no SDPA backend {backend_name}")
    q, k, v = (z.transpose(1, 2) for z in qkv.unbind(2))  # each (B, H, N, D), views
    with sdpa_kernel([kernel]):
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


def _flash2(qkv: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_qkvpacked_func

    return _first(flash_attn_qkvpacked_func(qkv, causal=False))


def _flash3(qkv: torch.Tensor) -> torch.Tensor:
    import flash_attn_interface

    if hasattr(flash_attn_interface, "flash_attn_qkvpacked_func"):
        return _first(flash_attn_interface.flash_attn_qkvpacked_func(qkv, causal=False))
    q, k, v = qkv.unbind(2)
    return _first(flash_attn_interface.flash_attn_func(q, k, v, causal=False))


def _flash4(qkv: torch.Tensor) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func

    q, k, v = qkv.unbind(2)
    return _first(flash_attn_func(q, k, v, causal=False))


def _xformers(qkv: torch.Tensor) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention

    q, k, v = qkv.unbind(2)
    return memory_efficient_attention(q, k, v, scale=qkv.shape[-1] ** -0.5)


_IMPLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "flash4": _flash4,
    "flash3": _flash3,
    "flash2": _flash2,
    "sdpa_cudnn": functools.partial(_sdpa, backend_name="CUDNN_ATTENTION"),
    "sdpa_flash": functools.partial(_sdpa, backend_name="FLASH_ATTENTION"),
    "xformers": _xformers,
    "math": _math,
}
_DTYPES = {name: (_FLOAT_ANY if name in ("xformers", "math") else _HALF) for name in ATTENTION_BACKENDS}
# minimum and maximum (major) compute capability
_CAPABILITY = {
    "flash4": (9, 10),
    "flash3": (9, 9),
    "flash2": (8, 99),
    "sdpa_cudnn": (8, 99),
    "sdpa_flash": (8, 99),
    "xformers": (0, 99),
}


@functools.lru_cache(maxsize=None)
def _importable(name: str) -> bool:
    module = {
        "flash4": "flash_attn.cute",
        "flash3": "flash_attn_interface",
        "flash2": "flash_attn",
        "xformers": "xformers.ops",
    }.get(name)
    if module is None:  # SDPA: part of torch; check the enum member exists
        if name.startswith("sdpa_"):
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
            except ImportError:
                return False
            return hasattr(SDPBackend, "CUDNN_ATTENTION" if name == "sdpa_cudnn" else "FLASH_ATTENTION")
        return True
    try:
        mod = importlib.import_module(module)
    except Exception:  # a broken binary wheel raises more than ImportError
        return False
    if name == "flash2":
        return hasattr(mod, "flash_attn_qkvpacked_func")
    return True


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: the current CUDA device if any,
    else the CPU), in the order ``auto`` tries them. ``math`` is always last."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return ["math"]
    major, _ = torch.cuda.get_device_capability(device)
    found = []
    for name in ATTENTION_BACKENDS[:-1]:
        lo, hi = _CAPABILITY[name]
        if lo <= major <= hi and _importable(name):
            if name == "sdpa_cudnn" and not torch.backends.cudnn.is_available():
                continue
            found.append(name)
    return found + ["math"]


def _check(qkv: torch.Tensor) -> None:
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention expects packed qkv of shape (B, N, 3, H, D), got {tuple(qkv.shape)}")
    if qkv.dtype not in _FLOAT_ANY:
        raise ValueError(f"attention supports float16, bfloat16 and float32 qkv, got {qkv.dtype}")


def attention(qkv: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T D^-0.5) v per head, non-causal.

    qkv: (B, N, 3, H, D) -> (B, N, H, D), same dtype. ``backend``: "auto" or one of
    ``ATTENTION_BACKENDS``; see the module docstring for the auto rule.
    """
    global _last_backend
    _check(qkv)
    if backend == "auto":
        return _auto(qkv)
    if backend not in _IMPLS:
        raise ValueError(f"unknown attention backend {backend!r}; choose 'auto' or one of {list(ATTENTION_BACKENDS)}")
    if backend != "math":
        if backend not in available_backends(qkv.device):
            raise RuntimeError(
                f"attention backend {backend!r} cannot run on {qkv.device} here; available: "
                f"{available_backends(qkv.device)} (install flash-attn / xformers for those backends)"
            )
        if qkv.dtype not in _DTYPES[backend]:
            raise ValueError(f"attention backend {backend!r} needs float16/bfloat16 qkv, got {qkv.dtype}")
    out = _IMPLS[backend](qkv)
    _last_backend = backend
    return out


def _auto(qkv: torch.Tensor) -> torch.Tensor:
    global _last_backend
    key = (qkv.device, qkv.dtype, qkv.shape[3], qkv.shape[4], qkv.requires_grad and torch.is_grad_enabled())
    chosen = _auto_choice.get(key)
    if chosen is not None:
        _last_backend = chosen
        return _IMPLS[chosen](qkv)
    for name in available_backends(qkv.device)[:-1]:
        if qkv.dtype not in _DTYPES[name] or (name, key) in _auto_rejected:
            continue
        try:
            out = _IMPLS[name](qkv)
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, ValueError, TypeError, AssertionError, ImportError):
            # the backend refuses this head dim / dtype / GPU: try the next one
            _auto_rejected.add((name, key))
            continue
        _auto_choice[key] = _last_backend = name
        announce("attention", name, f"first backend that accepts {qkv.dtype} on {qkv.device.type}")
        return out
    _auto_choice[key] = _last_backend = "math"
    announce("attention", "math", f"no other backend accepts {qkv.dtype} on {qkv.device.type}")
    return _math(qkv)
