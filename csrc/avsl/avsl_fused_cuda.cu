// The fused kernels around the cuBLAS GEMMs of the AVSL cuBLAS path; see avsl/avsl_fused.h.
//
// prologue, blend, epilogue of the distances: one warp per pair (grid-stride over the warps), lane:
// columns lane, lane + 32, ... (coalesced: a pair's columns are contiguous in hat, qe, ge, rq, rg);
// the epilogue sums with a butterfly and lane 0 writes d_ij. Top-k epilogue: a block of 256 threads
// per query of the chunk, its gallery in tiles of 64 pairs (8 per warp) into shared memory; after a
// barrier thread 0 inserts the tile's candidates in index order into the query's sorted output
// rows; a second barrier before the next tile overwrites the shared distances.
#include <algorithm>

#include "avsl/avsl_distance.h"
#include "avsl/avsl_fused.h"
#include "common/cuda_utils.cuh"

namespace whymatch {
namespace {

constexpr int kFusedThreads = 256;
constexpr int kFusedTile = 64;  // the top-k epilogue's pairs per tile
constexpr int64_t kFusedMaxBlocks = 1 << 16;

// Pair (i, j)'s rows of the level's columns, for fused_value.
struct PairRows {
  const float *qe, *ge, *rq, *rg, *coef, *bias;
};

__device__ __forceinline__ PairRows pair_rows(const AvslFusedParams& p, int64_t i, int64_t j) {
  return {p.qe + i * p.S + p.off, p.ge + j * p.S + p.off, p.rq + i * p.S1 + p.o1, p.rg + j * p.S1 + p.o1,
          p.coef + p.o1, p.bias + p.o1};
}

// The level's value hat_l[c] of a pair from the GEMM output a = A_l[c] (level 0: delta_0[c], a unused).
__device__ __forceinline__ float fused_value(const PairRows& r, int level, float gamma, int64_t c, float a) {
  const float d = __ldg(r.qe + c) - __ldg(r.ge + c);
  const float delta = d * d;
  if (level == 0) return delta;
  const float z = gamma * (__ldg(r.rq + c) * __ldg(r.rg + c) * __ldg(r.coef + c) + __ldg(r.bias + c));
  const float pr = 1.f / (1.f + expf(-z));
  return delta * pr + a * (1.f - pr);
}

// One warp per pair of the chunk (grid-stride over the warps), lanes over the columns (coalesced).
__device__ __forceinline__ int64_t first_warp() {
  return blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5);
}
__device__ __forceinline__ int64_t total_warps() { return static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5); }

__global__ void avsl_fused_prologue_kernel(AvslFusedParams p) {
  const int lane = threadIdx.x & 31;
  for (int64_t m = first_warp(); m < p.nq * p.ng; m += total_warps()) {
    const PairRows r = pair_rows(p, p.q0 + m / p.ng, p.g0 + m % p.ng);
    float* h = p.hat + m * p.R;
    for (int64_t c = lane; c < p.R; c += 32) h[c] = fused_value(r, 0, 0.f, c, 0.f);
  }
}

__global__ void avsl_fused_blend_kernel(AvslFusedParams p) {
  const int lane = threadIdx.x & 31;
  for (int64_t m = first_warp(); m < p.nq * p.ng; m += total_warps()) {
    const PairRows r = pair_rows(p, p.q0 + m / p.ng, p.g0 + m % p.ng);
    float* h = p.hat + m * p.R;
    for (int64_t c = lane; c < p.R; c += 32) h[c] = fused_value(r, p.level, p.gamma, c, h[c]);
  }
}

// d_ij of the chunk's pair m, in every lane of the calling warp (all 32 lanes call it).
__device__ __forceinline__ float fused_pair(const AvslFusedParams& p, int64_t m, int lane) {
  const PairRows r = pair_rows(p, p.q0 + m / p.ng, p.g0 + m % p.ng);
  const float* a = p.hat ? p.hat + m * p.R : nullptr;
  float s = 0.f;
  for (int64_t c = lane; c < p.R; c += 32) s += fused_value(r, p.level, p.gamma, c, a ? a[c] : 0.f);
  // butterfly: x + y == y + x, so every lane ends with the same bits
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

__global__ void avsl_fused_distance_kernel(AvslFusedParams p) {
  const int lane = threadIdx.x & 31;
  for (int64_t m = first_warp(); m < p.nq * p.ng; m += total_warps()) {
    const float d = fused_pair(p, m, lane);
    if (lane == 0) p.out[(p.q0 + m / p.ng) * p.G + p.g0 + m % p.ng] = d;
  }
}

__global__ void avsl_fused_topk_kernel(AvslFusedParams p) {
  __shared__ float dist[kFusedTile];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5, nwarps = blockDim.x >> 5;
  for (int64_t qi = blockIdx.x; qi < p.nq; qi += gridDim.x) {
    const int64_t i = p.q0 + qi;
    float* ld = p.topk_values + i * p.k;
    int64_t* lj = p.topk_indices + i * p.k;
    // the entries that the chunks over [0, g0) left in the list
    const int64_t before = p.g0 - (p.exclude_self && i < p.g0 ? 1 : 0);
    int64_t cnt = before < p.k ? before : p.k;  // read and updated by thread 0 only
    for (int64_t t0 = 0; t0 < p.ng; t0 += kFusedTile) {
      const int64_t n = p.ng - t0 < kFusedTile ? p.ng - t0 : kFusedTile;
      for (int w = warp; w < n; w += nwarps) {
        const float d = fused_pair(p, qi * p.ng + t0 + w, lane);
        if (lane == 0) dist[w] = d;
      }
      __syncthreads();  // the tile's distances are in shared memory
      if (t == 0) {
        for (int w = 0; w < n; ++w) {
          const int64_t j = p.g0 + t0 + w;
          if (p.exclude_self && j == i) continue;
          avsl_topk_insert(dist[w], j, ld, lj, cnt, p.k);
        }
      }
      __syncthreads();  // thread 0 has read the tile: the next one may overwrite it
    }
  }
}

void check_fused(const AvslFusedParams& p, const char* op) {
  WM_CHECK(p.q0 >= 0 && p.nq >= 0 && p.q0 + p.nq <= p.Q,
           op << ": the query chunk [" << p.q0 << ", " << p.q0 + p.nq << ") must lie in [0, " << p.Q << ")");
  WM_CHECK(p.g0 >= 0 && p.ng >= 0 && p.g0 + p.ng <= p.G,
           op << ": the gallery chunk [" << p.g0 << ", " << p.g0 + p.ng << ") must lie in [0, " << p.G << ")");
  WM_CHECK(p.R >= 1 && p.off >= 0 && p.off + p.R <= p.S,
           op << ": level columns [" << p.off << ", " << p.off + p.R << ") must lie in [0, " << p.S << ")");
  WM_CHECK(p.level == 0 || (p.o1 >= 0 && p.o1 + p.R <= p.S1),
           op << ": level columns [" << p.o1 << ", " << p.o1 + p.R << ") must lie in [0, " << p.S1 << ") of rq");
  if (p.nq * p.ng == 0) return;
  WM_CHECK(p.qe && p.ge, op << ": null embedding pointer");
  WM_CHECK(p.level == 0 || (p.rq && p.rg && p.coef && p.bias), op << ": null reliability/coef/bias pointer");
}

// Blocks of the warp-per-pair kernels: one warp per pair, at most kFusedMaxBlocks.
unsigned pair_blocks(int64_t pairs) {
  const int64_t warps = kFusedThreads / 32;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(1, (pairs + warps - 1) / warps), kFusedMaxBlocks));
}

}  // namespace

void avsl_fused_prologue_cuda(const AvslFusedParams& p, void* stream) {
  check_fused(p, "avsl_fused_prologue");
  WM_CHECK(p.level == 0, "avsl_fused_prologue: level must be 0, got " << p.level);
  if (p.nq * p.ng == 0) return;
  WM_CHECK(p.hat, "avsl_fused_prologue: null hat pointer");
  WM_CUDA_CHECK_PENDING("avsl_fused_prologue");
  avsl_fused_prologue_kernel<<<pair_blocks(p.nq * p.ng), kFusedThreads, 0,
                               static_cast<cudaStream_t>(stream)>>>(p);
  WM_CUDA_LAUNCH_CHECK();
}

void avsl_fused_blend_cuda(const AvslFusedParams& p, void* stream) {
  check_fused(p, "avsl_fused_blend");
  WM_CHECK(p.level >= 1, "avsl_fused_blend: level must be >= 1, got " << p.level);
  if (p.nq * p.ng == 0) return;
  WM_CHECK(p.hat, "avsl_fused_blend: null hat pointer");
  WM_CUDA_CHECK_PENDING("avsl_fused_blend");
  avsl_fused_blend_kernel<<<pair_blocks(p.nq * p.ng), kFusedThreads, 0,
                            static_cast<cudaStream_t>(stream)>>>(p);
  WM_CUDA_LAUNCH_CHECK();
}

void avsl_fused_epilogue_cuda(const AvslFusedParams& p, void* stream) {
  const char* op = "avsl_fused_epilogue";
  check_fused(p, op);
  WM_CHECK((p.level == 0) == (p.hat == nullptr) || p.nq * p.ng == 0,
           op << ": hat must be given exactly for a level >= 1, got level " << p.level);
  const bool topk = p.out == nullptr;
  if (topk) {
    WM_CHECK(p.k >= 1, op << ": k must be >= 1, got " << p.k);
    WM_CHECK(!p.exclude_self || p.Q == p.G, op << ": exclude_self needs Q == G, got Q=" << p.Q << " G=" << p.G);
  }
  if (p.nq * p.ng == 0) return;
  WM_CHECK(!topk || (p.topk_values && p.topk_indices), op << ": null output pointer");
  auto st = static_cast<cudaStream_t>(stream);
  WM_CUDA_CHECK_PENDING(op);
  if (topk) {
    avsl_fused_topk_kernel<<<static_cast<unsigned>(std::min<int64_t>(p.nq, kFusedMaxBlocks)), kFusedThreads, 0,
                             st>>>(p);
  } else {
    avsl_fused_distance_kernel<<<pair_blocks(p.nq * p.ng), kFusedThreads, 0, st>>>(p);
  }
  WM_CUDA_LAUNCH_CHECK();
}

}  // namespace whymatch
