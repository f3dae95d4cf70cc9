// Library-level entry points: error strings, built architectures, device checks.
#include <string>

#include "common.cuh"

namespace prdit {

namespace {
thread_local std::string last_error_message;

__global__ void probe_kernel() {}
}  // namespace

int fail(int code, const char *fmt, ...) {
  char buffer[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buffer, sizeof(buffer), fmt, args);
  va_end(args);
  last_error_message = buffer;
  return code;
}

void clear_error() { last_error_message.clear(); }

int DeviceGuard::set(int device) {
  if (cudaGetDevice(&previous_) != cudaSuccess) {
    cudaGetLastError();
    previous_ = -1;
  }
  if (previous_ == device) return PRDIT_OK;
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky: leave no stale error for the next call
    return fail(PRDIT_ERROR_CUDA, "cannot use CUDA device %d: %s (%s)", device,
                cudaGetErrorString(err), cudaGetErrorName(err));
  }
  device_ = device;
  return PRDIT_OK;
}

DeviceGuard::~DeviceGuard() {
  if (device_ >= 0 && previous_ >= 0) cudaSetDevice(previous_);
}

int check_launch(const char *what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return fail(PRDIT_ERROR_CUDA, "%s: kernel launch failed: %s (%s)", what,
                cudaGetErrorString(err), cudaGetErrorName(err));
  }
  return PRDIT_OK;
}

const char *dtype_name(int dtype) {
  switch (dtype) {
    case PRDIT_FLOAT32: return "float32";
    case PRDIT_BFLOAT16: return "bfloat16";
    case PRDIT_FLOAT16: return "float16";
    default: return "unknown";
  }
}

}  // namespace prdit

namespace {

// __CUDA_ARCH_LIST__ (nvcc >= 11.5) lists the virtual architectures compiled in,
// e.g. 800,900, in host code as well as device code.
std::string built_architectures() {
#ifdef __CUDA_ARCH_LIST__
  const int archs[] = {__CUDA_ARCH_LIST__};
  std::string out;
  for (int arch : archs) {
    if (!out.empty()) out += ",";
    out += "sm_" + std::to_string(arch / 10);
  }
  return out;
#else
  return "unknown";
#endif
}

}  // namespace

extern "C" {

int prdit_abi_version(void) { return PRDIT_ABI_VERSION; }

const char *prdit_last_error(void) { return prdit::last_error_message.c_str(); }

const char *prdit_arch(void) {
  static const std::string archs = built_architectures();
  return archs.c_str();
}

int prdit_device_check(int device) {
  prdit::clear_error();
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return prdit::fail(PRDIT_ERROR_NO_DEVICE, "no CUDA device usable by this library: %s (%s)",
                       cudaGetErrorString(err), cudaGetErrorName(err));
  }
  if (count == 0) return prdit::fail(PRDIT_ERROR_NO_DEVICE, "no CUDA device visible to this library");
  if (device < 0 || device >= count) {
    return prdit::fail(PRDIT_ERROR_INVALID_VALUE, "CUDA device %d does not exist (%d visible)",
                       device, count);
  }
  prdit::DeviceGuard guard;
  if (int rc = guard.set(device)) return rc;
  cudaFuncAttributes attributes;
  err = cudaFuncGetAttributes(&attributes, prdit::probe_kernel);
  if (err != cudaSuccess) {
    cudaGetLastError();
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    const int code = err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction
                         ? PRDIT_ERROR_NO_KERNEL_IMAGE
                         : PRDIT_ERROR_CUDA;
    return prdit::fail(code,
                       "the library (built for %s) cannot run on device %d of compute "
                       "capability %d.%d: %s (%s)",
                       prdit_arch(), device, major, minor, cudaGetErrorString(err),
                       cudaGetErrorName(err));
  }
  return PRDIT_OK;
}

}  // extern "C"
