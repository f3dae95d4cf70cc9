"""End-to-end benchmark of PRDiT over every backend in one run (``prdit-fast bench``).

For each cell (variant, volume edge S, batch B) and each backend it measures

    sample_step_ms      one sampler step (model call + predictor-corrector update) for the
                        batch: the median over timed reps of a ``steps_per_rep``-step
                        sample divided by ``steps_per_rep``, after warm-up
    volumes_per_hour    B * 3600 s / (1000 steps * step time)
    train_samples_per_s B / (forward + loss + backward + clip + AdamW step)
    peak memory         torch.cuda.max_memory_allocated, reset per cell
    MFU                 FLOP/s against a bf16 matmul peak measured at the start of the run

and ratios against the reference (eager fp32, TF32 off). From these: GPU-hour projections
of the paper's two-stage recipe and of sampling 1,000 volumes (GPU runs, from throughput
at 128^3 only; a CPU run or another edge projects nothing), and per backend the largest
batch that fits in memory at each volume edge. Results go to
``<out>/<device-slug>-<YYYY-MM-DD>/bench.{json,md,png}``; CPU results are labelled CPU.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import io
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .atomic import atomic_path
from .devices import resolve_device
from .diffusion import IaNDiffusion
from .models import PRDiT, PRDiTConfig, canonical_name, create_model, parse_variant, variant_config

SCHEMA = "prdit-fast-bench/1"
REFERENCE = "eager-fp32"

# The paper's recipe (spec section 9): global batch 64, stage 1 then stage 2.
GLOBAL_BATCH = 64
STAGES = (("stage 1", "PRDiT-B/12/0", 104_000), ("stage 2", "PRDiT-B/12/4", 130_000))
PROJECTION_SIZE = 128  # the paper's headline resolution; the largest measured edge otherwise
SAMPLING_VOLUMES = 1000
SAMPLING_STEPS = 1000
SAMPLING_VARIANTS = ("PRDiT-B/12/4", "PRDiT-B/12/12")
LEARNING_RATE = 1e-4
GRAD_CLIP = 1.0

DEFAULT_VARIANTS = ("PRDiT-B/12/0", "PRDiT-B/12/4", "PRDiT-B/12/12")
DEFAULT_SIZES = (64, 128, 256)
QUICK_GPU_SIZES = (64, 128)
QUICK_CPU_VARIANTS = ("PRDiT-B/12/0", "PRDiT-B/12/4")
QUICK_CPU_SIZES = (16,)
CAPACITY_BATCH_CAP = 4096


# --------------------------------------------------------------------------- #
# Projection arithmetic
# --------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------- #
# Environment
# --------------------------------------------------------------------------- #
def slugify(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def device_slug(device: torch.device) -> str:
    """Folder name part for the device; CPU slugs start with 'cpu-' so they never read as a GPU."""
    name = slugify(device_name(device))
    return name if device.type == "cuda" else f"cpu-{name}"


def _run_text(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def nvidia_driver_version() -> str:
    out = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else "unknown"


def git_commit(path: Path | None = None) -> str:
    """The commit of the source tree holding this package ('unknown' outside a git repo)."""
    return _run_text(["git", "rev-parse", "HEAD"], cwd=path or Path(__file__).resolve().parent) or "unknown"


def environment(device: torch.device, argv: list[str] | None = None) -> dict[str, Any]:
    """Device, versions, commit, date and command line of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # any import failure just means "not there"
        triton_version = None
    info: dict[str, Any] = {"name": device_name(device), "type": device.type, "cpu": _cpu_name(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            index=device.index if device.index is not None else torch.cuda.current_device(),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            memory_gib=round(props.total_memory / 2**30, 2),
            multiprocessors=props.multi_processor_count,
            driver=nvidia_driver_version(),
        )
    src = Path(__file__).resolve().parent
    dirty = _run_text(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src)
    from . import __version__

    return {
        "device": info,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton_version,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "driver": info.get("driver"),
            "prdit_fast": __version__,
        },
        "git_commit": git_commit(src),
        "git_dirty": bool(dirty),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv)),
    }


# --------------------------------------------------------------------------- #
# Timing and roofline measurements
# --------------------------------------------------------------------------- #
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_ms: float
    reps: int
    first_call_s: float  # includes compilation, autotuning, graph capture


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int = 2, min_reps: int = 3,
              max_reps: int = 50, budget_s: float = 2.0) -> Timing:
    """Median wall time of ``fn`` in ms after ``warmup`` untimed calls (the first one, which
    compiles / captures, is timed apart).

    The first timed rep sets how many follow: as many as fill ``budget_s``, within
    [min_reps, max_reps]. On CUDA each rep is timed with CUDA events; on CPU with perf_counter.
    """

    def timed() -> float:
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            return begin.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    start = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        fn()
    synchronize(device)
    times = [timed()]
    reps = int(min(max_reps, max(min_reps, budget_s * 1e3 // max(times[0], 1e-3))))
    times += [timed() for _ in range(reps - 1)]
    return Timing(statistics.median(times), reps, first)


def measure_matmul_peak(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16,
                        budget_s: float = 1.0) -> dict[str, Any]:
    """Dense matmul throughput (n x n) @ (n x n) in TFLOP/s: the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    timing = time_call(lambda: torch.matmul(a, b, out=out), device, warmup=3, min_reps=5, budget_s=budget_s)
    del a, b, out
    release(device)
    return {"tflops": 2.0 * n**3 / (timing.median_ms / 1e3) / 1e12, "shape": [n, n, n],
            "dtype": str(dtype).replace("torch.", ""), "reps": timing.reps}


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2**30, budget_s: float = 1.0) -> dict[str, Any]:
    """Device-to-device copy bandwidth in GB/s, counting the read and the write (2 x nbytes)."""
    src = torch.empty(nbytes, device=device, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    timing = time_call(lambda: dst.copy_(src), device, warmup=3, min_reps=5, budget_s=budget_s)
    del src, dst
    release(device)
    return {"gbps": 2.0 * nbytes / (timing.median_ms / 1e3) / 1e9, "bytes": nbytes,
            "counts": "read + write", "reps": timing.reps}


def release(device: torch.device) -> None:
    """Give freed memory back so the next cell starts clean (after an OOM above all)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------- #
# FLOPs
# --------------------------------------------------------------------------- #
def step_flops(variant: str, size: int) -> dict[str, Any]:
    """FLOPs per volume of one model call and of one training step (forward + backward).

    The forward count is ``prdit_fast.flops.flops_per_step``; the training count comes from
    torch's FlopCounterMode on a model built on the meta device (nothing is computed), so
    it includes exactly the backward that runs (the frozen coarse path has none at depth > 0).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .flops import flops_per_step

    with torch.device("meta"):
        model = create_model(variant, size)
        x0 = torch.empty(1, model.config.in_channels, size, size, size)
    counter = FlopCounterMode(display=False)
    with counter:
        IaNDiffusion().training_losses(model, x0)["loss"].mean().backward()
    return {"forward": float(flops_per_step(model.config)), "train": float(counter.get_total_flops()),
            "source": "forward: prdit_fast.flops.flops_per_step; train: torch FlopCounterMode (meta device)"}


# --------------------------------------------------------------------------- #
# Backends
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    tf32: bool = False
    autocast_bf16: bool = False
    compiled: bool = False
    fast: bool = False
    cuda_graph: bool = False


BACKENDS: tuple[Backend, ...] = (
    Backend(REFERENCE, "reference network, eager, fp32 with TF32 off (the official path)"),
    Backend("tf32", "reference network, eager, fp32 tensors with TF32 matmuls and convolutions", tf32=True),
    Backend("bf16-autocast", "reference network, eager, torch.autocast bf16", autocast_bf16=True),
    Backend("compile", "torch.compile of the reference network under bf16 autocast", autocast_bf16=True, compiled=True),
    Backend("fast", "prdit_fast.fast.accelerate(model, bf16): fused Triton kernels", fast=True),
    Backend("fast-cudagraph", "fast backend sampled by prdit_fast.engine.Sampler with a CUDA graph per step",
            fast=True, cuda_graph=True),
)
BACKEND_NAMES = tuple(b.name for b in BACKENDS)


def _load_accelerate() -> tuple[Callable | None, str]:
    try:
        from .fast import accelerate
    except Exception as err:  # a missing or broken optional module is a skip, with the reason
        return None, f"prdit_fast.fast is not importable ({type(err).__name__}: {err})"
    return accelerate, ""


def skip_reason(backend: Backend, device: torch.device, explicit: bool) -> str | None:
    """Why ``backend`` cannot (or, on CPU, should not) run here; None when it runs."""
    cpu = device.type != "cuda"
    if backend.tf32 and cpu:
        return "TF32 is an NVIDIA tensor-core mode; on CPU it would be the eager fp32 run again"
    if backend.compiled and cpu and not explicit:
        return ("torch.compile of a B-size model takes minutes on a few CPU cores (and needs a C++ "
                "toolchain); request it with --backends compile to run it anyway")
    if backend.cuda_graph and cpu:
        return "CUDA graphs need a CUDA GPU"
    if backend.fast:
        if cpu:
            return ("the fast backend's Triton kernels run on CPU only under the Triton interpreter, "
                    "which is orders of magnitude too slow to benchmark")
        accelerate, why = _load_accelerate()
        if accelerate is None:
            return why
    if backend.cuda_graph:
        try:
            from .engine import Sampler  # noqa: F401
        except Exception as err:  # optional module
            return f"prdit_fast.engine is not importable ({type(err).__name__}: {err})"
    return None


@contextlib.contextmanager
def numerics(backend: Backend) -> Iterator[None]:
    """TF32 on only for the tf32 backend; every other backend runs with it off. Restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = backend.tf32
    torch.backends.cudnn.allow_tf32 = backend.tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _autocast(backend: Backend, device: torch.device):
    if backend.autocast_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _compile_step_marker() -> Callable[[], None]:
    """Tell compiled CUDA graphs (mode max-autotune) that a new iteration starts, so
    outputs of the previous call may be overwritten."""
    return getattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)


class PreparedBackend:
    """A backend applied to one model copy on the device: builds sampling and training runs."""

    def __init__(self, backend: Backend, model: PRDiT, device: torch.device, compile_mode: str):
        self.backend = backend
        self.device = device
        self.config: PRDiTConfig = model.config
        self.diffusion = IaNDiffusion()
        self.engine = None
        if backend.fast:
            accelerate, why = _load_accelerate()
            if accelerate is None:
                raise RuntimeError(why)
            self.net = accelerate(model, dtype=torch.bfloat16, attention="auto")
        elif backend.compiled:
            torch.compiler.reset()  # a fresh cache per cell: never hit the recompile limit and fall back to eager
            self.net = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
        else:
            self.net = model
        self._mark_step = _compile_step_marker() if backend.compiled else (lambda: None)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._mark_step()
        with _autocast(self.backend, self.device):
            return self.net(x, t)

    def sampling_run(self, batch: int, steps: int) -> Callable[[], Any]:
        """A callable that samples ``batch`` volumes with ``steps`` pc (k=2) steps."""
        cfg = self.config
        if self.backend.cuda_graph:
            from .engine import Sampler, keys_for

            self.engine = Sampler(self.net, batch, steps, "pc", k=2, dtype=None, cuda_graph=True)
            keys = keys_for(0, range(batch))
            return lambda: self.engine.sample(keys)
        noise = self.diffusion.initial_noise((batch, cfg.in_channels) + (cfg.input_size,) * 3, device=self.device)
        generator = torch.Generator(self.device).manual_seed(0)
        return lambda: self.diffusion.sample(self.forward, noise, steps, "pc", 2, generator=generator)

    def training_run(self, batch: int) -> Callable[[], Any]:
        """A callable doing one training step on ``batch`` samples: IaN losses, backward,
        gradient clipping at 1.0 and an AdamW step over the trainable parameters (at
        depth > 0 only t_embedder.fine_head and the transformer, as in the reference)."""
        cfg = self.config
        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{self.backend.name}: the model has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
        x0 = torch.rand((batch, cfg.in_channels) + (cfg.input_size,) * 3, device=self.device) * 2 - 1
        generator = torch.Generator(self.device).manual_seed(0)

        def step() -> None:
            losses = self.diffusion.training_losses(self.forward, x0, generator=generator)
            losses["loss"].mean().backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def attention_backend(self) -> str | None:
        if self.engine is not None:
            return self.engine.describe().get("attention")
        if not self.backend.fast:
            return None
        try:
            from .ops.attention_backends import last_backend
        except Exception:  # optional module
            return getattr(self.net, "attention", None)
        return last_backend() or getattr(self.net, "attention", None)


# --------------------------------------------------------------------------- #
# Options
# --------------------------------------------------------------------------- #
@dataclass
class BenchOptions:
    out: str = "benchmarks/results"
    quick: bool = False
    variants: tuple[str, ...] | None = None  # None: the mode's default
    sizes: tuple[int, ...] | None = None
    batches: tuple[int, ...] | None = None  # None: default_batch(size)
    backends: tuple[str, ...] | None = None  # None: all
    device: str | None = None  # None: cuda if available
    compile_mode: str | None = None  # None: max-autotune, or default with --quick
    steps_per_rep: int | None = None
    train: bool = True
    capacity: bool = True
    capacity_seconds: float | None = None  # per backend and volume edge
    capacity_variant: str | None = None  # None: the deepest variant benchmarked
    time_budget_s: float | None = None  # cells not started within it are recorded as skipped
    tag: str | None = None  # results go to <stem>.{json,md,png} with stem bench-<tag>, so runs split by hand coexist
    argv: list[str] | None = None
    explicit_backends: bool = field(default=False, init=False)

    def resolve(self, device: torch.device) -> None:
        """Fill the mode's defaults and validate everything, with errors that say what is valid."""
        cpu = device.type != "cuda"
        if self.variants is None:
            self.variants = QUICK_CPU_VARIANTS if (cpu and self.quick) else DEFAULT_VARIANTS
        self.variants = tuple(dict.fromkeys(variant_name(v) for v in self.variants))
        if self.sizes is None:
            self.sizes = (QUICK_CPU_SIZES if cpu else QUICK_GPU_SIZES) if self.quick else DEFAULT_SIZES
        self.sizes = tuple(dict.fromkeys(self.sizes))
        for v in self.variants:
            for s in self.sizes:
                variant_config(v, s)  # a variant / edge pair that does not tile fails here, before any timing
        if self.batches is not None:
            if any(b < 1 for b in self.batches):
                raise ValueError(f"batch sizes must be >= 1, got {list(self.batches)}")
            self.batches = tuple(dict.fromkeys(self.batches))
        if self.tag is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.tag):
            raise ValueError(f"tag must be letters, digits, '.', '_' or '-', got {self.tag!r}")
        self.explicit_backends = self.backends is not None
        if self.backends is None:
            self.backends = BACKEND_NAMES
        unknown = [b for b in self.backends if b not in BACKEND_NAMES]
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown}; valid: {list(BACKEND_NAMES)}")
        # the reference runs first whatever was asked: every ratio is against it
        self.backends = (REFERENCE,) + tuple(b for b in BACKEND_NAMES if b in self.backends and b != REFERENCE)
        if self.compile_mode is None:
            self.compile_mode = "default" if self.quick else "max-autotune"
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if self.compile_mode not in modes:
            raise ValueError(f"compile mode must be one of {list(modes)}, got {self.compile_mode!r}")
        if self.steps_per_rep is None:
            self.steps_per_rep = 1 if cpu else (4 if self.quick else 10)
        if not 1 <= self.steps_per_rep <= 1000:
            raise ValueError(f"steps per rep must be in [1, 1000], got {self.steps_per_rep}")
        if self.capacity_seconds is None:
            self.capacity_seconds = 20.0 if self.quick else 60.0
        if self.capacity_variant is None:
            self.capacity_variant = max(self.variants, key=lambda v: parse_variant(v)[2])
        else:
            self.capacity_variant = variant_name(self.capacity_variant)

    @property
    def stem(self) -> str:
        """File name stem of the results: bench, or bench-<tag>."""
        return "bench" if self.tag is None else f"bench-{self.tag}"


def variant_name(name: str) -> str:
    """'B/12/4' -> 'PRDiT-B/12/4' (ValueError for an unknown variant)."""
    return canonical_name(name)


def default_batch(size: int, device: torch.device) -> int:
    """Batch per cell when --batch is not given: 1 on CPU; on a GPU 4 volumes at 128^3,
    scaled by the volume (at most 16), 1 at 256^3."""
    if device.type != "cuda":
        return 1
    return max(1, min(16, 4 * (128**3) // size**3))


def _timing_settings(opts: BenchOptions, device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"warmup": 1, "min_reps": 2, "max_reps": 3, "budget_s": 0.5}
    if opts.quick:
        return {"warmup": 2, "min_reps": 3, "max_reps": 10, "budget_s": 1.0}
    return {"warmup": 3, "min_reps": 5, "max_reps": 50, "budget_s": 3.0}


# --------------------------------------------------------------------------- #
# One cell
# --------------------------------------------------------------------------- #
def randomized_model(variant: str, size: int, seed: int = 0, std: float = 0.02) -> PRDiT:
    """A fresh PRDiT predicts exactly zero (spec section 12); every weight drawn from
    N(0, std) keeps the computation realistic. On the CPU, in eval mode: callers move it."""
    torch.manual_seed(seed)
    model = create_model(variant, size)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def _fmt_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    return text[:300]


def bench_cell(base: PRDiT, backend: Backend, batch: int, device: torch.device, opts: BenchOptions,
               timing: dict[str, Any]) -> dict[str, Any]:
    """Sampling and training measurements of one (model, backend, batch); OOM or errors are
    recorded per part, and memory is freed before returning."""
    row: dict[str, Any] = {"sample_status": "not run", "train_status": "not run"}
    prepared = model = run = None
    with numerics(backend):
        outcome = None
        try:
            reset_peak_memory(device)
            model = copy.deepcopy(base).to(device)
            prepared = PreparedBackend(backend, model, device, opts.compile_mode)
            run = prepared.sampling_run(batch, opts.steps_per_rep)
            t = time_call(run, device, **timing)
            row.update(sample_step_ms=t.median_ms / opts.steps_per_rep, sample_reps=t.reps,
                       sample_first_call_s=t.first_call_s, sample_peak_memory_gib=peak_memory_gib(device),
                       attention=prepared.attention_backend(), sample_status="ok")
            if prepared.engine is not None:
                row["cuda_graph"] = prepared.engine.cuda_graph
                row["cuda_graph_reason"] = prepared.engine.graph_reason or None
        except Exception as err:  # one failing backend must not end the whole run
            outcome = "OOM" if is_out_of_memory(err) else _fmt_error(err)
        if outcome is not None:
            row["sample_status"] = outcome
        run = None
        release(device)

        if not opts.train:
            row["train_status"] = "skipped (--no-train)"
        elif backend.cuda_graph:
            row["train_status"] = "n/a (sampling engine)"
        elif prepared is None:
            row["train_status"] = "not run (backend failed to build)"
        else:
            outcome = None
            try:
                reset_peak_memory(device)
                run = prepared.training_run(batch)
                t = time_call(run, device, **timing)
                row.update(train_samples_per_s=batch / (t.median_ms / 1e3), train_step_ms=t.median_ms,
                           train_reps=t.reps, train_first_call_s=t.first_call_s,
                           train_peak_memory_gib=peak_memory_gib(device), train_status="ok")
            except Exception as err:  # one failing backend must not end the whole run
                outcome = "OOM" if is_out_of_memory(err) else _fmt_error(err)
            if outcome is not None:
                row["train_status"] = outcome
    prepared = model = run = None
    if backend.compiled:
        torch.compiler.reset()
    release(device)
    return row


def largest_fitting(fits: Callable[[int], bool], cap: int, budget_s: float) -> tuple[int, int | None, str | None]:
    """Largest n in [1, cap] with ``fits(n)``, for a monotone ``fits``: doubling from 1, then
    bisection, stopping once ``budget_s`` seconds have passed.

    Returns (largest n found to fit, or 0; smallest n found not to fit, or None; what bounded
    the search early: None, 'batch cap N' or 'time (S s)').
    """
    start = time.perf_counter()
    lo, hi, n = 0, None, 1
    while hi is None:
        if fits(n):
            lo = n
            if n >= cap:
                return lo, hi, f"batch cap {cap}"
            n = min(2 * n, cap)
        else:
            hi = n
        if hi is None and time.perf_counter() - start > budget_s:
            return lo, hi, f"time ({budget_s:.0f} s)"
    while hi - lo > 1:
        if time.perf_counter() - start > budget_s:
            return lo, hi, f"time ({budget_s:.0f} s)"
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi, None


def capacity_search(base: PRDiT, backend: Backend, device: torch.device, budget_s: float) -> dict[str, Any]:
    """Largest batch whose sampling step (one model call + update) fits in device memory,
    searched by ``largest_fitting`` within ``budget_s`` seconds.

    torch.compile is searched in its default mode whatever --compile-mode says, since
    every batch size recompiles.
    """
    start = time.perf_counter()
    tried: dict[int, bool] = {}

    def fits(batch: int) -> bool:
        ok, outcome = True, None
        with numerics(backend):
            prepared = None
            try:
                model = copy.deepcopy(base).to(device)
                prepared = PreparedBackend(backend, model, device, "default")
                run = prepared.sampling_run(batch, 1)
                run()
                synchronize(device)
                if prepared.engine is not None and not prepared.engine.cuda_graph:
                    # the engine falls back to eager when capture fails; the graph is what is measured
                    reason = prepared.engine.graph_reason
                    ok, outcome = False, None if "out of memory" in reason.lower() else reason
            except Exception as err:  # OOM is the answer we look for; anything else is reported
                ok, outcome = False, None if is_out_of_memory(err) else _fmt_error(err)
            model = prepared = run = None
        if backend.compiled:
            torch.compiler.reset()
        release(device)
        if outcome is not None:
            raise RuntimeError(outcome)
        tried[batch] = ok
        return ok

    result: dict[str, Any] = {"max_batch": 0, "bounded_by": None}
    try:
        lo, hi, bounded_by = largest_fitting(fits, CAPACITY_BATCH_CAP, budget_s)
        result.update(max_batch=lo, first_oom_batch=hi, bounded_by=bounded_by,
                      status="ok" if lo > 0 else "OOM at batch 1")
    except RuntimeError as err:
        result["status"] = str(err)
    result["tried"] = {str(k): v for k, v in sorted(tried.items())}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


# --------------------------------------------------------------------------- #
# Derived numbers
# --------------------------------------------------------------------------- #
def _ratio(value: float | None, reference: float | None, higher_is_better: bool) -> float | None:
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
        r["sample_speedup"] = _ratio(ms, ref.get("sample_step_ms"), higher_is_better=False)
        r["train_speedup"] = _ratio(sps, ref.get("train_samples_per_s"), higher_is_better=True)
        r["sample_memory_ratio"] = _ratio(r.get("sample_peak_memory_gib"), ref.get("sample_peak_memory_gib"), True)
        r["train_memory_ratio"] = _ratio(r.get("train_peak_memory_gib"), ref.get("train_peak_memory_gib"), True)


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
        p["training_speedup"] = _ratio(p.get("training_gpu_hours"), ref.get("training_gpu_hours"), False)
        for variant, s in p["sampling_1000_volumes"].items():
            rs = ref.get("sampling_1000_volumes", {}).get(variant)
            same_size = rs is not None and rs["size"] == s["size"]
            s["speedup"] = _ratio(s["gpu_hours"], rs["gpu_hours"], False) if same_size else None
    return out


def capacity_summary(capacity: list[dict[str, Any]]) -> dict[str, Any]:
    """Per backend: the largest edge with a batch of at least 1, and that batch."""
    out = {}
    for c in capacity:
        best = out.get(c["backend"])
        if c.get("max_batch", 0) >= 1 and (best is None or c["size"] > best["size"]):
            out[c["backend"]] = {"size": c["size"], "max_batch": c["max_batch"], "bounded_by": c.get("bounded_by")}
    return out


# --------------------------------------------------------------------------- #
# Reports
# --------------------------------------------------------------------------- #
def _f(value: Any, fmt: str = "{:.3g}", none: str = "–") -> str:
    if value is None:
        return none
    if isinstance(value, (int, float)):
        return fmt.format(value)
    return str(value)


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def title(result: dict[str, Any]) -> str:
    dev = result["device"]["name"]
    if result["device_type"] == "cpu":
        return f"PRDiT benchmark: CPU results ({dev}), not GPU figures"
    return f"PRDiT benchmark: {dev} (GPU)"


def to_markdown(result: dict[str, Any]) -> str:
    env, peaks = result, result["peaks"]
    cpu = result["device_type"] == "cpu"
    lines = [f"# {title(result)}", ""]
    if cpu:
        lines += ["> **CPU results.** These numbers were measured on a CPU and say nothing about GPU "
                  "throughput, and no GPU-hours are projected from them.", ""]
    v = env["versions"]
    lines += [
        f"- device: {env['device']['name']} ({result['device_type']}), driver {v.get('driver') or 'n/a'}, "
        f"CUDA {v.get('cuda') or 'n/a'}, torch {v['torch']}, Triton {v.get('triton') or 'n/a'}",
        f"- commit {env['git_commit']}{' (uncommitted changes)' if env.get('git_dirty') else ''}, "
        f"date {env['date']}",
        f"- command: `{env['command']}`",
        f"- sampler: predictor-corrector k=2; a step is one model call plus the update, timed over "
        f"{result['settings']['steps_per_rep']} steps per rep (median of reps after warm-up); "
        f"volumes/hour at {SAMPLING_STEPS} steps",
        f"- training step: IaN losses, backward, grad clip {GRAD_CLIP}, AdamW; depth > 0 trains the "
        f"fine path only",
        f"- bf16 matmul peak {_f(peaks.get('matmul', {}).get('tflops'), '{:.3g}')} TFLOP/s "
        f"({'x'.join(map(str, peaks.get('matmul', {}).get('shape', [])))}), copy bandwidth "
        f"{_f(peaks.get('copy', {}).get('gbps'), '{:.0f}')} GB/s (read + write); MFU is against the bf16 "
        f"peak for every backend, fp32 ones included",
        f"- ratios (`x ref`) are against `{REFERENCE}` at the same variant, edge and batch; "
        f"memory ratios are backend / reference",
        "",
        "## Sampling and training",
        "",
        "| variant | S | backend | batch | step ms | x ref | volumes/h | sample peak GiB | x ref mem | "
        "sample MFU | train samples/s | x ref | train peak GiB | x ref mem | train MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        samp_ok, train_ok = r["sample_status"] == "ok", r["train_status"] == "ok"
        lines.append(
            f"| {r['variant']} | {r['size']} | {r['backend']} | {r['batch']} | "
            + (f"{r['sample_step_ms']:.3g} | {_x(r.get('sample_speedup'))} | {_f(r.get('volumes_per_hour'))} | "
               f"{_f(r.get('sample_peak_memory_gib'), '{:.2f}', 'n/a')} | {_x(r.get('sample_memory_ratio'))} | "
               f"{_f(r.get('sample_mfu'), '{:.1%}')} | "
               if samp_ok else f"{r['sample_status']} | | | | | | ")
            + (f"{r['train_samples_per_s']:.3g} | {_x(r.get('train_speedup'))} | "
               f"{_f(r.get('train_peak_memory_gib'), '{:.2f}', 'n/a')} | {_x(r.get('train_memory_ratio'))} | "
               f"{_f(r.get('train_mfu'), '{:.1%}')} |"
               if train_ok else f"{r['train_status']} | | | | |")
        )
    skipped = [b for b in result["backends"] if b["status"] != "run"]
    if skipped:
        lines += ["", "## Backends not run", ""] + [f"- `{b['name']}`: {b['reason']}" for b in skipped]

    if not result["projections"]:
        lines += ["", "## GPU-hour projections", "",
                  "None: " + ("a CPU run projects no GPU-hours." if cpu else
                              f"projections come only from throughput measured at {PROJECTION_SIZE}^3."), ""]
    else:
        lines += ["", "## GPU-hour projections", "",
                  f"Training: the paper's recipe at global batch {GLOBAL_BATCH}, GPU-hours = steps x "
                  f"{GLOBAL_BATCH} / samples per s / 3600 ({', '.join(f'{l}: {v} {s // 1000}k steps' for l, v, s in STAGES)}), "
                  f"from the throughput measured at {PROJECTION_SIZE}^3. Sampling: "
                  f"{SAMPLING_VOLUMES:,} volumes at {SAMPLING_STEPS} steps. `x ref` = reference hours / backend hours.",
                  "",
                  "| backend | train S | stage 1 GPUh | stage 2 GPUh | total GPUh | x ref | "
                  + " | ".join(f"sample {v.split('-')[1]} GPUh (S) | x ref" for v in SAMPLING_VARIANTS) + " |",
                  "| --- " * (6 + 2 * len(SAMPLING_VARIANTS)) + "|"]
        for p in result["projections"]:
            cells = [p["backend"], _f(p.get("training_size")),
                     _f(p.get("stage 1", {}).get("gpu_hours"), "{:.4g}"), _f(p.get("stage 2", {}).get("gpu_hours"), "{:.4g}"),
                     _f(p.get("training_gpu_hours"), "{:.4g}"), _x(p.get("training_speedup"))]
            for variant in SAMPLING_VARIANTS:
                s = p["sampling_1000_volumes"].get(variant)
                cells += [f"{s['gpu_hours']:.4g} ({s['size']})", _x(s.get("speedup"))] if s else ["–", "–"]
            lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Largest sampling batch that fits in memory", ""]
    if result["capacity"]:
        lines += [f"Variant {result['settings']['capacity_variant']}; one sampling step (model call + update); "
                  f"doubling then bisection, bounded in time per backend and edge.", "",
                  "| backend | S | max batch | x ref | bounded by | status | s |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        ref = {c["size"]: c.get("max_batch") for c in result["capacity"] if c["backend"] == REFERENCE}
        for c in result["capacity"]:
            lines.append(f"| {c['backend']} | {c['size']} | {c.get('max_batch', 0)} | "
                         f"{_x(_ratio(c.get('max_batch'), ref.get(c['size']), True))} | {c.get('bounded_by') or '–'} | "
                         f"{c.get('status')} | {c.get('seconds')} |")
        lines += [""] + [f"- `{b}`: largest edge {s['size']}^3 with batch {s['max_batch']}"
                         + (f" or more (search bounded by {s['bounded_by']})" if s.get("bounded_by") else "")
                         for b, s in result["capacity_summary"].items()]
    else:
        lines.append(f"Not measured: {result.get('capacity_note', 'disabled')}.")
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any]) -> bytes:
    """PNG: per cell, sampling step latency (log scale) and sampling speedup vs the reference."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("sample_step_ms")]
    cells = list(dict.fromkeys((r["variant"], r["size"], r["batch"]) for r in result["rows"]))
    backends = [b["name"] for b in result["backends"] if b["status"] == "run"]
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 1.6 * len(cells) + 5), 4.8))
    width = 0.8 / max(1, len(backends))
    for i, name in enumerate(backends):
        for ax, key in zip(axes, ("sample_step_ms", "sample_speedup")):
            xs, ys = [], []
            for j, cell in enumerate(cells):
                r = next((r for r in rows if (r["variant"], r["size"], r["batch"]) == cell and r["backend"] == name), None)
                if r is not None and r.get(key):
                    xs.append(j + (i - (len(backends) - 1) / 2) * width)
                    ys.append(r[key])
            ax.bar(xs, ys, width, label=name)
            for j, cell in enumerate(cells):
                r = next((r for r in result["rows"] if (r["variant"], r["size"], r["batch"]) == cell
                          and r["backend"] == name), None)
                if r is not None and r["sample_status"] == "OOM":
                    ax.annotate("OOM", (j + (i - (len(backends) - 1) / 2) * width, 0), xycoords=("data", "axes fraction"),
                                ha="center", va="bottom", fontsize=7, rotation=90)
    labels = [f"{v.replace('PRDiT-', '')}\n{s}^3 b{b}" for v, s, b in cells]
    for ax, ylabel in zip(axes, ("sampling step latency (ms, log)", f"speedup vs {REFERENCE} (x)")):
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel(ylabel)
    axes[0].set_yscale("log")
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(title(result), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_results(result: dict[str, Any], folder: Path, stem: str = "bench", chart: bool = True) -> dict[str, Path]:
    """<stem>.json, <stem>.md and (``chart``) <stem>.png under ``folder``, each written atomically."""
    paths = {"json": folder / f"{stem}.json", "markdown": folder / f"{stem}.md", "png": folder / f"{stem}.png"}
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(to_markdown(result))
    if chart:
        with atomic_path(paths["png"]) as tmp:
            tmp.write_bytes(plot(result))
    return paths


# --------------------------------------------------------------------------- #
# The run
# --------------------------------------------------------------------------- #
def _row_line(index: int, total: int, r: dict[str, Any], seconds: float) -> str:
    head = f"[{index:>3}/{total}] {r['variant']:<14} {r['size']:>3}^3 b{r['batch']:<3} {r['backend']:<15}"
    if r["sample_status"] == "ok":
        mem = r.get("sample_peak_memory_gib")
        samp = (f"step {r['sample_step_ms']:.4g} ms ({_x(r.get('sample_speedup'))}), "
                f"{r['volumes_per_hour']:.3g} vol/h" + (f", {mem:.2f} GiB" if mem is not None else ""))
    else:
        samp = f"sampling {r['sample_status']}"
    if r["train_status"] == "ok":
        mem = r.get("train_peak_memory_gib")
        train = (f"train {r['train_samples_per_s']:.3g} samples/s ({_x(r.get('train_speedup'))})"
                 + (f", {mem:.2f} GiB" if mem is not None else ""))
    else:
        train = f"train {r['train_status']}"
    return f"{head} {samp}; {train}  [{seconds:.1f} s]"


def run_benchmark(opts: BenchOptions, log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run every cell and backend, write bench.json / bench.md / bench.png, return (result, paths).

    JSON and Markdown are rewritten after every cell, so an interrupted run keeps what it
    measured; the chart is drawn at the end.
    """
    try:
        device = resolve_device(opts.device)
    except RuntimeError as err:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {opts.device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    opts.resolve(device)
    started = time.perf_counter()
    cpu = device.type == "cpu"
    env = environment(device, opts.argv)
    folder = Path(opts.out) / f"{device_slug(device)}-{datetime.date.today().isoformat()}"
    timing = _timing_settings(opts, device)
    label = "CPU results (not GPU figures)" if cpu else "GPU"
    log(f"prdit-fast bench: {env['device']['name']} [{label}], torch {env['versions']['torch']}, "
        f"output {folder}")

    backends_info = []
    runnable: list[Backend] = []
    for b in BACKENDS:
        if b.name not in opts.backends:
            continue
        reason = skip_reason(b, device, explicit=opts.explicit_backends and b.name in opts.backends)
        backends_info.append({"name": b.name, "description": b.description,
                              "status": "run" if reason is None else "skipped", "reason": reason})
        if reason is None:
            runnable.append(b)
        else:
            log(f"skip {b.name}: {reason}")

    matmul_n, copy_bytes = (512, 64 * 2**20) if cpu else (8192, 2**30)
    peaks = {"matmul": measure_matmul_peak(device, matmul_n), "copy": measure_copy_bandwidth(device, copy_bytes)}
    log(f"bf16 matmul {matmul_n}^3: {peaks['matmul']['tflops']:.3g} TFLOP/s; copy {copy_bytes / 2**30:.3g} GiB: "
        f"{peaks['copy']['gbps']:.4g} GB/s")

    result: dict[str, Any] = {
        "schema": SCHEMA,
        "device_type": device.type,
        "label": label,
        **env,
        "quick": opts.quick,
        "settings": {k: v for k, v in asdict(opts).items() if k not in ("argv", "explicit_backends")}
        | {"timing": timing, "sampler": "pc", "k": 2,
           "batch_by_size": {s: list(opts.batches or (default_batch(s, device),)) for s in opts.sizes}},
        "peaks": peaks,
        "backends": backends_info,
        "flops": {},
        "rows": [],
        "projections": [],
        "capacity": [],
        "capacity_summary": {},
        "notes": [],
    }
    if cpu:
        result["notes"].append("CPU run: every figure is a CPU figure; no GPU-hour projections.")
    if any(b.compiled for b in runnable):
        result["notes"].append(f"torch.compile mode: {opts.compile_mode}; its compile time is in "
                               f"sample_first_call_s / train_first_call_s, not in the step times.")
    flops_by_cell: dict[tuple[str, int], dict[str, Any]] = {}
    cells = [(v, s, b) for s in opts.sizes for v in opts.variants
             for b in (opts.batches or (default_batch(s, device),))]
    total = len(cells) * len(runnable)
    index = 0
    stop = False

    def over_budget() -> bool:
        return opts.time_budget_s is not None and time.perf_counter() - started > opts.time_budget_s

    for size in opts.sizes:
        for variant in opts.variants:
            if (variant, size) not in flops_by_cell:
                flops_by_cell[(variant, size)] = step_flops(variant, size)
                result["flops"][f"{variant}@{size}"] = flops_by_cell[(variant, size)]
            base = randomized_model(variant, size)
            for batch in [b for v, s, b in cells if (v, s) == (variant, size)]:
                for backend in runnable:
                    index += 1
                    row = {"variant": variant, "size": size, "batch": batch, "backend": backend.name,
                           "device_type": device.type}
                    cell_start = time.perf_counter()
                    stop = stop or over_budget()
                    if stop:
                        row.update(sample_status="skipped (time budget)", train_status="skipped (time budget)")
                    else:
                        row.update(bench_cell(base, backend, batch, device, opts, timing))
                    result["rows"].append(row)
                    add_derived(result["rows"], flops_by_cell, peaks["matmul"]["tflops"])
                    log(_row_line(index, total, row, time.perf_counter() - cell_start))
                    write_results(result, folder, opts.stem, chart=False)
            del base
            release(device)

    result["projections"] = [] if cpu else projections(result["rows"], tuple(b.name for b in runnable))
    if not opts.capacity:
        result["capacity_note"] = "disabled with --no-capacity"
    elif cpu:
        result["capacity_note"] = ("CPU run: host memory has no device limit worth searching "
                                   "(and swapping would hurt other work)")
    else:
        for size in opts.sizes:
            if over_budget():
                result["capacity_note"] = "time budget reached before every search ran"
                break
            base = randomized_model(opts.capacity_variant, size)
            for backend in runnable:
                if over_budget():
                    result["capacity_note"] = "time budget reached before every search ran"
                    break
                c = capacity_search(base, backend, device, opts.capacity_seconds)
                c.update(backend=backend.name, size=size, variant=opts.capacity_variant)
                result["capacity"].append(c)
                log(f"capacity {opts.capacity_variant} {size}^3 {backend.name}: max batch {c.get('max_batch')} "
                    f"({c.get('status')}{', bounded by ' + c['bounded_by'] if c.get('bounded_by') else ''}) "
                    f"[{c['seconds']} s]")
            del base
            release(device)
        result["capacity_summary"] = capacity_summary(result["capacity"])
    result["seconds"] = round(time.perf_counter() - started, 1)
    paths = write_results(result, folder, opts.stem)
    log(f"wrote {paths['json']}, {paths['markdown'].name}, {paths['png'].name} in {result['seconds']} s")
    return result, paths
