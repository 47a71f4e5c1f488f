// Tensor-core (WMMA tf32, 3xTF32 split) kernels of the AVSL rectified distance and its top-k; see
// avsl/avsl_tensorcore.h for the tiling and the numerics.
//
// Block: 256 threads = 8 warps, one tile of 64 pairs at a time: 4 queries i0 .. i0 + 3 x 16 gallery
// items j0 .. j0 + 15, pair (row) m = 16 (i - i0) + (j - j0). Four queries share each gallery item's
// reads (a quarter of the gallery traffic of a one-query tile; the 4 query rows stay in L1).
// hat buffer: 64 rows x ld floats in dynamic shared memory, row-major, ld = Rp + 4 (a multiple of
// 4 elements as WMMA requires; the +4 spreads the rows over the banks). GEMM of level l: warp w
// owns the column tiles n = w, w + 8, w + 16, w + 24 (of Rp_l / 16) and all 4 row tiles, so each
// link fragment is read once per tile from L2 and the a fragments of the hats from shared memory.
#include <mma.h>

#include <algorithm>
#include <cstdlib>

#include "avsl/avsl_tensorcore.h"
#include "common/cuda_utils.cuh"

namespace whymatch {
namespace {

constexpr int kTcThreads = 256;
constexpr int kTcWarps = kTcThreads / 32;
constexpr int kTcRowTiles = kAvslTcPairs / 16;  // 4
constexpr int kTcColSlots = 4;                  // 8 warps x 4 x 16 = 512 columns
constexpr int kTcQueries = 4, kTcGallery = 16;  // a tile: 4 queries x 16 gallery items
static_assert(kTcQueries * kTcGallery == kAvslTcPairs, "a tile's pairs");
static_assert(kTcWarps * kTcColSlots * 16 == kAvslTcMaxNodes, "the accumulators cover every column");
constexpr int64_t kTcMaxBlocks = 1 << 20;
constexpr int64_t kTcSmemDefault = 48 * 1024;

struct TcLevels {
  int L;
  int64_t G, S, S1, R0;
  int64_t R[kAvslMaxLevels], Rp[kAvslMaxLevels], off[kAvslMaxLevels];
  int64_t dense_off[kAvslMaxLevels];  // level pair l (l >= 1): offset of link*_{l-1} in the dense links
  int64_t split_off[kAvslMaxLevels];  // level pair l: offset (floats) of its hi matrix; lo follows it
  int64_t split_total;                // floats
};

TcLevels tc_levels(const AvslParams& p) {
  TcLevels lv{};
  lv.L = p.L;
  lv.G = p.G;
  lv.S = p.S();
  lv.S1 = p.S1();
  lv.R0 = p.R[0];
  int64_t dense = 0, split = 0;
  for (int l = 0; l < p.L; ++l) {
    lv.R[l] = p.R[l];
    lv.Rp[l] = avsl_tc_pad(p.R[l]);
    lv.off[l] = p.off(l);
    if (l >= 1) {
      lv.dense_off[l] = dense;
      dense += p.R[l - 1] * p.R[l];
      lv.split_off[l] = split;
      split += (2 * lv.Rp[l - 1] * lv.Rp[l] + 63) / 64 * 64;  // 256-byte aligned matrices
    }
  }
  lv.split_total = split;
  return lv;
}

extern __shared__ __align__(128) unsigned char wm_avsl_tc_smem[];

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define WM_AVSL_TC_ENABLED 1
#endif

// link*_{l-1} (R_{l-1} x R_l, row-major) -> padded hi and lo matrices (Rp_{l-1} x Rp_l), zeros outside.
__global__ void avsl_tc_split_links_kernel(TcLevels lv, const float* dense, float* split) {
#ifdef WM_AVSL_TC_ENABLED
  for (int l = 1; l < lv.L; ++l) {
    const int64_t K = lv.R[l - 1], N = lv.R[l], Kp = lv.Rp[l - 1], Np = lv.Rp[l];
    float* hi = split + lv.split_off[l];
    float* lo = hi + Kp * Np;
    for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < Kp * Np;
         e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t r = e / Np, c = e % Np;
      const float v = (r < K && c < N) ? dense[lv.dense_off[l] + r * N + c] : 0.f;
      const float h = nvcuda::wmma::__float_to_tf32(v);
      hi[e] = h;
      lo[e] = nvcuda::wmma::__float_to_tf32(v - h);
    }
  }
#endif
}

using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8, nvcuda::wmma::precision::tf32,
                                     nvcuda::wmma::row_major>;
using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 8, nvcuda::wmma::precision::tf32,
                                     nvcuda::wmma::row_major>;
using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float>;

// Round to nearest tf32, ties away from zero: __float_to_tf32 (cvt.rna.tf32.f32) for every finite
// value and for inf and the canonical NaN, in two integer operations (the hats are finite or
// canonical NaN); a NaN whose payload lies only in the low 13 bits would become inf.
__device__ __forceinline__ float tf32_rna(float v) {
  return __uint_as_float((__float_as_uint(v) + 0x1000u) & 0xffffe000u);
}

// acc[mt][s] = hat (64 x Kp, ld lda) @ link* columns of tile n = warp + 8 s (s < NS, or < nslots when
// NS == 0), 3xTF32: a_lo b_hi + a_hi b_lo + a_hi b_hi, the small terms first.
template <int NS>
__device__ __forceinline__ void tc_gemm(FragC (&acc)[kTcRowTiles][kTcColSlots], int nslots, const float* hat, int lda,
                                        const float* bhi, const float* blo, int Kp, int Np, int warp) {
  namespace wmma = nvcuda::wmma;
  const int ns = NS > 0 ? NS : nslots;
#pragma unroll
  for (int mt = 0; mt < kTcRowTiles; ++mt)
#pragma unroll
    for (int s = 0; s < kTcColSlots; ++s)
      if (s < ns) wmma::fill_fragment(acc[mt][s], 0.f);
  const float* bh = bhi + warp * 16;
  const float* bl = blo + warp * 16;
  for (int k0 = 0; k0 < Kp; k0 += 8, bh += 8 * Np, bl += 8 * Np) {
    FragB b_hi[kTcColSlots], b_lo[kTcColSlots];
#pragma unroll
    for (int s = 0; s < kTcColSlots; ++s)
      if (s < ns) {
        wmma::load_matrix_sync(b_hi[s], bh + s * kTcWarps * 16, static_cast<unsigned>(Np));
        wmma::load_matrix_sync(b_lo[s], bl + s * kTcWarps * 16, static_cast<unsigned>(Np));
      }
#pragma unroll
    for (int mt = 0; mt < kTcRowTiles; ++mt) {
      FragA a_hi, a_lo;
      wmma::load_matrix_sync(a_hi, hat + mt * 16 * lda + k0, static_cast<unsigned>(lda));
      for (int e = 0; e < a_hi.num_elements; ++e) {
        const float v = a_hi.x[e], h = tf32_rna(v);
        a_hi.x[e] = h;
        a_lo.x[e] = tf32_rna(v - h);
      }
#pragma unroll
      for (int s = 0; s < kTcColSlots; ++s)
        if (s < ns) {
          wmma::mma_sync(acc[mt][s], a_lo, b_hi[s], acc[mt][s]);
          wmma::mma_sync(acc[mt][s], a_hi, b_lo[s], acc[mt][s]);
          wmma::mma_sync(acc[mt][s], a_hi, b_hi[s], acc[mt][s]);
        }
    }
  }
}

// The distances of one tile, in the row sums: returns, in threads t with t % 4 == 0, the distance
// of pair m = t / 4 (query i0 + m / 16, gallery item j0 + m % 16). Every thread of the block calls
// it (it synchronizes); on return the hat buffer may be written again (a barrier follows the last
// read). Queries >= Q and gallery items >= G are clamped to the last one (computed, not reported).
__device__ __forceinline__ float tc_tile(const AvslParams& p, const TcLevels& lv, const float* split, int64_t i0,
                                         int64_t j0, float* hat) {
  float result = 0.f;
#ifdef WM_AVSL_TC_ENABLED
  namespace wmma = nvcuda::wmma;
  const int t = threadIdx.x, warp = t >> 5, lane = t & 31;
  const int64_t G = lv.G, Q = p.Q;
  const float* qe_all = static_cast<const float*>(p.qe);
  const float* geT = static_cast<const float*>(p.ge);  // (S, G)
  // prologue: hat_0 = (a - b)^2, zero in the padding columns; thread t: pair t % 64, columns t / 64 + 4 s
  {
    const int m = t % kAvslTcPairs, ld = static_cast<int>(lv.Rp[0]) + 4, R0 = static_cast<int>(lv.R0);
    const int64_t ic = i0 + m / kTcGallery < Q ? i0 + m / kTcGallery : Q - 1;
    const int64_t jc = j0 + m % kTcGallery < G ? j0 + m % kTcGallery : G - 1;
    const float* qp = qe_all + ic * lv.S;
    const float* gp = geT + jc;
    for (int r = t / kAvslTcPairs; r < ld - 4; r += kTcThreads / kAvslTcPairs) {
      float h = 0.f;
      if (r < R0) {
        const float d = __ldg(qp + r) - __ldg(gp + r * G);
        h = d * d;
      }
      hat[m * ld + r] = h;
    }
  }
  __syncthreads();
  const float gamma = static_cast<float>(p.gamma);
  const float* rq_all = static_cast<const float*>(p.rq);
  const float* rgT = static_cast<const float*>(p.rg);  // (S1, G)
  const float* coef = static_cast<const float*>(p.coef);
  const float* bias = static_cast<const float*>(p.bias);
  for (int l = 1; l < lv.L; ++l) {
    const int64_t Kp = lv.Rp[l - 1], Np = lv.Rp[l], lda = Kp + 4, ldo = Np + 4, nct = Np / 16;
    const float* bhi = split + lv.split_off[l];
    const float* blo = bhi + Kp * Np;
    int nslots = 0;  // this warp's column tiles: warp + 8 s, s < nslots (uniform over the warp)
    while (nslots < kTcColSlots && warp + kTcWarps * nslots < nct) ++nslots;
    FragC acc[kTcRowTiles][kTcColSlots];
    // the whole-width case (every warp 4 column tiles: R_l > 384) without a branch in the K loop
    if (nslots == kTcColSlots) {
      tc_gemm<kTcColSlots>(acc, nslots, hat, static_cast<int>(lda), bhi, blo, static_cast<int>(Kp),
                           static_cast<int>(Np), warp);
    } else if (nslots > 0) {
      tc_gemm<0>(acc, nslots, hat, static_cast<int>(lda), bhi, blo, static_cast<int>(Kp), static_cast<int>(Np), warp);
    }
    __syncthreads();  // every warp has read hat_{l-1}: hat_l may overwrite it
    if (nslots > 0) {
      for (int mt = 0; mt < kTcRowTiles; ++mt)
        for (int s = 0; s < nslots; ++s)
          wmma::store_matrix_sync(hat + mt * 16 * ldo + (warp + kTcWarps * s) * 16, acc[mt][s],
                                  static_cast<unsigned>(ldo), wmma::mem_row_major);
      __syncwarp();
      // epilogue on this warp's tiles: hat_l = delta_l p_l + A_l (1 - p_l), zero in the padding.
      // Lane: rows lane and lane + 32, i.e. queries i0 + lane / 16 and i0 + 2 + lane / 16 with the
      // same gallery item j0 + lane % 16, whose reliability and embedding are loaded once for both.
      const int R = static_cast<int>(lv.R[l]);
      const int64_t o = lv.off[l], o1 = o - lv.R0;
      const int64_t ia = i0 + lane / kTcGallery < Q ? i0 + lane / kTcGallery : Q - 1;
      const int64_t ib = i0 + 2 + lane / kTcGallery < Q ? i0 + 2 + lane / kTcGallery : Q - 1;
      const int64_t jc = j0 + lane % kTcGallery < G ? j0 + lane % kTcGallery : G - 1;
      const float* rqa = rq_all + ia * lv.S1 + o1;
      const float* rqb = rq_all + ib * lv.S1 + o1;
      const float* qea = qe_all + ia * lv.S + o;
      const float* qeb = qe_all + ib * lv.S + o;
      for (int s = 0; s < nslots; ++s) {
        const int n0 = (warp + kTcWarps * s) * 16;
        const float* rgc = rgT + (o1 + n0) * G + jc;  // column c's reliability and embedding of item jc
        const float* gec = geT + (o + n0) * G + jc;
        for (int cl = 0; cl < 16; ++cl, rgc += G, gec += G) {
          const int c = n0 + cl;
          float* ha = hat + lane * static_cast<int>(ldo) + c;
          float* hb = ha + 32 * static_cast<int>(ldo);
          if (c >= R) {
            *ha = 0.f;
            *hb = 0.f;
            continue;
          }
          const float cf = __ldg(coef + o1 + c), bs = __ldg(bias + o1 + c), rg = __ldg(rgc), gv = __ldg(gec);
          const float za = gamma * (__ldg(rqa + c) * rg * cf + bs), zb = gamma * (__ldg(rqb + c) * rg * cf + bs);
          const float pa = 1.f / (1.f + expf(-za)), pb = 1.f / (1.f + expf(-zb));
          const float da = __ldg(qea + c) - gv, db = __ldg(qeb + c) - gv;
          *ha = da * da * pa + *ha * (1.f - pa);
          *hb = db * db * pb + *hb * (1.f - pb);
        }
      }
    }
    __syncthreads();
  }
  // row sums of the last level: 4 threads per pair, strided columns, then two shuffles
  {
    const int m = t / 4, part = t % 4;
    const int64_t ld = lv.Rp[lv.L - 1] + 4, R = lv.R[lv.L - 1];
    float s = 0.f;
    for (int64_t c = part; c < R; c += 4) s += hat[m * ld + c];
    s += __shfl_down_sync(0xffffffffu, s, 2, 4);
    s += __shfl_down_sync(0xffffffffu, s, 1, 4);
    result = s;
  }
  __syncthreads();  // the hats are read: the caller's next tile may write them (the distance kernel has no
                    // other barrier between this tile's row sums and the next tile's prologue)
#endif
  return result;
}

__global__ void __launch_bounds__(kTcThreads, 1) avsl_tc_distance_kernel(AvslParams p, TcLevels lv,
                                                                         const float* split) {
  float* hat = reinterpret_cast<float*>(wm_avsl_tc_smem);
  float* out = static_cast<float*>(p.out);
  const int64_t gt = (p.G + kTcGallery - 1) / kTcGallery, tasks = (p.Q + kTcQueries - 1) / kTcQueries * gt;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t i0 = task / gt * kTcQueries, j0 = (task % gt) * kTcGallery;
    const float d = tc_tile(p, lv, split, i0, j0, hat);
    const int m = threadIdx.x / 4;
    const int64_t i = i0 + m / kTcGallery, j = j0 + m % kTcGallery;
    if (threadIdx.x % 4 == 0 && i < p.Q && j < p.G) out[i * p.G + j] = d;
  }
}

// A block per 4 queries (grid-stride): each query's k best, kept sorted in its output rows; after
// every tile, thread q < 4 inserts the tile's 16 candidates of query i0 + q.
__global__ void __launch_bounds__(kTcThreads, 1) avsl_tc_topk_kernel(AvslParams p, TcLevels lv, const float* split,
                                                                     int64_t rp_max) {
  float* hat = reinterpret_cast<float*>(wm_avsl_tc_smem);
  float* dt = hat + kAvslTcPairs * (rp_max + 4);  // the tile's 64 distances
  const int64_t gt = (p.G + kTcGallery - 1) / kTcGallery, k = p.k;
  const int64_t groups = (p.Q + kTcQueries - 1) / kTcQueries;
  const int t = threadIdx.x;
  for (int64_t grp = blockIdx.x; grp < groups; grp += gridDim.x) {
    const int64_t i0 = grp * kTcQueries, i = i0 + t;  // thread t < 4: query i
    const bool owner = t < kTcQueries && i < p.Q;
    float* ld = owner ? static_cast<float*>(p.topk_values) + i * k : nullptr;
    int64_t* lj = owner ? p.topk_indices + i * k : nullptr;
    int64_t cnt = 0;
    for (int64_t tile = 0; tile < gt; ++tile) {
      const int64_t j0 = tile * kTcGallery;
      const float d = tc_tile(p, lv, split, i0, j0, hat);
      if (t % 4 == 0) dt[t / 4] = d;
      __syncthreads();
      if (owner) {
        for (int g = 0; g < kTcGallery; ++g) {
          const int64_t j = j0 + g;
          if (j >= p.G || (p.exclude_self && j == i)) continue;
          avsl_topk_insert(dt[t * kTcGallery + g], j, ld, lj, cnt, k);
        }
      }
      // No barrier here: the next tile writes dt only after tc_tile's barriers, which the owners reach
      // after their reads.
    }
  }
}

// check_avsl, then the tensor-core kernel's own limits; the dense links stand in for the compressed ones.
void check_tc(const AvslParams& p, const char* op, bool topk) {
  static const int64_t no_compressed_links = 0;
  AvslParams c = p;
  c.col_ptr = &no_compressed_links;
  check_avsl(c, op, false, topk);
  WM_CHECK(avsl_tc_fits(p), op << ": the tensor-core kernel takes float32 and at most " << kAvslTcMaxNodes
                               << " nodes per level, got dtype " << dtype_name(p.dtype) << " and R_max " << p.Rmax());
  WM_CHECK(p.L < 2 || p.Q * p.G == 0 || p.values, op << ": null dense links pointer");
}

// The grid's cap. The host emulation (no __CUDACC__) lowers it with WHYMATCH_EMU_TC_MAX_BLOCKS, so
// that a test makes one block walk several tiles (the barriers between tiles).
int64_t tc_max_blocks() {
#ifndef __CUDACC__
  if (const char* e = std::getenv("WHYMATCH_EMU_TC_MAX_BLOCKS")) return std::max<int64_t>(1, std::atoll(e));
#endif
  return kTcMaxBlocks;
}

template <typename Kernel>
void tc_prepare(const AvslParams& p, const TcLevels& lv, Kernel kernel, size_t smem, cudaStream_t st,
                const char* op) {
  WM_CHECK(lv.split_total == 0 || p.workspace, op << ": null workspace pointer");
  if (smem > static_cast<size_t>(kTcSmemDefault))
    WM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  if (lv.split_total > 0) {
    const int64_t most = std::max<int64_t>(1, lv.split_total / 2);
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(most, 256), 4096));
    avsl_tc_split_links_kernel<<<blocks, 256, 0, st>>>(lv, static_cast<const float*>(p.values),
                                                       static_cast<float*>(p.workspace));
    WM_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace

int64_t avsl_tc_workspace_bytes(const AvslParams& p) { return tc_levels(p).split_total * 4; }

void avsl_tc_distance_cuda(const AvslParams& p, void* stream) {
  check_tc(p, "avsl_tc_distance", false);
  if (p.Q * p.G == 0) return;
  const TcLevels lv = tc_levels(p);
  const size_t smem = static_cast<size_t>(avsl_tc_smem_bytes(p));
  auto st = static_cast<cudaStream_t>(stream);
  WM_CUDA_CHECK_PENDING("avsl_tc_distance");
  tc_prepare(p, lv, avsl_tc_distance_kernel, smem, st, "avsl_tc_distance");
  const int64_t tasks = (p.Q + kTcQueries - 1) / kTcQueries * ((p.G + kTcGallery - 1) / kTcGallery);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(tasks, tc_max_blocks()));
  avsl_tc_distance_kernel<<<blocks, kTcThreads, smem, st>>>(p, lv, static_cast<const float*>(p.workspace));
  WM_CUDA_LAUNCH_CHECK();
}

void avsl_tc_topk_cuda(const AvslParams& p, void* stream) {
  check_tc(p, "avsl_tc_topk", true);
  if (p.Q == 0) return;
  const TcLevels lv = tc_levels(p);
  const size_t smem = static_cast<size_t>(avsl_tc_smem_bytes(p));
  auto st = static_cast<cudaStream_t>(stream);
  WM_CUDA_CHECK_PENDING("avsl_tc_topk");
  tc_prepare(p, lv, avsl_tc_topk_kernel, smem, st, "avsl_tc_topk");
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((p.Q + kTcQueries - 1) / kTcQueries, tc_max_blocks()));
  avsl_tc_topk_kernel<<<blocks, kTcThreads, smem, st>>>(p, lv, static_cast<const float*>(p.workspace),
                                                       avsl_tc_pad(p.Rmax()));
  WM_CUDA_LAUNCH_CHECK();
}

}  // namespace whymatch
