"""The native CUDA library (kernels/, kernels/native.py).

Without a GPU: the built artifact exists wherever nvcc does (the ``built_library`` fixture
runs kernels/build.sh once when the library is missing or older than its sources), it
loads, its Philox integer core equals Triton's randint4x, and status() explains every way
the library can be unusable. With a GPU: every op against the Triton ops and the
plain-torch references.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from prdit_fast.testing import interpret_without_gpu

interpret_without_gpu()  # before Triton is first imported (this directory has no conftest)

from kernels import native  # noqa: E402
from prdit_fast import models  # noqa: E402
from prdit_fast.diffusion import IaNDiffusion  # noqa: E402
from prdit_fast.ops import sampling as triton_sampler  # noqa: E402
from prdit_fast.ops import token_cubes as triton_unpatchify  # noqa: E402
from prdit_fast.ops import unfold as triton_unfold  # noqa: E402
from prdit_fast.schedules import build_step_table  # noqa: E402

# (batch, edge, patch): odd sizes and every standard patch; stride 8, pad (p - 8) / 2.
# p = 18 takes the kernels' generic (runtime patch, scalar store) path.
WINDOW_CASES = [(1, 16, 10), (3, 24, 12), (1, 40, 16), (3, 16, 16), (1, 24, 14), (1, 16, 18)]
TRITON_CASES = WINDOW_CASES[:3]  # also compared with the Triton ops (which autotune per shape)
STRIDE = 8


@pytest.fixture
def library_env(monkeypatch):
    """Point PRDIT_NATIVE_LIB somewhere for one test, then restore the real library."""

    def use(path):
        monkeypatch.setenv(native.LIBRARY_ENV, str(path))
        return native.reload()

    yield use
    monkeypatch.undo()
    native.reload()


KERNELS = Path(__file__).resolve().parent
# A marker, not only the fixture: `pytest --cuda-only` (tests/conftest.py, the GPU session)
# selects the tests whose skipif reason says they need a GPU.
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BUILD_TIMEOUT_S = 900  # a cold build of two architectures; an up-to-date library costs nothing


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    return found or ("/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None)


def _stale(library: Path) -> bool:
    """Missing, or older than a source, a header, the CMake file or the build script."""
    if not library.is_file():
        return True
    sources = [*KERNELS.glob("*.cu"), *KERNELS.glob("*.cuh"), *KERNELS.glob("*.h"),
               KERNELS / "build.sh", KERNELS.parent / "CMakeLists.txt"]
    return library.stat().st_mtime < max(p.stat().st_mtime for p in sources)


@pytest.fixture(scope="session")
def built_library() -> Path | None:
    """The library the tests load: built with kernels/build.sh (into build/, which git
    ignores) where nvcc and cmake exist and it is missing or stale, once per session and
    under a file lock (pytest-xdist workers share it); None where it cannot be built. A
    compile error fails the test that asked. $PRDIT_NATIVE_LIB, a built copy, is used as is."""
    library = native.library_path()
    if os.environ.get(native.LIBRARY_ENV) or _nvcc() is None or shutil.which("cmake") is None:
        return library if library.is_file() else None
    lock_path = KERNELS.parent / "build" / ".native-build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _stale(library):
            done = subprocess.run(["bash", str(KERNELS / "build.sh")], capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT_S)
            if done.returncode != 0:
                pytest.fail(f"kernels/build.sh failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    native.reload()
    return library


@pytest.fixture
def library(built_library):
    """Skips unless the native library loads (it needs no GPU to load)."""
    if native.status().startswith("absent"):
        pytest.skip(f"native library unavailable: {native.status()}")


@pytest.fixture
def native_gpu(library):
    """Skips unless the native ops can run (a CUDA device the library was built for)."""
    if not (torch.cuda.is_available() and native.available()):
        pytest.skip(f"native ops cannot run: {native.status()}")


# --------------------------------------------------------------------------- #
# Without a GPU
# --------------------------------------------------------------------------- #
def test_status_and_available_never_raise():
    assert isinstance(native.status(), str) and native.status()
    assert isinstance(native.available(), bool)


def test_absent_library_says_how_to_build(library_env, tmp_path):
    text = library_env(tmp_path / "missing.so")
    assert text.startswith("absent") and "kernels/build.sh" in text
    assert native.available() is False
    assert native.built_architectures() == ""
    with pytest.raises(RuntimeError, match="unavailable.*kernels/build.sh"):
        native.unfold3d(torch.zeros(1, 1, 16, 16, 16), 12, STRIDE, 2)
    with pytest.raises(RuntimeError, match="unavailable"):
        native.philox_host(1, 2)


def test_unloadable_library_is_reported(library_env, tmp_path):
    broken = tmp_path / "libprdit_kernels.so"
    broken.write_bytes(b"not an ELF file")
    text = library_env(broken)
    assert text.startswith("absent") and "cannot be loaded" in text
    assert native.available() is False


@pytest.mark.skipif(_nvcc() is None or shutil.which("cmake") is None, reason="no nvcc or cmake: the library is optional")
def test_library_is_built_where_nvcc_exists(built_library):
    path = native.library_path()
    assert built_library == path and path.is_file(), f"{path} missing after kernels/build.sh"
    assert not _stale(path)
    assert not native.status().startswith("absent"), native.status()
    archs = native.built_architectures().split(",")
    assert archs and all(a.startswith("sm_") for a in archs), archs


@pytest.mark.usefixtures("library")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_status_without_gpu_says_no_cuda_device():
    text = native.status()
    assert text.startswith("loaded") and "no CUDA device" in text
    with pytest.raises(RuntimeError, match="no CUDA device"):
        native.fold3d(torch.zeros(1, 8, 1728), 16, 12, STRIDE, 2)


def _triton_randint4x(key: int, offsets: torch.Tensor) -> torch.Tensor:
    """Triton's randint4x(key, offsets): (n, 4) int64 holding the uint32 words; on the GPU,
    or on the CPU under the interpreter."""
    import triton
    import triton.language as tl

    @triton.jit
    def words_kernel(OFF, OUT, key, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        ok = i < n
        r0, r1, r2, r3 = tl.randint4x(key, tl.load(OFF + i, mask=ok, other=0))
        tl.store(OUT + i * 4, r0.to(tl.int64), mask=ok)
        tl.store(OUT + i * 4 + 1, r1.to(tl.int64), mask=ok)
        tl.store(OUT + i * 4 + 2, r2.to(tl.int64), mask=ok)
        tl.store(OUT + i * 4 + 3, r3.to(tl.int64), mask=ok)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    offsets = offsets.to(device)
    out = torch.zeros((offsets.numel(), 4), dtype=torch.int64, device=device)
    words_kernel[(1,)](offsets, out, key, offsets.numel(), BLOCK=triton.next_power_of_2(offsets.numel()))
    return out.cpu()


# keys as sample_key(run_seed, index) makes them, including a seed with the top bit set
PHILOX_KEYS = [(7 << 32) | 3, (0xDEADBEEF << 32) | 12345, (0x80000001 << 32) | 0]


def _signed64(key: int) -> int:
    """The int64 holding a uint64 key's bits (keys travel as int64 tensors)."""
    return key - 2**64 if key >= 2**63 else key


@pytest.mark.usefixtures("library")
@pytest.mark.parametrize("key", PHILOX_KEYS)
def test_philox_words_equal_triton_randint4x(key):
    # element v at counter step: offset v + (step << 32), as the sampler draws its noise
    offsets = torch.tensor([v + (step << 32) for step in (0, 1, 999) for v in (0, 1, 4095, 123457, 2**32 - 1)])
    expected = _triton_randint4x(key, offsets)
    got = torch.tensor([native.philox_host(key, int(o))[0] for o in offsets], dtype=torch.int64)
    assert torch.equal(got, expected)


@pytest.mark.usefixtures("library")
def test_philox_normal_on_host_matches_reference():
    keys = torch.tensor([_signed64(k) for k in PHILOX_KEYS], dtype=torch.int64)
    ref = triton_sampler.philox_normal(keys, 3, (2, 8, 8))  # (B, 2, 8, 8): element v = linear index
    for b, key in enumerate(PHILOX_KEYS):
        got = torch.tensor([native.philox_host(key, v + (3 << 32))[1] for v in range(128)])
        # host libm vs torch: a few fp32 ulps; a wrong Philox word would be off by O(1)
        torch.testing.assert_close(got, ref[b].reshape(-1), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# On the GPU
# --------------------------------------------------------------------------- #
def _volume(B: int, C: int, S: int, dtype: torch.dtype, integers: bool = False) -> torch.Tensor:
    """Random volume on the GPU; integer-valued when sums must be exact in any order."""
    if integers:
        return torch.randint(-8, 9, (B, C, S, S, S), device="cuda").to(dtype)
    return torch.randn(B, C, S, S, S, device="cuda").to(dtype)


@requires_cuda
@pytest.mark.usefixtures("native_gpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,S,p", WINDOW_CASES)
def test_unfold_equals_reference_and_triton(B, S, p, dtype):
    pad = (p - STRIDE) // 2
    x = _volume(B, 2 if S == 16 else 1, S, dtype)
    got = native.unfold3d(x, p, STRIDE, pad)
    assert got.dtype == dtype
    assert torch.equal(got, models.unfold3d(x, p, STRIDE, pad))  # a copy: exact
    if (B, S, p) in TRITON_CASES and dtype == torch.float32:  # each new shape autotunes the Triton op
        assert torch.equal(got, triton_unfold.unfold3d(x, p, STRIDE, pad, impl="triton"))


@requires_cuda
@pytest.mark.usefixtures("native_gpu")
def test_non_contiguous_input_is_rejected():
    x = _volume(2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        native.unfold3d(x.transpose(2, 4), 12, STRIDE, 2)


@requires_cuda
@pytest.mark.usefixtures("native_gpu")
@pytest.mark.parametrize("B,S,p", WINDOW_CASES)
def test_fold_sum_is_exact_in_fp32(B, S, p):
    pad = (p - STRIDE) // 2
    C = 2 if S == 16 else 1
    N = (S // STRIDE) ** 3
    # integer-valued: every summation order gives the same fp32 result
    tokens = torch.randint(-8, 9, (B, N, C * p**3), device="cuda").float()
    got = native.fold3d(tokens, S, p, STRIDE, pad, "sum")
    assert torch.equal(got, triton_unfold.fold3d_reference(tokens, S, p, STRIDE, pad, "sum"))
    tokens = torch.randn(B, N, C * p**3, device="cuda")
    got = native.fold3d(tokens, S, p, STRIDE, pad, "sum")
    # the reference scatter-adds in another order: fp32 rounding of sums of <= 27 terms
    torch.testing.assert_close(got, triton_unfold.fold3d_reference(tokens, S, p, STRIDE, pad), rtol=1e-6, atol=1e-5)
    if (B, S, p) in TRITON_CASES:
        # random values: the Triton fold adds in the same order, so fp32 sums agree exactly
        assert torch.equal(got, triton_unfold.fold3d(tokens, S, p, STRIDE, pad, "sum", impl="triton"))


@requires_cuda
@pytest.mark.usefixtures("native_gpu")
@pytest.mark.parametrize("B,S,p", WINDOW_CASES[:3])
def test_fold_is_the_adjoint_of_unfold(B, S, p):
    pad = (p - STRIDE) // 2
    x = _volume(B, 1, S, torch.float32)
    tokens = torch.randn(B, (S // STRIDE) ** 3, p**3, device="cuda")
    lhs = (native.unfold3d(x, p, STRIDE, pad).double() * tokens.double()).sum()
    rhs = (x.double() * native.fold3d(tokens, S, p, STRIDE, pad).double()).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-6, atol=1e-6)  # fp32 fold sums, fp64 dot products


@requires_cuda
@pytest.mark.usefixtures("native_gpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,S,p", WINDOW_CASES[:3])
def test_fold_mean_inverts_unfold(B, S, p, dtype):
    pad = (p - STRIDE) // 2
    x = _volume(B, 1, S, dtype)
    back = native.fold3d(native.unfold3d(x, p, STRIDE, pad), S, p, STRIDE, pad, "mean")
    # every contribution equals the voxel; fp32 sums of up to 27 equal terms then one divide
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(back.float(), x.float(), rtol=tol, atol=tol)
    tokens = torch.randn(B, (S // STRIDE) ** 3, p**3, device="cuda").to(dtype)
    torch.testing.assert_close(
        native.fold3d(tokens, S, p, STRIDE, pad, "mean").float(),
        triton_unfold.fold3d_reference(tokens.float(), S, p, STRIDE, pad, "mean"),
        rtol=tol, atol=tol,
    )


@requires_cuda
@pytest.mark.usefixtures("native_gpu")
def test_fold_bf16_integer_sums_are_exact():
    B, S, p = 3, 24, 12
    tokens = torch.randint(-8, 9, (B, (S // STRIDE) ** 3, p**3), device="cuda").to(torch.bfloat16)
    got = native.fold3d(tokens, S, p, STRIDE, 2)
    assert torch.equal(got, triton_unfold.fold3d_reference(tokens, S, p, STRIDE, 2))


@requires_cuda
@pytest.mark.usefixtures("native_gpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,S", [(1, 16), (3, 24), (1, 40)])
def test_unpatchify_equals_reference_and_triton(B, S, dtype):
    C_out = 2
    tokens = torch.randn(B, (S // STRIDE) ** 3, STRIDE**3 * C_out, device="cuda").to(dtype)
    fine = torch.randn_like(tokens)
    got = native.unpatchify(tokens, S, STRIDE, C_out)
    assert torch.equal(got, models.unpatchify(tokens, S, STRIDE, C_out))
    fused = native.unpatchify(tokens, S, STRIDE, C_out, residual=fine)
    # the fp32 sum rounded once equals torch's own rounding of tokens + fine
    assert torch.equal(fused, models.unpatchify(tokens + fine, S, STRIDE, C_out))
    assert torch.equal(fused, triton_unpatchify.unpatchify(tokens, S, STRIDE, C_out, fine, impl="triton"))
    wide = native.unpatchify(tokens, S, STRIDE, C_out, residual=fine, out_dtype=torch.float32)
    assert torch.equal(wide, models.unpatchify(tokens.float() + fine.float(), S, STRIDE, C_out))


@requires_cuda
@pytest.mark.usefixtures("native_gpu")
def test_bad_inputs_raise_value_errors():
    x = _volume(1, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="2\\*pad"):
        native.unfold3d(x, 12, STRIDE, 3)
    with pytest.raises(ValueError, match="dtype"):
        native.unfold3d(x.double(), 12, STRIDE, 2)
    with pytest.raises(ValueError, match="CUDA tensor"):
        native.unfold3d(x.cpu(), 12, STRIDE, 2)
    with pytest.raises(ValueError, match="expects tokens"):
        native.fold3d(torch.zeros(1, 7, 1728, device="cuda"), 16, 12, STRIDE, 2)
    with pytest.raises(ValueError, match="reduce"):
        native.fold3d(torch.zeros(1, 8, 1728, device="cuda"), 16, 12, STRIDE, 2, "max")
    with pytest.raises(ValueError, match="needs tokens"):
        native.unpatchify(torch.zeros(1, 8, 100, device="cuda"), 16, STRIDE, 2)


def _triton_randn(keys: torch.Tensor, step: int, numel: int) -> torch.Tensor:
    """tl.randn(key, v + (step << 32)) for v < numel, per key: (B, numel) fp32 on the GPU."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["step"])  # step == 1 would otherwise become a Python int
    def randn_kernel(KEYS, OUT, step, numel, BLOCK: tl.constexpr):
        v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        b = tl.program_id(1).to(tl.int64)
        ok = v < numel
        key = tl.load(KEYS + b)
        z = tl.randn(key, v.to(tl.int64) + (step.to(tl.int64) << 32))
        tl.store(OUT + b * numel + v, z, mask=ok)

    out = torch.empty((keys.numel(), numel), device=keys.device)
    randn_kernel[(triton.cdiv(numel, 1024), keys.numel())](keys, out, step, numel, BLOCK=1024)
    return out


@requires_cuda
@pytest.mark.usefixtures("native_gpu")
@pytest.mark.parametrize("step", [0, 1, 77])
def test_philox_normal_equals_triton_randn(step):
    keys = torch.tensor([_signed64(k) for k in PHILOX_KEYS], dtype=torch.int64, device="cuda")
    shape = (1, 24, 24, 24)
    got = native.philox_normal(keys, step, shape)
    numel = got[0].numel()
    # same integer core, the same libdevice functions and sqrt.approx as Triton's tl.randn
    assert torch.equal(got.view(len(PHILOX_KEYS), -1), _triton_randn(keys, step, numel))
    ref = triton_sampler.philox_normal(keys, step, shape)  # plain torch: accurate sqrt/log/cos
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(native.philox_normal(keys, step, shape, scale=0.5), 0.5 * got, rtol=0, atol=0)


def _sampler_inputs(B: int, C: int, S: int, dtype: torch.dtype):
    tokens = torch.randn(B, (S // STRIDE) ** 3, STRIDE**3 * 2 * C, device="cuda").to(dtype)
    residual = (0.1 * torch.randn(tokens.shape, device="cuda")).to(dtype)
    x = torch.randn(B, C, S, S, S, device="cuda")
    keys = torch.tensor([triton_sampler.sample_key(2**31 + 5, i) for i in range(B)], device="cuda")
    # pc sampler, 4 steps, k = 2: row 0 has a corrector (sigma > 0), row 1 is an Euler step
    table = build_step_table(IaNDiffusion(), 4, "pc", 2, "cuda")
    assert table[0, 4] > 0 and table[1, 4] == 0
    return tokens, residual, x, keys, table


@requires_cuda
@pytest.mark.usefixtures("native_gpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,C,S", [(1, 1, 16), (3, 1, 24), (1, 2, 40)])
@pytest.mark.parametrize("row", [0, 1])
@pytest.mark.parametrize("with_residual", [False, True])
def test_sampler_update_matches_reference_and_triton(B, C, S, dtype, row, with_residual):
    tokens, residual, x, keys, table = _sampler_inputs(B, C, S, dtype)
    residual = residual if with_residual else None
    index_dtype = torch.int64 if row == 0 else torch.int32
    step = torch.tensor([row], dtype=index_dtype, device="cuda")
    x_next, x0_hat = native.sampler_update(tokens, x, table, step, keys, stride=STRIDE, residual=residual)
    ref_next, ref_x0 = triton_sampler.sampler_update_reference(
        tokens, x, table, step, keys, stride=STRIDE, residual=residual
    )
    tri_next, tri_x0 = triton_sampler.sampler_update(
        tokens, x, table, step, keys, stride=STRIDE, residual=residual, impl="triton"
    )
    assert torch.equal(x0_hat, ref_x0) and torch.equal(x0_hat, tri_x0)  # fp32 sums of the same two values
    # fp32 rounding: FMA contraction differs between compilers; torch's accurate log/cos
    # differ from the approximations in the noise by a few ulps
    torch.testing.assert_close(x_next, tri_next, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_next, ref_next, rtol=1e-5, atol=1e-5)
    assert step.item() == row  # not advanced


@requires_cuda
@pytest.mark.usefixtures("native_gpu")
def test_sampler_update_in_place_and_advance():
    tokens, _, x, keys, table = _sampler_inputs(2, 1, 24, torch.bfloat16)
    step = torch.zeros(1, dtype=torch.int64, device="cuda")
    expected, expected_x0 = native.sampler_update(tokens, x, table, step, keys, stride=STRIDE)
    x0 = torch.empty_like(x)
    out, out_x0 = native.sampler_update(tokens, x, table, step, keys, stride=STRIDE, x_out=x, x0_out=x0, advance=True)
    assert out is x and out_x0 is x0
    assert torch.equal(x, expected) and torch.equal(x0, expected_x0)
    assert step.item() == 1


@requires_cuda
@pytest.mark.usefixtures("native_gpu")
@pytest.mark.parametrize("bad", [-1, 4])
def test_sampler_update_out_of_range_step_gives_nan(bad):
    tokens, _, x, keys, table = _sampler_inputs(1, 1, 16, torch.float32)
    step = torch.tensor([bad], device="cuda")
    x_next, x0_hat = native.sampler_update(tokens, x, table, step, keys, stride=STRIDE)
    assert torch.isnan(x_next).all() and torch.isnan(x0_hat).all()


@requires_cuda
@pytest.mark.usefixtures("native_gpu")
def test_sampler_update_rejects_mismatched_inputs():
    tokens, _, x, keys, table = _sampler_inputs(2, 1, 16, torch.float32)
    step = torch.zeros(1, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="keys"):
        native.sampler_update(tokens, x, table, step, keys[:1], stride=STRIDE)
    with pytest.raises(ValueError, match="step_table"):
        native.sampler_update(tokens, x, table[:, :4].contiguous(), step, keys, stride=STRIDE)
    with pytest.raises(ValueError, match="needs tokens"):
        native.sampler_update(tokens[:, :, :100].contiguous(), x, table, step, keys, stride=STRIDE)
    with pytest.raises(ValueError, match="dtype"):
        native.sampler_update(tokens, x.double(), table, step, keys, stride=STRIDE)
