"""benchmarks/bench_metrics.py runs end to end (tiny, on the CPU) and reports every timing."""
import json

import pytest

pytest.importorskip("monai")


def test_bench_metrics_tiny(tmp_path):
    from benchmarks import bench_metrics as bench  # after the skip: it imports monai

    out = tmp_path / "metrics.json"
    result = bench.main(["--num", "2", "--size", "48", "--official-volumes", "1", "--official-pairs", "1",
                         "--fid-methods", "factors", "--bootstrap", "4", "--device", "cpu", "--out", str(out),
                         "--torch-pairs", "1", "--wscore-seeds", "2", "--wscore-edge", "32",
                         "--wscore-widths", "4", "8", "8", "8", "--wscore-precision", "fp32"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for key in ("features_real_fp32", "features_fake_bf16", "fid_factors", "mmd", "ms_ssim_all_pairs"):
        assert result["seconds"][key] > 0
    assert result["official_seconds"]["ms_ssim_all_ordered_pairs_extrapolated"] > 0
    assert result["ms_ssim_pairs"] == 1 and 0 <= result["ms_ssim"] <= 1
    assert 0 <= result["bf16_feature_max_error_relative_to_max"] < 0.1
    assert result["seconds"]["ms_ssim_torch_1_pairs"] > 0 and result["seconds"]["ms_ssim_triton_1_pairs"] > 0
    w = result["wscore"]
    assert w["seeds"] == 2 and w["step_ms"] > 0 and isinstance(w["protocol_steps"], str)  # 2 volumes: no split
