// Argument checks for the kernels. Python validates every argument first and
// names it; these checks are the last line of defence, so a bad call from a
// new caller becomes a Python ValueError instead of a crash.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

#define WM_CHECK(cond, ...)                                                   \
  do {                                                                        \
    if (!(cond)) {                                                            \
      std::ostringstream wm_msg_;                                             \
      wm_msg_ << __VA_ARGS__;                                                 \
      throw std::invalid_argument(wm_msg_.str());                             \
    }                                                                         \
  } while (0)

#if defined(__CUDACC__)
#define WM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define WM_HOST_DEVICE inline
#endif
