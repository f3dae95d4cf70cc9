#!/usr/bin/env bash
# One GPU session's checks as ONE command that fits a 15-minute device lease, resumable:
#
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_session.sh        # on the GPU machine
#   RESUME=benchmarks/results/DEVICE-DATE/results.json COMMIT=... bash benchmarks/gpu_session.sh
#   DRY_RUN=1 OUT=/tmp/dry bash benchmarks/gpu_session.sh                       # every stage, tiny, on the CPU
#
# Stages, in priority order (the released workloads first); each runs under `timeout` with
# its own cap, clamped to what is left of SESSION_BUDGET_S (default 525 s: the whole command
# ends within 9 minutes); a stage with under MIN_STAGE_S left is recorded as skipped:
#   tests       the CUDA tests only (pytest --cuda-only: the tests that skip without a GPU; CI
#               runs the rest), in parallel, at most 10 failures, each test capped; a failure
#               fails the stage, the log and summary.md name the failing tests, later stages run
#   fm          the released 256^3 model B/16/12-s16 (flow matching; random weights written in the
#               official layout and read by load_checkpoint, or FM_CHECKPOINT=<released file>), 100 Euler
#               steps per volume at batch 1 and 2: the official loop (FlowMatching.sample, fp32
#               with TF32, SDPA), the reference under bf16 autocast, ours eager, ours with CUDA
#               graphs (benchmarks/bench_flow_matching.py); peak memory and attention per row
#   guided      TF-PRDiT B/12/12 prior at 128^3: guided vs unguided step, a whole 1000-step
#               super-resolution of one volume (benchmarks/bench_guided.py)
#   fm_compile  the fm rows against torch.compile(max-autotune) of the reference (minutes of
#               autotuning): ours with graphs and compile, batch 1 and 2, in one run
#   baselines   128^3 B/12/4, batch 4 (benchmarks/bench_sampling.py): official / reference
#               SDPA (TF32, bf16, compile max-autotune) / ours eager / ours with CUDA graphs
#   profile     benchmarks/profile_step.py: one fast step of B/12/4, 128^3, batch 4, bf16
#   sr          PRDiT-SR 128 -> 256 at batch 2 (benchmarks/bench_sampling.py --sr-size)
#   fp8         benchmarks/bench_fp8.py: e4m3 GEMMs vs bf16, step time, 1000-step samples
#   metrics     benchmarks/bench_metrics.py: features + FID/MMD, MS-SSIM
#   features    feature extraction (benchmarks/bench_features.py, where this commit has it)
# By name only: native (kernels/build.sh), swiglu, epilogue, memory.
#
# Resuming: RESUME names an earlier run's results.json (or its folder, e.g. the committed
# benchmarks/results/<device>-<date>/); its stages that ended "ok" are not run again, and
# their results are carried into this run's results.json, marked with that run's commit and
# date. A stage cut off or failed runs again. Results are merged after every stage, so a
# stage cut off by its cap (or a killed command) keeps what the earlier ones measured, and
# fm, fm_compile and baselines keep every row they finished. $OUT (default ./gpu_out)
# receives at most 8 files:
#   session.log   every stage's output      tests.log     the pytest run
#   profile.md    profile.json              results.json  every row of every stage, with versions
#   summary.md    the tables and each target met or its gap, also printed last
# Wheels the image lacks are installed from .whl/ (carried; no network there). STAGES="a b"
# runs a subset; SESSION_BUDGET_S, <STAGE>_CAP_S (e.g. FM_CAP_S) and BASELINE_WHOLE_BUDGET_S
# override the defaults; PYTEST_ARGS replaces the tests stage's selection.
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
STAGES=${STAGES:-tests fm guided fm_compile baselines profile sr fp8 metrics features}
RESUME=${RESUME:-}
FM_WEIGHTS=()
[ -n "${FM_CHECKPOINT:-}" ] && FM_WEIGHTS=(--checkpoint "$FM_CHECKPOINT")

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
DONE=""
if [ -n "$RESUME" ]; then
  DONE=$(python3 -m benchmarks.gpu_session_report --done-stages "$RESUME" 2>>"$LOG") \
    || { echo "RESUME=$RESUME: not a gpu_session results.json (see session.log); running every stage"; DONE=""; }
  echo "resuming from $RESUME: done there: ${DONE:-none}" | tee -a "$LOG"
fi

# the caps below sum past the budget on purpose: later stages get what the earlier ones leave
declare -A CAP=([tests]=150 [fm]=200 [guided]=60 [fm_compile]=200 [baselines]=200 [profile]=45 [sr]=120 [fp8]=90
              [metrics]=150 [features]=90 [native]=45 [swiglu]=60 [epilogue]=40 [memory]=45)

stage_command() {
  case "$1" in
    tests)
      # --cuda-only (tests/conftest.py): the tests that skip without a GPU; the rest run in CI
      local select=${PYTEST_ARGS:-tests kernels --cuda-only}
      local extra=(--maxfail=10)
      [ "$DRY_RUN" = 1 ] && select=${PYTEST_ARGS:-tests/test_ops_flow_update.py --cuda-only}
      python3 -c "import xdist" 2>/dev/null && [ "$DRY_RUN" != 1 ] && extra+=(-n 6 --dist loadfile)
      python3 -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=120)
      python3 -m pytest -q -rfE -p no:cacheprovider "${extra[@]}" $select 2>&1 | tee "$OUT/tests.log" ;;
    fm)
      if [ "$DRY_RUN" = 1 ]; then
        python3 -m benchmarks.bench_flow_matching "${DEVICE[@]}" --variant PRDiT-XS/4/0 --size 8 --steps 1 \
          --rows official reference-bf16 fast-eager fast-graph --json "$WORK/fm.json"
      else
        python3 -m benchmarks.bench_flow_matching "${FM_WEIGHTS[@]}" --rows official reference-bf16 fast-eager fast-graph \
          --json "$WORK/fm.json"
      fi ;;
    fm_compile)
      if [ "$DRY_RUN" = 1 ]; then
        python3 -m benchmarks.bench_flow_matching "${DEVICE[@]}" --variant PRDiT-XS/4/0 --size 8 --steps 1 \
          --rows fast-graph compile --json "$WORK/fm_compile.json"
      else
        python3 -m benchmarks.bench_flow_matching "${FM_WEIGHTS[@]}" --rows fast-graph compile --json "$WORK/fm_compile.json"
      fi ;;
    guided)
      if [ "$DRY_RUN" = 1 ]; then
        python3 -m benchmarks.bench_guided "${DEVICE[@]}" --variant DiT-XS/10/1 --size 16 --steps 2 --whole-steps 2 \
          --json "$WORK/guided.json"
      else
        python3 -m benchmarks.bench_guided --whole-steps 1000 --json "$WORK/guided.json"
      fi ;;
    baselines)
      if [ "$DRY_RUN" = 1 ]; then
        python3 -m benchmarks.bench_sampling "${DEVICE[@]}" "${TINY[@]}" --batch-size 1 --steps 1 --json "$WORK/baselines.json"
      else
        python3 -m benchmarks.bench_sampling --whole-budget "${BASELINE_WHOLE_BUDGET_S:-25}" --json "$WORK/baselines.json"
      fi ;;
    profile)
      if [ "$DRY_RUN" = 1 ]; then
        python3 -m benchmarks.profile_step "${DEVICE[@]}" "${TINY[@]}" --batch 1 --steps 1 --rounds 1 --impl torch --out "$WORK/profile"
      else
        python3 -m benchmarks.profile_step --out "$WORK/profile"
      fi ;;
    sr)
      if [ "$DRY_RUN" = 1 ]; then
        python3 -m benchmarks.bench_sampling "${DEVICE[@]}" --variant PRDiT-XS/10/1 --size 8 --sr-size 16 --batch-size 1 \
          --rows official fast-eager --steps 1 --json "$WORK/sr.json"
      else
        python3 -m benchmarks.bench_sampling --variant PRDiT-B/12/4 --size 128 --sr-size 256 --batch-size 2 \
          --whole-budget "${BASELINE_WHOLE_BUDGET_S:-25}" --json "$WORK/sr.json"
      fi ;;
    fp8)
      python3 -m benchmarks.bench_fp8 "${DEVICE[@]}" "${TINY_FLAG[@]}" --json "$WORK/fp8.json" ;;
    metrics)
      if [ "$DRY_RUN" = 1 ]; then
        python3 -m benchmarks.bench_metrics "${DEVICE[@]}" --num 2 --size 16 --official-volumes 1 --official-pairs 1 \
          --fid-methods factors --bootstrap 4 --no-ms-ssim --wscore-seeds 1 --wscore-edge 32 \
          --wscore-widths 4 8 8 8 --wscore-precision fp32 --out "$WORK/metrics.json"
      else
        python3 -m benchmarks.bench_metrics --num "${METRICS_VOLUMES:-1000}" --size 128 --out "$WORK/metrics.json"
      fi ;;
    features)
      # engineer "dropin"'s feature-extraction benchmark: runs once this commit has it
      [ -f benchmarks/bench_features.py ] || { echo "skip: benchmarks/bench_features.py is not in this commit"; return 0; }
      if [ "$DRY_RUN" = 1 ]; then
        python3 -m benchmarks.bench_features "${DEVICE[@]}" --variant PRDiT-XS/10/8 --size 16 --batch-size 1 \
          --budget-s 0.1 --json "$WORK/features.json"
      else
        python3 -m benchmarks.bench_features --compile --json "$WORK/features.json"
      fi ;;
    native)
      if [ "$DRY_RUN" = 1 ]; then echo "skip: no CUDA build in a dry run"; return 0; fi
      command -v nvcc >/dev/null && command -v cmake >/dev/null || { echo "skip: nvcc or cmake missing"; return 0; }
      bash kernels/build.sh ;;
    swiglu)
      if [ "$DRY_RUN" = 1 ]; then echo "skip: GPU only"; return 0; fi
      python3 -m benchmarks.bench_ops_swiglu --json "$WORK/swiglu.json" ;;
    epilogue)
      python3 -m benchmarks.bench_ops_gated_residual_gemm "${DEVICE[@]}" "${TINY_FLAG[@]}" --json "$WORK/epilogue.json" ;;
    memory)
      if [ "$DRY_RUN" = 1 ]; then echo "skip: GPU only"; return 0; fi
      python3 -m pytest -q -p no:cacheprovider benchmarks/bench_ops_memory.py --benchmark-only --benchmark-json="$WORK/memory.json" ;;
    *) echo "unknown stage $1 (stages: ${!CAP[*]})"; return 2 ;;
  esac
}

report() {
  python3 -m benchmarks.gpu_session_report --work "$WORK" --out "$OUT" --commit "${COMMIT:-unknown}" \
    --dry-run "$DRY_RUN" ${RESUME:+--resume "$RESUME"} "$@" 2>>"$LOG"
}

for stage in $STAGES; do
  if [[ " $DONE " == *" $stage "* ]]; then
    echo "   $stage: done in the resumed run, not run again" | tee -a "$LOG"
    continue
  fi
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
