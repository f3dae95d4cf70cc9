// Cubes -> volume (unpatchify), fused with the coarse + fine token sum.
//
// A thread handles one CubeRun: the s voxels of one output row inside one cube. It
// reads them from its token (Cout apart: channel is fastest inside a cube) and writes
// them as one contiguous run, with 16-byte stores when s = 8.
#include "common.cuh"

namespace prdit {

int check_cube_geometry(const char *what, int64_t batch, int channels, int depth, int height, int width, int stride,
                        int cube_channels, CubeGeometry *geo) {
  if (batch < 1 || channels < 1 || depth < 1 || height < 1 || width < 1 || stride < 1)
    return fail(PRDIT_ERROR_INVALID_VALUE,
                "%s: need batch, channels, edges and stride >= 1 (got B=%lld C=%d D=%d H=%d W=%d s=%d)", what,
                static_cast<long long>(batch), channels, depth, height, width, stride);
  if (depth % stride || height % stride || width % stride)
    return fail(PRDIT_ERROR_INVALID_VALUE, "%s: volume edges %dx%dx%d are not multiples of the stride %d", what, depth,
                height, width, stride);
  if (int64_t(cube_channels) * depth * height * width >= (int64_t(1) << 31))
    return fail(PRDIT_ERROR_INVALID_VALUE, "%s: one sample exceeds 2^31 elements (%d channels, %dx%dx%d)", what,
                cube_channels, depth, height, width);
  geo->channels = channels;
  geo->depth = depth;
  geo->height = height;
  geo->width = width;
  geo->stride = stride;
  geo->grid_h = height / stride;
  geo->grid_w = width / stride;
  geo->token_len = stride * stride * stride * cube_channels;
  geo->runs = batch * channels * depth * int64_t(height) * geo->grid_w;
  return PRDIT_OK;
}

namespace {

// ST > 0: compile-time stride with vector stores (out 16-byte aligned); ST == 0: scalar.
template <typename Tin, typename Tout, int ST>
__global__ void unpatchify_kernel(const Tin *__restrict__ cubes, const Tin *__restrict__ residual,
                                  Tout *__restrict__ out, CubeGeometry geo) {
  const int s = ST > 0 ? ST : geo.stride;
  const int cout = geo.channels;
  for (int64_t run = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; run < geo.runs;
       run += int64_t(gridDim.x) * blockDim.x) {
    const CubeRun r(run, geo);
    const int64_t src = r.token_offset(geo, s, cout) + r.c;
    Tout *dst = out + r.volume_offset(geo, cout, r.c, s);
    if constexpr (ST > 0) {
      constexpr int V = vec16<Tout>() < ST ? vec16<Tout>() : ST;
      static_assert(ST % V == 0, "the run must split into whole vectors");
      Vec<Tout, V> chunk;
#pragma unroll
      for (int sw = 0; sw < ST; ++sw) {
        float v = to_float(cubes[src + sw * cout]);
        if (residual != nullptr) v += to_float(residual[src + sw * cout]);
        chunk.v[sw % V] = from_float<Tout>(v);
        if (sw % V == V - 1) reinterpret_cast<Vec<Tout, V> *>(dst)[sw / V] = chunk;
      }
    } else {
      for (int sw = 0; sw < s; ++sw) {
        float v = to_float(cubes[src + sw * cout]);
        if (residual != nullptr) v += to_float(residual[src + sw * cout]);
        dst[sw] = from_float<Tout>(v);
      }
    }
  }
}

}  // namespace
}  // namespace prdit

extern "C" int prdit_unpatchify(const void *cubes, const void *residual, void *out, int in_dtype, int out_dtype,
                                int64_t batch, int out_channels, int depth, int height, int width, int stride,
                                int device, void *stream) {
  using namespace prdit;
  clear_error();
  CubeGeometry geo;
  if (int rc = check_cube_geometry("unpatchify", batch, out_channels, depth, height, width, stride, out_channels,
                                   &geo))
    return rc;
  if (cubes == nullptr || out == nullptr) return fail(PRDIT_ERROR_INVALID_VALUE, "unpatchify: null pointer");
  DeviceGuard guard;
  if (int rc = guard.set(device)) return rc;
  const int threads = 256;
  const unsigned blocks = grid_for(geo.runs, threads);
  const bool vector_path = stride == 8 && aligned16(out);
  bool known_out = true;
  const bool known_in = dispatch_dtype(in_dtype, [&](auto in_tag) {
    using Tin = decltype(in_tag);
    known_out = dispatch_dtype(out_dtype, [&](auto out_tag) {
      using Tout = decltype(out_tag);
      const Tin *src = static_cast<const Tin *>(cubes);
      const Tin *res = static_cast<const Tin *>(residual);
      Tout *dst = static_cast<Tout *>(out);
      if (vector_path)
        unpatchify_kernel<Tin, Tout, 8><<<blocks, threads, 0, as_stream(stream)>>>(src, res, dst, geo);
      else
        unpatchify_kernel<Tin, Tout, 0><<<blocks, threads, 0, as_stream(stream)>>>(src, res, dst, geo);
    });
  });
  if (!known_in || !known_out)
    return fail(PRDIT_ERROR_UNSUPPORTED_DTYPE, "unpatchify: unsupported dtype enum (in %d, out %d)", in_dtype,
                out_dtype);
  return check_launch("unpatchify");
}
