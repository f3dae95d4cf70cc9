#!/usr/bin/env bash
# Configure and build libprdit_kernels.so with CMake into build/native, then copy it into
# build/lib/ where kernels/native.py loads it. A compile error exits non-zero.
#   kernels/build.sh                      # sm_80 + sm_90
#   CUDA_ARCHS="90" kernels/build.sh      # other architectures (CMAKE_CUDA_ARCHITECTURES syntax)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${PRDIT_NATIVE_BUILD_DIR:-$root/build/native}"
dest="$root/build/lib"

nvcc_bin="$(command -v nvcc || true)"
if [[ -z "$nvcc_bin" && -x /usr/local/cuda/bin/nvcc ]]; then nvcc_bin=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$nvcc_bin" ]]; then
  echo "kernels/build.sh: nvcc not found (install the CUDA toolkit or put it on PATH)" >&2
  exit 2
fi
command -v cmake >/dev/null || { echo "kernels/build.sh: cmake not found" >&2; exit 2; }

cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_COMPILER="$nvcc_bin" -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-80;90}"
cmake --build "$build" --parallel "${PRDIT_BUILD_JOBS:-$(nproc)}"

mkdir -p "$dest"
# copy then rename: a process that already loaded the old library keeps a valid file
tmp="$(mktemp "$dest/.libprdit_kernels.so.XXXXXX")"
cp "$build/libprdit_kernels.so" "$tmp"
chmod 755 "$tmp"
mv -f "$tmp" "$dest/libprdit_kernels.so"
echo "kernels/build.sh: built $dest/libprdit_kernels.so"
