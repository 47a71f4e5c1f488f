// The soft mask's keep = 1 / (1 + exp(alpha * (u - beta))) along a row, 16 lanes at a time with
// common/vec_math.h, compiled for AVX-512, AVX2+FMA and baseline x86-64 and chosen at the first
// call (common/cpu_isa.h, as the AVSL kernels do). Until this used -ffast-math so that GCC called
// glibc's libmvec; the module now needs neither. The argument is clamped to +-80 (float) /
// +-700 (double): that changes the result by less than exp(-80) ~ 2e-35 and never overflows.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/cpu_isa.h"
#include "common/vec_math.h"

// vec::keep is always inlined: no 64-byte vector crosses a call (GCC's ABI note does not apply).
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace whymatch {
namespace {

constexpr int kLanes = 16;

template <typename T> struct Lanes { typedef T V __attribute__((vector_size(sizeof(T) * kLanes))); };

// NB: the ISA's vector register in bytes.
template <int NB, typename T>
__attribute__((always_inline)) inline void keep_impl(const T* u, T alpha, T beta, T* keep, int64_t n) {
  using V = typename Lanes<T>::V;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    V x;
    std::memcpy(&x, u + i, sizeof(V));
    const V k = vec::keep<T, NB>(alpha * (x - beta));
    std::memcpy(keep + i, &k, sizeof(V));
  }
  if (i < n) {  // the tail computes on zeros beyond n, which are not stored
    T buf[kLanes] = {};
    std::copy(u + i, u + n, buf);
    V x;
    std::memcpy(&x, buf, sizeof(V));
    const V k = vec::keep<T, NB>(alpha * (x - beta));
    std::memcpy(buf, &k, sizeof(V));
    std::copy(buf, buf + (n - i), keep + i);
  }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
template <typename T>
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))) void keep_avx512(const T* u, T a, T b, T* k, int64_t n) {
  keep_impl<64>(u, a, b, k, n);
}
template <typename T>
__attribute__((target("avx2,fma"))) void keep_avx2(const T* u, T a, T b, T* k, int64_t n) {
  keep_impl<32>(u, a, b, k, n);
}
template <typename T>
void keep_any(const T* u, T a, T b, T* k, int64_t n) {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: keep_avx512(u, a, b, k, n); return;
    case CpuIsa::kAvx2: keep_avx2(u, a, b, k, n); return;
    default: keep_impl<16>(u, a, b, k, n); return;
  }
}
#else
template <typename T>
void keep_any(const T* u, T a, T b, T* k, int64_t n) { keep_impl<16>(u, a, b, k, n); }
#endif

}  // namespace

void sigmoid_keep(const float* u, float alpha, float beta, float* keep, int64_t n) {
  keep_any(u, alpha, beta, keep, n);
}

void sigmoid_keep(const double* u, double alpha, double beta, double* keep, int64_t n) {
  keep_any(u, alpha, beta, keep, n);
}

}  // namespace whymatch
