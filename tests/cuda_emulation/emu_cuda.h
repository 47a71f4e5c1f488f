// emu_cuda.h: the prelude (g++ -include) that lets the project's CUDA sources compile and run on
// the host, one block at a time, every CUDA thread a fiber (default) or an OS thread
// (-DEMU_OS_THREADS). Used by tests/cuda_emulation/build.py; see README.md beside it.
//
// What is emulated, and how:
//  - the CUDA headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) compiled in host mode give dim3,
//    cudaError_t, __half, __nv_bfloat16 and their host conversions; emu_runtime.cpp defines the
//    runtime API functions the host code calls.
//  - a __shared__ variable becomes a function-local static (one block runs at a time, so one copy
//    is the block's copy) that rewrite.py registers with the runtime where it is declared
//    (register_shared). The runtime fills every registered variable with 0xFF bytes (a NaN in every
//    float / double, -1 in every integer) at registration and before every block, so that a read
//    before a write shows. extern __shared__ arrays are rewritten into views of the dynamic shared
//    memory, which is poisoned the same way. (An ELF section for the statics would be simpler, but
//    g++ drops the section attribute of a static local in a function template.)
//  - threadIdx / blockIdx / blockDim / gridDim read the emulator's state; __syncthreads,
//    __syncwarp, the shuffles and __ballot_sync are barriers of the scheduler, which checks masks
//    against absent (partial warp) and exited lanes and reports a barrier that can never complete.
// Not emulated: timing, the memory model between warps without a barrier, atomics, cooperative
// groups, tensor-core MMA, textures. A kernel that uses one fails to compile here, loudly.
#pragma once
#ifdef __CUDACC__
#error "emu_cuda.h is the prelude of a host compiler, not of nvcc"
#endif

// Tells a kernel file that it is compiled for the emulation: only test hooks look at it (e.g.
// WHYMATCH_EMU_MAX_MERGE_BLOCKS in avsl_distance_cuda.cu); nvcc builds never define it.
#define WHYMATCH_CUDA_EMULATION 1

// Before the CUDA headers, whose host_defines.h keeps an existing definition.
// rewrite.py replaces every __shared__ of a .cu file; this is for the CUDA headers' sake.
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#ifdef EMU_OS_THREADS
#define EMU_TLS thread_local
#else
#define EMU_TLS
#endif

namespace emu {

struct ThreadCtx {
  uint3 tid;
  unsigned linear = 0, lane = 0, warp = 0;
};
struct BlockCtx {
  uint3 bid;
  dim3 bdim, gdim;
};

// The running thread (per OS thread in the thread back end) and block (one at a time).
inline EMU_TLS ThreadCtx* g_thr = nullptr;
inline BlockCtx* g_blk = nullptr;
inline unsigned char* g_dyn_smem = nullptr;

// The scheduler (emu_runtime.cpp).
void syncthreads();
void syncwarp(unsigned mask);
// Every lane of `mask` deposits n bytes (n <= 16) and receives those of lane `src` (its own when src < 0).
void warp_exchange(unsigned mask, const void* in, void* out, size_t n, int src);
// A static __shared__ array `name` of `used` bytes at p, followed by guard bytes up to `bytes`:
// poisoned now and before every block, the guard checked after every block. Returns true.
bool register_shared(void* p, size_t bytes, size_t used, const char* name);
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t dyn_smem, const std::function<void()>& body);
[[noreturn]] void fail(const std::string& what);

// `K<<<g, b, smem, stream>>>(args)` becomes `::emu::launch(K, g, b, smem, stream)(args)` (rewrite.py).
// The arguments are converted to the kernel's parameter types once, as a launch does, and every
// CUDA thread gets its own copy of them (a kernel may modify its by-value parameters).
template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(a)...);
    auto k = kernel;
    run_grid(reinterpret_cast<const void*>(k), grid, block, smem, [&params, k] {
      auto mine = params;
      std::apply(k, mine);
    });
  }
};

template <typename... P>
Launcher<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launcher<P...>{kernel, grid, block, smem};
}

template <typename T>
inline T exchange(unsigned mask, T v, int src) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "shuffle of an unsupported type");
  T out;
  warp_exchange(mask, &v, &out, sizeof(T), src);
  return out;
}
inline int lane_id() { return static_cast<int>(g_thr->lane); }

}  // namespace emu

#define threadIdx (::emu::g_thr->tid)
#define blockIdx (::emu::g_blk->bid)
#define blockDim (::emu::g_blk->bdim)
#define gridDim (::emu::g_blk->gdim)
#ifndef warpSize
#define warpSize 32
#endif

inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::syncwarp(mask); }
inline void __threadfence_block() {}
inline void __threadfence() {}

template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }

// Shuffles: a source lane outside the segment of `width` lanes returns the caller's own value (CUDA).
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = ::emu::lane_id(), base = lane & ~(width - 1);
  return ::emu::exchange(mask, v, base + (src & (width - 1)));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::emu::lane_id(), seg = lane & (width - 1);
  return ::emu::exchange(mask, v, seg + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : -1);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::emu::lane_id(), seg = lane & (width - 1);
  return ::emu::exchange(mask, v, seg >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : -1);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::emu::lane_id(), src = lane ^ lane_mask;
  return ::emu::exchange(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : -1);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  // one exchange per lane of the mask: each lane reads every other lane's predicate
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) r |= ::emu::exchange(mask, pred ? 1u : 0u, l) << l;
  return r;
}
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline unsigned __activemask() { return 0xffffffffu; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }

// The float overloads of <cmath> in the global namespace, as CUDA's math headers declare them.
using std::ceil;
using std::exp;
using std::fabs;
using std::floor;
using std::fma;
using std::log;
using std::pow;
using std::sqrt;
using std::tanh;

// Device intrinsics the host headers lack. The fast-math ones (__expf, __fdividef, ...) compute
// the exact value here: the emulation checks logic, not the last bits of an approximation.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
inline float __saturatef(float a) { return a < 0.f ? 0.f : (a > 1.f ? 1.f : a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline int __float2int_rd(float a) { return static_cast<int>(std::floor(a)); }
inline int __float2int_rz(float a) { return static_cast<int>(a); }
inline float __int2float_rn(int a) { return static_cast<float>(a); }

// CUDA's min / max: device overloads for every arithmetic type (floating point as fminf / fmaxf).
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
#define WM_EMU_INT_MINMAX(T)                                  \
  inline T min(T a, T b) { return a < b ? a : b; }            \
  inline T max(T a, T b) { return a > b ? a : b; }
WM_EMU_INT_MINMAX(int)
WM_EMU_INT_MINMAX(unsigned)
WM_EMU_INT_MINMAX(long)
WM_EMU_INT_MINMAX(unsigned long)
WM_EMU_INT_MINMAX(long long)
WM_EMU_INT_MINMAX(unsigned long long)
#undef WM_EMU_INT_MINMAX

// nvcc's cuda_runtime.h declares these templates only under __CUDACC__.
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* entry, enum cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
template <class T>
inline cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes* attr, T* entry) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(entry));
}

#include "emu_wmma.h"  // nvcuda::wmma (tf32 m16n16k8) for the tensor-core kernels
