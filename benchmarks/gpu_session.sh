#!/usr/bin/env bash
# One GPU session's checks, for a lent GPU machine with no network:
#   bash benchmarks/gpu_session.sh [tests|profile|sampling|step|kernels|bench|all] ...
# Rough GPU minutes on an H100 (30 are lent per session): tests 3-4, profile 1-3, sampling
# 1-2, step 3-10 (torch.compile max-autotune), kernels 5+, bench (full) 30+: pass the stages
# that fit, cheapest first.
# Wheels the image lacks (nibabel, pydicom) are expected in .whl/ (see README, "GPU checks").
# Logs and results go to $OUT (or ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# no network there: use the checkout in place rather than pip install (no build isolation possible)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
prdit-fast() { python3 -m prdit_fast.cli "$@"; }
if command -v nvcc >/dev/null && [ -x kernels/build.sh ]; then
  bash kernels/build.sh >"$OUT/native_build.log" 2>&1 && echo "native library built" || { echo "native build FAILED"; tail -20 "$OUT/native_build.log"; }
fi
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton, subprocess
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0))
print(subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip())
PY
for what in "${@:-all}"; do
  case "$what" in
    tests|all)
      PRDIT_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-900} python3 -m pytest -v -rfE --durations=25 --timeout=300 ${PYTEST_ARGS:-tests} -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -60 ;;&
    profile|all)
      python3 benchmarks/profile_step.py --out "$OUT" 2>&1 | tee "$OUT/profile.log" | tail -60 ;;&
    sampling|all)
      python3 benchmarks/bench_sampling.py --batch-size 4 --json "$OUT/sampling.json" 2>&1 | tee "$OUT/sampling.log" | tail -20 ;;&
    step|all)
      python3 benchmarks/bench_fast_step.py --json "$OUT/step.json" 2>&1 | tee "$OUT/step.log" | tail -20 ;;&
    kernels|all)
      python3 -m pytest -q benchmarks --benchmark-only --benchmark-json="$OUT/kernel_bench.json" -p no:cacheprovider 2>&1 | tee "$OUT/kernel_bench.log" | tail -60 ;;&
    bench|all)
      prdit-fast bench --out benchmarks/results 2>&1 | tee "$OUT/bench.log" | tail -60
      latest=$(ls -td benchmarks/results/*/ 2>/dev/null | head -1)
      [ -n "$latest" ] && mkdir -p "$OUT/results" && cp "$latest"/* "$OUT/results/" ;;
  esac
done
