// CUDA kernels of the AVSL rectified distance (see avsl/avsl_distance.h).
//
// On CUDA the gallery tensors are passed transposed: ge (S, G) and rg (S1, G), so that the P
// threads of a pair group read P consecutive gallery items (coalesced).
//
// Work unit: a tile = one query i and P consecutive gallery items; a block of kThreads threads
// handles one tile at a time (grid-stride loop over tiles). Thread t works on pair jj = t % P and
// on the columns c = t / P, t / P + kThreads / P, ... of each level; the hats of the tile's two
// current levels live node-major (R_max x P) in shared memory when they fit in 48 KiB, else in a
// per-block slice of the global workspace. Link values and rows are read through the read-only
// cache (__ldg), shared by the P threads of a column.
//
// Top-k: the gallery of each query is split into nseg segments; block (i, seg) keeps the sorted
// k best of its segment in the workspace (thread 0 inserts the tile's P candidates), and a merge
// kernel (one block per query) takes the k best of the nseg sorted lists: each thread owns the
// segments s = t, t + kMergeThreads, ... and keeps the best head among them; per output, a
// block-wide argmin (shuffles, then the warps' winners in shared memory) picks the winner and only
// its owner advances and rescans its few segments. (One thread per query walked k x nseg dependent
// global reads: ~200k for Q = 1, nseg = 2048.)
//
// Backward: a fixed grid of blocks, each owning a slice of the workspace: A_l, p_l of the tile,
// two R_max x P buffers, and its partial sums of the coef / bias gradients (double), which a last
// kernel adds up in block order (deterministic, no atomics).
#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include "avsl/avsl_distance.h"
#include "common/cuda_utils.cuh"

namespace whymatch {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSmemLimit = 48 * 1024;
constexpr int64_t kMaxForwardBlocks = 4096;
constexpr int64_t kMaxBackwardBlocks = 1024;
constexpr int64_t kTopkTargetBlocks = 2048;
constexpr int64_t kMaxMergeBlocks = 65535;  // the merge loops over queries beyond it

// A grid cap (kMaxForwardBlocks, kMaxBackwardBlocks, kTopkTargetBlocks, kMaxMergeBlocks). Test
// hook: a build for the host emulation (tests/cuda_emulation/emu_cuda.h defines
// WHYMATCH_CUDA_EMULATION; nvcc builds never do) takes a lower cap from the environment variable
// `hook`, read at every call (workspace size and launch alike), so that a test runs the kernels'
// loops over several tiles / queries per block on a few small inputs (the merge kernel's loop over
// queries otherwise needs Q > 65,535).
int64_t grid_cap(const char* hook, int64_t cap) {
#ifdef WHYMATCH_CUDA_EMULATION
  const char* e = std::getenv(hook);
  if (e && *e) {
    char* end = nullptr;
    const long long v = std::strtoll(e, &end, 10);
    WM_CHECK(*end == '\0' && v > 0, hook << " must be a positive number of blocks, got '" << e << "'");
    return std::min<int64_t>(v, cap);
  }
#else
  (void)hook;
#endif
  return cap;
}
int64_t max_forward_blocks() { return grid_cap("WHYMATCH_EMU_MAX_FORWARD_BLOCKS", kMaxForwardBlocks); }
int64_t max_backward_blocks() { return grid_cap("WHYMATCH_EMU_MAX_BACKWARD_BLOCKS", kMaxBackwardBlocks); }
int64_t topk_target_blocks() { return grid_cap("WHYMATCH_EMU_TOPK_TARGET_BLOCKS", kTopkTargetBlocks); }
int64_t max_merge_blocks() { return grid_cap("WHYMATCH_EMU_MAX_MERGE_BLOCKS", kMaxMergeBlocks); }

struct Levels {
  int L;
  int64_t R[kAvslMaxLevels], off[kAvslMaxLevels];
  int64_t S, S1, R0, Rmax;
};

Levels levels_of(const AvslParams& p) {
  Levels lv;
  lv.L = p.L;
  for (int l = 0; l < kAvslMaxLevels; ++l) { lv.R[l] = l < p.L ? p.R[l] : 0; lv.off[l] = l < p.L ? p.off(l) : 0; }
  lv.S = p.S(); lv.S1 = p.S1(); lv.R0 = p.R[0]; lv.Rmax = p.Rmax();
  return lv;
}

int64_t elem_size(const AvslParams& p) { return p.dtype == DType::F64 ? 8 : 4; }
int64_t align256(int64_t n) { return (n + 255) / 256 * 256; }

// Pair-group size and where the hats live for the forward / top-k kernels.
struct FwdConfig {
  int P;
  bool global;           // hats in the global workspace instead of shared memory
  int64_t hat_bytes;     // per block: 2 * R_max * P elements
  int64_t tiles;         // per query: ceil(G / P)
};

// Shared memory a block may use (the hats plus the top-k tile's distances). Default 48 KiB, which
// needs no opt-in and leaves room for several blocks per SM. WHYMATCH_AVSL_CUDA_SMEM=BYTES sets
// another limit: above 48 KiB up to the opt-in maximum of the current device (more pairs per
// tile, fewer blocks per SM), below it down to forcing the hats into global memory. An experiment
// knob until a GPU measurement picks the default. The variable is read once per process and each
// device's opt-in maximum once per device, so that the workspace size and the launch agree when
// both are asked with the same current device (the caller makes the tensors' device current).
int64_t smem_limit_wanted() {
  static const int64_t want = [] {
    const char* e = std::getenv("WHYMATCH_AVSL_CUDA_SMEM");
    if (!e || !*e) return kSmemLimit;
    char* end = nullptr;
    const long long v = std::strtoll(e, &end, 10);
    WM_CHECK(*end == '\0' && v > 0, "WHYMATCH_AVSL_CUDA_SMEM must be a positive number of bytes, got '" << e << "'");
    return static_cast<int64_t>(v);
  }();
  return want;
}

// The opt-in maximum of device dev, asked once per device. A failed query falls back to the
// default and is cleared only when it is the runtime's only pending error (an earlier, unrelated
// error stays pending for its owner); a fallback is not cached, so a later call asks again.
int64_t device_optin(int dev) {
  static std::mutex mu;
  static std::unordered_map<int, int64_t> cache;
  {
    std::lock_guard<std::mutex> lk(mu);
    const auto it = cache.find(dev);
    if (it != cache.end()) return it->second;
  }
  const cudaError_t pending = cudaPeekAtLastError();
  int optin = 0;
  const cudaError_t e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) {
    if (pending == cudaSuccess && cudaPeekAtLastError() == e) (void)cudaGetLastError();
    return kSmemLimit;
  }
  std::lock_guard<std::mutex> lk(mu);
  cache.emplace(dev, static_cast<int64_t>(optin));
  return optin;
}

int64_t smem_limit() {
  const int64_t want = smem_limit_wanted();
  if (want <= kSmemLimit) return want;
  const cudaError_t pending = cudaPeekAtLastError();
  int dev = 0;
  const cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) {
    if (pending == cudaSuccess && cudaPeekAtLastError() == e) (void)cudaGetLastError();
    return kSmemLimit;
  }
  return std::min<int64_t>(want, device_optin(dev));
}

constexpr int kGlobalP = 8;  // the pair-group size when the hats live in global memory
constexpr int64_t kTileDistBytes = 32 * 8;  // the top-k kernel's P (<= 32) distances of a tile
// tile_forward's static shared memory: the warps' partial sums of the last level (kThreads / 32
// warps x P <= 32 pairs, double at most); the dynamic part's budget leaves room for it
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kFinalSumBytes = kWarpsPerBlock * 32 * 8;

FwdConfig forward_config(const AvslParams& p) {
  FwdConfig f;
  const int64_t es = elem_size(p), rmax = p.Rmax(), limit = smem_limit() - kTileDistBytes - kFinalSumBytes;
  const auto bytes = [&](int P) { return align256(2 * rmax * P * es); };
  f.P = 32;
  while (f.P > 1 && bytes(f.P) > limit) f.P /= 2;
  f.global = bytes(f.P) > limit;
  if (f.global) f.P = kGlobalP;
  f.hat_bytes = bytes(f.P);
  f.tiles = (p.G + f.P - 1) / f.P;
  return f;
}

// Dynamic shared memory above 48 KiB must be allowed per kernel (opt-in).
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > static_cast<size_t>(kSmemLimit))
    WM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

int64_t forward_blocks(const AvslParams& p, const FwdConfig& f) {
  return std::max<int64_t>(1, std::min<int64_t>(p.Q * f.tiles, max_forward_blocks()));
}

int64_t topk_segments(const AvslParams& p, const FwdConfig& f) {
  if (p.Q <= 0) return 1;
  const int64_t target = topk_target_blocks(), want = (target + p.Q - 1) / p.Q;
  return std::max<int64_t>(1, std::min<int64_t>(want, f.tiles));
}

constexpr int kBwdP = 8;

int64_t backward_blocks(const AvslParams& p) {
  const int64_t tiles = (p.G + kBwdP - 1) / kBwdP;
  return std::max<int64_t>(1, std::min<int64_t>(p.Q * tiles, max_backward_blocks()));
}

int64_t backward_block_bytes(const AvslParams& p) {
  return align256((2 * p.S1() + 2 * p.Rmax()) * kBwdP * elem_size(p));
}

__device__ __forceinline__ float exp_d(float v) { return expf(v); }
__device__ __forceinline__ double exp_d(double v) { return exp(v); }

extern __shared__ __align__(16) unsigned char wm_avsl_smem[];

// The forward of one tile (query i, gallery items j0 .. j0 + P - 1). buf0 / buf1: R_max x P each.
// With A_save / P_save (S1 x P each) the tile's A_l and p_l are kept for the backward. Returns (in
// registers of threads t < P) the tile's distances; the hats of the last level stay in the
// returned buffer. Every thread of the block must call it (it synchronizes).
// kP: the pair-group size when known at compile time (the global-hats and backward paths: 8),
// else 0 and P_run. Indices into the hats, A_l / p_l and the level's nodes are 32-bit (R_max * P
// and S1 * P elements fit a block's slice); only the gallery offsets (node * G + j) are 64-bit.
// Inlined into each kernel, so that the hats' loads and stores are shared-memory (LDS / STS) or
// global ones, as the caller's buffers are, not generic ones.
template <typename T, int kP>
__device__ __forceinline__ T tile_forward(const AvslParams& p, const Levels& lv, int64_t i, int64_t j0, int P_run,
                                          T* buf0, T* buf1, T* A_save, T* P_save) {
  const int P = kP ? kP : P_run;
  const int t = threadIdx.x, jj = t % P, slot = t / P, nslots = kThreads / P;
  const int64_t j = j0 + jj;
  const bool valid = j < p.G;
  const int64_t jc = valid ? j : 0;
  const T* qe = static_cast<const T*>(p.qe) + i * lv.S;
  const T* geT = static_cast<const T*>(p.ge) + jc;  // (S, G), at column jc
  const int R0 = static_cast<int>(lv.R0);
  for (int r = slot; r < R0; r += nslots) {
    const T d = __ldg(qe + r) - __ldg(geT + r * p.G);
    buf0[r * P + jj] = valid ? d * d : T(0);
  }
  __syncthreads();
  T* prev = buf0;
  T* cur = buf1;
  const T gamma = static_cast<T>(p.gamma);
  for (int l = 1; l < lv.L; ++l) {
    const int R = static_cast<int>(lv.R[l]), o = static_cast<int>(lv.off[l]), o1 = o - R0;
    const int64_t* cp = p.col_ptr + o1 + (l - 1);
    const T* vals = static_cast<const T*>(p.values);
    const T* rq = static_cast<const T*>(p.rq) + i * lv.S1;
    const T* rgT = static_cast<const T*>(p.rg) + jc;  // (S1, G), at column jc
    const T* coef = static_cast<const T*>(p.coef);
    const T* bias = static_cast<const T*>(p.bias);
    for (int c = slot; c < R; c += nslots) {
      T acc = T(0);
      const int64_t kb = __ldg(cp + c), ke = __ldg(cp + c + 1);
#pragma unroll 4  // a column has a few links (the link top-k): a 16-fold unroll mostly runs its remainder
      for (int64_t k = kb; k < ke; ++k) acc += __ldg(vals + k) * prev[static_cast<int>(__ldg(p.row_idx + k)) * P + jj];
      const int cc = o1 + c;
      const T z = gamma * (__ldg(rq + cc) * __ldg(rgT + cc * p.G) * __ldg(coef + cc) + __ldg(bias + cc));
      const T pp = T(1) / (T(1) + exp_d(-z));
      const T d = __ldg(qe + o + c) - __ldg(geT + (o + c) * p.G);
      const T h = d * d * pp + acc * (T(1) - pp);
      cur[c * P + jj] = valid ? h : T(0);
      if (A_save) {
        A_save[cc * P + jj] = acc;
        P_save[cc * P + jj] = pp;
      }
    }
    __syncthreads();
    T* tmp = prev; prev = cur; cur = tmp;
  }
  // The last level's sum over its nodes, for each pair: per slot (thread) a partial sum over
  // c = slot, slot + nslots, ..., then over the slots of a warp by shuffles (lanes jj, jj + P, ...
  // of a warp share the pair), then over the warps in a fixed order: deterministic, and every
  // thread of the block works instead of P threads walking all R nodes.
  __shared__ T warp_part[kWarpsPerBlock][32];
  const int Rl = static_cast<int>(lv.R[lv.L - 1]);  // R_max * P elements fit in shared memory or a block's slice
  T part = T(0);
  for (int c = slot; c < Rl; c += nslots) part += prev[c * P + jj];
  for (int o = 16; o >= P; o >>= 1) part += __shfl_down_sync(0xffffffffu, part, o);
  const int lane = t & 31, warp = t >> 5;
  if (lane < P) warp_part[warp][lane] = part;
  __syncthreads();
  T s = T(0);
  if (t < P)
    for (int w = 0; w < kWarpsPerBlock; ++w) s += warp_part[w][t];
  // No barrier here: after the one above, the only shared reads are these of warp_part (threads
  // t < P); every read of buf0 / buf1 by another thread's entries came before it. A caller's next
  // write to buf0 / buf1 is to the writing thread's own entries (r * P + jj with r = slot mod
  // nslots) until its next barrier, and warp_part is written again only after the first barrier
  // of the next tile_forward, which the readers reach after reading.
  return s;
}

// Where the forward / top-k kernels keep a tile's hats, a template parameter: in shared memory
// (P from the launch), or in the block's slice of a global workspace (P = 8, compile-time).
enum class Hats { Shared, Global };

template <typename T, Hats kHats>
__device__ __forceinline__ T* hat_buffers(const FwdConfig& f, unsigned char* workspace) {
  if constexpr (kHats == Hats::Global) return reinterpret_cast<T*>(workspace + blockIdx.x * f.hat_bytes);
  else return reinterpret_cast<T*>(wm_avsl_smem);
}

template <typename T, Hats kHats>
__global__ void __launch_bounds__(kThreads) avsl_forward_kernel(AvslParams p, Levels lv, FwdConfig f) {
  constexpr int kP = kHats == Hats::Global ? kGlobalP : 0;
  const int P = kP ? kP : f.P;
  T* buf0 = hat_buffers<T, kHats>(f, static_cast<unsigned char*>(p.workspace));
  T* buf1 = buf0 + static_cast<int>(lv.Rmax) * P;
  T* out = static_cast<T*>(p.out);
  const int64_t tasks = p.Q * f.tiles;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t i = task / f.tiles, j0 = (task % f.tiles) * P;
    const T d = tile_forward<T, kP>(p, lv, i, j0, P, buf0, buf1, nullptr, nullptr);
    if (static_cast<int>(threadIdx.x) < P && j0 + threadIdx.x < p.G) out[i * p.G + j0 + threadIdx.x] = d;
  }
}

// Top-k, pass 1: block task = (query i, segment seg) keeps the sorted best k of its segment.
template <typename T, Hats kHats>
__global__ void __launch_bounds__(kThreads) avsl_topk_partial_kernel(AvslParams p, Levels lv, FwdConfig f,
                                                                     int64_t nseg, T* list_d, int64_t* list_j,
                                                                     int64_t* counts, unsigned char* hat_ws) {
  constexpr int kP = kHats == Hats::Global ? kGlobalP : 0;
  const int P = kP ? kP : f.P;
  T* buf0 = hat_buffers<T, kHats>(f, hat_ws);
  T* buf1 = buf0 + static_cast<int>(lv.Rmax) * P;
  const int64_t k = p.k;
  const int lane = threadIdx.x;
  T* dt = reinterpret_cast<T*>(wm_avsl_smem + (kHats == Hats::Global ? 0 : f.hat_bytes));  // P distances of the tile
  const int64_t tasks = p.Q * nseg;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t i = task / nseg, seg = task % nseg;
    const int64_t t0 = f.tiles * seg / nseg, t1 = f.tiles * (seg + 1) / nseg;
    T* ld = list_d + task * k;
    int64_t* lj = list_j + task * k;
    int64_t cnt = 0;  // meaningful in thread 0 only
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t j0 = tile * P;
      const T d = tile_forward<T, kP>(p, lv, i, j0, P, buf0, buf1, nullptr, nullptr);
      if (lane < P) dt[lane] = d;
      __syncthreads();
      if (lane == 0) {
        for (int jj = 0; jj < P; ++jj) {
          const int64_t j = j0 + jj;
          if (j >= p.G || (p.exclude_self && j == i)) continue;
          avsl_topk_insert(dt[jj], j, ld, lj, cnt, k);
        }
      }
      // No barrier here: lane 0's reads of dt end before it enters the next tile_forward, and dt
      // is written again only after that call returns, i.e. after its barriers, which lane 0
      // must reach too.
    }
    if (lane == 0) counts[task] = cnt;
  }
}

// Top-k, pass 2: one block per query merges its nseg sorted lists (see the file's header).
constexpr int kMergeThreads = 128;

// The better of two candidates (seg < 0: none). Gallery indices are unique across segments, so the
// winner does not depend on the order of the reduction.
template <typename T>
__device__ __forceinline__ void merge_pick(T& d, int64_t& j, int64_t& seg, T d2, int64_t j2, int64_t seg2) {
  if (seg2 >= 0 && (seg < 0 || avsl_before(d2, j2, d, j))) { d = d2; j = j2; seg = seg2; }
}

template <typename T>
__global__ void __launch_bounds__(kMergeThreads) avsl_topk_merge_kernel(AvslParams p, int64_t nseg, const T* list_d,
                                                                        const int64_t* list_j, const int64_t* counts,
                                                                        int64_t* heads) {
  constexpr int kWarps = kMergeThreads / 32;
  __shared__ T win_d[2][kWarps];  // double-buffered by output parity: one barrier per output
  __shared__ int64_t win_j[2][kWarps];
  __shared__ int64_t win_s[2][kWarps];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int64_t k = p.k;
  for (int64_t i = blockIdx.x; i < p.Q; i += gridDim.x) {
    int64_t* head = heads + i * nseg;
    const int64_t* cnt = counts + i * nseg;
    // this thread's best head over its segments
    T bd = T(0);
    int64_t bj = 0, bs = -1;
    for (int64_t s = t; s < nseg; s += kMergeThreads) {
      head[s] = 0;
      if (cnt[s] > 0) merge_pick(bd, bj, bs, list_d[(i * nseg + s) * k], list_j[(i * nseg + s) * k], s);
    }
    T* out_d = static_cast<T*>(p.topk_values) + i * k;
    int64_t* out_j = p.topk_indices + i * k;
    for (int64_t m = 0; m < k; ++m) {
      T d = bd;
      int64_t j = bj, sg = bs;
      for (int o = 16; o > 0; o >>= 1) {
        const T d2 = __shfl_down_sync(0xffffffffu, d, o);
        const int64_t j2 = __shfl_down_sync(0xffffffffu, j, o), s2 = __shfl_down_sync(0xffffffffu, sg, o);
        if (lane + o < 32) merge_pick(d, j, sg, d2, j2, s2);
      }
      const int buf = static_cast<int>(m & 1);
      if (lane == 0) { win_d[buf][warp] = d; win_j[buf][warp] = j; win_s[buf][warp] = sg; }
      __syncthreads();
      d = win_d[buf][0]; j = win_j[buf][0]; sg = win_s[buf][0];
      for (int w = 1; w < kWarps; ++w) merge_pick(d, j, sg, win_d[buf][w], win_j[buf][w], win_s[buf][w]);
      if (sg < 0) {  // cannot happen when k <= candidates
        if (t == 0) { out_d[m] = T(0); out_j[m] = -1; }
        continue;
      }
      if (t == 0) { out_d[m] = d; out_j[m] = j; }
      if (sg % kMergeThreads == t) {  // the owner advances the winner's segment and rescans its own
        ++head[sg];
        bs = -1;
        for (int64_t s = t; s < nseg; s += kMergeThreads) {
          const int64_t h = head[s];
          if (h >= cnt[s]) continue;
          const int64_t j = list_j[(i * nseg + s) * k + h];
          merge_pick(bd, bj, bs, list_d[(i * nseg + s) * k + h], j, s);
        }
      }
    }
    // A block with another query (Q > the merge grid): with k odd this query's last output used
    // buffer 0, which the next query's first output writes; wait until every thread has read it
    // (tests/test_emulated_barriers.py lowers the grid to run this).
    __syncthreads();
  }
}

// Backward: per tile, recompute the forward (keeping A_l, p_l), then walk the levels down.
template <typename T>
__global__ void __launch_bounds__(kThreads) avsl_backward_kernel(AvslParams p, Levels lv, int64_t block_bytes,
                                                                 double* partials) {
  constexpr int P = kBwdP;
  unsigned char* base = static_cast<unsigned char*>(p.workspace) + blockIdx.x * block_bytes;
  T* A_save = reinterpret_cast<T*>(base);
  T* P_save = A_save + lv.S1 * P;
  T* buf0 = P_save + lv.S1 * P;
  T* buf1 = buf0 + lv.Rmax * P;
  double* part_b = partials + blockIdx.x * 2 * lv.S1;
  double* part_c = part_b + lv.S1;
  // Zeroed by threads other than those that accumulate; no barrier needed here: every block has
  // a task (blocks <= tasks) and the first barrier of its first tile_forward orders the zeroing
  // before the first accumulation.
  for (int64_t c = threadIdx.x; c < 2 * lv.S1; c += blockDim.x) part_b[c] = 0.0;
  const int t = threadIdx.x, jj = t % P, slot = t / P, nslots = blockDim.x / P;
  const int64_t tiles = (p.G + P - 1) / P, tasks = p.Q * tiles;
  const T gamma = static_cast<T>(p.gamma);
  const T* g = static_cast<const T*>(p.grad_out);
  const T* qe_all = static_cast<const T*>(p.qe);
  const T* geT = static_cast<const T*>(p.ge);
  const T* rgT = static_cast<const T*>(p.rg);
  const T* rv = static_cast<const T*>(p.row_values);
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t i = task / tiles, j0 = (task % tiles) * P, j = j0 + jj;
    const bool valid = j < p.G;
    const int64_t jc = valid ? j : 0;
    tile_forward<T, P>(p, lv, i, j0, P, buf0, buf1, A_save, P_save);
    const T* qe = qe_all + i * lv.S;
    const T* rq = static_cast<const T*>(p.rq) + i * lv.S1;
    T* u = buf0;
    T* un = buf1;
    const int top = lv.L - 1;
    const T gij = valid ? g[i * p.G + j] : T(0);
    // No barrier after this: the top level reads and rewrites only u[c * P + jj] with c = slot mod
    // nslots, the entries this thread wrote (and tile_forward's last barrier ordered every other
    // thread's reads of buf0 before these writes).
    for (int64_t c = slot; c < lv.R[top]; c += nslots) u[c * P + jj] = gij;
    for (int l = top; l >= 1; --l) {
      const int64_t R = lv.R[l], o = lv.off[l], o1 = o - lv.R0;
      for (int64_t cb = 0; cb < R; cb += nslots) {  // the same trip count for every thread: shuffles below
        const int64_t c = cb + slot;
        const bool act = c < R;
        T s = T(0), sr = T(0);
        if (act) {
          const int64_t cc = o1 + c;
          const T pp = P_save[cc * P + jj], q = T(1) - pp;
          const T d = __ldg(qe + o + c) - __ldg(geT + (o + c) * p.G + jc);
          const T uu = u[c * P + jj];
          s = uu * (d * d - A_save[cc * P + jj]) * pp * q;
          sr = s * __ldg(rgT + cc * p.G + jc);
          u[c * P + jj] = uu * q;
        }
        for (int w = P / 2; w > 0; w /= 2) {  // sum over the P threads of the column (aligned in the warp)
          s += __shfl_down_sync(0xffffffffu, s, w, P);
          sr += __shfl_down_sync(0xffffffffu, sr, w, P);
        }
        if (act && jj == 0) {
          const int64_t cc = o1 + c;
          part_b[cc] += static_cast<double>(gamma * s);
          part_c[cc] += static_cast<double>(gamma * __ldg(rq + cc) * sr);
        }
      }
      __syncthreads();
      if (l > 1) {
        const int64_t* rp = p.row_ptr + lv.off[l - 1] + (l - 1);
        for (int64_t r = slot; r < lv.R[l - 1]; r += nslots) {
          T acc = T(0);
          const int64_t kb = __ldg(rp + r), ke = __ldg(rp + r + 1);
          for (int64_t k = kb; k < ke; ++k) acc += __ldg(rv + k) * u[static_cast<int64_t>(__ldg(p.col_idx + k)) * P + jj];
          un[r * P + jj] = acc;
        }
        // No barrier here: the next level reads and rewrites only its own entries of un (the new
        // u: r = slot mod nslots), and its barrier after the shuffles comes before anything writes
        // the old u (the new un), which the gather above read.
        T* tmp = u; u = un; un = tmp;
      }
    }
    // No barrier at the end of a tile: level 1 reads only this thread's own entries (u, A_save,
    // P_save) and the next tile_forward writes its own entries of buf0, A_save and P_save before
    // its first barrier; every read of another thread's entries came before level 1's barrier.
  }
}

template <typename T>
__global__ void avsl_backward_reduce_kernel(int64_t S1, int64_t blocks, const double* partials, T* grad_coef,
                                            T* grad_bias) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= S1) return;
  double sb = 0.0, sc = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    sb += partials[b * 2 * S1 + c];
    sc += partials[b * 2 * S1 + S1 + c];
  }
  grad_bias[c] = static_cast<T>(sb);
  grad_coef[c] = static_cast<T>(sc);
}

// Top-k workspace sections: lists (values, indices), counts, merge heads, then the hats (global mode).
struct TopkLayout {
  int64_t nseg, list_d, list_j, counts, heads, hats, total;
};

TopkLayout topk_layout(const AvslParams& p, const FwdConfig& f) {
  TopkLayout t;
  t.nseg = topk_segments(p, f);
  const int64_t lists = p.Q * t.nseg;
  t.list_d = 0;
  t.list_j = align256(lists * p.k * elem_size(p));
  t.counts = t.list_j + align256(lists * p.k * 8);
  t.heads = t.counts + align256(lists * 8);
  t.hats = t.heads + align256(lists * 8);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(lists, max_forward_blocks()));
  t.total = t.hats + (f.global ? blocks * f.hat_bytes : 0);
  return t;
}

}  // namespace

int64_t avsl_workspace_bytes_cuda(const AvslParams& p, AvslWorkspace kernel) {
  if (p.Q * p.G == 0 && kernel != AvslWorkspace::kTopk) return 0;
  if (kernel == AvslWorkspace::kDistance) {
    const FwdConfig f = forward_config(p);
    return f.global ? forward_blocks(p, f) * f.hat_bytes : 0;
  }
  if (kernel == AvslWorkspace::kBackward) {
    if (p.S1() == 0) return 0;
    return backward_blocks(p) * (backward_block_bytes(p) + align256(2 * p.S1() * 8));
  }
  WM_CHECK(kernel == AvslWorkspace::kTopk,
           "avsl_workspace_bytes: kernel code must be 0, 1 or 2, got " << static_cast<int>(kernel));
  if (p.Q == 0) return 0;
  return topk_layout(p, forward_config(p)).total;
}

void avsl_distance_cuda(const AvslParams& p, void* stream) {
  check_avsl(p, "avsl_distance", false, false);
  if (p.Q * p.G == 0) return;
  const FwdConfig f = forward_config(p);
  WM_CHECK(!f.global || p.workspace, "avsl_distance: null workspace pointer");
  const Levels lv = levels_of(p);
  const unsigned int blocks = static_cast<unsigned int>(forward_blocks(p, f));
  const size_t smem = f.global ? 0 : static_cast<size_t>(f.hat_bytes);
  auto st = static_cast<cudaStream_t>(stream);
  WM_CUDA_CHECK_PENDING("avsl_distance");
  const auto launch = [&](auto kernel) {
    allow_smem(kernel, smem);
    kernel<<<blocks, kThreads, smem, st>>>(p, lv, f);
  };
  if (p.dtype == DType::F64)
    f.global ? launch(avsl_forward_kernel<double, Hats::Global>) : launch(avsl_forward_kernel<double, Hats::Shared>);
  else
    f.global ? launch(avsl_forward_kernel<float, Hats::Global>) : launch(avsl_forward_kernel<float, Hats::Shared>);
  WM_CUDA_LAUNCH_CHECK();
}

void avsl_topk_cuda(const AvslParams& p, void* stream) {
  check_avsl(p, "avsl_topk", false, true);
  if (p.Q == 0) return;
  WM_CHECK(p.workspace, "avsl_topk: null workspace pointer");
  const FwdConfig f = forward_config(p);
  const TopkLayout t = topk_layout(p, f);
  const Levels lv = levels_of(p);
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);
  const int64_t lists = p.Q * t.nseg;
  const unsigned int blocks = static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(lists, max_forward_blocks())));
  const size_t smem = static_cast<size_t>((f.global ? 0 : f.hat_bytes) + kTileDistBytes);  // + the tile's distances
  auto st = static_cast<cudaStream_t>(stream);
  const unsigned int mblocks = static_cast<unsigned int>(std::min<int64_t>(p.Q, max_merge_blocks()));
  auto* lj = reinterpret_cast<int64_t*>(ws + t.list_j);
  auto* counts = reinterpret_cast<int64_t*>(ws + t.counts);
  auto* heads = reinterpret_cast<int64_t*>(ws + t.heads);
  WM_CUDA_CHECK_PENDING("avsl_topk");
  const auto partial = [&](auto kernel, auto* ld) {
    allow_smem(kernel, smem);
    kernel<<<blocks, kThreads, smem, st>>>(p, lv, f, t.nseg, ld, lj, counts, ws + t.hats);
    WM_CUDA_LAUNCH_CHECK();
  };
  if (p.dtype == DType::F64) {
    auto* ld = reinterpret_cast<double*>(ws + t.list_d);
    f.global ? partial(avsl_topk_partial_kernel<double, Hats::Global>, ld)
             : partial(avsl_topk_partial_kernel<double, Hats::Shared>, ld);
    avsl_topk_merge_kernel<double><<<mblocks, kMergeThreads, 0, st>>>(p, t.nseg, ld, lj, counts, heads);
  } else {
    auto* ld = reinterpret_cast<float*>(ws + t.list_d);
    f.global ? partial(avsl_topk_partial_kernel<float, Hats::Global>, ld)
             : partial(avsl_topk_partial_kernel<float, Hats::Shared>, ld);
    avsl_topk_merge_kernel<float><<<mblocks, kMergeThreads, 0, st>>>(p, t.nseg, ld, lj, counts, heads);
  }
  WM_CUDA_LAUNCH_CHECK();
}

void avsl_distance_backward_cuda(const AvslParams& p, void* stream) {
  check_avsl(p, "avsl_distance_backward", true, false);
  const int64_t S1 = p.S1();
  if (S1 == 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  const int64_t es = elem_size(p);
  WM_CUDA_CHECK_PENDING("avsl_distance_backward");
  if (p.Q * p.G == 0) {
    WM_CUDA_CHECK(cudaMemsetAsync(p.grad_coef, 0, S1 * es, st));
    WM_CUDA_CHECK(cudaMemsetAsync(p.grad_bias, 0, S1 * es, st));
    return;
  }
  WM_CHECK(p.workspace, "avsl_distance_backward: null workspace pointer");
  const Levels lv = levels_of(p);
  const int64_t blocks = backward_blocks(p), bb = backward_block_bytes(p);
  double* partials = reinterpret_cast<double*>(static_cast<unsigned char*>(p.workspace) + blocks * bb);
  const unsigned int rblocks = ceil_div(S1, 256);
  if (p.dtype == DType::F64) {
    avsl_backward_kernel<double><<<static_cast<unsigned int>(blocks), kThreads, 0, st>>>(p, lv, bb, partials);
    WM_CUDA_LAUNCH_CHECK();
    avsl_backward_reduce_kernel<double><<<rblocks, 256, 0, st>>>(S1, blocks, partials, static_cast<double*>(p.grad_coef),
                                                                 static_cast<double*>(p.grad_bias));
  } else {
    avsl_backward_kernel<float><<<static_cast<unsigned int>(blocks), kThreads, 0, st>>>(p, lv, bb, partials);
    WM_CUDA_LAUNCH_CHECK();
    avsl_backward_reduce_kernel<float><<<rblocks, 256, 0, st>>>(S1, blocks, partials, static_cast<float*>(p.grad_coef),
                                                                static_cast<float*>(p.grad_bias));
  }
  WM_CUDA_LAUNCH_CHECK();
}

}  // namespace whymatch
