"""Atomic file writes: a reader (or a crash, or Ctrl-C) never sees a half-written file.

A file ``DIR/NAME`` is written as ``DIR/.NAME.tmp-XXXXXXXX`` and renamed onto ``NAME``
when complete. The temporary name is hidden and ends in neither NAME's extension nor
any other, so no reader's glob (``*.npy``, ``*.pt``, ``sample_*.nii.gz``) ever takes it.
A process killed mid-write (SIGKILL, power loss) leaves its temporary file behind;
``remove_stale_temps`` deletes such leftovers and every job calls it on the folders it
writes when it starts.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

# mkstemp creates 0600 files; finished files get the mode a plain open() would give
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
_TEMP_MARK = ".tmp-"
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.tmp-[A-Za-z0-9_]+$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto
    ``path`` (``os.replace``, atomic on one file system), on any exception (including
    KeyboardInterrupt) it is removed and ``path`` is left as it was.

    The temporary name has no extension, so writers must not choose their format from
    the file name (pass it explicitly: ``format="PNG"``, a file object to ``np.save``).
    Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{_TEMP_MARK}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        full = _full_disk(e, path.parent)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if full is not None:
            raise OSError(errno.ENOSPC, full) from e
        raise


def _full_disk(error: BaseException, folder: Path) -> str | None:
    """A one-line message when ``error`` is a write that stopped on a full file system
    (ENOSPC, or torch.save's zip writer failing midway while the disk is full), else None."""
    free = shutil.disk_usage(folder).free
    writer_failed = isinstance(error, RuntimeError) and any(
        mark in str(error) for mark in ("inline_container", "file write failed", "PytorchStreamWriter"))
    if not (isinstance(error, OSError) and error.errno == errno.ENOSPC) and not (writer_failed and free < 1 << 30):
        return None
    return (f"no space left on device in {folder} ({free / 2**20:.0f} MiB free): the file was not written and the "
            f"earlier version, if any, is intact; free space or write elsewhere")


def temp_target(name: str) -> str | None:
    """The file name a temporary file of ``atomic_path`` was to become, or None when
    ``name`` is not such a temporary file."""
    m = _TEMP_RE.match(name)
    return m.group("target") if m else None


def remove_stale_temps(
    folder: str | os.PathLike, owned: Callable[[str], bool] | None = None, before: float | None = None
) -> list[Path]:
    """Delete ``atomic_path``'s leftovers in ``folder`` (not recursive) last modified
    before ``before`` (a ``time.time()``; default now), restricted to those whose target
    name ``owned(target)`` accepts (several processes sharing a folder each clean their
    own files). Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = time.time() if before is None else before
    removed = []
    for p in folder.iterdir():
        target = temp_target(p.name)
        if target is None or (owned is not None and not owned(target)):
            continue
        with contextlib.suppress(FileNotFoundError):
            if p.stat().st_mtime <= cutoff:
                p.unlink()
                removed.append(p)
    return removed


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented JSON at ``path`` (values JSON cannot hold written as ``str``), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
