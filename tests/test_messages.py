"""Failures that used to leave a user stuck (issue 25) end in one clear ``error:`` line
with the right exit status: 2 for a bad argument, 1 for a runtime failure."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from prdit_fast.atomic import atomic_path
from prdit_fast.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from prdit_fast.cli import main
from prdit_fast.models import create_model

SIZE = 16


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("PRDiT-XS/10/0", SIZE)


def test_flow_matching_checkpoint_given_to_reconstruct(tmp_path, capsys):
    fm = create_model("PRDiT-XS/4/0", 8, out_channels=1)
    ckpt = save_checkpoint(tmp_path / "fm.pt", fm, ema_model=fm)
    (tmp_path / "y.npy").write_bytes(b"")
    assert main(["reconstruct", "--ckpt", str(ckpt), "--task", "deblur", "--input", str(tmp_path / "y.npy"),
                 "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error: --ckpt") and "flow-matching model" in line and "IaN" in line
    assert not (tmp_path / "out").exists()


def test_text_file_given_as_checkpoint(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello world\n")
    assert main(["info", "--ckpt", str(text)]) == 2  # a wrong --ckpt argument
    (line,) = error_lines(capsys)
    assert "is not a checkpoint" in line and "b'hello wo'" in line
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_checkpoint(text)


def test_info_describes_a_bare_state_dict_given_variant_and_size(tmp_path, model, capsys):
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    assert main(["info", "--ckpt", str(bare)]) == 2
    (line,) = error_lines(capsys)
    assert "--variant and --size" in line and "PRDiT-XS/10/0" in line
    assert main(["info", "--ckpt", str(bare), "--variant", "PRDiT-XS/10/0", "--size", str(SIZE), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)["model"]
    assert described["variant"] == "PRDiT-XS/10/0" and described["input_size"] == SIZE


@pytest.mark.parametrize("field, value, said", [
    ("config", "{not json", "'config'"),
    ("version", "two", "'version'"),
    ("diffusion", "[", "'diffusion'"),
])
def test_safetensors_metadata_errors(tmp_path, model, field, value, said):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    good = save_checkpoint(tmp_path / "good.safetensors", model)
    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
    meta[field] = value
    save_file(load_file(str(good)), str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=f"metadata field {said} is missing or unreadable") as e:
        read_checkpoint(tmp_path / "bad.safetensors")
    assert "\n" not in str(e.value)


def test_device_that_does_not_exist_is_a_usage_error(tmp_path, capsys):
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"")  # never read: the device is checked first
    from prdit_fast.devices import resolve_device

    with pytest.raises(ValueError, match="--device 'cuda:3'"):
        resolve_device("cuda:3")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")


def test_device_cuda3_exits_2_from_the_command_line(tmp_path, model):
    if torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    ckpt = save_checkpoint(tmp_path / "m.pt", model)
    out = subprocess.run([sys.executable, "-m", "prdit_fast.cli", "sample", "--ckpt", str(ckpt), "--num", "1",
                          "--steps", "2", "--out", str(tmp_path / "out"), "--device", "cuda:3"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: --device 'cuda:3'")


def test_a_full_disk_is_one_clear_line(tmp_path, model, monkeypatch):
    # a real ENOSPC from the kernel (/dev/full), inside an atomic write
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="no space left on device") as e:
        with atomic_path(target) as tmp, open("/dev/full", "wb") as full:
            tmp.write_bytes(b"partial")
            full.write(b"x" * 8)
            full.flush()
    assert e.value.errno == errno.ENOSPC and target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary left
    # torch.save's zip writer on a full disk: "[enforce fail at inline_container.cc:...]"
    import prdit_fast.atomic as atomic

    def full_save(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3968")

    monkeypatch.setattr(torch, "save", full_save)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda _: type("U", (), {"free": 0})())
    with pytest.raises(OSError, match=r"no space left on device in .* \(0 MiB free\): the file was not written"):
        save_checkpoint(tmp_path / "ckpt.pt", model)
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_real_full_file_system_while_checkpointing(tmp_path, model):
    """On a 256 KiB tmpfs when this process may mount one (root); else the test above covers it."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        with pytest.raises(OSError, match="no space left on device") as e:
            save_checkpoint(mount / "ckpt.pt", model)
        assert e.value.errno == errno.ENOSPC and list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)  # the caught error may still hold the file


def test_an_image_size_the_variant_cannot_take_is_a_usage_error(tmp_path, capsys):
    import yaml

    config = {"data": {"image_size": 17}, "model": {"name": "PRDiT-XS/12/0"},
              "training": {"batch_size": 1, "total_steps": 1, "learning_rate": 1e-3, "device": "cpu"},
              "output": {"results_dir": str(tmp_path / "run")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error: model.name / data.image_size:") and "not a multiple of stride 8" in line
    assert not (tmp_path / "run").exists()
