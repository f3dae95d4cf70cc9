"""Run folders are claimed atomically (``prdit_fast.run_claims``): of runs started at the
same moment exactly one gets a folder; a live run refuses everyone else; a killed run's
claim is released; a finished run's outputs refuse another identity; a failed run that
wrote nothing gives the folder up. Concurrency is tested with real processes."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import prdit_fast

from prdit_fast import run_claims
from prdit_fast.errors import UsageError
from prdit_fast.run_claims import check_out_folder, claim_output_file, claim_run_folder

# A child process: for each round r, wait for the start signal (a line on stdin; the parent
# writes it to every child at once, and a closed stdin, the parent gone, ends the child),
# claim OUT.r for seed SEED (writing its file), hold it HOLD seconds; one line per round.
_CHILD = textwrap.dedent("""
    import sys, time, types
    from pathlib import Path
    # the package's __init__ imports torch (seconds per process); run_claims needs none of it
    package = types.ModuleType("prdit_fast")
    package.__path__ = [PACKAGE_DIR]
    sys.modules["prdit_fast"] = package
    from prdit_fast.errors import UsageError
    from prdit_fast.run_claims import claim_run_folder
    out, seed, hold, rounds = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    for r in range(rounds):
        print("ready", flush=True)
        if not sys.stdin.readline():
            sys.exit(3)  # the parent is gone
        folder = Path(f"{out}.{r}")
        try:
            claim = claim_run_folder(folder, {"seed": seed}, outputs=("result_*",))
        except UsageError as e:
            print(f"refused: {e}", flush=True)
            continue
        (folder / f"result_{seed}.txt").write_text(str(seed))
        print("claimed", flush=True)
        time.sleep(hold)
        claim.release()
""")


def _children(out, seeds, hold=0.0, rounds=1):
    child = _CHILD.replace("PACKAGE_DIR", repr(os.path.dirname(prdit_fast.__file__)))
    return [subprocess.Popen([sys.executable, "-c", child, str(out), str(s), str(hold), str(rounds)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for s in seeds]


def _start(procs):
    for p in procs:  # every child is blocked on its stdin
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
    for p in procs:
        p.stdin.flush()


def test_runs_started_together_one_wins(tmp_path):
    out, rounds = tmp_path / "out", 5
    procs = _children(out, seeds=range(4), hold=0.05, rounds=rounds)
    for r in range(rounds):  # several races, each between 4 processes started at the same moment
        _start(procs)
        lines = [p.stdout.readline().strip() for p in procs]
        winners = [i for i, line in enumerate(lines) if line == "claimed"]
        assert len(winners) == 1, lines
        for i, line in enumerate(lines):
            if i != winners[0]:
                assert line.startswith("refused: --out") and "another run" in line
        folder = tmp_path / f"out.{r}"
        assert sorted(p.name for p in folder.glob("result_*")) == [f"result_{winners[0]}.txt"]
        assert json.loads((folder / "run.json").read_text()) == {"seed": winners[0]}
    for p in procs:
        p.stdin.close()
    assert [p.wait(timeout=60) for p in procs] == [0] * 4


def test_a_live_run_refuses_others_and_a_killed_run_is_released(tmp_path):
    (holder,) = _children(tmp_path / "out", seeds=[7], hold=60)
    _start([holder])
    out = tmp_path / "out.0"
    assert holder.stdout.readline().strip() == "claimed"
    # while it lives: another identity, and the same identity, are refused with its pid
    with pytest.raises(UsageError, match=f"in use by another run \\(pid {holder.pid} "):
        claim_run_folder(out, {"seed": 8})
    with pytest.raises(UsageError, match=f"in use by the same run \\(pid {holder.pid} "):
        claim_run_folder(out, {"seed": 7})
    os.kill(holder.pid, signal.SIGKILL)  # a crash: no release, the member file stays
    holder.wait(timeout=30)
    assert list(out.glob(".claim-rank0"))
    # the killed run's claim is released: the same run resumes; its output still refuses another
    with claim_run_folder(out, {"seed": 7}, outputs=("result_*",)) as claim:
        assert claim.resumed
    with pytest.raises(UsageError, match=r"holds 1 file\(s\) of another run \(seed 7 \(folder\) vs 8\)"):
        claim_run_folder(out, {"seed": 8}, outputs=("result_*",))


def test_a_killed_run_without_outputs_leaves_the_folder_free(tmp_path):
    (holder,) = _children(tmp_path / "out", seeds=[1], hold=60)
    _start([holder])
    out = tmp_path / "out.0"
    assert holder.stdout.readline().strip() == "claimed"
    (out / "result_1.txt").unlink()  # as if killed before its first output
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    with claim_run_folder(out, {"seed": 2}, outputs=("result_*",)) as claim:
        assert not claim.resumed
    assert json.loads((out / "run.json").read_text()) == {"seed": 2}


def test_finished_and_failed_runs(tmp_path):
    out = tmp_path / "out"
    with claim_run_folder(out, {"seed": 1, "steps": [2, 3]}):
        (out / "volume.npy").write_bytes(b"x")
    assert not list(out.glob(".claim-*"))  # released
    with pytest.raises(UsageError, match="seed 1 \\(folder\\) vs 2"):
        claim_run_folder(out, {"seed": 2, "steps": [2, 3]})
    with claim_run_folder(out, {"seed": 1, "steps": (2, 3)}) as claim:  # the same run (tuples as JSON lists)
        assert claim.resumed
    # a failed run that wrote nothing gives the folder up ...
    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError):
        with claim_run_folder(failed, {"seed": 1}):
            raise RuntimeError("NaN")
    assert not (failed / "run.json").exists()
    claim_run_folder(failed, {"seed": 2}).release()
    # ... one that wrote outputs keeps them and its identity
    with pytest.raises(RuntimeError):
        with claim_run_folder(tmp_path / "partial", {"seed": 1}, outputs=("sample_*",)):
            (tmp_path / "partial" / "sample_000000.npy").write_bytes(b"x")
            raise RuntimeError("NaN")
    with pytest.raises(UsageError, match="sample_000000.npy"):
        claim_run_folder(tmp_path / "partial", {"seed": 2}, outputs=("sample_*",))


def test_ranks_of_one_run_share_the_folder(tmp_path):
    out = tmp_path / "out"
    identity = {"seed": 0, "world_size": 2}
    rank0 = claim_run_folder(out, identity, member="rank0")
    rank1 = claim_run_folder(out, identity, member="rank1")
    with pytest.raises(UsageError, match="same run"):
        claim_run_folder(out, identity, member="rank1")
    with pytest.raises(UsageError, match="another run"):
        claim_run_folder(out, {"seed": 1, "world_size": 2}, member="rank0")
    rank0.release()
    rank1.release()


def test_out_that_cannot_be_a_folder_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="--out .*file is a file"):
        check_out_folder(tmp_path / "file")
    with pytest.raises(UsageError, match="cannot be created"):
        check_out_folder(tmp_path / "file" / "sub")
    assert check_out_folder(tmp_path / "new" / "sub") == tmp_path / "new" / "sub"
    assert not (tmp_path / "new").exists()


def test_an_output_file_lock_deleted_meanwhile_is_not_taken_as_held(tmp_path, monkeypatch):
    """A file claim's lock file is deleted on release: a process that opened it before the
    deletion and locks it after must not count as holding the claim of the file's successor."""
    out, lock = tmp_path / "report.json", tmp_path / ".report.json.claim"
    first = claim_output_file(out, {"seed": 1})
    opened_before = os.open(lock, os.O_RDWR)  # another process opened the lock file ...
    first.release()  # ... its holder deleted it ...
    second = claim_output_file(out, {"seed": 1})  # ... and a new run created and locked a new one
    assert lock.exists() and not os.path.samestat(os.fstat(opened_before), os.stat(lock))
    real_try_lock, calls = run_claims._try_lock, []

    def late_lock(path):  # the first attempt locks the deleted file (nobody holds it)
        calls.append(path)
        if len(calls) == 1:
            fcntl.flock(opened_before, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return opened_before
        return real_try_lock(path)

    monkeypatch.setattr(run_claims, "_try_lock", late_lock)
    with pytest.raises(UsageError, match=f"is being written by another run \\(pid {os.getpid()} on "):
        claim_output_file(out, {"seed": 1})
    assert calls == [lock, lock]  # retried on the current file, found it held
    second.release()
    assert not lock.exists()
