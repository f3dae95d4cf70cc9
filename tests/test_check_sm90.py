"""benchmarks/check_sm90.py: the untuned (first) config of every GEMM launch kind and of the
copy kernels compiles for sm_90a within the shared memory of a block and without spills.

Runs without a GPU: Triton compiles for an H100 target with its bundled ptxas / cuobjdump
(in a subprocess, outside the interpreter that tests/conftest.py turns on). A first config
that fails here would fail to launch, or run slowly, in every PRDIT_AUTOTUNE=0 GPU run.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "check_sm90.py"
KINDS = {"swiglu fc1, folded weights", "swiglu fc1, normalize on load", "swiglu fc2", "swiglu fc2 + residual",
         "linear_final, folded weights", "linear_final, modulate on load", "unfold3d fp32 -> bf16", "fold3d bf16 -> fp32",
         "gated residual attn.proj", "gated residual mlp.fc2",
         "flow_update euler", "flow_update heun/rk4 acc", "flow_update pc noise", "sampler_update",
         "sampler_update SR base"}


def test_first_configs_fit_an_h100(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PRDIT_AUTOTUNE")}
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--first-only", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    if "skipped:" in done.stdout:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} == KINDS and all(r["first"] for r in rows)
    for r in rows:
        assert r["verdict"] == "ok" and r["stack_bytes"] == 0 and 0 <= r["shared_bytes"] <= 232448, r
        elementwise = r["kernel"].startswith(("flow_update", "sampler_update"))  # no loop to measure
        assert 0 < r["registers"] <= 255 and (r["largest_loop_sass"] > 0 or elementwise), r
