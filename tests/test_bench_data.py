"""`prdit-fast bench data` on tiny sources: every source at every edge, the official
layouts on disk, cores per GPU from the given rate with its source named, bad rates refused."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from prdit_fast.bench.data import SOURCES, make_sources
from prdit_fast.cli import main


def test_sources_have_the_official_layouts(tmp_path):
    files = make_sources(tmp_path, 16, 2)
    lidc = files["official-lidc"][0]
    assert lidc.relative_to(tmp_path).parts[:2] == ("LIDC-IDRI", "LIDC-IDRI-0001") and lidc.name == "processed.nii.gz"
    image = nib.load(str(lidc))
    assert image.get_data_dtype() == np.float32 and np.allclose(image.affine, np.eye(4))
    v = np.asarray(image.dataobj)
    assert v.shape == (16, 16, 16) and v.min() == 0.0 and v.max() == 1.0
    with np.load(files["official-rad"][1]) as z:
        assert set(z.files) == {"ct", "volume"} and z["ct"].dtype == np.float32
    assert np.load(files["npy"][0]).dtype == np.float16
    assert not np.array_equal(np.asarray(image.dataobj), np.asarray(nib.load(str(files["official-lidc"][1])).dataobj))


def test_bench_data_command(tmp_path, capsys):
    args = ["bench", "data", "--sizes", "8", "16", "--volumes", "1", "--out", str(tmp_path / "out"),
            "--work-dir", str(tmp_path), "--device", "cpu"]
    assert main(args + ["--gpu-rate", "8=50"]) == 2  # a rate without its source
    assert "--gpu-rate-source" in capsys.readouterr().err
    assert main(args + ["--gpu-rate", "8=50", "--gpu-rate-source", "a made-up rate"]) == 0
    report = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(open(report.replace(".md", ".json")).read())
    rows = {(r["source"], r["size"]): r for r in result["rows"]}
    assert set(rows) == {(s, n) for s in SOURCES for n in (8, 16)}
    for (source, size), r in rows.items():
        assert r["samples_per_s_per_core"] > 0 and r["stored_edge"] == 16
        assert r["cores_per_gpu"] == (50 / r["samples_per_s_per_core"] if size == 8 else None)
    assert result["gpu_rate"]["8"]["source"] == "a made-up rate"
    text = open(report).read()
    assert "a made-up rate" in text and result["environment"]["git_commit"] in text
    assert list(tmp_path.glob("prdit-bench-data-*")) == []  # the synthetic sources are removed
