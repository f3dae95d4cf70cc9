"""An output folder (or file) belongs to one run: claimed atomically, held while the run works.

Every command that writes a run's results into a folder (``sample``, ``reconstruct``,
``features``) claims it first::

    with claim_run_folder(out, identity, outputs=("sample_*",)) as claim:
        ...  # write the run's files
    # or: claim = claim_run_folder(...); ...; claim.release(failed=...)

- The identity (a JSON-able mapping: checkpoint hash and every argument that changes
  the outputs) is recorded in ``OUT/run.json``. A later run with the same identity may
  resume in the folder; a run with another identity is refused (``UsageError``, one
  line naming what differs) while the folder holds outputs of the recorded run.
- The decision (read run.json, check, write run.json) is made under an exclusive
  ``fcntl.flock`` on ``OUT/.claim.lock``, so of two runs started at the same moment
  exactly one gets the folder (the old check-then-write let both in).
- While it works, each process of the run holds an exclusive lock on its own member
  file ``OUT/.claim-MEMBER`` (MEMBER: ``rank0``..., holding pid, host and start time).
  A run whose member lock is held is running: any other run, even one of the same
  identity for the same member, is refused. The kernel drops the lock when the process
  dies, so a crashed (killed) run's claim is released by construction: the next run
  finds the member file unlocked, takes it over, and (same identity) resumes.
- A run that fails (``release(failed=True)``, e.g. a NaN volume) and wrote no outputs
  gives the folder up: its run.json is removed and any run may use the folder. A
  crashed run that wrote no outputs is treated the same way by the next claimant.

A command whose result is one file (``evaluate``'s report, a JSON object) claims the file
instead (``claim_output_file``): while it works it holds an exclusive lock on the hidden
``DIR/.NAME.claim`` (holder pid, host and start time; dropped by the kernel when the process
dies, removed on release), so a second run with the same file is refused before any work.
The identity is recorded inside the file; an existing file of another identity (or of none)
is refused unless the caller overwrites on the user's request, and the same identity
replaces its own file. Leftover temporary files of interrupted writes of the file are
removed under the lock.

Locks are advisory and need a file system with ``flock`` (local disks; NFS v4 maps it
onto byte-range locks).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .atomic import atomic_path, remove_stale_temps
from .errors import UsageError

RUN_FILE = "run.json"
_DECISION_LOCK = ".claim.lock"
_MEMBER_PREFIX = ".claim-"


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created when absent; never deleted, so every
    process locks the same inode)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on ``path``, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _lock_removable(path: Path) -> int | None:
    """``_try_lock`` for a lock file that its holder deletes on release: the lock counts only
    when ``path`` still names the locked inode (else a process that opened the file before
    its deletion and one that created it anew would both hold "the" lock)."""
    while True:
        fd = _try_lock(path)
        if fd is None:
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        os.close(fd)  # deleted by its last holder meanwhile: lock the current file


def _write_holder(fd: int) -> None:
    """Record this process (pid, host, start time) in the locked file ``fd``, for ``_holder``."""
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())


def _holder(path: Path) -> str:
    """'pid P on HOST since TIME' from a member file, or a plain description."""
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info['pid']} on {info['host']} since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"another process ({path.name})"


def _outputs(out: Path, patterns: Iterable[str] | None) -> list[Path]:
    """The run outputs present in ``out``: entries matching ``patterns``, or, when None,
    every visible entry but run.json."""
    if patterns is None:
        return sorted(p for p in out.iterdir() if not p.name.startswith(".") and p.name != RUN_FILE)
    return sorted({p for pattern in patterns for p in out.glob(pattern)})


def _differences(owner: Mapping[str, Any], identity: Mapping[str, Any], where: str = "folder") -> str:
    keys = sorted(set(owner) | set(identity), key=str)
    return "; ".join(f"{k} {owner.get(k)!r} ({where}) vs {identity.get(k)!r}" for k in keys if owner.get(k) != identity.get(k))


class RunClaim:
    """The held claim of one process on a run folder (``claim_run_folder``)."""

    def __init__(self, out: Path, fd: int, member_file: Path, outputs: tuple[str, ...] | None, resumed: bool):
        self.out, self._fd, self._member_file, self._outputs = out, fd, member_file, outputs
        self.resumed = resumed  # the folder already belonged to this identity

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, failed: bool = False) -> None:
        """Drop the claim. ``failed``: when the folder holds no outputs, also give the
        folder up (remove run.json) so that another run may use it."""
        if self._fd is None:
            return
        with _flock(self.out / _DECISION_LOCK):
            if failed and not _outputs(self.out, self._outputs):
                with contextlib.suppress(FileNotFoundError):
                    (self.out / RUN_FILE).unlink()
            with contextlib.suppress(FileNotFoundError):
                self._member_file.unlink()
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunClaim":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None)


def check_out_folder(out: str | os.PathLike, flag: str = "--out") -> Path:
    """``out`` as a Path, after checking (before any work) that it is a folder or can be
    created as one; UsageError naming ``flag`` otherwise. Nothing is created."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} is a file; give a folder (it will be created)")
    _check_creatable(out, out, flag)
    return out


def _check_creatable(folder: Path, out: Path, flag: str) -> None:
    """UsageError (naming ``flag`` and ``out``) unless ``folder`` is, or can be created as, a
    writable folder."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {out}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out}: {existing} is not writable")


def claim_run_folder(
    out: str | os.PathLike,
    identity: Mapping[str, Any],
    outputs: Iterable[str] | None = None,
    member: str = "rank0",
    flag: str = "--out",
) -> RunClaim:
    """Claim ``out`` (created when absent) for the run ``identity`` and hold it until
    ``release()`` (or the end of a ``with`` block, or the process).

    ``outputs``: glob patterns of the run's result files (None: every visible entry but
    run.json); they decide whether a folder without a live run still belongs to the
    recorded one. ``member``: this process's part of the run (one per rank; two live
    processes of one member are refused). Raises UsageError, naming ``flag``, when the
    folder is running another process or holds another run's outputs.
    """
    out = check_out_folder(out, flag)
    out.mkdir(parents=True, exist_ok=True)
    identity = json.loads(json.dumps(dict(identity)))  # as run.json will hold it (tuples -> lists)
    patterns = None if outputs is None else tuple(outputs)
    member_file = out / f"{_MEMBER_PREFIX}{member}"
    run_file = out / RUN_FILE
    with _flock(out / _DECISION_LOCK):
        live: list[Path] = []
        for f in sorted(out.glob(f"{_MEMBER_PREFIX}*")):
            fd = _try_lock(f)
            if fd is None:
                live.append(f)
            else:  # a crashed process's member file: released
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
                os.close(fd)
        try:
            owner = json.loads(run_file.read_text()) if run_file.is_file() else None
        except ValueError:
            owner = None  # unreadable: treated as absent; outputs still protect the folder
        if owner != identity:
            if live:
                raise UsageError(f"{flag} {out} is in use by another run ({_holder(live[0])}); use another {flag} folder")
            present = _outputs(out, patterns)
            if present:
                whose = (f"another run ({_differences(owner, identity)})" if isinstance(owner, Mapping)
                         else f"another run (no readable {RUN_FILE}: another tool or an older prdit_fast)")
                raise UsageError(
                    f"{flag} {out} holds {len(present)} file(s) of {whose}, e.g. {present[0].name}; "
                    f"use another {flag} folder"
                )
            with atomic_path(run_file) as tmp:
                tmp.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
        elif member_file in live:
            raise UsageError(
                f"{flag} {out} is in use by the same run ({_holder(member_file)}); wait for it or use another {flag}"
            )
        fd = _try_lock(member_file)
        if fd is None:  # cannot happen under the decision lock unless a process ignores it
            raise UsageError(f"{flag} {out} is in use ({_holder(member_file)})")
        _write_holder(fd)
    return RunClaim(out, fd, member_file, patterns, resumed=owner == identity)


class FileClaim:
    """The held claim of one process on an output file (``claim_output_file``)."""

    def __init__(self, path: Path, lock: Path, fd: int, identity: dict[str, Any]):
        self.path, self._lock, self._fd = path, lock, fd
        self.identity = identity  # as the file records it (JSON types)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the claim (the lock file is removed while still locked; see ``_lock_removable``)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self._lock.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FileClaim":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()


def _recorded_identity(path: Path, key: str) -> Any:
    """What ``path`` (a JSON object) records under ``key``; None when unreadable or absent."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def claim_output_file(
    path: str | os.PathLike,
    identity: Mapping[str, Any],
    key: str = "identity",
    companions: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    flag: str = "--out",
    overwrite_flag: str = "--overwrite",
) -> FileClaim:
    """Claim the output file ``path`` (its folder created when absent) for the run
    ``identity`` and hold it until ``release()`` (or the end of a ``with`` block, or the
    process). The run writes ``path`` as a JSON object holding ``FileClaim.identity`` under
    ``key``, and the ``companions`` (files written beside it, e.g. a Markdown copy).

    Raises UsageError, naming ``flag``, when another live process holds the claim (its pid
    named), or, unless ``overwrite``, when ``path`` holds another identity or none, or a
    companion exists without ``path``. Stale temporary files of ``path`` and the companions
    are removed.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    _check_creatable(path.parent, path, flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = json.loads(json.dumps(dict(identity)))  # as the file will hold it (tuples -> lists)
    companions = [Path(c) for c in companions]
    lock = path.parent / f".{path.name}.claim"
    fd = _lock_removable(lock)
    if fd is None:
        raise UsageError(f"{flag} {path} is being written by another run ({_holder(lock)}); "
                         f"wait for it to finish or choose another {flag}")
    claim = FileClaim(path, lock, fd, identity)
    try:
        _write_holder(fd)
        for target in (path, *companions):  # no live writer of these files but us
            remove_stale_temps(target.parent, owned=lambda name, target=target: name == target.name)
        if overwrite:
            return claim
        retry = f"pass {overwrite_flag} to replace it or choose another {flag}"
        if path.exists():
            owner = _recorded_identity(path, key)
            if owner != identity:
                whose = (f"another run ({_differences(owner, identity, 'existing')})" if isinstance(owner, Mapping)
                         else f"a file with no recorded {key} (another tool or an older prdit_fast)")
                raise UsageError(f"{flag} {path} holds the output of {whose}; {retry}")
        else:
            for companion in companions:
                if companion.exists():
                    raise UsageError(f"{flag} {path}: {companion} exists without {path.name}, so it is not this "
                                     f"run's; {retry}")
    except BaseException:
        claim.release()
        raise
    return claim
