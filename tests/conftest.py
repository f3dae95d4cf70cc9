import os
import re

import pytest
import torch

from prdit_fast.testing import interpret_without_gpu, randomize_, rel_rms  # noqa: F401 (tests import these from here)

interpret_without_gpu()  # before Triton is first imported

from prdit_fast.ops.dispatch import triton_runs_on  # noqa: E402 (after the interpreter is set)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Where the Triton kernel tests run: the GPU when there is one, else the CPU under the interpreter
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(
    not triton_runs_on(torch.empty(0, device=TRITON_DEVICE)), reason="Triton cannot run here (no GPU, no interpreter)"
)


def assert_close_scaled(a: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    """Largest absolute error within ``tol`` times the reference's largest magnitude (at least 1)."""
    err = (a - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * max(scale, 1.0), f"max abs error {err:.3e} vs reference max {scale:.3e}"


@pytest.fixture(autouse=True, scope="session")
def _private_training_cache(tmp_path_factory):
    """Training caches (prdit_fast.data.cache) of the tests go to a temporary folder, not
    the user's ~/.cache (subprocesses inherit the variable)."""
    saved = os.environ.get("PRDIT_FAST_CACHE_DIR")
    os.environ["PRDIT_FAST_CACHE_DIR"] = str(tmp_path_factory.mktemp("training_cache"))
    yield
    if saved is None:
        os.environ.pop("PRDIT_FAST_CACHE_DIR", None)
    else:
        os.environ["PRDIT_FAST_CACHE_DIR"] = saved
# the skip reasons of the tests that only a GPU runs (requires_cuda, FP8 tensor cores, the native library)
_GPU_ONLY = re.compile(r"needs a (CUDA )?GPU|native ops cannot run")


def pytest_addoption(parser):
    parser.addoption("--cuda-only", action="store_true",
                     help="run only the tests that skip without a CUDA GPU (benchmarks/gpu_session.sh; CI runs the rest)")


def needs_gpu(item: pytest.Item) -> bool:
    """True when ``item`` is skipped without a GPU by one of the GPU-only markers."""
    return any(_GPU_ONLY.search(str(mark.kwargs.get("reason", ""))) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--cuda-only"):
        return
    deselected = [item for item in items if not needs_gpu(item)]
    items[:] = [item for item in items if needs_gpu(item)]
    config.hook.pytest_deselected(items=deselected)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    """Where the Triton ops under test run: the GPU when there is one, else the CPU
    under the Triton interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _restore_tf32():
    """Training turns TF32 on for speed; keep that from leaking into later fp32 comparisons."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def meta_shadow(module: torch.nn.Module, *init_args) -> torch.nn.Module:
    """A meta-device ``type(module)(*init_args)`` whose parameter slots hold differentiable
    casts (``param * 1.0``) of ``module``'s parameters, as FastPRDiT passes to the local
    denoiser."""
    with torch.device("meta"):
        shadow = type(module)(*init_args)
    for name, param in module.named_parameters():
        owner, _, leaf = name.rpartition(".")
        shadow.get_submodule(owner)._parameters[leaf] = param * 1.0
    return shadow
