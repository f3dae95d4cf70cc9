"""Where a benchmark ran: device names and slugs, driver, versions, git commit."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .. import __version__


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
        import triton  # optional dependency: here, so a missing one is a value, not an error

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
