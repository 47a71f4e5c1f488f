// CUDA helpers: error checks that throw (never abort), device storage types.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>

#include "common/dtype.h"

// A call that returned an error also left it as the runtime's "last error"; the check takes it
// back (when it is still the pending one), so that this op's failure does not surface again as the
// failure of the next, unrelated launch check. A sticky error (a device fault) stays: it cannot be
// cleared.
#define WM_CUDA_CHECK(expr)                                                           \
  do {                                                                                \
    cudaError_t wm_err_ = (expr);                                                     \
    if (wm_err_ != cudaSuccess) {                                                     \
      if (cudaPeekAtLastError() == wm_err_) (void)cudaGetLastError();                 \
      std::ostringstream wm_msg_;                                                     \
      wm_msg_ << "CUDA error " << cudaGetErrorName(wm_err_) << " (" << cudaGetErrorString(wm_err_) \
              << ") at " << __FILE__ << ":" << __LINE__ << " in " #expr;               \
      throw std::runtime_error(wm_msg_.str());                                        \
    }                                                                                 \
  } while (0)

// Before an op's first launch: an error already pending (another library's failed call, an
// earlier kernel's fault) is not this op's. It is reported by name and left pending for its owner,
// never cleared here; and since nothing is pending after this check, WM_CUDA_LAUNCH_CHECK below
// sees only the errors of this op's own launches. `what` names the op.
#define WM_CUDA_CHECK_PENDING(what)                                                   \
  do {                                                                                \
    const cudaError_t wm_pending_ = cudaPeekAtLastError();                            \
    if (wm_pending_ != cudaSuccess) {                                                 \
      std::ostringstream wm_msg_;                                                     \
      wm_msg_ << (what) << ": a CUDA error was already pending before its launch: "   \
              << cudaGetErrorName(wm_pending_) << " (" << cudaGetErrorString(wm_pending_) \
              << "), from an earlier call; left pending, nothing launched";            \
      throw std::runtime_error(wm_msg_.str());                                        \
    }                                                                                 \
  } while (0)

// Check the launch that was just made (configuration errors surface here; asynchronous faults
// surface at the next synchronizing call, also as exceptions). After WM_CUDA_CHECK_PENDING, the
// error taken here is this launch's own.
#define WM_CUDA_LAUNCH_CHECK() WM_CUDA_CHECK(cudaGetLastError())

namespace whymatch {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

inline unsigned int ceil_div(long long a, long long b) { return static_cast<unsigned int>((a + b - 1) / b); }

}  // namespace whymatch

// Calls BODY with `scalar_t` bound to the CUDA storage type of DTYPE.
#define WM_DISPATCH_FLOAT_CUDA(DTYPE, NAME, ...)                                \
  [&] {                                                                         \
    switch (DTYPE) {                                                            \
      case ::whymatch::DType::F32: { using scalar_t = float; return __VA_ARGS__(); }          \
      case ::whymatch::DType::F16: { using scalar_t = __half; return __VA_ARGS__(); }         \
      case ::whymatch::DType::BF16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
      case ::whymatch::DType::F64: break;                                       \
    }                                                                           \
    throw std::invalid_argument(std::string(NAME) + ": unsupported dtype");     \
  }()

// As WM_DISPATCH_FLOAT_CUDA, with float64 too.
#define WM_DISPATCH_FLOAT64_CUDA(DTYPE, NAME, ...)                              \
  [&] {                                                                         \
    if ((DTYPE) == ::whymatch::DType::F64) { using scalar_t = double; return __VA_ARGS__(); }    \
    return WM_DISPATCH_FLOAT_CUDA(DTYPE, NAME, __VA_ARGS__);                    \
  }()
