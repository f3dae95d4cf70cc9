"""``prdit-fast sample``: files, resume after a kill, sharding, summary.

A randomized PRDiT-XS/10/0 at S = 16 saved with ``save_checkpoint``; 2 steps per volume.
"""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import requires_cuda

from prdit_fast.checkpoint import save_checkpoint
from prdit_fast.cli import main
from prdit_fast.commands import sample as sample_cmd
from prdit_fast.models import create_model

SIZE = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("PRDiT-XS/10/0", SIZE)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", model, ema_model=model)


def cli_args(ckpt, out, *extra: str) -> list[str]:
    return [
        "sample", "--ckpt", str(ckpt), "--num", "3", "--batch-size", "2", "--steps", "2",
        "--seed", "5", "--out", str(out), "--device", "cpu", *extra,
    ]


def parse(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    sample_cmd.add_arguments(parser)
    return parser.parse_args(argv[1:])


class Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_files(ckpt, tmp_path):
    out = tmp_path / "run"

    def kill_after_first(index, path):
        raise Killed(index)

    with pytest.raises(Killed):
        sample_cmd.run(parse(cli_args(ckpt, out)), on_volume=kill_after_first)
    first = sorted(p.name for p in out.glob("sample_*.nii.gz"))
    assert first == ["sample_000000.nii.gz"]
    assert not list(out.glob(".*tmp*"))  # no half-written leftovers
    stamp = (out / first[0]).stat().st_mtime_ns

    assert main(cli_args(ckpt, out)) == 0
    files = sorted(p.name for p in out.glob("sample_*.nii.gz"))
    assert files == [f"sample_{i:06d}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in out.glob("sample_*.png")) == [f"sample_{i:06d}.png" for i in range(3)]
    assert (out / first[0]).stat().st_mtime_ns == stamp  # resumed, not redone
    volumes = []
    for name in files:
        img = nib.load(out / name)
        assert img.shape == (SIZE,) * 3
        assert np.allclose(img.header.get_zooms()[:3], 1.0)
        volumes.append(np.asarray(img.dataobj, dtype=np.float32))
    assert np.isfinite(volumes[0]).all() and np.ptp(volumes[0]) > 0
    summary = json.loads((out / "summary.json").read_text())["runs"][-1]
    assert summary["volumes_written"] == 2 and summary["volumes_skipped"] == 1
    assert summary["backend"] == "reference" and summary["cuda_graph"] is False
    assert summary["volumes_per_hour"] > 0 and summary["seconds_per_volume"] > 0

    # the resumed run's files are byte for byte an uninterrupted run's
    straight = tmp_path / "straight"
    assert main(cli_args(ckpt, straight)) == 0
    for name in files + [f"sample_{i:06d}.png" for i in range(3)]:
        assert (straight / name).read_bytes() == (out / name).read_bytes(), name

    # volume i depends only on (seed, i): an uninterrupted run in other batches agrees
    fresh = tmp_path / "fresh"
    assert main(cli_args(ckpt, fresh, "--batch-size", "3", "--no-png")) == 0
    assert not list(fresh.glob("*.png"))
    for name, vol in zip(files, volumes):
        # int16 HU on disk: float rounding of other batch shapes may flip one rounding step
        np.testing.assert_allclose(np.asarray(nib.load(fresh / name).dataobj, dtype=np.float32), vol, atol=1.0)

    # nothing left to do: a rerun writes nothing and says so
    assert main(cli_args(ckpt, out)) == 0
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["volumes_written"] for r in runs] == [2, 0]  # every invocation's record is kept


def test_ranks_shard_indices_and_npy(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "rank1"
    assert main(cli_args(ckpt, out, "--format", "npy")) == 0
    assert sorted(p.name for p in out.glob("sample_*")) == ["sample_000001.npy"]
    volume = np.load(out / "sample_000001.npy")
    assert volume.shape == (SIZE,) * 3 and volume.dtype == np.float32
    summary = json.loads((out / "summary_rank1.json").read_text())["runs"][-1]
    assert summary["rank"] == 1 and summary["world_size"] == 2 and summary["volumes_written"] == 1


@pytest.mark.parametrize(
    "extra, message",
    [(("--seed", "-1"), "seed"), (("--num", "0"), "num"), (("--sampler", "pc", "--k", "0"), "predictor step")],
)
def test_bad_arguments_raise(ckpt, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        sample_cmd.run(parse(cli_args(ckpt, tmp_path / "bad", *extra)))


@requires_cuda
def test_gpu_run_uses_fast_backend_and_graph(ckpt, tmp_path):
    out = tmp_path / "gpu"
    argv = cli_args(ckpt, out)
    argv[argv.index("--device") + 1] = "cuda"
    assert main(argv) == 0
    assert len(list(out.glob("sample_*.nii.gz"))) == 3
    summary = json.loads((out / "summary.json").read_text())["runs"][-1]
    if sample_cmd._fast_available():
        assert summary["backend"] == "fast" and summary["dtype"] == "bfloat16"
    assert summary["cuda_graph"] is True, summary["cuda_graph_reason"]
    assert summary["peak_gpu_memory_gib"] > 0 and summary["gpu"]
