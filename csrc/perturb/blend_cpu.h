// Flat row primitives of the perturbation kernels (rise_apply, ranked_blend), vectorized for
// AVX-512 and AVX2 (chosen once per process, common/cpu_isa.h) with a portable fallback, and with
// optional non-temporal ("streaming") stores.
//
// Why streaming stores: both ops write far more than they read (rise_apply: N x C x H x W outputs
// from one image and N tiny grids). An ordinary store first reads each output cache line from
// memory (read-for-ownership), so a large output costs its size twice in memory traffic; a
// streaming store writes the line without reading it and without evicting the caches. It only
// pays for outputs larger than the caches, whose lines would be evicted before the consumer reads
// them anyway: outputs of at least stream_min_bytes() (4 MiB, or WHYMATCH_STREAM_MIN_BYTES; 0 =
// always, for the tests) stream, smaller ones stay in the caches for the model that reads them.
// Streaming stores are weakly ordered: every chunk that used them ends with fence(), before the
// thread pool's own synchronization publishes the chunk to the caller.
//
// Alignment: a streaming store needs an aligned address, so each row is written as an unaligned
// head (up to the next 64- or 32-byte boundary), an aligned body and a tail. Outputs whose address
// is not even a multiple of the element size (never from torch) use ordinary stores.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/cpu_isa.h"
#include "common/dtype.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
// GCC 12 reports the deliberately undefined lanes inside the AVX-512 conversion intrinsics as
// "may be used uninitialized" (a false positive): silenced for the intrinsics' own lines
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define WM_BLEND_X86 1
#define WM_BLEND_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma,f16c")))
#define WM_BLEND_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define WM_BLEND_X86 0
#endif

namespace whymatch {
namespace blend {

// Outputs of at least this many bytes use streaming stores (WHYMATCH_STREAM_MIN_BYTES, read at each
// call; a value that is not a non-negative integer is ignored).
inline int64_t stream_min_bytes() {
  if (const char* env = std::getenv("WHYMATCH_STREAM_MIN_BYTES")) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    if (end != env && *end == '\0' && v >= 0) return static_cast<int64_t>(v);
  }
  return int64_t(4) << 20;
}

inline bool use_stream(int64_t out_bytes) { return WM_BLEND_X86 && out_bytes >= stream_min_bytes(); }

// Orders this thread's streaming stores before whatever it does next (the end of a chunk).
inline void fence(bool stream) {
#if WM_BLEND_X86
  if (stream) _mm_sfence();
#endif
}

// Elements from p up to the next multiple of `align` bytes (at most n); 0 when p is not
// element-aligned (the caller then stores without streaming).
template <typename T>
inline int64_t head_elems(const T* p, int64_t align, int64_t n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const int64_t h = static_cast<int64_t>((align - static_cast<int64_t>(a % align)) % align) / int64_t(sizeof(T));
  return h < n ? h : n;
}
template <typename T>
inline bool element_aligned(const T* p) { return reinterpret_cast<uintptr_t>(p) % sizeof(T) == 0; }

#if WM_BLEND_X86
// The variant of a row primitive for this process's instruction set (common/cpu_isa.h): every
// pick_* below. An overloaded name (mix_avx512) resolves to the overload of type Fn.
template <typename Fn>
inline Fn by_isa(Fn avx512, Fn avx2, Fn base) {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return avx512;
    case CpuIsa::kAvx2: return avx2;
    default: return base;
  }
}
#define WM_BLEND_PICK(Fn, avx512, avx2, base) by_isa<Fn>(avx512, avx2, base)
#else
#define WM_BLEND_PICK(Fn, avx512, avx2, base) static_cast<Fn>(base)
#endif

// ---------------------------------------------------------------------------------------------
// mix: o[i] = to_T(m[i] * a[i] + (1 - m[i]) * b[i]), the RISE blend, float math, one rounding to T.
// CB (a constant baseline): b[i] is b[0] for every i, read once (one load stream less per element).
// ---------------------------------------------------------------------------------------------

template <typename T>
using MixFn = void (*)(T* o, const float* m, const float* a, const float* b, int64_t n, bool stream);

template <bool CB, typename T>
inline void mix_scalar(T* o, const float* m, const float* a, const float* b, int64_t n, bool) {
  for (int64_t i = 0; i < n; ++i) o[i] = from_float<T>(m[i] * a[i] + (1.f - m[i]) * b[CB ? 0 : i]);
}

#if WM_BLEND_X86

// ---- AVX-512 ----
WM_BLEND_AVX512 inline __m512 mix16(__m512 m, __m512 a, __m512 b) {
  return _mm512_fmadd_ps(m, a, _mm512_fnmadd_ps(m, b, b));  // m*a + (b - m*b)
}
// 16 baseline values from b + i, or b[0] 16 times with CB (masked: lanes outside k are 0)
template <bool CB>
WM_BLEND_AVX512 inline __m512 ld16(const float* b, int64_t i) { return CB ? _mm512_set1_ps(*b) : _mm512_loadu_ps(b + i); }
template <bool CB>
WM_BLEND_AVX512 inline __m512 ldk16(__mmask16 k, const float* b, int64_t i) {
  return CB ? _mm512_maskz_mov_ps(k, _mm512_set1_ps(*b)) : _mm512_maskz_loadu_ps(k, b + i);
}
// 16 floats -> 16 half / bfloat16 (round to nearest even; NaN stays NaN)
WM_BLEND_AVX512 inline __m256i to16_avx512(__m512 v, half_t*) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
WM_BLEND_AVX512 inline __m256i to16_avx512(__m512 v, bf16_t*) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

template <bool CB>
WM_BLEND_AVX512 inline void mix_avx512(float* o, const float* m, const float* a, const float* b, int64_t n,
                                       bool stream) {
  int64_t i = 0;
  if (stream && element_aligned(o)) {
    const int64_t h = head_elems(o, 64, n);
    if (h) {
      const __mmask16 k = static_cast<__mmask16>((1u << h) - 1);
      _mm512_mask_storeu_ps(o, k, mix16(_mm512_maskz_loadu_ps(k, m), _mm512_maskz_loadu_ps(k, a),
                                        ldk16<CB>(k, b, 0)));
      i = h;
    }
#pragma GCC unroll 4
    for (; i + 16 <= n; i += 16)
      _mm512_stream_ps(o + i, mix16(_mm512_loadu_ps(m + i), _mm512_loadu_ps(a + i), ld16<CB>(b, i)));
  } else {
#pragma GCC unroll 4
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(o + i, mix16(_mm512_loadu_ps(m + i), _mm512_loadu_ps(a + i), ld16<CB>(b, i)));
  }
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(o + i, k, mix16(_mm512_maskz_loadu_ps(k, m + i), _mm512_maskz_loadu_ps(k, a + i),
                                          ldk16<CB>(k, b, i)));
  }
}

template <bool CB, typename T>  // half_t or bf16_t: 32 outputs (64 bytes) a step, scalar head and tail
WM_BLEND_AVX512 inline void mix16bit_avx512(T* o, const float* m, const float* a, const float* b, int64_t n,
                                       bool stream) {
  stream = stream && element_aligned(o);
  const int64_t h = stream ? head_elems(o, 64, n) : 0;
  mix_scalar<CB>(o, m, a, b, h, false);
  int64_t i = h;
  for (; i + 32 <= n; i += 32) {
    const __m256i lo = to16_avx512(mix16(_mm512_loadu_ps(m + i), _mm512_loadu_ps(a + i), ld16<CB>(b, i)),
                                   static_cast<T*>(nullptr));
    const __m256i hi = to16_avx512(
        mix16(_mm512_loadu_ps(m + i + 16), _mm512_loadu_ps(a + i + 16), ld16<CB>(b, i + 16)),
        static_cast<T*>(nullptr));
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    if (stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(o + i), v);
    else _mm512_storeu_si512(o + i, v);
  }
  mix_scalar<CB>(o + i, m + i, a + i, b + (CB ? 0 : i), n - i, false);
}

// ---- AVX2 ----
WM_BLEND_AVX2 inline __m256 mix8(__m256 m, __m256 a, __m256 b) {
  return _mm256_fmadd_ps(m, a, _mm256_fnmadd_ps(m, b, b));
}
template <bool CB>
WM_BLEND_AVX2 inline __m256 ld8(const float* b, int64_t i) { return CB ? _mm256_set1_ps(*b) : _mm256_loadu_ps(b + i); }
WM_BLEND_AVX2 inline __m128i to16_avx2(__m256 v, half_t*) {
  return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
WM_BLEND_AVX2 inline __m256i bf16_round_avx2(__m256 v) {  // 8 rounded bf16 in the low halves of 32-bit lanes
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, q, nan);
}
WM_BLEND_AVX2 inline __m256i pack16_avx2(__m256 lo, __m256 hi, half_t* t) {
  return _mm256_set_m128i(to16_avx2(hi, t), to16_avx2(lo, t));
}
WM_BLEND_AVX2 inline __m256i pack16_avx2(__m256 lo, __m256 hi, bf16_t*) {
  // packus interleaves 128-bit lanes: (lo0-3, hi0-3, lo4-7, hi4-7); the permute restores the order
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_round_avx2(lo), bf16_round_avx2(hi)), 0xD8);
}

template <bool CB>
WM_BLEND_AVX2 inline void mix_avx2(float* o, const float* m, const float* a, const float* b, int64_t n,
                                   bool stream) {
  stream = stream && element_aligned(o);
  const int64_t h = stream ? head_elems(o, 32, n) : 0;
  mix_scalar<CB>(o, m, a, b, h, false);
  int64_t i = h;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = mix8(_mm256_loadu_ps(m + i), _mm256_loadu_ps(a + i), ld8<CB>(b, i));
    if (stream) _mm256_stream_ps(o + i, v);
    else _mm256_storeu_ps(o + i, v);
  }
  mix_scalar<CB>(o + i, m + i, a + i, b + (CB ? 0 : i), n - i, false);
}

template <bool CB, typename T>  // half_t or bf16_t: 16 outputs (32 bytes) a step
WM_BLEND_AVX2 inline void mix16bit_avx2(T* o, const float* m, const float* a, const float* b, int64_t n, bool stream) {
  stream = stream && element_aligned(o);
  const int64_t h = stream ? head_elems(o, 32, n) : 0;
  mix_scalar<CB>(o, m, a, b, h, false);
  int64_t i = h;
  for (; i + 16 <= n; i += 16) {
    const __m256 lo = mix8(_mm256_loadu_ps(m + i), _mm256_loadu_ps(a + i), ld8<CB>(b, i));
    const __m256 hi = mix8(_mm256_loadu_ps(m + i + 8), _mm256_loadu_ps(a + i + 8), ld8<CB>(b, i + 8));
    const __m256i v = pack16_avx2(lo, hi, static_cast<T*>(nullptr));
    if (stream) _mm256_stream_si256(reinterpret_cast<__m256i*>(o + i), v);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), v);
  }
  mix_scalar<CB>(o + i, m + i, a + i, b + (CB ? 0 : i), n - i, false);
}

#endif  // WM_BLEND_X86

template <typename T, bool CB = false>
inline MixFn<T> pick_mix() {
  if constexpr (std::is_same_v<T, float>) {
    return WM_BLEND_PICK(MixFn<T>, mix_avx512<CB>, mix_avx2<CB>, (mix_scalar<CB, T>));
  } else {
    return WM_BLEND_PICK(MixFn<T>, (mix16bit_avx512<CB, T>), (mix16bit_avx2<CB, T>), (mix_scalar<CB, T>));
  }
}

// ---------------------------------------------------------------------------------------------
// select: o[i] = keep[i] ? f[i] : s[i] on raw elements of U (uint32_t or uint16_t), keep[i] all ones
// or all zeros (a bitwise select: exact for any bit pattern, NaN included).
// ---------------------------------------------------------------------------------------------

template <typename U>
using SelectFn = void (*)(U* o, const U* keep, const U* f, const U* s, int64_t n, bool stream);

template <typename U>
inline void select_scalar(U* o, const U* keep, const U* f, const U* s, int64_t n, bool) {
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<U>((f[i] & keep[i]) | (s[i] & static_cast<U>(~keep[i])));
}

#if WM_BLEND_X86
template <typename U>
WM_BLEND_AVX512 inline void select_avx512(U* o, const U* keep, const U* f, const U* s, int64_t n, bool stream) {
  constexpr int64_t L = 64 / sizeof(U);
  stream = stream && element_aligned(o);
  const int64_t h = stream ? head_elems(o, 64, n) : 0;
  select_scalar(o, keep, f, s, h, false);
  int64_t i = h;
#pragma GCC unroll 4
  for (; i + L <= n; i += L) {
    const __m512i v = _mm512_ternarylogic_epi32(_mm512_loadu_si512(keep + i), _mm512_loadu_si512(f + i),
                                                _mm512_loadu_si512(s + i), 0xCA);  // keep ? f : s, bitwise
    if (stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(o + i), v);
    else _mm512_storeu_si512(o + i, v);
  }
  select_scalar(o + i, keep + i, f + i, s + i, n - i, false);
}

template <typename U>
WM_BLEND_AVX2 inline void select_avx2(U* o, const U* keep, const U* f, const U* s, int64_t n, bool stream) {
  constexpr int64_t L = 32 / sizeof(U);
  stream = stream && element_aligned(o);
  const int64_t h = stream ? head_elems(o, 32, n) : 0;
  select_scalar(o, keep, f, s, h, false);
  int64_t i = h;
  for (; i + L <= n; i += L) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keep + i));
    const __m256i v = _mm256_or_si256(_mm256_and_si256(k, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(f + i))),
                                      _mm256_andnot_si256(k, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
    if (stream) _mm256_stream_si256(reinterpret_cast<__m256i*>(o + i), v);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), v);
  }
  select_scalar(o + i, keep + i, f + i, s + i, n - i, false);
}
#endif  // WM_BLEND_X86

template <typename U>
inline SelectFn<U> pick_select() {
  return WM_BLEND_PICK(SelectFn<U>, select_avx512<U>, select_avx2<U>, select_scalar<U>);
}

// ---------------------------------------------------------------------------------------------
// keep: k[i] = rank[i] < count ? all ones : 0, the per-pixel choice of ranked_blend, computed once
// per (pair, step) and reused for every channel.
// ---------------------------------------------------------------------------------------------

template <typename U>
using KeepFn = void (*)(U* k, const int64_t* rank, int64_t count, int64_t n);

template <typename U>
inline void keep_scalar(U* k, const int64_t* rank, int64_t count, int64_t n) {
  for (int64_t i = 0; i < n; ++i) k[i] = rank[i] < count ? static_cast<U>(~U(0)) : U(0);
}
#if WM_BLEND_X86
template <typename U>
WM_BLEND_AVX512 void keep_avx512(U* k, const int64_t* rank, int64_t count, int64_t n) {
  for (int64_t i = 0; i < n; ++i) k[i] = rank[i] < count ? static_cast<U>(~U(0)) : U(0);  // vectorized by -O3
}
template <typename U>
WM_BLEND_AVX2 void keep_avx2(U* k, const int64_t* rank, int64_t count, int64_t n) {
  for (int64_t i = 0; i < n; ++i) k[i] = rank[i] < count ? static_cast<U>(~U(0)) : U(0);
}
#endif

template <typename U>
inline KeepFn<U> pick_keep() { return WM_BLEND_PICK(KeepFn<U>, keep_avx512<U>, keep_avx2<U>, keep_scalar<U>); }

// ---------------------------------------------------------------------------------------------
// lerp: o[i] = a * r0[i] + b * r1[i], one row of a RISE mask from two rows of its grid
// interpolated horizontally (the vertical step of the bilinear upsampling), as RiseCanvas::mask_row.
// ---------------------------------------------------------------------------------------------

using LerpFn = void (*)(float* o, const float* r0, const float* r1, float a, float b, int64_t n);

inline void lerp_scalar(float* __restrict__ o, const float* __restrict__ r0, const float* __restrict__ r1, float a,
                        float b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = a * r0[i] + b * r1[i];
}
#if WM_BLEND_X86
WM_BLEND_AVX512 inline void lerp_avx512(float* o, const float* r0, const float* r1, float a, float b, int64_t n) {
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(o + i, _mm512_add_ps(_mm512_mul_ps(va, _mm512_loadu_ps(r0 + i)),
                                          _mm512_mul_ps(vb, _mm512_loadu_ps(r1 + i))));
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(o + i, k, _mm512_add_ps(_mm512_mul_ps(va, _mm512_maskz_loadu_ps(k, r0 + i)),
                                                  _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(k, r1 + i))));
  }
}
WM_BLEND_AVX2 inline void lerp_avx2(float* o, const float* r0, const float* r1, float a, float b, int64_t n) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(o + i, _mm256_add_ps(_mm256_mul_ps(va, _mm256_loadu_ps(r0 + i)),
                                          _mm256_mul_ps(vb, _mm256_loadu_ps(r1 + i))));
  for (; i < n; ++i) o[i] = a * r0[i] + b * r1[i];
}
#endif

inline LerpFn pick_lerp() { return WM_BLEND_PICK(LerpFn, lerp_avx512, lerp_avx2, lerp_scalar); }

#undef WM_BLEND_PICK

}  // namespace blend
}  // namespace whymatch
