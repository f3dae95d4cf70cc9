// What the kernel files share: error reporting, dtype dispatch, vector access, launch checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>

#include "prdit_kernels.h"

namespace prdit {

// Records the message returned by prdit_last_error() and passes `code` through.
int fail(int code, const char *fmt, ...);
void clear_error();

// Makes `device` current for the duration of an entry point and restores the previous
// device afterwards. The library links the CUDA runtime statically, so its notion of the
// current device is not the caller's (torch's): every entry point selects the device of
// its pointers explicitly, and leaves the thread's context as it found it.
class DeviceGuard {
 public:
  DeviceGuard() = default;
  DeviceGuard(const DeviceGuard &) = delete;
  DeviceGuard &operator=(const DeviceGuard &) = delete;
  ~DeviceGuard();
  int set(int device);  // PRDIT_OK or PRDIT_ERROR_CUDA (message recorded)

 private:
  int previous_ = -1;
  int device_ = -1;
};

// PRDIT_OK, or PRDIT_ERROR_CUDA describing the launch error of the last kernel.
int check_launch(const char *what);

inline cudaStream_t as_stream(void *stream) { return static_cast<cudaStream_t>(stream); }

// Widening load / narrowing store so every kernel computes in fp32.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// V elements moved as one aligned access (16 bytes for V * sizeof(T) == 16).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Elements per 16-byte access.
template <typename T>
constexpr int vec16() { return 16 / static_cast<int>(sizeof(T)); }

inline bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Calls f(T{}) with T the C++ type of a prdit_dtype; false when the enum is unknown.
template <typename F>
bool dispatch_dtype(int dtype, F &&f) {
  switch (dtype) {
    case PRDIT_FLOAT32: f(float{}); return true;
    case PRDIT_BFLOAT16: f(__nv_bfloat16{}); return true;
    case PRDIT_FLOAT16: f(__half{}); return true;
    default: return false;
  }
}

const char *dtype_name(int dtype);

// Grid-stride loop bound: enough blocks to fill the GPU several times over, not one
// block per element of a large volume.
inline unsigned grid_for(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  const int64_t cap = int64_t(1) << 20;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// Mirror without repeating the edge (F.pad mode="reflect"); valid for -S < i < 2S - 1.
__device__ __forceinline__ int reflect(int i, int size) {
  i = i < 0 ? -i : i;
  return i >= size ? 2 * size - 2 - i : i;
}

struct CubeGeometry {
  int channels;  // volume channels written per run: Cout for unpatchify, C for the sampler
  int depth, height, width, stride;
  int grid_h, grid_w;  // cubes along H and W
  int token_len;       // s^3 * cube channels
  int64_t runs;        // B * channels * D * H * (W / s)
};

// Validates a cube layout (every edge a multiple of s) and fills geo; cube_channels is
// the channel count inside each cube.
int check_cube_geometry(const char *what, int64_t batch, int channels, int depth, int height, int width, int stride,
                        int cube_channels, CubeGeometry *geo);

// The unit of work of the cube kernels (unpatchify, sampler update): the s voxels
// (b, c, z, y, gw*s .. gw*s+s-1) of one output row that come from a single cube, so that
// one thread reads them from one token and writes them as one contiguous run.
// Runs are enumerated with c fastest, so the threads of a warp that share a token's
// interleaved channels read the same sectors, and the runs of one channel are
// contiguous in the output.
struct CubeRun {
  int64_t b;
  int c, z, y, gw;
  __device__ CubeRun(int64_t run, const CubeGeometry &geo) {
    c = static_cast<int>(run % geo.channels);
    run /= geo.channels;
    gw = static_cast<int>(run % geo.grid_w);
    run /= geo.grid_w;
    y = static_cast<int>(run % geo.height);
    run /= geo.height;
    z = static_cast<int>(run % geo.depth);
    b = run / geo.depth;
  }
  // Offset of the run's first element, at channel 0, in the cubes (B, N, s^3 cube channels).
  __device__ int64_t token_offset(const CubeGeometry &geo, int stride, int cube_channels) const {
    const int64_t tokens = int64_t(geo.depth / stride) * geo.grid_h * geo.grid_w;
    const int64_t n = (int64_t(z / stride) * geo.grid_h + y / stride) * geo.grid_w + gw;
    return (b * tokens + n) * geo.token_len + int64_t((z % stride) * stride + y % stride) * stride * cube_channels;
  }
  // Offset of the run's first voxel in a volume (B, volume_channels, D, H, W) at channel ch.
  __device__ int64_t volume_offset(const CubeGeometry &geo, int volume_channels, int ch, int stride) const {
    return ((b * volume_channels + ch) * geo.depth + z) * int64_t(geo.height) * geo.width + int64_t(y) * geo.width +
           gw * stride;
  }
};

}  // namespace prdit
