// The widest x86 instruction set that the CPU kernels' hot loops may use: detected once per
// process, and capped by the environment variable WHYMATCH_CPU_ISA=base|avx2|avx512 so that
// the tests can run every code path on one machine (a cap above what the CPU has is ignored).
#pragma once
#include <cstdlib>
#include <cstring>

namespace whymatch {

enum class CpuIsa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuIsa detect_cpu_isa() {
  CpuIsa best = CpuIsa::kBase;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // F16C (half-precision conversions, the perturbation kernels' float16 outputs) comes with every
  // CPU that has AVX2 and FMA; it is checked all the same
  const bool f16c = __builtin_cpu_supports("f16c");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && f16c)
    best = CpuIsa::kAvx512;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c)
    best = CpuIsa::kAvx2;
#endif
  if (const char* env = std::getenv("WHYMATCH_CPU_ISA")) {
    CpuIsa cap = best;
    if (std::strcmp(env, "base") == 0) cap = CpuIsa::kBase;
    else if (std::strcmp(env, "avx2") == 0) cap = CpuIsa::kAvx2;
    else if (std::strcmp(env, "avx512") == 0) cap = CpuIsa::kAvx512;
    if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
  }
  return best;
}

inline CpuIsa cpu_isa() {
  static const CpuIsa v = detect_cpu_isa();
  return v;
}

}  // namespace whymatch
