"""Compile prdit_fast's Triton kernels for an H100 (sm_90a) on any machine, GPU or not, and
report what each autotune config costs in resources: registers, local-memory stack (spills),
shared memory, and the SASS size of the main loop.

    python -m benchmarks.check_sm90                  # every tuned config, a table
    python -m benchmarks.check_sm90 --first-only     # the configs that run untuned (PRDIT_AUTOTUNE=0)
    python -m benchmarks.check_sm90 --json rows.json

Why: a config that needs more shared memory than a block may have fails to launch, and one
that spills is slow; both used to surface only on a lent GPU. The kernels are compiled the
way a launch at PRDiT-B/12/4, 128^3, batch 4 (bf16) specialises them: pointers 16-byte
aligned, integer arguments divisible by 16 marked so, integers equal to 1 made constant.
Exit status 1 when a first config (the untuned one) does not fit or spills; other configs
are reported (the autotuner skips those that cannot launch). Needs the Triton NVIDIA
backend's bundled ptxas / cuobjdump; runs without a GPU and without the interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)  # the tuned config lists, not the interpreter's

import triton  # noqa: E402

SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
TOKENS, BATCH, WIDTH = 4096, 4, 1728  # PRDiT-B/12/4 at 128^3: tokens per sample, samples, C p^3
EDGE, PATCH, STRIDE, PAD = 128, 12, 8, 2


@dataclass
class Case:
    """One launch kind of one kernel: its jit function, argument types and values, constexprs."""

    name: str
    fn: object  # the @triton.jit function (unwrapped from autotune / heuristics)
    configs: list  # triton.Config list of the autotuner, or one pseudo-config
    pointers: dict[str, str]
    ints: dict[str, int]
    floats: dict[str, float] = field(default_factory=dict)
    constexprs: dict = field(default_factory=dict)
    derived: object = None  # (constexprs incl. the config's) -> extra constexprs (heuristics)


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def _gemm_cases() -> list[Case]:
    from prdit_fast.ops import layernorm_gemm as lg

    M, D, groups = BATCH * TOKENS, WIDTH, -(-WIDTH // lg.STATS_GROUP)
    pointers = {name: "*bf16" for name in ("a_ptr", "res_ptr", "shift_ptr", "w_ptr", "bias_ptr", "w2_ptr",
                                           "bias2_ptr", "out_ptr")}
    pointers.update({name: "*fp32" for name in ("stats_ptr", "colsum_ptr", "colsum2_ptr", "scale_ptr",
                                                "out_stats_ptr")})
    strides = dict(stride_am=D, stride_rm=D, stride_plane=M * groups, stride_sm=groups, stride_cb=D, stride_wn=D,
                   stride_w2n=D, stride_om=D, stride_out_plane=M * groups, stride_out_sm=groups)
    common = dict(GROUPS_POW2=triton.next_power_of_2(groups), GROUP=lg.STATS_GROUP, DOT_PRECISION="tf32")

    def on_load_constants(cx: dict) -> dict:
        return {"EVEN_K": D % cx["BLOCK_K"] == 0,
                "TILE_MODULATION": lg._tile_modulation({"MODULATION": cx["MODULATION"], "n_tokens": TOKENS, "BLOCK_M": cx["BLOCK_M"]})}

    def epilogue_constants(cx: dict) -> dict:
        return {"EVEN_K": D % cx["BLOCK_K"] == 0}

    def on_load(name, configs, n_out, flags):
        ints = dict(M=M, N=n_out, K=D, n_tokens=TOKENS, n_samples=BATCH, **strides)
        return Case(name, _jit(lg._normalize_on_load_gemm_kernel), configs, pointers, ints, {"eps": 1e-6},
                    {**common, "GATED": False, "EMIT_STATS": False, "NORM_RMS": False, **flags}, on_load_constants)

    def epilogue(name, configs, n_out, flags, wb=0, vb=0):
        ints = dict(M=M, N=n_out, K=D, n_tokens=TOKENS, stride_wb=wb, stride_vb=vb, **strides)
        return Case(name, _jit(lg._layernorm_epilogue_gemm_kernel), configs, pointers, ints, {"eps": 1e-6},
                    {**common, "GATED": False, "EMIT_STATS": False, "NORM_RMS": False, "SAMPLE_WEIGHTS": False, "RESIDUAL": False,
                     **flags},
                    epilogue_constants)

    gated, single = lg._LAYERNORM_EPILOGUE["16bit_gated"].configs, lg._LAYERNORM_EPILOGUE["16bit"].configs
    out = STRIDE**3 * 2  # linear_final's width, s^3 Cout
    return [
        epilogue("swiglu fc1, folded weights", gated, D, dict(GATED=True, NORMALIZE=True, SAMPLE_WEIGHTS=True,
                 EMIT_STATS=True), wb=D * D, vb=D),
        on_load("swiglu fc1, normalize on load", gated, D, dict(GATED=True, NORMALIZE=True,
                MODULATION=lg.MODULATION_PER_SAMPLE, EMIT_STATS=True)),
        epilogue("swiglu fc2", single, D, dict(NORMALIZE=True, EMIT_STATS=True)),
        epilogue("swiglu fc2 + residual", single, D, dict(NORMALIZE=True, RESIDUAL=True)),
        epilogue("linear_final, folded weights", single, out, dict(NORMALIZE=False, SAMPLE_WEIGHTS=True),
                 wb=out * D, vb=out),
        on_load("linear_final, modulate on load", single, out, dict(NORMALIZE=False,
                MODULATION=lg.MODULATION_PER_SAMPLE)),
    ]


def _epilogue_cases() -> list[Case]:
    from prdit_fast.ops import gated_residual_gemm as gr

    M, hidden = BATCH * TOKENS, 768  # PRDiT-B: attn.proj is hidden x hidden, mlp.fc2 4 hidden x hidden
    pointers = {"a_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "gate_ptr": "*fp32", "res_ptr": "*fp32",
                "out_ptr": "*fp32"}

    def case(name, K):
        ints = dict(M=M, N=hidden, K=K, n_tokens=TOKENS, stride_am=K, stride_wn=K, stride_gb=hidden,
                    stride_rm=hidden, stride_om=hidden)
        kernel = gr._gated_residual_gemm_kernel
        return Case(name, _jit(kernel), kernel.configs, pointers, ints, constexprs={"DOT_PRECISION": "tf32"})

    return [case("gated residual attn.proj", hidden), case("gated residual mlp.fc2", 4 * hidden)]


def _copy_cases() -> list[Case]:
    from prdit_fast.ops import unfold as uf

    geometry = dict(C=1, D=EDGE, H=EDGE, W=EDGE, P=PATCH, STRIDE=STRIDE, PAD=PAD)
    volume = EDGE**3
    return [
        Case("unfold3d fp32 -> bf16", _jit(uf._unfold3d_kernel), uf._unfold3d_kernel.configs,
             {"X": "*fp32", "OUT": "*bf16"},
             dict(stride_b=volume, stride_c=volume, stride_d=EDGE * EDGE, stride_h=EDGE, stride_w=1),
             constexprs=dict(geometry, BLOCK_P=triton.next_power_of_2(PATCH))),
        Case("fold3d bf16 -> fp32", _jit(uf._fold3d_kernel), uf._fold3d_kernel.configs,
             {"TOK": "*bf16", "OUT": "*fp32"}, {},
             constexprs=dict(geometry, MEAN=False, BLOCK_W=triton.next_power_of_2(EDGE))),
    ]


def _update_cases() -> list[Case]:
    """The sampler's per-step updates, with B/16/12-s16's geometry (256^3, stride 16, C = 1)."""
    import importlib

    fu = importlib.import_module("prdit_fast.ops.flow_update")  # the package exports a function of that name
    pointers = {name: "*fp32" for name in ("X", "OUT", "ACC", "ACC_OUT", "COEF")}
    pointers.update(TOK="*bf16", RES="*bf16", STEP="*i64", KEYS="*i64")
    flags = dict(C=1, S=256, STRIDE=16, HAS_RESIDUAL=True, BLOCK_M=1024)
    config = triton.Config({}, num_warps=4)  # the launcher's fixed configuration
    cases = [Case(f"flow_update {name}", _jit(fu._flow_update_kernel), [config], pointers, {"num_steps": 100},
                  constexprs=dict(flags, HAS_ACC=acc, HAS_NOISE=noise))
             for name, acc, noise in (("euler", False, False), ("heun/rk4 acc", True, False), ("pc noise", False, True))]
    # the IaN update at B/12/4 128^3 (coarse + fine tokens), and PRDiT-SR 128 -> 256 reading the base itself
    sampling = importlib.import_module("prdit_fast.ops.sampling")
    pointers = {name: "*fp32" for name in ("BASE", "X", "X_OUT", "X0_OUT", "TABLE")}
    pointers.update(TOK="*bf16", RES="*bf16", STEP="*i64", KEYS="*i64")
    for name, flags in (("sampler_update", dict(S=EDGE, HAS_RESIDUAL=True, HAS_BASE=False, S_LO=EDGE, SCALE=1.0)),
                        ("sampler_update SR base", dict(S=2 * EDGE, HAS_RESIDUAL=False, HAS_BASE=True, S_LO=EDGE,
                                                        SCALE=0.5))):
        cases.append(Case(name, _jit(sampling._sampler_update_kernel), [config], pointers, {"num_steps": 1000},
                          constexprs=dict(flags, C=1, STRIDE=STRIDE, BLOCK_M=sampling.SR_UPDATE_BLOCK
                                          if flags["HAS_BASE"] else sampling.UPDATE_BLOCK)))
    return cases


def _tools() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_for_sm90(case: Case, config) -> object:
    """The kernel of ``case`` with ``config`` compiled for sm_90a, specialised as a launch is."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = case.fn
    constexprs = dict(case.constexprs, **config.kwargs)
    if case.derived is not None:
        constexprs.update(case.derived(constexprs))
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in case.pointers:
            signature[name] = case.pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in case.ints:
            value = case.ints[name]
            if value == 1:  # Triton turns an integer argument equal to 1 into a constant
                constexprs[name], signature[name] = 1, "constexpr"
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in case.floats:
            signature[name] = "fp32"
        else:
            raise KeyError(f"{case.name}: no type or value for argument {name!r}")
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def resources(kernel) -> dict:
    """Registers, stack bytes, shared bytes and the largest loop's SASS size of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(kernel.asm["cubin"])
    try:
        tool = os.path.join(_tools(), "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", handle.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)
    field_of = {key: int(value) for key, value in re.findall(r"(REG|STACK):(\d+)", usage)}
    addresses = [int(m, 16) for m in re.findall(r"^\s+/\*([0-9a-f]{4,})\*/", sass, flags=re.M)]
    loop = 0
    for line in sass.splitlines():
        branch = re.search(r"/\*([0-9a-f]{4,})\*/.*\bBRA\s+(0x[0-9a-f]+)", line)
        if branch and int(branch.group(2), 16) < int(branch.group(1), 16):
            start, end = int(branch.group(2), 16), int(branch.group(1), 16)
            loop = max(loop, sum(start <= a <= end for a in addresses))
    return {"registers": field_of.get("REG"), "stack_bytes": field_of.get("STACK", 0),
            "shared_bytes": kernel.metadata.shared, "sass": len(addresses), "largest_loop_sass": loop}


def _config_text(config) -> str:
    tiles = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles} stages={config.num_stages} warps={config.num_warps}"


def check(first_only: bool = False, log=print) -> list[dict]:
    """One row per (case, config): resources and a verdict ("ok", "spills", "over shared memory")."""
    rows = []
    for case in _gemm_cases() + _epilogue_cases() + _copy_cases() + _update_cases():
        for rank, config in enumerate(case.configs[:1] if first_only else case.configs):
            row = {"kernel": case.name, "config": _config_text(config), "first": rank == 0}
            row.update(resources(compile_for_sm90(case, config)))
            row["verdict"] = ("over shared memory" if row["shared_bytes"] > SHARED_LIMIT
                              else "spills" if row["stack_bytes"] else "ok")
            log(f"{row['kernel']:<28} {row['config']:<52} regs {row['registers']:>3}  stack {row['stack_bytes']:>5}"
                f"  shared {row['shared_bytes']:>6}  loop {row['largest_loop_sass']:>4}  {row['verdict']}")
            rows.append(row)
    return rows


def unsupported() -> str | None:
    """Why this Triton cannot compile for sm_90a here, or None."""
    if not os.path.isfile(os.path.join(_tools(), "cuobjdump")):
        return f"no cuobjdump in {_tools()} (Triton's NVIDIA backend tools)"
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource
    except ImportError as err:
        return f"this Triton ({triton.__version__}) lacks the compile API used here: {err}"
    if "attrs" not in ASTSource.__init__.__code__.co_varnames:
        return f"this Triton ({triton.__version__}) takes no ASTSource attrs"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--first-only", action="store_true", help="only the configs that run untuned")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    reason = unsupported()
    if reason:
        print(f"check_sm90: skipped: {reason}")
        return 0
    print(f"sm_90a, Triton {triton.__version__}; shared memory limit {SHARED_LIMIT} bytes per block")
    rows = check(args.first_only)
    if args.json:
        from prdit_fast.atomic import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=2) + "\n")
    bad = [r for r in rows if r["first"] and r["verdict"] != "ok"]
    for r in bad:
        print(f"FIRST CONFIG {r['verdict'].upper()}: {r['kernel']} {r['config']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
