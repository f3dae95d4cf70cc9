/* C ABI of libprdit_kernels: the PRDiT data-movement and sampler kernels in CUDA.
 *
 * Every entry point takes raw device pointers to contiguous tensors, the CUDA device
 * index the pointers live on, and a cudaStream_t passed as void* (NULL: the legacy
 * default stream). Calls are asynchronous on that stream. They return PRDIT_OK or an
 * error code; prdit_last_error() then describes the failure (per calling thread).
 *
 * Layouts (volume edges D, H, W; p: window edge, s: stride; the window grid has
 * g_a = (A + 2 pad - p) / s + 1 windows along an edge A and N = g_d g_h g_w windows):
 *   volume  (B, C, D, H, W)
 *   windows (B, N, C p^3): window grid in raster order (depth slowest), each window
 *           flattened (channel, d, h, w) over the volume reflect-padded by pad
 *   cubes   (B, N, s^3 Cout): non-overlapping s^3 cubes in raster order, each laid out
 *           (d, h, w, channel) with channel fastest; requires D, H, W multiples of s
 */
#ifndef PRDIT_KERNELS_H
#define PRDIT_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define PRDIT_API __declspec(dllexport)
#else
#define PRDIT_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a signature below changes; the Python loader refuses a mismatch. */
#define PRDIT_ABI_VERSION 1

typedef enum {
  PRDIT_FLOAT32 = 0,
  PRDIT_BFLOAT16 = 1,
  PRDIT_FLOAT16 = 2
} prdit_dtype;

typedef enum {
  PRDIT_OK = 0,
  PRDIT_ERROR_INVALID_VALUE = 1,     /* a size, pointer or flag is out of range */
  PRDIT_ERROR_UNSUPPORTED_DTYPE = 2, /* dtype enum not handled by this entry point */
  PRDIT_ERROR_CUDA = 3,              /* the CUDA runtime failed (e.g. a kernel launch) */
  PRDIT_ERROR_NO_DEVICE = 4,         /* no usable CUDA device or driver */
  PRDIT_ERROR_NO_KERNEL_IMAGE = 5,   /* built for other GPU architectures than this device's */
} prdit_status;

PRDIT_API int prdit_abi_version(void);

/* Message of the last failed call on this thread ("" when none). */
PRDIT_API const char *prdit_last_error(void);

/* The architectures compiled in, e.g. "sm_80,sm_90". */
PRDIT_API const char *prdit_arch(void);

/* PRDIT_OK when `device` exists and can run this library's kernels; otherwise
 * PRDIT_ERROR_NO_DEVICE (no device, or a driver older than the toolkit that built the
 * library), PRDIT_ERROR_NO_KERNEL_IMAGE (its compute capability is not covered by
 * prdit_arch()) or PRDIT_ERROR_INVALID_VALUE (no such index); prdit_last_error() says
 * which. */
PRDIT_API int prdit_device_check(int device);

/* volume x (B, C, D, H, W) -> windows (B, N, C p^3). Needs 0 <= pad < every edge and
 * edge + 2 pad >= p. dtype: float32, bfloat16 or float16 (both tensors). */
PRDIT_API int prdit_unfold3d(const void *x, void *windows, int dtype, int64_t batch,
                             int channels, int depth, int height, int width, int patch,
                             int stride, int pad, int device, void *stream);

/* The adjoint of unfold3d: windows (B, N, C p^3) -> volume (B, C, D, H, W), each voxel
 * the sum (reduce_mean = 0) or the mean (reduce_mean = 1) of every window element that
 * unfold3d copied from it (0 for a voxel no window covers). A gather: deterministic, no
 * atomics; fp32 accumulation in the order (d, h, w contribution), each axis listing the
 * voxel itself, then its mirror in the front padding, then in the back padding, windows
 * ascending. Needs ceil(p / s) <= 4 and W <= 900. */
PRDIT_API int prdit_fold3d(const void *windows, void *out, int dtype, int64_t batch,
                           int channels, int depth, int height, int width, int patch,
                           int stride, int pad, int reduce_mean, int device, void *stream);

/* cubes (B, N, s^3 Cout) [+ residual cubes of the same shape and dtype] ->
 * volume (B, Cout, D, H, W) in out_dtype; the sum is formed in fp32 and rounded once.
 * residual may be NULL. */
PRDIT_API int prdit_unpatchify(const void *cubes, const void *residual, void *out,
                               int in_dtype, int out_dtype, int64_t batch, int out_channels,
                               int depth, int height, int width, int stride, int device,
                               void *stream);

/* One sampler step on the model output, fused with its unpatchify.
 *   cubes (+ residual): (B, N, s^3 2C) in cube_dtype; channels [0:C] eps_hat, [C:2C] x0_hat
 *   x, x_next: (B, C, D, H, W) fp32 (x_next may equal x for an in-place update)
 *   x0_out: (B, C, D, H, W) fp32, receives x0_hat
 *   step_table: (num_steps, 5) fp32 rows [sin_i, cos_i, move, a, sigma]
 *   step_index: device pointer to one int32 (index_is_int64 = 0) or int64 (= 1), the row n
 *   keys: (B,) 64-bit Philox keys, (run_seed << 32) | volume index
 * f = sin_i x0_hat - cos_i eps_hat;  x_pred = x - move f;
 * x_next = a x_pred + sigma z when sigma != 0, else a x_pred;
 * z = Philox normal of voxel v (linear in (c, d, h, w)) at counter step n + 1.
 * A step index outside [0, num_steps) writes NaN to x_next and x0_out. */
PRDIT_API int prdit_sampler_update(const void *cubes, const void *residual, int cube_dtype,
                                   const float *x, float *x_next, float *x0_out,
                                   const float *step_table, int num_steps,
                                   const void *step_index, int index_is_int64,
                                   const uint64_t *keys, int64_t batch, int channels,
                                   int depth, int height, int width, int stride, int device,
                                   void *stream);

/* out (B, numel) fp32 = scale * Philox normal of element v at counter `step` for each
 * sample's key: the starting noise x_T is scale = 0.5, step = 0. */
PRDIT_API int prdit_philox_normal(float *out, const uint64_t *keys, int64_t batch,
                                  int64_t numel, uint32_t step, float scale, int device,
                                  void *stream);

/* Host evaluation of the same Philox4x32-10 code the kernels run, for checks without
 * a GPU: words[4] = Philox(key, counter = (offset lo, offset hi, 0, 0)); *normal = the
 * Box-Muller value of words[0], words[1] (host libm, so not bit-identical to the GPU's
 * transcendental functions). */
PRDIT_API int prdit_philox_host(uint64_t key, uint64_t offset, uint32_t *words, float *normal);

#ifdef __cplusplus
}
#endif

#endif /* PRDIT_KERNELS_H */
