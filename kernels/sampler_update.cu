// One IaN sampler step fused with the unpatchify of the model output, and the Philox
// noise generator on its own (the sampler's starting noise).
//
// A thread handles one CubeRun of channel c: it reads eps_hat (cube channel c) and
// x0_hat (cube channel C + c) of s voxels from one token, the matching run of x, and
// writes runs of x_next and x0_hat. The step scalars come from a device table indexed
// by a device step counter, so a captured CUDA graph replays every step unchanged.
#include "common.cuh"
#include "philox.cuh"

namespace prdit {
namespace {

constexpr int kTableColumns = 5;  // sin_i, cos_i, move, a, sigma

struct StepScalars {
  float sin_i, cos_i, move, a, sigma;
  uint32_t noise_step;  // Philox counter of this step's corrector noise: n + 1
  bool valid;
};

__device__ StepScalars read_step(const float *table, int num_steps, const void *step_index, int index_is_int64) {
  const int64_t n = index_is_int64 ? *static_cast<const int64_t *>(step_index)
                                   : static_cast<int64_t>(*static_cast<const int32_t *>(step_index));
  StepScalars st;
  st.valid = n >= 0 && n < num_steps;
  if (st.valid) {
    const float *row = table + n * kTableColumns;
    st.sin_i = row[0];
    st.cos_i = row[1];
    st.move = row[2];
    st.a = row[3];
    st.sigma = row[4];
  } else {
    st.sin_i = st.cos_i = st.move = st.a = st.sigma = __int_as_float(0x7fc00000);  // NaN poisons the outputs
  }
  st.noise_step = static_cast<uint32_t>(n + 1);
  return st;
}

// x and x_next may alias (in-place update), so neither is __restrict__.
template <typename T, int ST>
__global__ void sampler_update_kernel(const T *__restrict__ cubes, const T *__restrict__ residual, const float *x,
                                      float *x_next, float *__restrict__ x0_out, const float *__restrict__ table,
                                      int num_steps, const void *step_index, int index_is_int64,
                                      const uint64_t *__restrict__ keys, CubeGeometry geo) {
  const StepScalars st = read_step(table, num_steps, step_index, index_is_int64);
  const int s = ST > 0 ? ST : geo.stride;
  const int C = geo.channels, cube_channels = 2 * geo.channels;
  const float nan = __int_as_float(0x7fc00000);

  for (int64_t run = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; run < geo.runs;
       run += int64_t(gridDim.x) * blockDim.x) {
    const CubeRun r(run, geo);
    const int64_t src = r.token_offset(geo, s, cube_channels) + r.c;
    const int64_t vol = r.volume_offset(geo, C, r.c, s);
    const uint64_t key = keys[r.b];
    // voxel index within the sample, (c, d, h, w) raster: the Philox element counter
    const uint64_t voxel0 =
        ((uint64_t(r.c) * geo.depth + r.z) * geo.height + r.y) * uint64_t(geo.width) + uint64_t(r.gw) * s;

    auto update = [&](int sw, float x_value, float &x_new, float &x0_value) {
      float eps = to_float(cubes[src + sw * cube_channels]);
      float x0 = to_float(cubes[src + sw * cube_channels + C]);
      if (residual != nullptr) {
        eps += to_float(residual[src + sw * cube_channels]);
        x0 += to_float(residual[src + sw * cube_channels + C]);
      }
      const float f = st.sin_i * x0 - st.cos_i * eps;
      const float x_pred = x_value - st.move * f;
      x_new = st.a * x_pred;
      if (st.sigma != 0.0f) x_new += st.sigma * philox_normal(key, noise_offset(voxel0 + sw, st.noise_step));
      x0_value = st.valid ? x0 : nan;
    };

    if constexpr (ST > 0) {
      constexpr int V = 4;  // fp32 runs of ST voxels move as 16-byte vectors
      static_assert(ST % V == 0, "the run must split into whole vectors");
#pragma unroll
      for (int part = 0; part < ST / V; ++part) {
        const Vec<float, V> xv = reinterpret_cast<const Vec<float, V> *>(x + vol)[part];
        Vec<float, V> xn, x0v;
#pragma unroll
        for (int j = 0; j < V; ++j) update(part * V + j, xv.v[j], xn.v[j], x0v.v[j]);
        reinterpret_cast<Vec<float, V> *>(x_next + vol)[part] = xn;
        reinterpret_cast<Vec<float, V> *>(x0_out + vol)[part] = x0v;
      }
    } else {
      for (int sw = 0; sw < s; ++sw) {
        float xn, x0v;
        update(sw, x[vol + sw], xn, x0v);
        x_next[vol + sw] = xn;
        x0_out[vol + sw] = x0v;
      }
    }
  }
}

__global__ void philox_normal_kernel(float *__restrict__ out, const uint64_t *__restrict__ keys, int64_t batch,
                                     int64_t numel, uint32_t step, float scale) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < batch * numel;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / numel;
    out[i] = scale * philox_normal(keys[b], noise_offset(uint64_t(i - b * numel), step));
  }
}

}  // namespace
}  // namespace prdit

extern "C" {

int prdit_sampler_update(const void *cubes, const void *residual, int cube_dtype, const float *x, float *x_next,
                         float *x0_out, const float *step_table, int num_steps, const void *step_index,
                         int index_is_int64, const uint64_t *keys, int64_t batch, int channels, int depth, int height,
                         int width, int stride, int device, void *stream) {
  using namespace prdit;
  clear_error();
  CubeGeometry geo;
  if (int rc = check_cube_geometry("sampler_update", batch, channels, depth, height, width, stride, 2 * channels,
                                   &geo))
    return rc;
  if (cubes == nullptr || x == nullptr || x_next == nullptr || x0_out == nullptr || step_table == nullptr ||
      step_index == nullptr || keys == nullptr)
    return fail(PRDIT_ERROR_INVALID_VALUE, "sampler_update: null pointer");
  if (num_steps < 1) return fail(PRDIT_ERROR_INVALID_VALUE, "sampler_update: num_steps must be >= 1");
  if (index_is_int64 != 0 && index_is_int64 != 1)
    return fail(PRDIT_ERROR_INVALID_VALUE, "sampler_update: index_is_int64 must be 0 or 1");
  DeviceGuard guard;
  if (int rc = guard.set(device)) return rc;
  const int threads = 256;
  const unsigned blocks = grid_for(geo.runs, threads);
  const bool vector_path = stride == 8 && aligned16(x) && aligned16(x_next) && aligned16(x0_out);
  const bool known = dispatch_dtype(cube_dtype, [&](auto tag) {
    using T = decltype(tag);
    const T *src = static_cast<const T *>(cubes);
    const T *res = static_cast<const T *>(residual);
    if (vector_path)
      sampler_update_kernel<T, 8><<<blocks, threads, 0, as_stream(stream)>>>(
          src, res, x, x_next, x0_out, step_table, num_steps, step_index, index_is_int64, keys, geo);
    else
      sampler_update_kernel<T, 0><<<blocks, threads, 0, as_stream(stream)>>>(
          src, res, x, x_next, x0_out, step_table, num_steps, step_index, index_is_int64, keys, geo);
  });
  if (!known) return fail(PRDIT_ERROR_UNSUPPORTED_DTYPE, "sampler_update: unsupported dtype enum %d", cube_dtype);
  return check_launch("sampler_update");
}

int prdit_philox_normal(float *out, const uint64_t *keys, int64_t batch, int64_t numel, uint32_t step, float scale,
                        int device, void *stream) {
  using namespace prdit;
  clear_error();
  if (out == nullptr || keys == nullptr) return fail(PRDIT_ERROR_INVALID_VALUE, "philox_normal: null pointer");
  if (batch < 1 || numel < 1 || numel > (int64_t(1) << 32))
    return fail(PRDIT_ERROR_INVALID_VALUE, "philox_normal: need batch >= 1 and 1 <= numel <= 2^32 (got %lld, %lld)",
                static_cast<long long>(batch), static_cast<long long>(numel));
  DeviceGuard guard;
  if (int rc = guard.set(device)) return rc;
  const int threads = 256;
  philox_normal_kernel<<<grid_for(batch * numel, threads), threads, 0, as_stream(stream)>>>(out, keys, batch, numel,
                                                                                           step, scale);
  return check_launch("philox_normal");
}

int prdit_philox_host(uint64_t key, uint64_t offset, uint32_t *words, float *normal) {
  using namespace prdit;
  clear_error();
  if (words == nullptr || normal == nullptr) return fail(PRDIT_ERROR_INVALID_VALUE, "philox_host: null pointer");
  philox_words(key, offset, words);
  *normal = words_to_normal(words[0], words[1]);
  return PRDIT_OK;
}

}  // extern "C"
