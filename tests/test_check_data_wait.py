"""The GPU data-wait check (benchmarks/check_data_wait.py) as a CPU dry run: both data
paths train from an official-layout folder and report a measured wait."""
from __future__ import annotations

import json

from benchmarks.check_data_wait import main


def test_dry_run_measures_both_paths(tmp_path):
    out = tmp_path / "wait.json"
    result = main(["--variant", "PRDiT-XS/10/1", "--size", "16", "--edge", "32", "--volumes", "2", "--steps", "2",
                   "--skip", "0", "--batch", "2", "--workers", "0", "--device", "cpu", "--backend", "reference",
                   "--out", str(out)])
    assert json.loads(out.read_text())["paths"] == result["paths"]
    for path in ("on_device", "loader"):
        row = result["paths"][path]
        assert row["status"] == "ok" and row["steps_measured"] == 2, row
        assert 0 <= row["data_wait_pct_mean"] <= 100 and row["samples_per_s_mean"] > 0
        assert row["passed"] == (row["data_wait_pct_mean"] < 2.0)
