"""benchmarks/bench_metrics.py's MS-SSIM and W-Score rows run end to end (tiny, on the CPU)
and report every timing. The MS-SSIM rows need an edge of 48 (5 scales, kernel 3), where the
feature network takes minutes on two cores: the feature rows (features, FID, MMD, the bf16
error) run at 16^3 in benchmarks/gpu_session.sh's dry run (tests/test_gpu_session.py)."""
import json

import pytest

pytest.importorskip("monai")


def test_bench_metrics_tiny(tmp_path):
    from benchmarks import bench_metrics as bench  # after the skip: it imports monai

    out = tmp_path / "metrics.json"
    result = bench.main(["--num", "2", "--size", "48", "--no-features", "--official-pairs", "1", "--device", "cpu",
                         "--out", str(out), "--torch-pairs", "1", "--wscore-seeds", "2", "--wscore-edge", "32",
                         "--wscore-widths", "4", "8", "8", "8", "--wscore-precision", "fp32"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert not any(key.startswith("features") for key in result["seconds"])  # --no-features
    assert result["seconds"]["ms_ssim_all_pairs"] > 0
    assert result["official_seconds"]["ms_ssim_all_ordered_pairs_extrapolated"] > 0
    assert result["ms_ssim_pairs"] == 1 and 0 <= result["ms_ssim"] <= 1
    assert result["seconds"]["ms_ssim_torch_1_pairs"] > 0 and result["seconds"]["ms_ssim_triton_1_pairs"] > 0
    w = result["wscore"]
    assert w["seeds"] == 2 and w["step_ms"] > 0 and isinstance(w["protocol_steps"], str)  # 2 volumes: no split
