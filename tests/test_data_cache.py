"""The training cache (prdit_fast.data.cache): the same samples as the direct read within
the stored dtype's rounding and in the same order, rebuilt when a source changes, never
taken half-built after a kill, built once by concurrent processes, one file per split
and size. Sources are 32^3 official-layout files pooled to 16^3."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from prdit_fast.cli import main
from prdit_fast.data.cache import (
    FLOAT16_ERROR,
    CacheError,
    CacheSpec,
    cached_split,
    open_cache,
    storage_dtype,
    training_cache,
)
from prdit_fast.data.dataset import VolumeDataset

from test_official_layouts import OFFICIAL_LOCAL, lidc_root, rad_root, write_splits

ROOT = Path(__file__).resolve().parents[1]


def _spec(files, size=16, recipe="lidc", split="train") -> CacheSpec:
    return CacheSpec(tuple(Path(f).resolve() for f in files), size, 1, recipe, storage_dtype("auto", recipe), split)


def _cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.cache"))


def test_cached_samples_equal_the_direct_read_in_order(tmp_path):
    lidc, rad = lidc_root(tmp_path, cases=3), rad_root(tmp_path, cases=2)
    files = [lidc[2], rad[0], lidc[0], rad[1], lidc[1]]  # a list order that is not the sorted one
    cached = cached_split(files, {"image_size": 16, "cache_dir": tmp_path / "c"}, 1, "lidc")
    direct = VolumeDataset(files, 16)
    assert cached.dtype == np.float16 and [f.resolve() for f in files] == cached.files
    worst = max(float((cached[i] - direct[i]).abs().max()) for i in range(len(files)))
    assert 0 < worst <= FLOAT16_ERROR  # the stated bound, and float16 is really used
    assert all(cached[i].dtype == torch.float32 and cached[i].shape == (1, 16, 16, 16) for i in range(len(files)))
    # an unknown recipe is kept in float32: equal to the direct read
    exact = cached_split(files, {"image_size": 16, "cache_dir": tmp_path / "c"}, 1, "unknown")
    assert exact.dtype == np.float32 and exact.path != cached.path
    assert all(torch.equal(exact[i], direct[i]) for i in range(len(files)))


def test_splits_and_sizes_get_their_own_files(tmp_path):
    files = lidc_root(tmp_path, cases=3)
    folder = tmp_path / "c"
    train = training_cache(_spec(files[:2]), folder)
    val = training_cache(_spec(files[2:], split="val"), folder)
    small = training_cache(_spec(files[:2], size=8), folder)
    assert len({train.path, val.path, small.path}) == 3 and len(_cache_files(folder)) == 3
    assert val.path.name.startswith("val-16-") and small.shape == (2, 1, 8, 8, 8)
    assert torch.allclose(val[0], VolumeDataset(files[2:], 16)[0], atol=FLOAT16_ERROR)
    # a cache is checked against what it is opened for
    with pytest.raises(CacheError, match="shape"):
        open_cache(train.path, _spec(files[:2], size=8), train.header["key"])
    with pytest.raises(CacheError, match="key"):
        open_cache(train.path, _spec(files[:2]), "0" * 64)


def test_a_changed_source_rebuilds_and_a_corrupt_cache_is_replaced(tmp_path):
    import nibabel as nib

    files = lidc_root(tmp_path, cases=2)
    folder = tmp_path / "c"
    first = training_cache(_spec(files), folder)
    again = training_cache(_spec(files), folder)
    assert again.path == first.path and again.header["created"] == first.header["created"]  # reused, not rebuilt
    new = np.zeros((32, 32, 32))
    new[:16] = 1.0
    nib.save(nib.Nifti1Image(new, np.eye(4)), str(files[1]))
    os.utime(files[1], ns=(time.time_ns(), time.time_ns() + 10**9))  # a distinct mtime even on coarse clocks
    rebuilt = training_cache(_spec(files), folder)
    assert rebuilt.path != first.path and _cache_files(folder) == [rebuilt.path]  # the stale version is gone
    assert torch.equal(rebuilt[1], VolumeDataset([files[1]], 16)[0])  # 0 and 1 are exact in float16
    # a truncated file under the right name is not taken: it is rebuilt
    with open(rebuilt.path, "r+b") as f:
        f.truncate(rebuilt.path.stat().st_size - 100)
    with pytest.raises(CacheError, match="bytes"):
        open_cache(rebuilt.path, _spec(files), rebuilt.header["key"])
    fixed = training_cache(_spec(files), folder)
    assert fixed.path == rebuilt.path and torch.equal(fixed[1], VolumeDataset([files[1]], 16)[0])


_BUILD = """
import logging, sys, time
from pathlib import Path
from prdit_fast.data.cache import CacheSpec, storage_dtype, training_cache
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
files = tuple(Path(p) for p in sys.argv[3:])
spec = CacheSpec(files, 16, 1, "lidc", storage_dtype("auto", "lidc"))
def slow(done, total):
    print("built", done, flush=True)
    time.sleep(float(sys.argv[2]))
training_cache(spec, sys.argv[1], progress=slow)
print("done", flush=True)
"""


def _builder(folder: Path, files: list[Path], pause: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", _BUILD, str(folder), str(pause), *map(str, files)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_a_build_killed_midway_leaves_nothing_a_later_run_takes(tmp_path):
    files = [f.resolve() for f in lidc_root(tmp_path, cases=3)]
    folder = tmp_path / "c"
    proc = _builder(folder, files, pause=60)
    for line in proc.stdout:  # wait until one volume is written into the temporary file
        if line.startswith("built 1"):
            break
    proc.kill()
    proc.wait()
    leftovers = list(folder.iterdir())
    assert _cache_files(folder) == [] and any(".tmp-" in p.name for p in leftovers), leftovers
    cached = training_cache(_spec(files), folder)
    assert not any(".tmp-" in p.name for p in folder.iterdir())  # the killed build's temp is cleaned
    direct = VolumeDataset(files, 16)
    assert all(torch.allclose(cached[i], direct[i], atol=FLOAT16_ERROR) for i in range(3))


def test_a_second_process_waits_for_the_build_and_takes_it(tmp_path, caplog):
    files = [f.resolve() for f in lidc_root(tmp_path, cases=2)]
    folder = tmp_path / "c"
    proc = _builder(folder, files, pause=1.0)
    for line in proc.stdout:  # the other process holds the build lock
        if line.startswith("built 1"):
            break
    with caplog.at_level("INFO", logger="prdit_fast.data"):
        cached = training_cache(_spec(files), folder)
    rest = proc.stdout.read()
    assert proc.wait() == 0 and "done" in rest
    messages = [r.getMessage() for r in caplog.records]
    assert any("waiting for it" in m for m in messages) and not any(m.startswith("cache: building") for m in messages), messages
    assert _cache_files(folder) == [cached.path] and len(cached) == 2


def test_cache_command_builds_train_and_val(tmp_path, monkeypatch, capsys):
    paths = lidc_root(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_splits(tmp_path / "lidc_data", [str(p.resolve()) for p in paths[:2]], [str(paths[2].resolve())])
    (tmp_path / "lidc.yaml").write_text(OFFICIAL_LOCAL.format(prefix="lidc", task="lidc"))
    assert main(["cache", "--config", "lidc.yaml", "data.image_size=16", "data.num_workers=0",
                 f"data.cache_dir={tmp_path / 'c'}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("train: ") and "(2 volumes, float16" in out[0]
    assert out[1].startswith("val: ") and "(1 volumes, float16" in out[1]
    assert len(_cache_files(tmp_path / "c")) == 2
