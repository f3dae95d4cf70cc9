"""ctypes bindings of the native CUDA library ``libprdit_kernels.so`` (``kernels/``).

The library holds CUDA C++ versions of the data-movement ops and the sampler update,
with the same layouts and numbers as the Triton ops in ``prdit_fast.ops``:

    unfold3d(x, patch, stride, pad)                          (B, C, D, H, W) -> (B, N, C p^3)
    fold3d(tokens, size, patch, stride, pad, reduce)         (B, N, C p^3) -> (B, C, D, H, W)
    unpatchify(tokens, size, stride, channels, residual)     (B, N, s^3 Cout) -> (B, Cout, D, H, W)
    sampler_update(tokens, x, step_table, step_index, keys)  one fused IaN sampler step
    philox_normal(keys, step, shape)                         the counter-based noise

It is a benchmark and cross-check, not part of the package: no prdit_fast code path runs it
(``prdit_fast.ops.dispatch`` chooses among the torch reference, Triton and cuBLAS). The
tests compare it against the Triton ops where it is built (kernels/test_native.py) and
``benchmarks/bench_native.py`` times it.

Build it with ``bash kernels/build.sh`` (needs nvcc and cmake); it lands in
``build/lib/``, or set ``PRDIT_NATIVE_LIB`` to a built copy. Importing this
module never fails: without the library (or a GPU) ``available()`` is False,
``status()`` says why, and the ops raise RuntimeError with that reason.

Inputs are CUDA tensors, contiguous, of the dtypes each op lists; kernels run
asynchronously on the current torch stream (so they can be captured in CUDA graphs).
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Sequence

import torch

from prdit_fast import models
from prdit_fast.ops.unfold import _as_size as _edges
from prdit_fast.ops.unfold import _validate as _validate_windows

LIBRARY_NAME = "libprdit_kernels.so"
LIBRARY_ENV = "PRDIT_NATIVE_LIB"
ABI_VERSION = 1  # PRDIT_ABI_VERSION in kernels/prdit_kernels.h
BUILD_HINT = "build it with `bash kernels/build.sh` (needs nvcc and cmake)"

# prdit_dtype and prdit_status of kernels/prdit_kernels.h
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_OK, _NO_DEVICE, _NO_KERNEL_IMAGE = 0, 4, 5
TABLE_COLUMNS = 5  # sin_i, cos_i, move, a, sigma


def library_path() -> Path:
    """Where the library is loaded from: $PRDIT_NATIVE_LIB, else build/lib/ of the checkout."""
    override = os.environ.get(LIBRARY_ENV)
    return Path(override) if override else Path(__file__).resolve().parent.parent / "build" / "lib" / LIBRARY_NAME


_c_int, _c_i64, _c_u32, _c_u64, _c_ptr, _c_float = (
    ctypes.c_int, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_float,
)
_SIGNATURES = {
    "prdit_abi_version": (_c_int, []),
    "prdit_last_error": (ctypes.c_char_p, []),
    "prdit_arch": (ctypes.c_char_p, []),
    "prdit_device_check": (_c_int, [_c_int]),
    "prdit_unfold3d": (_c_int, [_c_ptr, _c_ptr, _c_int, _c_i64, _c_int, _c_int, _c_int, _c_int, _c_int, _c_int,
                                _c_int, _c_int, _c_ptr]),
    "prdit_fold3d": (_c_int, [_c_ptr, _c_ptr, _c_int, _c_i64, _c_int, _c_int, _c_int, _c_int, _c_int, _c_int,
                              _c_int, _c_int, _c_int, _c_ptr]),
    "prdit_unpatchify": (_c_int, [_c_ptr, _c_ptr, _c_ptr, _c_int, _c_int, _c_i64, _c_int, _c_int, _c_int, _c_int,
                                  _c_int, _c_int, _c_ptr]),
    "prdit_sampler_update": (_c_int, [_c_ptr, _c_ptr, _c_int, _c_ptr, _c_ptr, _c_ptr, _c_ptr, _c_int, _c_ptr, _c_int,
                                      _c_ptr, _c_i64, _c_int, _c_int, _c_int, _c_int, _c_int, _c_int, _c_ptr]),
    "prdit_philox_normal": (_c_int, [_c_ptr, _c_ptr, _c_i64, _c_i64, _c_u32, _c_float, _c_int, _c_ptr]),
    "prdit_philox_host": (_c_int, [_c_u64, _c_u64, ctypes.POINTER(_c_u32), ctypes.POINTER(_c_float)]),
}


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why it is absent)."""
    path = library_path()
    if not path.is_file():
        return None, f"absent: {path} not found; {BUILD_HINT}, or set {LIBRARY_ENV} to a built copy"
    try:
        lib = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, AttributeError) as err:
        return None, f"absent: {path} cannot be loaded ({err}); rebuild it: {BUILD_HINT}"
    version = lib.prdit_abi_version()
    if version != ABI_VERSION:
        return None, f"absent: {path} has C ABI version {version}, this package needs {ABI_VERSION}; {BUILD_HINT}"
    return lib, ""


@functools.lru_cache(maxsize=None)
def _device_problem(device: int) -> str:
    """'' when the library runs on CUDA device ``device``, else why not."""
    lib, why = _load()
    if lib is None:
        return why
    code = lib.prdit_device_check(device)
    if code == _OK:
        return ""
    message = lib.prdit_last_error().decode(errors="replace")
    if code == _NO_KERNEL_IMAGE:
        major, minor = torch.cuda.get_device_capability(device)
        return (
            f"built for another architecture ({built_architectures()}) than the current GPU "
            f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}); rebuild with "
            f"`CUDA_ARCHS={major}{minor} bash kernels/build.sh` ({message})"
        )
    if code == _NO_DEVICE:
        hint = ""
        if "InsufficientDriver" in message and torch.cuda.is_available():
            hint = (f"; the GPU driver is older than the CUDA toolkit that built the library: rebuild it "
                    f"(`bash kernels/build.sh`) with a toolkit the driver supports (torch uses CUDA "
                    f"{torch.version.cuda})")
        return f"no CUDA device usable by the library: {message}{hint}"
    return message


def reload() -> str:
    """Forget the loaded library and device checks (after a rebuild, or a changed
    $PRDIT_NATIVE_LIB); returns the new ``status()``."""
    _load.cache_clear()
    _device_problem.cache_clear()
    return status()


def built_architectures() -> str:
    """The architectures compiled into the library, e.g. 'sm_80,sm_90' ('' when absent)."""
    lib, _ = _load()
    return lib.prdit_arch().decode() if lib is not None else ""


def status() -> str:
    """One line: 'loaded: ...' when the ops can run on the current GPU; otherwise
    'absent: ...' (with how to build), 'loaded ... but no CUDA device ...', or
    'loaded ... but built for another architecture ...'."""
    lib, why = _load()
    if lib is None:
        return why
    loaded = f"loaded {library_path()} (built for {built_architectures()})"
    if not torch.cuda.is_available():
        return f"{loaded} but no CUDA device: torch sees no GPU"
    device = torch.cuda.current_device()
    problem = _device_problem(device)
    if problem:
        return f"{loaded} but {problem}"
    major, minor = torch.cuda.get_device_capability(device)
    return (
        f"loaded: {library_path()} (built for {built_architectures()}) on "
        f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    )


def available() -> bool:
    """True when the library is loaded and runs on the current CUDA device."""
    lib, _ = _load()
    return lib is not None and torch.cuda.is_available() and not _device_problem(torch.cuda.current_device())


# --------------------------------------------------------------------------- #
# Argument checks and calls
# --------------------------------------------------------------------------- #
def _require(t: object) -> ctypes.CDLL:
    """The library, ready for the device of tensor ``t`` (the current device when ``t``
    is not a CUDA tensor); RuntimeError saying why not."""
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"the native library is unavailable: {why}")
    if not torch.cuda.is_available():
        raise RuntimeError(f"the native library is unavailable: {status()}")
    on_cuda = isinstance(t, torch.Tensor) and t.is_cuda
    device = _device_index(t.device) if on_cuda else torch.cuda.current_device()
    problem = _device_problem(device)
    if problem:
        raise RuntimeError(f"the native library is unavailable on cuda:{device}: {problem}")
    return lib


def _check(name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype], device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor (the native library runs on the GPU), got device {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first), got strides {t.stride()}")


def _call(lib: ctypes.CDLL, fn_name: str, *args) -> None:
    code = getattr(lib, fn_name)(*args)
    if code != _OK:
        raise RuntimeError(f"{fn_name} failed (code {code}): {lib.prdit_last_error().decode(errors='replace')}")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _validate_cubes(edges: tuple[int, int, int], stride: int) -> None:
    for edge in edges:  # cubes tile each edge: windows of the stride, no padding
        models.validate_tiling(edge, stride, stride, 0)


_ALL_DTYPES = tuple(_DTYPE_CODES)


def unfold3d(x: torch.Tensor, patch: int, stride: int, pad: int) -> torch.Tensor:
    """Overlapping windows of the reflect-padded volume (``ops.unfold.unfold3d``).

    x: (B, C, D, H, W) fp32 / bf16 / fp16, contiguous CUDA -> (B, N, C p^3) in x.dtype,
    windows in raster order (depth slowest), each flattened (channel, d, h, w).
    """
    lib = _require(x)
    _check("x", x, _ALL_DTYPES)
    if x.dim() != 5:
        raise ValueError(f"unfold3d expects a volume (B, C, D, H, W), got shape {tuple(x.shape)}")
    B, C, D, H, W = x.shape
    _validate_windows((D, H, W), patch, stride, pad)
    N = (D // stride) * (H // stride) * (W // stride)
    out = torch.empty((B, N, C * patch**3), device=x.device, dtype=x.dtype)
    if out.numel():
        _call(lib, "prdit_unfold3d", x.data_ptr(), out.data_ptr(), _DTYPE_CODES[x.dtype], B, C, D, H, W,
              patch, stride, pad, _device_index(x.device), _stream(x.device))
    return out


def fold3d(
    tokens: torch.Tensor, size: int | Sequence[int], patch: int, stride: int, pad: int, reduce: str = "sum"
) -> torch.Tensor:
    """The adjoint of ``unfold3d`` (``ops.unfold.fold3d``), as a deterministic gather.

    tokens: (B, N, C p^3) fp32 / bf16 / fp16, contiguous CUDA -> (B, C, D, H, W) in
    tokens.dtype, summed in fp32; ``size`` is S or (D, H, W). reduce="sum" is the exact
    adjoint, "mean" divides each voxel by its number of contributions.
    """
    lib = _require(tokens)
    _check("tokens", tokens, _ALL_DTYPES)
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    D, H, W = _edges(size)
    _validate_windows((D, H, W), patch, stride, pad)
    N = (D // stride) * (H // stride) * (W // stride)
    if tokens.dim() != 3 or tokens.shape[1] != N or tokens.shape[2] % patch**3 or tokens.shape[2] == 0:
        raise ValueError(
            f"fold3d of a {(D, H, W)} volume with patch {patch}, stride {stride} expects tokens "
            f"(B, {N}, C*{patch ** 3}), got shape {tuple(tokens.shape)}"
        )
    B, C = tokens.shape[0], tokens.shape[2] // patch**3
    out = torch.empty((B, C, D, H, W), device=tokens.device, dtype=tokens.dtype)
    if out.numel():
        _call(lib, "prdit_fold3d", tokens.data_ptr(), out.data_ptr(), _DTYPE_CODES[tokens.dtype], B, C, D, H, W,
              patch, stride, pad, int(reduce == "mean"), _device_index(tokens.device), _stream(tokens.device))
    return out


def _cube_shape_check(name: str, tokens: torch.Tensor, edges: tuple[int, int, int], stride: int, channels: int):
    N = (edges[0] // stride) * (edges[1] // stride) * (edges[2] // stride)
    if tokens.dim() != 3 or tokens.shape[1] != N or tokens.shape[2] != stride**3 * channels:
        raise ValueError(
            f"{name}: a {edges} volume of {channels} channels at stride {stride} needs tokens "
            f"(B, {N}, {stride ** 3 * channels}), got shape {tuple(tokens.shape)}"
        )


def unpatchify(
    tokens: torch.Tensor,
    size: int | Sequence[int],
    stride: int,
    channels: int,
    residual: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cubes to volume (``models.unpatchify``), fused with ``tokens + residual``.

    tokens, residual: (B, N, s^3 Cout) fp32 / bf16 / fp16, same dtype, contiguous CUDA;
    each token an s^3 cube laid out (d, h, w, channel) channel fastest.
    -> (B, Cout, D, H, W) in ``out_dtype`` (default tokens.dtype); the sum is fp32,
    rounded once.
    """
    lib = _require(tokens)
    _check("tokens", tokens, _ALL_DTYPES)
    edges = _edges(size)
    _validate_cubes(edges, stride)
    _cube_shape_check("unpatchify", tokens, edges, stride, channels)
    if residual is not None:
        _check("residual", residual, (tokens.dtype,), tokens.device)
        if residual.shape != tokens.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}, tokens {tuple(tokens.shape)}")
    out_dtype = out_dtype or tokens.dtype
    if out_dtype not in _DTYPE_CODES:
        raise ValueError(f"out_dtype {out_dtype} is not one of {_ALL_DTYPES}")
    B = tokens.shape[0]
    out = torch.empty((B, channels) + edges, device=tokens.device, dtype=out_dtype)
    if out.numel():
        _call(lib, "prdit_unpatchify", tokens.data_ptr(), residual.data_ptr() if residual is not None else None,
              out.data_ptr(), _DTYPE_CODES[tokens.dtype], _DTYPE_CODES[out_dtype], B, channels, *edges, stride,
              _device_index(tokens.device), _stream(tokens.device))
    return out


def sampler_update(
    tokens: torch.Tensor,
    x: torch.Tensor,
    step_table: torch.Tensor,
    step_index: torch.Tensor,
    keys: torch.Tensor,
    *,
    stride: int,
    residual: torch.Tensor | None = None,
    x_out: torch.Tensor | None = None,
    x0_out: torch.Tensor | None = None,
    advance: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One IaN sampler step fused with the unpatchify of the model output
    (``ops.sampling.sampler_update``).

    tokens (+ residual): (B, N, s^3 2C) fp32 / bf16 / fp16, cubes whose channels [0:C]
    are eps_hat and [C:2C] x0_hat; x: (B, C, D, H, W) fp32; step_table: (steps, 5) fp32
    rows [sin_i, cos_i, move, a, sigma]; step_index: one int32 / int64 on the device, the
    row n; keys: (B,) int64 Philox keys. With f = sin_i x0_hat - cos_i eps_hat:
    x_next = a (x - move f) + sigma z, z the Philox normal of each voxel at counter n + 1,
    drawn only when sigma != 0. Writes x_next into ``x_out`` (may be ``x``) and x0_hat
    into ``x0_out`` (fp32, allocated when None); ``advance`` then adds 1 to step_index on
    the same stream. Returns (x_next, x0_hat). A step index outside the table makes both
    outputs NaN (the kernel cannot raise without a host sync).
    """
    lib = _require(x)
    _check("x", x, (torch.float32,))
    dev = x.device
    _check("tokens", tokens, _ALL_DTYPES, dev)
    _check("step_table", step_table, (torch.float32,), dev)
    _check("step_index", step_index, (torch.int32, torch.int64), dev)
    _check("keys", keys, (torch.int64,) + ((torch.uint64,) if hasattr(torch, "uint64") else ()), dev)
    if x.dim() != 5:
        raise ValueError(f"x must be a volume (B, C, D, H, W), got shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    edges = tuple(x.shape[2:])
    _validate_cubes(edges, stride)
    _cube_shape_check("sampler_update", tokens, edges, stride, 2 * C)
    if tokens.shape[0] != B:
        raise ValueError(f"tokens hold {tokens.shape[0]} samples, x {B}")
    if residual is not None:
        _check("residual", residual, (tokens.dtype,), dev)
        if residual.shape != tokens.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}, tokens {tuple(tokens.shape)}")
    if step_table.dim() != 2 or step_table.shape[1] != TABLE_COLUMNS or step_table.shape[0] < 1:
        raise ValueError(f"step_table must be (steps, {TABLE_COLUMNS}), got shape {tuple(step_table.shape)}")
    if step_index.numel() != 1:
        raise ValueError(f"step_index must hold one element, got shape {tuple(step_index.shape)}")
    if keys.shape != (B,):
        raise ValueError(f"keys must be ({B},), got shape {tuple(keys.shape)}")
    if x_out is None:
        x_out = torch.empty_like(x)
    if x0_out is None:
        x0_out = torch.empty_like(x)
    for name, t in (("x_out", x_out), ("x0_out", x0_out)):
        _check(name, t, (torch.float32,), dev)
        if t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, x {tuple(x.shape)}")
    if x.numel():
        _call(lib, "prdit_sampler_update", tokens.data_ptr(), residual.data_ptr() if residual is not None else None,
              _DTYPE_CODES[tokens.dtype], x.data_ptr(), x_out.data_ptr(), x0_out.data_ptr(), step_table.data_ptr(),
              step_table.shape[0], step_index.data_ptr(), int(step_index.dtype == torch.int64), keys.data_ptr(),
              B, C, *edges, stride, _device_index(dev), _stream(dev))
    if advance:
        step_index.add_(1)
    return x_out, x0_out


def philox_normal(keys: torch.Tensor, step: int, shape: Sequence[int], scale: float = 1.0) -> torch.Tensor:
    """scale * the counter-based normal noise (``ops.sampling.philox_normal``):
    keys (B,) int64 CUDA -> (B, *shape) fp32, element v of sample b drawn at
    Philox counter (v, step) under keys[b]. scale=0.5, step=0 is the sampler's x_T."""
    lib = _require(keys)
    _check("keys", keys, (torch.int64,) + ((torch.uint64,) if hasattr(torch, "uint64") else ()))
    if keys.dim() != 1:
        raise ValueError(f"keys must be (B,), got shape {tuple(keys.shape)}")
    if not 0 <= step < 2**32:
        raise ValueError(f"step must be in [0, 2^32), got {step}")
    shape = tuple(int(s) for s in shape)
    out = torch.empty((keys.shape[0],) + shape, device=keys.device, dtype=torch.float32)
    if out.numel():
        numel = out.numel() // keys.shape[0]
        _call(lib, "prdit_philox_normal", out.data_ptr(), keys.data_ptr(), keys.shape[0], numel, step, scale,
              _device_index(keys.device), _stream(keys.device))
    return out


def philox_host(key: int, offset: int) -> tuple[list[int], float]:
    """The library's Philox4x32-10 evaluated on the host (no GPU needed): the four words
    of Triton's randint4x(key, offset) and the Box-Muller normal of the first two
    (host libm: equal to the GPU value within a few fp32 ulps)."""
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"the native library is unavailable: {why}")
    words = (_c_u32 * 4)()
    normal = _c_float()
    _call(lib, "prdit_philox_host", key & (2**64 - 1), offset & (2**64 - 1), words, ctypes.byref(normal))
    return list(words), normal.value
