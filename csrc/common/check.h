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

#include <cstdint>
#include <initializer_list>

namespace whymatch {

// The product of non-negative sizes as int64, or an invalid_argument naming `what` when a size is
// negative or the product overflows int64 (a size that no buffer can have).
inline int64_t checked_product(const char* op, const char* what, std::initializer_list<int64_t> dims) {
  int64_t prod = 1;
  for (int64_t d : dims) {
    WM_CHECK(d >= 0, op << ": " << what << " must be made of non-negative sizes, got " << d);
    WM_CHECK(!__builtin_mul_overflow(prod, d, &prod),
             op << ": " << what << " overflows int64 (sizes too large)");
  }
  return prod;
}

}  // namespace whymatch
