// Floating-point storage types understood by the kernels, without torch.
// The integer codes reach Python through the op table (op_table.h), which python/whymatch/ops/_ext.py reads.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/check.h"

namespace whymatch {

// F64 is accepted only by the ops that support it (soft_mask, for float64 gradcheck);
// the others are never handed it by the Python side and throw if they are.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

inline DType dtype_from_code(int code) {
  WM_CHECK(code >= 0 && code <= 3,
           "dtype code must be 0 (float32), 1 (float16), 2 (bfloat16) or 3 (float64), got " << code);
  return static_cast<DType>(code);
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::F64: return "float64";
  }
  return "unknown";
}

// ---- host conversions (round to nearest even, NaN/inf preserved) ----
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline bf16_t to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}
inline float from_bf16(bf16_t h) { return f32_from_bits(static_cast<uint32_t>(h.bits) << 16); }

inline half_t to_half(float f) {
  uint32_t x = f32_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return half_t{static_cast<uint16_t>(sign | 0x7e00u)};          // NaN
  if (ax >= 0x477ff000u) return half_t{static_cast<uint16_t>(sign | 0x7c00u)};         // overflow -> inf
  if (ax < 0x38800000u) {                                                               // subnormal or zero
    float af = f32_from_bits(ax);
    // scale so that the half subnormal unit (2^-24) becomes 1, then round to nearest even
    float scaled = af * 16777216.0f;
    uint32_t m = static_cast<uint32_t>(scaled);
    float rem = scaled - static_cast<float>(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return half_t{static_cast<uint16_t>(sign | m)};
  }
  uint32_t mant = ax & 0x7fffffu;
  uint32_t exp = (ax >> 23) - 112u;  // rebias 127 -> 15
  uint32_t h = (exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: correct
  return half_t{static_cast<uint16_t>(sign | h)};
}
inline float from_half(half_t h) {
  uint32_t sign = (static_cast<uint32_t>(h.bits) & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0) {
    float v = static_cast<float>(mant) / 16777216.0f;
    return sign ? -v : v;
  }
  if (exp == 31) return f32_from_bits(sign | 0x7f800000u | (mant << 13));
  return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}

template <typename T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline half_t from_float<half_t>(float f) { return to_half(f); }
template <> inline bf16_t from_float<bf16_t>(float f) { return to_bf16(f); }

// Compute type of a storage type (double for double, float otherwise) and the conversions.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
inline float to_acc(float v) { return v; }
inline float to_acc(half_t v) { return from_half(v); }
inline float to_acc(bf16_t v) { return from_bf16(v); }
inline double to_acc(double v) { return v; }
template <typename T> inline T from_acc(typename AccType<T>::type v) { return from_float<T>(v); }
template <> inline double from_acc<double>(double v) { return v; }

}  // namespace whymatch

// Calls BODY with `scalar_t` bound to the host storage type of DTYPE.
#define WM_DISPATCH_FLOAT_HOST(DTYPE, NAME, ...)                               \
  [&] {                                                                        \
    switch (DTYPE) {                                                           \
      case ::whymatch::DType::F32: { using scalar_t = float; return __VA_ARGS__(); }              \
      case ::whymatch::DType::F16: { using scalar_t = ::whymatch::half_t; return __VA_ARGS__(); } \
      case ::whymatch::DType::BF16: { using scalar_t = ::whymatch::bf16_t; return __VA_ARGS__(); }\
      case ::whymatch::DType::F64: break;                                      \
    }                                                                          \
    throw std::invalid_argument(std::string(NAME) + ": unsupported dtype");    \
  }()

// As WM_DISPATCH_FLOAT_HOST, with float64 too.
#define WM_DISPATCH_FLOAT64_HOST(DTYPE, NAME, ...)                             \
  [&] {                                                                        \
    if ((DTYPE) == ::whymatch::DType::F64) { using scalar_t = double; return __VA_ARGS__(); }   \
    return WM_DISPATCH_FLOAT_HOST(DTYPE, NAME, __VA_ARGS__);                   \
  }()
