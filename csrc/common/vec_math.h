// exp and sigmoid on GCC/Clang vector-extension types, for the CPU kernels' hot loops.
//
// Written once for any lane count: V is a vector of T (float or double), I the vector of
// same-width integers with as many lanes. A caller compiled for AVX-512 or AVX2 (function target
// attributes) inlines these into its own instruction set; baseline x86-64 gets SSE2. The entry
// point, keep<T, NB>(w), works on vectors w of any width in native-width parts of NB bytes (the
// caller's register width): GCC turns compares and selects on vectors wider than the target's
// registers into scalar code, so the parts must be native. This replaces glibc's libmvec (which
// -ffast-math loops called): the module needs no libmvec and nothing is built with -ffast-math.
//
// exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, n rounded to nearest with the
// 1.5 * 2^mantissa trick (needs strict IEEE addition: never compile this with -ffast-math), the
// Cephes polynomial (float, about 1 ulp) or Pade form (double, about 2 ulp) of exp(r), times 2^n
// built in the exponent field. Arguments must lie in [-ExpConst<T>::clamp, ExpConst<T>::clamp].
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

// Always inlined: each caller compiles them for its own target ISA, and no vector ever crosses a
// call boundary (so GCC's note about the ABI of wide vector returns does not apply).
#if defined(__GNUC__)
#define WM_VEC_INLINE __attribute__((always_inline)) inline
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define WM_VEC_INLINE inline
#endif

namespace whymatch {
namespace vec {

template <typename T> struct ExpConst;
template <> struct ExpConst<float> {
  static constexpr float clamp = 80.f, log2e = 1.44269504088896341f, magic = 12582912.f;  // 1.5 * 2^23
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr int mant = 23, bias = 127;
};
template <> struct ExpConst<double> {
  static constexpr double clamp = 700.0, log2e = 1.4426950408889634073599, magic = 6755399441055744.0;  // 1.5*2^52
  static constexpr double ln2_hi = 6.93145751953125e-1, ln2_lo = 1.42860682030941723212e-6;
  static constexpr int mant = 52, bias = 1023;
};

template <typename V>
WM_VEC_INLINE V exp_poly(const V& r, float) {
  V p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * (r * r) + r + 1.f;
}
template <typename V>
WM_VEC_INLINE V exp_poly(const V& r, double) {
  const V r2 = r * r;
  const V px = r * ((1.26177193074810590878e-4 * r2 + 3.02994407707441961300e-2) * r2 + 9.99999999999999999910e-1);
  const V qx = ((3.00198505138664455042e-6 * r2 + 2.52448340349684104192e-3) * r2 + 2.27265548208155028766e-1) * r2 +
               2.00000000000000000009e0;
  return 1.0 + 2.0 * px / (qx - px);
}

// exp(x) for |x| <= ExpConst<T>::clamp (NaN in, NaN out).
template <typename T, typename V, typename I>
WM_VEC_INLINE V exp(const V& x) {
  using K = ExpConst<T>;
  const V n = (x * K::log2e + K::magic) - K::magic;
  const V r = (x - n * K::ln2_hi) - n * K::ln2_lo;
  const I e = (__builtin_convertvector(n == n ? n : V{}, I) + K::bias) << K::mant;
  V scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return exp_poly(r, T()) * scale;
}

// 1 / (1 + exp(u)) on one native vector, u clamped to +-ExpConst<T>::clamp first (in float the
// clamp changes the result by less than exp(-80) ~ 2e-35; it is never a denormal or NaN); NaN
// stays NaN. sigmoid(z) is keep(-z).
template <typename T, typename V, typename I>
WM_VEC_INLINE V keep_native(const V& u) {
  using K = ExpConst<T>;
  const V hi = V{} + K::clamp, lo = V{} - K::clamp;
  V x = u < hi ? u : hi;  // NaN becomes +clamp here...
  x = x > lo ? x : lo;
  x = u == u ? x : u;     // ...and is put back
  return T(1) / (T(1) + exp<T, V, I>(x));
}

// NB-byte vectors of T and of same-width integers.
template <typename T, int NB>
struct Native {
  typedef T V __attribute__((vector_size(NB)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> S;
  typedef S I __attribute__((vector_size(NB)));
};

// keep(u) = 1 / (1 + exp(u)) for a vector W of T of any width, computed in NB-byte parts.
template <typename T, int NB, typename W>
WM_VEC_INLINE W keep(const W& u) {
  static_assert(sizeof(W) % NB == 0, "the vector must be a whole number of native parts");
  using N = Native<T, NB>;
  W out;
  for (int part = 0; part < static_cast<int>(sizeof(W) / NB); ++part) {
    typename N::V x;
    std::memcpy(&x, reinterpret_cast<const char*>(&u) + part * NB, NB);
    x = keep_native<T, typename N::V, typename N::I>(x);
    std::memcpy(reinterpret_cast<char*>(&out) + part * NB, &x, NB);
  }
  return out;
}

}  // namespace vec
}  // namespace whymatch

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
