"""One benchmark cell (model, setup, batch): sampling and training measurements, and the
largest batch that fits."""
from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..models import PRDiT, canonical_name, parse_variant, variant_config
from .setups import REFERENCE, SETUP_NAMES, PreparedSetup, Setup, numerics
from .timing import is_out_of_memory, peak_memory_gib, release, reset_peak_memory, synchronize, time_call

DEFAULT_VARIANTS = ("PRDiT-B/12/0", "PRDiT-B/12/4", "PRDiT-B/12/12")
DEFAULT_SIZES = (64, 128, 256)
QUICK_GPU_SIZES = (64, 128)
QUICK_CPU_VARIANTS = ("PRDiT-B/12/0", "PRDiT-B/12/4")
QUICK_CPU_SIZES = (16,)
CAPACITY_BATCH_CAP = 4096


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
            self.backends = SETUP_NAMES
        unknown = [b for b in self.backends if b not in SETUP_NAMES]
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown}; valid: {list(SETUP_NAMES)}")
        # the reference runs first whatever was asked: every ratio is against it
        self.backends = (REFERENCE,) + tuple(b for b in SETUP_NAMES if b in self.backends and b != REFERENCE)
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


def timing_settings(opts: BenchOptions, device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"warmup": 1, "min_reps": 2, "max_reps": 3, "budget_s": 0.5}
    if opts.quick:
        return {"warmup": 2, "min_reps": 3, "max_reps": 10, "budget_s": 1.0}
    return {"warmup": 3, "min_reps": 5, "max_reps": 50, "budget_s": 3.0}


def error_line(err: BaseException) -> str:
    """The first line of an exception, type first, at most 300 characters (for a table cell)."""
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    return text[:300]


def bench_cell(base: PRDiT, backend: Setup, batch: int, device: torch.device, opts: BenchOptions,
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
            prepared = PreparedSetup(backend, model, device, opts.compile_mode)
            run = prepared.sampling_run(batch, opts.steps_per_rep)
            t = time_call(run, device, **timing)
            row.update(sample_step_ms=t.median_ms / opts.steps_per_rep, sample_reps=t.reps,
                       sample_first_call_s=t.first_call_s, sample_peak_memory_gib=peak_memory_gib(device),
                       attention=prepared.attention_backend(), sample_status="ok")
            if prepared.engine is not None:
                row["cuda_graph"] = prepared.engine.cuda_graph
                row["cuda_graph_reason"] = prepared.engine.graph_reason or None
        except Exception as err:  # one failing backend must not end the whole run
            outcome = "OOM" if is_out_of_memory(err) else error_line(err)
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
                outcome = "OOM" if is_out_of_memory(err) else error_line(err)
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


def capacity_search(base: PRDiT, backend: Setup, device: torch.device, budget_s: float) -> dict[str, Any]:
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
                prepared = PreparedSetup(backend, model, device, "default")
                run = prepared.sampling_run(batch, 1)
                run()
                synchronize(device)
                if prepared.engine is not None and not prepared.engine.cuda_graph:
                    # the engine falls back to eager when capture fails; the graph is what is measured
                    reason = prepared.engine.graph_reason
                    ok, outcome = False, None if "out of memory" in reason.lower() else reason
            except Exception as err:  # OOM is the answer we look for; anything else is reported
                ok, outcome = False, None if is_out_of_memory(err) else error_line(err)
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
