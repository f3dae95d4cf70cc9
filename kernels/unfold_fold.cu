// Overlapping window extraction (unfold3d) and its exact adjoint (fold3d).
//
// unfold: one block per window; a thread copies one (channel, d, h) row of p voxels,
//   reading through the reflect padding and writing the row with the widest aligned
//   stores that p * sizeof(T) allows.
// fold: a gather. Every voxel sums the window elements unfold copied from it, so the
//   result is deterministic and needs no atomics. Along one axis a voxel at coordinate
//   i is read by padded coordinate i + pad and, near the faces, by its mirror images;
//   each padded coordinate lies in up to ceil(p / s) windows. The window element offset
//   is separable, offset = off_d + off_h + off_w, so a block precomputes per axis the
//   list of (window, position) offsets of each coordinate in shared memory and a voxel
//   sums over the product of its three lists, in the same order as the Triton fold
//   (so fp32 sums agree bit for bit).
#include <algorithm>

#include "common.cuh"

namespace prdit {
namespace {

struct WindowGeometry {
  int channels, depth, height, width, patch, stride, pad;
  int grid_d, grid_h, grid_w;  // windows along each edge
  int window_len;              // C p^3
  int64_t batch;
};

int check_geometry(const char *what, int64_t batch, int channels, int depth, int height, int width, int patch,
                   int stride, int pad, WindowGeometry *geo) {
  if (batch < 1 || channels < 1 || depth < 1 || height < 1 || width < 1 || patch < 1 || stride < 1 || pad < 0)
    return fail(PRDIT_ERROR_INVALID_VALUE,
                "%s: need batch, channels, edges, patch, stride >= 1 and pad >= 0 (got B=%lld C=%d D=%d H=%d W=%d "
                "p=%d s=%d pad=%d)",
                what, static_cast<long long>(batch), channels, depth, height, width, patch, stride, pad);
  const int smallest = std::min(depth, std::min(height, width));
  if (pad >= smallest)
    return fail(PRDIT_ERROR_INVALID_VALUE, "%s: reflect padding %d needs every volume edge > %d, got %d", what, pad,
                pad, smallest);
  if (smallest + 2 * pad < patch)
    return fail(PRDIT_ERROR_INVALID_VALUE, "%s: window %d is larger than the padded edge %d", what, patch,
                smallest + 2 * pad);
  geo->channels = channels;
  geo->depth = depth;
  geo->height = height;
  geo->width = width;
  geo->patch = patch;
  geo->stride = stride;
  geo->pad = pad;
  geo->grid_d = (depth + 2 * pad - patch) / stride + 1;
  geo->grid_h = (height + 2 * pad - patch) / stride + 1;
  geo->grid_w = (width + 2 * pad - patch) / stride + 1;
  geo->batch = batch;
  const int64_t window_len = int64_t(channels) * patch * patch * patch;
  const int64_t sample_windows = int64_t(geo->grid_d) * geo->grid_h * geo->grid_w * window_len;
  const int64_t sample_volume = int64_t(channels) * depth * height * width;
  if (sample_windows >= (int64_t(1) << 31) || sample_volume >= (int64_t(1) << 31))
    return fail(PRDIT_ERROR_INVALID_VALUE, "%s: one sample exceeds 2^31 elements (C=%d, %dx%dx%d, p=%d)", what,
                channels, depth, height, width, patch);
  geo->window_len = static_cast<int>(window_len);
  return PRDIT_OK;
}

// ------------------------------------------------------------------ unfold

// Elements per store for a row of P elements of T that starts at a multiple of P elements.
template <typename T, int P>
constexpr int row_store_elems() {
  constexpr int bytes = P * static_cast<int>(sizeof(T));
  constexpr int vb = bytes % 16 == 0 ? 16 : bytes % 8 == 0 ? 8 : bytes % 4 == 0 ? 4 : static_cast<int>(sizeof(T));
  return vb / static_cast<int>(sizeof(T));
}

// P > 0: compile-time window edge with vector stores (windows pointer 16-byte aligned);
// P == 0: any edge, scalar stores.
template <typename T, int P>
__global__ void unfold3d_kernel(const T *__restrict__ x, T *__restrict__ windows, WindowGeometry geo) {
  const int p = P > 0 ? P : geo.patch;
  const int D = geo.depth, H = geo.height, W = geo.width;
  const int64_t tokens = int64_t(geo.grid_d) * geo.grid_h * geo.grid_w;
  const int64_t volume = int64_t(D) * H * W;
  const int rows = geo.channels * p * p;

  for (int64_t window = blockIdx.x; window < geo.batch * tokens; window += gridDim.x) {
    const int64_t b = window / tokens;
    const int n = static_cast<int>(window - b * tokens);
    const int gw = n % geo.grid_w, gh = (n / geo.grid_w) % geo.grid_h, gd = n / (geo.grid_w * geo.grid_h);
    const int z0 = gd * geo.stride - geo.pad, y0 = gh * geo.stride - geo.pad, x0 = gw * geo.stride - geo.pad;
    const T *xb = x + b * geo.channels * volume;
    T *out = windows + window * geo.window_len;

    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
      const int kh = r % p, kd = (r / p) % p, c = r / (p * p);
      const T *src = xb + (int64_t(c) * D + reflect(z0 + kd, D)) * H * W + int64_t(reflect(y0 + kh, H)) * W;
      T *dst = out + int64_t(r) * p;
      if constexpr (P > 0) {
        constexpr int V = row_store_elems<T, P>();
        Vec<T, V> chunk;
#pragma unroll
        for (int kw = 0; kw < P; ++kw) {
          chunk.v[kw % V] = src[reflect(x0 + kw, W)];
          if (kw % V == V - 1) reinterpret_cast<Vec<T, V> *>(dst)[kw / V] = chunk;
        }
      } else {
        for (int kw = 0; kw < p; ++kw) dst[kw] = src[reflect(x0 + kw, W)];
      }
    }
  }
}

template <typename T, int P>
void launch_unfold(const T *x, T *windows, const WindowGeometry &geo, cudaStream_t stream) {
  const int p = P > 0 ? P : geo.patch;
  const int rows = geo.channels * p * p;
  const int threads = std::min(256, (rows + 31) / 32 * 32);
  const int64_t windows_total = geo.batch * geo.grid_d * geo.grid_h * geo.grid_w;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(windows_total, int64_t(1) << 30));
  unfold3d_kernel<T, P><<<blocks, threads, 0, stream>>>(x, windows, geo);
}

template <typename T>
void dispatch_unfold(const void *x, void *windows, const WindowGeometry &geo, cudaStream_t stream) {
  const T *src = static_cast<const T *>(x);
  T *dst = static_cast<T *>(windows);
  if (aligned16(windows)) {
    switch (geo.patch) {
      case 10: return launch_unfold<T, 10>(src, dst, geo, stream);
      case 12: return launch_unfold<T, 12>(src, dst, geo, stream);
      case 14: return launch_unfold<T, 14>(src, dst, geo, stream);
      case 16: return launch_unfold<T, 16>(src, dst, geo, stream);
      default: break;
    }
  }
  launch_unfold<T, 0>(src, dst, geo, stream);
}

// ------------------------------------------------------------------ fold

// Most (window, position) pairs of one coordinate along one axis: itself and its two
// mirror images, each inside at most kMaxWindowsPerCoord windows.
constexpr int kMaxWindowsPerCoord = 4;
constexpr int kMaxTaps = 3 * kMaxWindowsPerCoord;
constexpr int kFoldRowsPerBlock = 16;
constexpr size_t kMaxSharedBytes = 48 * 1024;

// Offsets (within one sample's windows) of every window element unfold copied from
// coordinate i along an axis of length `size` with `grid` windows, window index stride
// `window_step` and in-window position stride `position_step`; returns their count.
// Order: i itself, its mirror in the front padding, in the back padding; windows ascending.
__device__ int axis_taps(int i, int size, int grid, const WindowGeometry &geo, int window_step, int position_step,
                         int *taps) {
  const int pad = geo.pad, p = geo.patch, s = geo.stride;
  int sources[3];
  int n_sources = 0;
  sources[n_sources++] = i + pad;
  if (i >= 1 && i <= pad) sources[n_sources++] = pad - i;
  if (i <= size - 2 && i >= size - 1 - pad) sources[n_sources++] = pad + 2 * (size - 1) - i;
  int count = 0;
  for (int k = 0; k < n_sources; ++k) {
    const int q = sources[k];  // coordinate in the padded volume
    const int first = q >= p ? (q - p + s) / s : 0;
    const int last = min(q / s, grid - 1);
    for (int w = first; w <= last; ++w) taps[count++] = w * window_step + (q - w * s) * position_step;
  }
  return count;
}

size_t fold_shared_bytes(int width, int rows) {
  return sizeof(int) * (size_t(width) * (kMaxTaps + 1) + size_t(rows) * (kMaxTaps + 1) + kMaxTaps);
}

// One block per (sample, channel, depth plane, band of kFoldRowsPerBlock rows);
// blockDim = (32, 8): a warp covers 32 consecutive voxels of a row. Shared memory holds
// the w taps of every column, the h taps of the band's rows and the d taps of the plane.
template <typename T>
__global__ void fold3d_kernel(const T *__restrict__ windows, T *__restrict__ out, WindowGeometry geo,
                              int reduce_mean) {
  extern __shared__ int shared[];
  const int D = geo.depth, H = geo.height, W = geo.width, p = geo.patch;
  int *w_taps = shared;
  int *w_count = w_taps + W * kMaxTaps;
  int *h_taps = w_count + W;
  int *h_count = h_taps + kFoldRowsPerBlock * kMaxTaps;
  int *d_taps = h_count + kFoldRowsPerBlock;
  __shared__ int d_count;

  const int bands = (H + kFoldRowsPerBlock - 1) / kFoldRowsPerBlock;
  const int64_t tasks = geo.batch * geo.channels * D * bands;
  const int64_t tokens = int64_t(geo.grid_d) * geo.grid_h * geo.grid_w;
  const int threads = blockDim.x * blockDim.y;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;

  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t plane = task / bands;  // (b, c, z)
    const int y_begin = static_cast<int>(task - plane * bands) * kFoldRowsPerBlock;
    const int y_end = min(H, y_begin + kFoldRowsPerBlock);
    const int z = static_cast<int>(plane % D);
    const int c = static_cast<int>((plane / D) % geo.channels);
    const int64_t b = plane / D / geo.channels;

    __syncthreads();  // the previous task is done reading the tables
    for (int i = tid; i < W; i += threads)
      w_count[i] = axis_taps(i, W, geo.grid_w, geo, geo.window_len, 1, w_taps + i * kMaxTaps);
    for (int i = tid; i < y_end - y_begin; i += threads)
      h_count[i] = axis_taps(y_begin + i, H, geo.grid_h, geo, geo.grid_w * geo.window_len, p, h_taps + i * kMaxTaps);
    if (tid == 0)
      d_count = axis_taps(z, D, geo.grid_d, geo, geo.grid_h * geo.grid_w * geo.window_len, p * p, d_taps);
    __syncthreads();

    const T *base = windows + b * tokens * geo.window_len + int64_t(c) * p * p * p;
    T *out_plane = out + plane * H * W;
    for (int y = y_begin + threadIdx.y; y < y_end; y += blockDim.y) {
      const int *hy = h_taps + (y - y_begin) * kMaxTaps;
      const int nh = h_count[y - y_begin];
      for (int xw = threadIdx.x; xw < W; xw += blockDim.x) {
        const int *wx = w_taps + xw * kMaxTaps;
        const int nw = w_count[xw];
        float acc = 0.0f;
        for (int td = 0; td < d_count; ++td) {
          for (int th = 0; th < nh; ++th) {
            const T *row = base + d_taps[td] + hy[th];
            for (int tw = 0; tw < nw; ++tw) acc += to_float(row[wx[tw]]);
          }
        }
        if (reduce_mean) {
          const int contributions = d_count * nh * nw;
          acc = contributions > 0 ? acc / static_cast<float>(contributions) : 0.0f;
        }
        out_plane[int64_t(y) * W + xw] = from_float<T>(acc);
      }
    }
  }
}

}  // namespace
}  // namespace prdit

extern "C" {

int prdit_unfold3d(const void *x, void *windows, int dtype, int64_t batch, int channels, int depth, int height,
                   int width, int patch, int stride, int pad, int device, void *stream) {
  using namespace prdit;
  clear_error();
  WindowGeometry geo;
  if (int rc = check_geometry("unfold3d", batch, channels, depth, height, width, patch, stride, pad, &geo)) return rc;
  if (x == nullptr || windows == nullptr) return fail(PRDIT_ERROR_INVALID_VALUE, "unfold3d: null pointer");
  DeviceGuard guard;
  if (int rc = guard.set(device)) return rc;
  const bool known =
      dispatch_dtype(dtype, [&](auto tag) { dispatch_unfold<decltype(tag)>(x, windows, geo, as_stream(stream)); });
  if (!known) return fail(PRDIT_ERROR_UNSUPPORTED_DTYPE, "unfold3d: unsupported dtype enum %d", dtype);
  return check_launch("unfold3d");
}

int prdit_fold3d(const void *windows, void *out, int dtype, int64_t batch, int channels, int depth, int height,
                 int width, int patch, int stride, int pad, int reduce_mean, int device, void *stream) {
  using namespace prdit;
  clear_error();
  WindowGeometry geo;
  if (int rc = check_geometry("fold3d", batch, channels, depth, height, width, patch, stride, pad, &geo)) return rc;
  if (windows == nullptr || out == nullptr) return fail(PRDIT_ERROR_INVALID_VALUE, "fold3d: null pointer");
  const int per_coord = (patch + stride - 1) / stride;
  if (per_coord > kMaxWindowsPerCoord)
    return fail(PRDIT_ERROR_INVALID_VALUE,
                "fold3d: supports up to %d windows over a voxel per axis; patch %d / stride %d gives %d",
                kMaxWindowsPerCoord, patch, stride, per_coord);
  if (reduce_mean != 0 && reduce_mean != 1)
    return fail(PRDIT_ERROR_INVALID_VALUE, "fold3d: reduce_mean must be 0 (sum) or 1 (mean), got %d", reduce_mean);
  const size_t shared_bytes = fold_shared_bytes(width, kFoldRowsPerBlock);
  if (shared_bytes > kMaxSharedBytes)
    return fail(PRDIT_ERROR_INVALID_VALUE, "fold3d: width %d needs %zu bytes of tap tables (max %zu)", width,
                shared_bytes, kMaxSharedBytes);
  DeviceGuard guard;
  if (int rc = guard.set(device)) return rc;

  const dim3 threads(32, 8);
  const int bands = (height + kFoldRowsPerBlock - 1) / kFoldRowsPerBlock;
  const int64_t tasks = batch * channels * depth * bands;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(tasks, int64_t(1) << 30));
  const bool known = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    fold3d_kernel<T><<<blocks, threads, shared_bytes, as_stream(stream)>>>(static_cast<const T *>(windows),
                                                                          static_cast<T *>(out), geo, reduce_mean);
  });
  if (!known) return fail(PRDIT_ERROR_UNSUPPORTED_DTYPE, "fold3d: unsupported dtype enum %d", dtype);
  return check_launch("fold3d");
}

}  // extern "C"
