"""benchmarks/profile_step.py on a tiny model on the CPU: the report's structure and
arithmetic, so a GPU session cannot be the first to find an error in it.

PRDiT-XS/10/1 at 16^3, batch 1, fp32, with the fast backend's plain-torch kernels
(impl="torch"): under the Triton interpreter one step of the Triton kernels takes
about 4 s on two cores, and the profiler would not see them by name anyway (on the GPU
it does). Tolerance: sums agree to 1e-6 relative (they are float sums of the same numbers
in another order). ``test_profile_on_gpu`` runs the real Triton kernels on a GPU and
checks that the profiler finds them by name.
"""
import json

import pytest
import torch
from conftest import requires_cuda

from benchmarks import profile_step
from prdit_fast.flops import flops_per_step
from prdit_fast.models import variant_config

VARIANT, SIZE, BATCH, STEPS = "PRDiT-XS/10/1", 16, 1, 2
REL = 1e-6


@pytest.fixture(scope="module")
def profile_step_module():
    return profile_step


@pytest.fixture(scope="module")
def report(profile_step_module):
    return profile_step_module.profile_step(
        VARIANT, SIZE, BATCH, STEPS, device="cpu", dtype="fp32", impl="torch", timing_rounds=1
    )


def test_report_is_consistent(report):
    rows, categories = report["rows"], report["categories"]
    assert rows and categories
    total = report["kernel_ms_per_step"]
    assert total > 0 and report["wall_ms_per_step"] > 0 and report["profiled_wall_ms_per_step"] > 0
    assert sum(r["ms_per_step"] for r in rows) == pytest.approx(total, rel=REL)
    assert sum(c["ms_per_step"] for c in categories) == pytest.approx(total, rel=REL)
    assert sum(r["pct_of_kernels"] for r in rows) == pytest.approx(100.0, rel=REL)
    assert sum(c["pct_of_kernels"] for c in categories) == pytest.approx(100.0, rel=REL)
    assert report["gap_ms_per_step"] == pytest.approx(report["wall_ms_per_step"] - total, rel=REL, abs=1e-9)
    # every row in exactly one category, and the category table sums its rows
    assert sum(c["kernels"] for c in categories) == len(rows) == len({r["name"] for r in rows})
    for c in categories:
        members = [r for r in rows if r["category"] == c["category"]]
        assert c["kernels"] == len(members)
        assert c["ms_per_step"] == pytest.approx(sum(r["ms_per_step"] for r in members), rel=REL)
    assert report["launches_per_step"] == pytest.approx(sum(r["calls_per_step"] for r in rows), rel=REL)
    # the model's Linears run as aten::addmm on the CPU
    assert "gemm" in {c["category"] for c in categories}


def test_flop_and_settings(report):
    cfg = variant_config(VARIANT, SIZE)
    assert report["flop_per_step"] == flops_per_step(cfg) * BATCH
    assert sum(report["flop_breakdown_per_step"].values()) == pytest.approx(report["flop_per_step"], rel=REL)
    assert report["achieved_tflops"] == pytest.approx(
        report["flop_per_step"] / (report["wall_ms_per_step"] / 1e3) / 1e12, rel=REL
    )
    assert report["peak"] is None and report["mfu"] is None  # no matmul peak on the CPU
    s = report["settings"]
    assert (s["variant"], s["size"], s["batch"], s["steps"], s["dtype"], s["impl"]) == (
        VARIANT, SIZE, BATCH, STEPS, "fp32", "torch")
    assert s["warmup_steps"] >= 3
    assert report["versions"]["torch"] == torch.__version__
    assert report["git_commit"] and report["date"]


def test_categories(profile_step_module):
    """The category table on names of the kinds seen on an H100 (cuBLAS, flash-attn,
    cuDNN SDPA, our Triton kernels) and of CPU ops."""
    names = profile_step_module.triton_function_names()
    for kernel in ("_adaln_fwd_kernel", "_unfold3d_kernel", "_sampler_update_kernel",
                   "_normalize_on_load_gemm_kernel", "_layernorm_epilogue_gemm_kernel"):
        assert kernel in names
    categorize = lambda name: profile_step_module.categorize(name, names)
    assert categorize("_layernorm_epilogue_gemm_kernel") == "triton:_layernorm_epilogue_gemm_kernel"  # not "gemm"
    assert categorize("_adaln_fwd_kernel_0d1d2d3de") == "triton:_adaln_fwd_kernel"  # Triton 2 names
    assert categorize("triton_poi_fused_add_0") == "triton:triton_poi_fused_add_0"
    for gemm in ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "nvjet_tst_192x192_64x4_2x1_v_bz",
                 "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8>",
                 "aten::addmm"):
        assert categorize(gemm) == "gemm", gemm
    for attention in ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>>",
                      "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<>>>",
                      "cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0",
                      "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)"):
        assert categorize(attention) == "attention", attention
    for other in ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
                  "Memcpy DtoD (Device -> Device)", "aten::native_layer_norm"):
        assert categorize(other) == "elementwise/other", other


def test_cli_writes_report_and_trace(profile_step_module, tmp_path):
    assert profile_step_module.main(["--variant", "XS/10/1", "--size", "16", "--batch", "1", "--steps", "1",
                                     "--rounds", "1", "--device", "cpu", "--impl", "torch",
                                     "--out", str(tmp_path), "--trace"]) == 0
    stem = "profile-prdit-xs-10-1-16-b1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}-trace.json", f"{stem}.json", f"{stem}.md"]
    written = json.loads((tmp_path / f"{stem}.json").read_text())
    assert written["settings"]["variant"] == VARIANT and written["settings"]["steps"] == 1
    markdown = (tmp_path / f"{stem}.md").read_text()
    assert markdown.startswith(f"# One fast-backend step: {VARIANT} at 16^3, batch 1, fp32")
    assert all(f"| {c['category']} |" in markdown for c in written["categories"])
    assert json.loads((tmp_path / f"{stem}-trace.json").read_text())["traceEvents"]


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "fp16"}, "dtype must be one of"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"variant": "PRDiT-Q/12/4"}, "unknown PRDiT variant"),
    ({"size": 20}, "not a multiple of stride"),
    ({"device": "meta"}, "device must be 'cpu' or 'cuda"),
    ({"device": "gpu0"}, "'gpu0' is not a torch device"),
])
def test_bad_input_is_a_value_error(profile_step_module, kwargs, message):
    args = {"variant": VARIANT, "size": SIZE, "batch": BATCH, "steps": STEPS, "device": "cpu"} | kwargs
    with pytest.raises(ValueError, match=message):
        profile_step_module.profile_step(**args)


def test_device_kernels_are_summed_by_name(profile_step_module):
    """The GPU branch of the aggregation on real FunctionEvents (as ``prof.events()`` gives
    them): device kernels summed by name, CPU-side events and GPU user annotations left out."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(name, start, end, device_type, **kw):
        return FunctionEvent(id=0, name=name, thread=0, start_us=start, end_us=end, device_type=device_type, **kw)

    events = [
        event("nvjet_tst_gemm", 0.0, 10.0, DeviceType.CUDA),
        event("nvjet_tst_gemm", 20.0, 25.0, DeviceType.CUDA),
        event("_adaln_fwd_kernel", 30.0, 32.5, DeviceType.CUDA),
        event("cudaLaunchKernel", 0.0, 3.0, DeviceType.CPU),
        event("aten::addmm", 0.0, 40.0, DeviceType.CPU),
        event("step", 0.0, 40.0, DeviceType.CUDA, is_user_annotation=True),
    ]
    prof = SimpleNamespace(events=lambda: events)
    totals, calls = profile_step_module._kernel_times(prof, torch.device("cuda", 0))
    assert totals == {"nvjet_tst_gemm": 15.0, "_adaln_fwd_kernel": 2.5}
    assert calls == {"nvjet_tst_gemm": 2, "_adaln_fwd_kernel": 1}


@requires_cuda
def test_profile_on_gpu(profile_step_module):
    """bf16, impl "auto": the Triton kernels, cuBLAS and the attention backend are all
    seen and categorized; the kernels of one serial stream fit inside the wall time of the
    same round (2% for timestamp granularity)."""
    report = profile_step_module.profile_step("PRDiT-XS/10/1", 32, 1, STEPS, device="cuda", timing_rounds=1)
    categories = {c["category"] for c in report["categories"]}
    expected = {"gemm", "attention", "triton:_unfold3d_kernel", "triton:_adaln_fwd_kernel",
                "triton:_sampler_update_kernel"}
    assert expected <= categories, categories
    assert report["settings"]["dtype"] == "bf16" and report["timing"] == "CUDA events"
    assert 0 < report["kernel_ms_per_step"] <= 1.02 * report["profiled_wall_ms_per_step"]
    assert report["peak"]["tflops"] > 0 and report["mfu"] > 0
