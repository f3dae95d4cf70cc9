"""``prdit-fast evaluate --out`` belongs to one evaluation (``prdit_fast.run_claims.claim_output_file``):
a running job locks it (of two started together exactly one proceeds; a killed job's lock is
released), a report of other inputs or settings is replaced only with ``--overwrite``, and stale
temporary files of the report are removed. Concurrency is tested with real processes that only
claim (an evaluation is seconds per process)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import prdit_fast
from prdit_fast import cli
from prdit_fast.commands import evaluate
from prdit_fast.phantom import PhantomDataset, unit_to_hu
from prdit_fast.volumes import save_nifti

SIZE = 16

# A child process: parse evaluate's arguments, wait for the start signal (a line on stdin; a
# closed stdin, the parent gone, ends the child), claim --out as the command does, print the
# outcome, hold the claim until the next line on stdin (or EOF).
_CHILD = textwrap.dedent("""
    import argparse, sys, types
    # the package's __init__ imports torch (seconds per process); the claim needs none of it
    package = types.ModuleType("prdit_fast")
    package.__path__ = [PACKAGE_DIR]
    sys.modules["prdit_fast"] = package
    from prdit_fast.commands import evaluate
    from prdit_fast.errors import UsageError
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(sys.argv[1:])
    print("ready", flush=True)
    if not sys.stdin.readline():
        sys.exit(3)
    try:
        claim = evaluate.claim_report(args)
    except UsageError as e:
        print(f"refused: {e}", flush=True)
        sys.exit(0)
    print("claimed", flush=True)
    sys.stdin.readline()
    claim.release()
""")


def _arguments(out, real="real", fake="fake", *extra):
    return ["--real", str(real), "--fake", str(fake), "--weights", "random", "--out", str(out), *extra]


def _children(n, arguments):
    child = _CHILD.replace("PACKAGE_DIR", repr(os.path.dirname(prdit_fast.__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", child, *arguments], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    for p in procs:  # every child is blocked on its stdin
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    for p in procs:
        p.stdin.write("go\n")
    for p in procs:
        p.stdin.flush()
    return procs


def test_two_jobs_with_one_out_exactly_one_proceeds_and_a_killed_job_releases_it(tmp_path, capsys):
    for r in range(3):  # several races between two processes started at the same moment
        out = tmp_path / f"race{r}.json"
        procs = _children(2, _arguments(out))
        lines = [p.stdout.readline().strip() for p in procs]
        winners = [i for i, line in enumerate(lines) if line == "claimed"]
        assert len(winners) == 1, lines
        loser = lines[1 - winners[0]]
        assert loser.startswith(f"refused: --out {out} is being written by another run (")
        assert loser.endswith("); wait for it to finish or choose another --out")
        holder = procs[winners[0]]
        if r < 2:
            holder.stdin.close()
            assert [p.wait(timeout=60) for p in procs] == [0, 0]
            assert not (tmp_path / f".race{r}.json.claim").exists()  # released and removed
    # the last winner still holds race2.json: the command is refused before any work (the
    # input folders do not even exist), naming the holder, in one line
    procs[1 - winners[0]].wait(timeout=60)
    assert cli.main(["evaluate", *_arguments(out, tmp_path / "no_real", tmp_path / "no_fake")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out} is being written by another run (pid {holder.pid} on ")
    assert "wait for it to finish or choose another --out" in err and len(err.strip().splitlines()) == 1
    # killed (no release): the kernel drops the lock; the next job takes --out, and first removes
    # the stale temporary files of interrupted writes of the report (only the report's)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert (tmp_path / ".race2.json.claim").exists()
    stale = [tmp_path / ".race2.json.tmp-a1b2c3d4", tmp_path / ".race2.md.tmp-e5f6g7h8"]
    other = tmp_path / ".race1.json.tmp-a1b2c3d4"
    for path in (*stale, other):
        path.write_text("half")
    assert cli.main(["evaluate", *_arguments(out, tmp_path / "no_real", tmp_path / "no_fake")]) == 2
    assert f"--fake {tmp_path / 'no_fake'} is not a folder" in capsys.readouterr().err  # past the claim
    assert not any(p.exists() for p in stale) and other.exists()
    assert not (tmp_path / ".race2.json.claim").exists()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_out")
    for name, seed in (("real", 1), ("fake", 2), ("other_fake", 3)):
        (root / name).mkdir()
        for i, volume in enumerate(PhantomDataset(SIZE, 2, seed=seed)):
            if name == "real":  # preprocess output: [0, 1]
                np.save(root / name / f"case_{i}.npy", ((volume[0].numpy() + 1) / 2).astype(np.float16))
            else:  # sample output: HU NIfTI
                save_nifti(root / name / f"sample_{i:06d}.nii.gz", unit_to_hu(volume[0]).numpy())
    return root


def _identity(*arguments):
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return evaluate.report_identity(parser.parse_args(list(arguments)))


def _run(*arguments):
    return cli.main(["evaluate", *arguments, "--no-cache", "--no-progress", "--bootstrap", "0", "--no-ms-ssim",
                     "--fid-method", "factors"])


def test_a_report_of_another_evaluation_is_refused_unless_overwrite(folders, tmp_path, capsys):
    real, fake, other = folders / "real", folders / "fake", folders / "other_fake"
    out = tmp_path / "report.json"
    # a report of the same real set against another generated set (identity as evaluate records it)
    earlier = {"identity": _identity(*_arguments(out, real, other, "--bootstrap", "0", "--no-ms-ssim",
                                                 "--fid-method", "factors")), "fid": 1.0}
    out.write_text(json.dumps(earlier))
    out.with_suffix(".md").write_text("earlier\n")
    assert _run(*_arguments(out, real, fake)) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --out {out} holds the output of another run (fake {str(other)!r} (existing) vs "
                   f"{str(fake)!r}); pass --overwrite to replace it or choose another --out\n")
    assert json.loads(out.read_text()) == earlier and out.with_suffix(".md").read_text() == "earlier\n"
    # a file that records no identity (another tool's, an older report) and a lone .md are refused too
    (tmp_path / "plain.json").write_text('{"fid": 1.0}')
    assert _run(*_arguments(tmp_path / "plain.json", real, fake)) == 2
    assert "holds the output of a file with no recorded identity" in capsys.readouterr().err
    (tmp_path / "notes.md").write_text("mine\n")
    assert _run(*_arguments(tmp_path / "notes.json", real, fake)) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'notes.md'} exists without notes.json, so it is not this run's; pass --overwrite" in err
    assert (tmp_path / "notes.md").read_text() == "mine\n" and not (tmp_path / "notes.json").exists()
    # --out naming the Markdown file would have the .md overwrite the JSON report
    assert _run(*_arguments(tmp_path / "report.md", real, fake)) == 2
    assert "give the JSON file's name (e.g. " in capsys.readouterr().err
    # --overwrite replaces the earlier report; the new one records this evaluation's identity
    assert _run(*_arguments(out, real, fake, "--overwrite")) == 0
    report = json.loads(out.read_text())
    assert report["identity"] == _identity(*_arguments(out, real, fake, "--bootstrap", "0", "--no-ms-ssim",
                                                        "--fid-method", "factors"))
    assert report["identity"]["fake"] == str(fake.resolve()) and report["identity"]["weights"] == "random"
    assert "3D FID x10^3" in out.with_suffix(".md").read_text()
    assert not list(tmp_path.glob(".*"))  # no lock or temporary file left behind
