#!/usr/bin/env bash
# One GPU session's checks as ONE command that fits a 15-minute device lease:
#
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_session.sh     # on the GPU machine
#   DRY_RUN=1 OUT=/tmp/dry bash benchmarks/gpu_session.sh                    # every stage, tiny, on the CPU
#
# Stages, in priority order; each runs under `timeout` with its own cap, clamped to what is
# left of SESSION_BUDGET_S (default 525 s: the whole command ends within 9 minutes), and a
# stage with under MIN_STAGE_S left is recorded as skipped:
#   native     build the optional CUDA library (kernels/build.sh), when nvcc and cmake are there
#   tests      the test suite on the GPU (its CUDA tests are the GPU checks of resolved issues)
#   profile    benchmarks/profile_step.py: one fast step of B/12/4, 128^3, batch 4, bf16
#   baselines  benchmarks/bench_sampling.py: official / reference SDPA (TF32, bf16, compile
#              max-autotune) / ours eager / ours with CUDA graphs; single steps, network calls,
#              whole 100- and 1000-step samples, attention kernel per row, MFU
#   fp8        benchmarks/bench_fp8.py: e4m3 GEMMs vs bf16, step time, 1000-step samples against bf16
#   swiglu     benchmarks/bench_ops_swiglu.py: fused vs cuBLAS-composed local denoiser
#   epilogue   benchmarks/bench_ops_gated_residual_gemm.py: the gate + residual GEMM epilogue vs today's composition
#   memory     pytest benchmarks/bench_ops_memory.py: unfold / fold / unpatchify / sampler update
# Results are merged after every stage, so a stage cut off by its cap (or a killed command)
# keeps what the earlier ones measured. $OUT (default ./gpu_out) receives at most 8 files:
#   session.log   every stage's output      tests.log     the pytest run
#   profile.md    profile.json              results.json  every row of every stage, with versions
#   summary.md    the summary table, also printed last
# Wheels the image lacks are installed from .whl/ (carried; no network there). STAGES="a b"
# runs a subset; SESSION_BUDGET_S, <STAGE>_CAP_S (e.g. BASELINES_CAP_S) and
# BASELINE_WHOLE_BUDGET_S override the defaults; PYTEST_ARGS replaces the tests stage's
# selection.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/prdit-gpu-session.XXXXXX")
LOG="$OUT/session.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 PRDIT_AUTOTUNE=${PRDIT_AUTOTUNE:-0}
DRY_RUN=${DRY_RUN:-0}
START=$(date +%s)
BUDGET=${SESSION_BUDGET_S:-525}
MIN_STAGE_S=${MIN_STAGE_S:-15}
REPORT_RESERVE_S=10
STAGES=${STAGES:-native tests profile baselines fp8 swiglu epilogue memory}

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "wheel install FAILED (see session.log)"
fi
# no network there: the checkout runs in place (no pip install, no build isolation)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DEVICE=() TINY=() TINY_FLAG=()
if [ "$DRY_RUN" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  DEVICE=(--device cpu)
  TINY=(--variant PRDiT-XS/10/1 --size 16)
  TINY_FLAG=(--tiny)
fi

# the caps below sum past the budget on purpose: later stages get what the earlier ones leave
declare -A CAP=([native]=45 [tests]=130 [profile]=60 [baselines]=270 [fp8]=90 [swiglu]=60 [epilogue]=40 [memory]=45
              [fm]=240 [sr]=240 [guided]=120 [metrics]=240)
# fm, sr, guided and metrics are not in the default STAGES (they do not fit one 9-minute
# session with the rest): a later session runs them by name, e.g. STAGES="tests fm sr".

stage_command() {
  case "$1" in
    native)
      if [ "$DRY_RUN" = 1 ]; then echo "skip: no CUDA build in a dry run"; return 0; fi
      command -v nvcc >/dev/null && command -v cmake >/dev/null || { echo "skip: nvcc or cmake missing"; return 0; }
      bash kernels/build.sh ;;
    tests)
      # tests/test_gpu_session.py is this script's own CPU dry run: no GPU check, minutes of CPU
      local select=${PYTEST_ARGS:-tests kernels --ignore=tests/test_gpu_session.py}
      local parallel=()
      [ "$DRY_RUN" = 1 ] && select=${PYTEST_ARGS:-tests/test_reference_attention.py}
      python3 -c "import xdist" 2>/dev/null && [ "$DRY_RUN" != 1 ] && parallel=(-n 8 --dist loadfile)
      python3 -m pytest -q -rfE -p no:cacheprovider "${parallel[@]}" $select 2>&1 | tee "$OUT/tests.log" ;;
    profile)
      if [ "$DRY_RUN" = 1 ]; then
        python3 -m benchmarks.profile_step "${DEVICE[@]}" "${TINY[@]}" --batch 1 --steps 1 --rounds 1 --impl torch --out "$WORK/profile"
      else
        python3 -m benchmarks.profile_step --out "$WORK/profile"
      fi ;;
    baselines)
      if [ "$DRY_RUN" = 1 ]; then
        python3 -m benchmarks.bench_sampling "${DEVICE[@]}" "${TINY[@]}" --batch-size 1 --steps 1 2 --json "$WORK/baselines.json"
      else
        python3 -m benchmarks.bench_sampling --whole-budget "${BASELINE_WHOLE_BUDGET_S:-25}" --json "$WORK/baselines.json"
      fi ;;
    swiglu)
      if [ "$DRY_RUN" = 1 ]; then echo "skip: GPU only"; return 0; fi
      python3 -m benchmarks.bench_ops_swiglu --json "$WORK/swiglu.json" ;;
    epilogue)
      python3 -m benchmarks.bench_ops_gated_residual_gemm "${DEVICE[@]}" "${TINY_FLAG[@]}" --json "$WORK/epilogue.json" ;;
    fp8)
      python3 -m benchmarks.bench_fp8 "${DEVICE[@]}" "${TINY_FLAG[@]}" --json "$WORK/fp8.json" ;;
    memory)
      if [ "$DRY_RUN" = 1 ]; then echo "skip: GPU only"; return 0; fi
      python3 -m pytest -q -p no:cacheprovider benchmarks/bench_ops_memory.py --benchmark-only --benchmark-json="$WORK/memory.json" ;;
    fm)
      if [ "$DRY_RUN" = 1 ]; then echo "skip: GPU only"; return 0; fi
      python3 -m benchmarks.bench_flow_matching --json "$WORK/fm.json" ;;
    sr)
      if [ "$DRY_RUN" = 1 ]; then echo "skip: GPU only"; return 0; fi
      python3 -m benchmarks.bench_sampling --variant PRDiT-B/12/4 --size 128 --sr-size 256 --batch-size 2 \
        --whole-budget "${BASELINE_WHOLE_BUDGET_S:-25}" --json "$WORK/sr.json" ;;
    guided)
      if [ "$DRY_RUN" = 1 ]; then echo "skip: GPU only"; return 0; fi
      python3 -m benchmarks.bench_guided --json "$WORK/guided.json" ;;
    metrics)
      if [ "$DRY_RUN" = 1 ]; then echo "skip: GPU only"; return 0; fi
      python3 -m benchmarks.bench_metrics --num "${METRICS_VOLUMES:-1000}" --size 128 --out "$WORK/metrics.json" ;;
    *) echo "unknown stage $1 (stages: ${!CAP[*]})"; return 2 ;;
  esac
}

report() {
  python3 -m benchmarks.gpu_session_report --work "$WORK" --out "$OUT" --commit "${COMMIT:-unknown}" \
    --dry-run "$DRY_RUN" "$@" 2>>"$LOG"
}

for stage in $STAGES; do
  var=${stage^^}_CAP_S
  cap=${!var:-${CAP[$stage]:-60}}
  left=$(( START + BUDGET - REPORT_RESERVE_S - $(date +%s) ))
  if (( left < MIN_STAGE_S )); then
    status="skipped: ${left}s left of the ${BUDGET}s session budget"
    seconds=0
  else
    (( cap > left )) && cap=$left
    echo "== $stage (cap ${cap}s) ==" | tee -a "$LOG"
    begin=$(date +%s)
    # the whole stage (pytest workers, compile workers) dies at its cap; a failing test fails the stage
    timeout -k 10 "$cap" bash -c "set -o pipefail; $(declare -f stage_command); $(declare -p DRY_RUN OUT WORK DEVICE TINY TINY_FLAG); stage_command $stage" >>"$LOG" 2>&1
    rc=$?
    seconds=$(( $(date +%s) - begin ))
    case $rc in
      0) status=ok ;;
      124|137) status="cut off at its ${cap}s cap" ;;
      *) status="failed (exit $rc)" ;;
    esac
    grep -q "^skip: " <(tail -n 1 "$LOG") && [ $rc = 0 ] && status="skipped: $(tail -n 1 "$LOG" | cut -c7-)"
  fi
  printf '{"stage": "%s", "status": "%s", "seconds": %d, "cap_s": %d}\n' "$stage" "$status" "$seconds" "$cap" >>"$WORK/stages.jsonl"
  echo "   $stage: $status (${seconds}s)" | tee -a "$LOG"
  (( seconds > 0 )) && report --quiet
done
report
echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"
