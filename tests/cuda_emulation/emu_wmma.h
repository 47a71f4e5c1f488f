// emu_wmma.h: the subset of the CUDA C++ WMMA API (nvcuda::wmma, <mma.h>) that the project's
// kernels use, for the host emulation (included by emu_cuda.h; see README.md beside it).
//
// Fragment layouts are opaque in CUDA (code may only touch frag.x[] elementwise, the same
// operation on every element), so here every lane holds the WHOLE tile, row-major:
// matrix_a M x K, matrix_b K x N, accumulator M x N. Every collective (load, store, fill, mma)
// is a warp barrier over all 32 lanes first (a divergent or partial warp fails, as the API
// requires the whole warp), then each lane does the whole tile's work on its own copy.
//
// Numerics, as the tensor cores of sm_80 / sm_90 compute tf32:
//  - __float_to_tf32 rounds to nearest on 10 explicit mantissa bits, ties away from zero (PTX
//    cvt.rna.tf32.f32); NaN and Inf pass unchanged. The result is a float with its low 13 bits 0.
//  - mma_sync on precision::tf32 fragments reads only the tf32 bits of each input (the low 13 bits
//    are ignored, i.e. truncated, as the hardware does for unconverted fp32 data); a product of two
//    tf32 values is exact in float, and the products are added to the accumulator in float in
//    k order (d = c + a0 b0 + a1 b1 + ..., each addition rounded to nearest). The hardware's
//    internal order and rounding of the additions are unspecified; the tests' bounds allow for it.
// Checks (as documented for the API): ldm a multiple of 4 elements (16 bytes) for tf32 / float,
// pointers 32-byte aligned. Only m16n16k8 tf32 (float accumulator) is provided; anything else
// fails to compile here.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

// Bit casts (device intrinsics that emu_cuda.h does not provide; the tensor-core kernels round to
// tf32 with them).
inline float __uint_as_float(unsigned v) { float r; std::memcpy(&r, &v, 4); return r; }
inline unsigned __float_as_uint(float v) { unsigned r; std::memcpy(&r, &v, 4); return r; }
inline float __int_as_float(int v) { float r; std::memcpy(&r, &v, 4); return r; }
inline int __float_as_int(float v) { int r; std::memcpy(&r, &v, 4); return r; }

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) {  // finite: round the magnitude half away from zero
    u += 0x1000u;
    u &= 0xffffe000u;
  }
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

namespace detail {
template <typename Use, int M, int N, int K> struct dims;
template <int M, int N, int K> struct dims<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct dims<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct dims<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

inline float tf32_bits(float v) {  // what the tensor core reads of an input: the top 19 bits
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= 0xffffe000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

inline void collective(const char* what, const void* ptr, unsigned ldm) {
  ::emu::syncwarp(0xffffffffu);  // the whole warp, converged
  if (ptr && (reinterpret_cast<uintptr_t>(ptr) & 31u))
    ::emu::fail(std::string("wmma::") + what + ": the pointer must be 32-byte aligned");
  if (ptr && (ldm % 4u))
    ::emu::fail(std::string("wmma::") + what + ": ldm must be a multiple of 4 elements (16 bytes) for tf32/float, got " +
                std::to_string(ldm));
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && K == 8, "the emulated WMMA provides m16n16k8 only");
  static_assert(std::is_same<T, precision::tf32>::value || std::is_same<T, float>::value,
                "the emulated WMMA provides tf32 inputs with a float accumulator only");

 public:
  using storage_element_type = float;
  using element_type = float;
  static constexpr int rows = detail::dims<Use, M, N, K>::rows, cols = detail::dims<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;  // the whole tile: a lane holds every element
  float x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  detail::collective("fill_fragment", nullptr, 0);
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = v;
}

template <typename Frag>
inline void load_tile(Frag& f, const float* p, unsigned ldm, bool row) {
  for (int r = 0; r < Frag::rows; ++r)
    for (int c = 0; c < Frag::cols; ++c)
      f.x[r * Frag::cols + c] = row ? p[static_cast<size_t>(r) * ldm + c] : p[static_cast<size_t>(c) * ldm + r];
}

template <typename Use, int M, int N, int K, typename L>
inline void load_matrix_sync(fragment<Use, M, N, K, precision::tf32, L>& f, const float* p, unsigned ldm) {
  static_assert(std::is_same<L, row_major>::value || std::is_same<L, col_major>::value,
                "an input fragment needs a row_major or col_major layout");
  detail::collective("load_matrix_sync", p, ldm);
  load_tile(f, p, ldm, std::is_same<L, row_major>::value);
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float, void>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  detail::collective("load_matrix_sync", p, ldm);
  load_tile(f, p, ldm, layout == mem_row_major);
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float, void>& f, unsigned ldm,
                              layout_t layout) {
  detail::collective("store_matrix_sync", p, ldm);
  ::emu::syncwarp(0xffffffffu);  // every lane has its copy before any lane writes (lanes write the same values)
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) {
      const float v = f.x[r * N + c];
      if (layout == mem_row_major) p[static_cast<size_t>(r) * ldm + c] = v;
      else p[static_cast<size_t>(c) * ldm + r] = v;
    }
}

template <int M, int N, int K, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float, void>& d,
                     const fragment<matrix_a, M, N, K, precision::tf32, LA>& a,
                     const fragment<matrix_b, M, N, K, precision::tf32, LB>& b,
                     const fragment<accumulator, M, N, K, float, void>& c) {
  detail::collective("mma_sync", nullptr, 0);
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc = c.x[m * N + n];
      for (int k = 0; k < K; ++k) acc += detail::tf32_bits(a.x[m * K + k]) * detail::tf32_bits(b.x[k * N + n]);
      out[m * N + n] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda
