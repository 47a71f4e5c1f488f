// CUDA kernels of the fused AVSL CAM correlation (see avsl/cam_correlation.h).
//
// prepare_kernel: one warp per map (B * (R1 + R2) maps, 4 per block): pool, l2-normalize and store
//   the map K-major in the workspace (lt: K x R1p, ht: K x R2p), and its reliability statistic.
// gemm_kernel: 64 x 64 tiles of corr, 256 threads with 4 x 4 outputs each, K in slices of 16
//   staged in shared memory; the epilogue writes corr and updates edges. Bounds-checked, so the
//   workspace's padding columns are never read.
// reliability_kernel: one warp per map, the reliability only.
// All on the caller's stream; every launch checked.
#include <cuda_runtime.h>

#include "avsl/cam_correlation.h"
#include "common/cuda_utils.cuh"

namespace whymatch {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kBM = 64, kBN = 64, kBK = 16, kGemmThreads = 256;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_min(T v) {
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Calls f(shifted value) for this lane's positions of map x [H, W]: x minus the map's minimum
// (gmin) or, when published, minus its row's minimum (lanes take whole rows).
template <typename T, typename F>
__device__ __forceinline__ void for_each_shifted(const T* __restrict__ x, int64_t H, int64_t W, bool published,
                                                 T gmin, int lane, F f) {
  if (published) {
    for (int64_t y = lane; y < H; y += 32) {
      const T* row = x + y * W;
      T mn = row[0];
      for (int64_t c = 1; c < W; ++c) mn = min(mn, row[c]);
      for (int64_t c = 0; c < W; ++c) f(row[c] - mn);
    }
  } else {
    for (int64_t i = lane; i < H * W; i += 32) f(x[i] - gmin);
  }
}

// Reliability of map x [H, W] computed by one warp (every lane returns it).
template <typename T>
__device__ T warp_reliability(const T* __restrict__ x, int64_t H, int64_t W, bool published, int lane) {
  const int64_t N = H * W;
  T gmin = x[0];
  if (!published) {
    for (int64_t i = lane; i < N; i += 32) gmin = min(gmin, x[i]);
    gmin = warp_min(gmin);
  }
  // z = x - min, d = max(sum |z|, 1e-12): std(z / d) = sqrt(sum (z - mean z)^2 / (N - 1)) / d.
  T s = 0;
  for_each_shifted(x, H, W, published, gmin, lane, [&](T v) { s += fabs(v); });
  s = warp_sum(s);
  const T d = max(s, T(1e-12)), mean = s / static_cast<T>(N);
  T sv = 0;
  for_each_shifted(x, H, W, published, gmin, lane, [&](T v) {
    const T e = v - mean;
    sv += e * e;
  });
  return sqrt(warp_sum(sv) / static_cast<T>(N - 1)) / d;
}

template <typename T>
__global__ void prepare_kernel(CamCorrParams p, T* __restrict__ lt, T* __restrict__ ht, int64_t R1p, int64_t R2p) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t n1 = p.B * p.R1, n2 = p.B * p.R2;
  if (t >= n1 + n2) return;  // whole warps leave together
  const int64_t J = p.H2 * p.W2;
  const bool is_low = t < n1;
  const int64_t u = is_low ? t : t - n1;
  const int64_t R = is_low ? p.R1 : p.R2, ld = is_low ? R1p : R2p;
  const int64_t H = is_low ? p.H1 : p.H2, W = is_low ? p.W1 : p.W2;
  const T* x = static_cast<const T*>(is_low ? p.low : p.high) + u * H * W;
  T* dst = (is_low ? lt : ht) + (u / R) * J * ld + (u % R);
  T ss = 0;
  for (int64_t j = lane; j < J; j += 32) {
    const int64_t i = j / p.W2, k = j % p.W2;
    const int64_t y0 = cam_pool_start(i, H, p.H2), y1 = cam_pool_end(i, H, p.H2);
    const int64_t x0 = cam_pool_start(k, W, p.W2), x1 = cam_pool_end(k, W, p.W2);
    T s = 0;
    for (int64_t y = y0; y < y1; ++y)
      for (int64_t c = x0; c < x1; ++c) s += x[y * W + c];
    const T v = s / static_cast<T>((y1 - y0) * (x1 - x0));
    ss += v * v;
    dst[j * ld] = v;
  }
  const T d = max(sqrt(warp_sum(ss)), T(1e-12));
  for (int64_t j = lane; j < J; j += 32) dst[j * ld] = dst[j * ld] / d;  // this lane's own writes
  T* rel = static_cast<T*>(is_low ? p.rel_low : p.rel_high);
  if (rel != nullptr) {
    const T r = warp_reliability(x, H, W, p.published, lane);
    if (lane == 0) rel[u] = r;
  }
}

template <typename T>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(CamCorrParams p, const T* __restrict__ lt,
                                                            const T* __restrict__ ht, int64_t R1p, int64_t R2p) {
  __shared__ T As[kBK][kBM];
  __shared__ T Bs[kBK][kBN];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t K = p.B * p.H2 * p.W2;
  T acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
#pragma unroll
    for (int r = 0; r < (kBK * kBM) / kGemmThreads; ++r) {
      const int e = tid + r * kGemmThreads, kk = e / kBM, mm = e % kBM;
      const int64_t k = k0 + kk;
      As[kk][mm] = (k < K && m0 + mm < p.R1) ? lt[k * R1p + m0 + mm] : T(0);
      Bs[kk][mm] = (k < K && n0 + mm < p.R2) ? ht[k * R2p + n0 + mm] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      T a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
  T* corr = static_cast<T*>(p.corr);
  T* edges = static_cast<T*>(p.edges);
  const T nb = static_cast<T>(p.B), mom = static_cast<T>(p.momentum), keep = static_cast<T>(1.0 - p.momentum);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= p.R1) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n >= p.R2) continue;
      const T c = acc[i][j] / nb;
      if (corr != nullptr) corr[m * p.R2 + n] = c;
      if (edges != nullptr) {
        const int64_t o = m * p.R2 + n;
        edges[o] = p.first ? c : edges[o] * mom + c * keep;
      }
    }
  }
}

template <typename T>
__global__ void reliability_kernel(CamRelParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (t >= p.B * p.R) return;
  const T r = warp_reliability(static_cast<const T*>(p.cam) + t * p.H * p.W, p.H, p.W, p.published, lane);
  if (lane == 0) static_cast<T*>(p.rel)[t] = r;
}

template <typename T>
void rel_launch(const CamRelParams& p, cudaStream_t s) {
  reliability_kernel<T><<<ceil_div(p.B * p.R, kWarpsPerBlock), kWarpsPerBlock * 32, 0, s>>>(p);
  WM_CUDA_LAUNCH_CHECK();
}

template <typename T>
void corr_launch(const CamCorrParams& p, cudaStream_t s) {
  if (p.R1 * p.R2 == 0) {
    // No product: the workspace is never touched (check_cam_corr lets a caller pass none, nor the
    // maps of the empty level); only the reliabilities asked for, with the kernel and the
    // arithmetic of prepare_kernel's (bitwise the same values).
    for (const bool low : {true, false}) {
      CamRelParams r;
      r.cam = low ? p.low : p.high;
      r.rel = low ? p.rel_low : p.rel_high;
      r.B = p.B;
      r.R = low ? p.R1 : p.R2;
      r.H = low ? p.H1 : p.H2;
      r.W = low ? p.W1 : p.W2;
      r.published = p.published;
      r.dtype = p.dtype;
      if (r.rel != nullptr && r.B * r.R > 0) rel_launch<T>(r, s);
    }
    return;
  }
  const int64_t R1p = cam_corr_pad(p.R1, kCamMR), R2p = cam_corr_pad(p.R2, kCamNR);
  T* lt = static_cast<T*>(p.workspace);
  T* ht = lt + p.B * p.H2 * p.W2 * R1p;
  const int64_t maps = p.B * (p.R1 + p.R2);
  prepare_kernel<T><<<ceil_div(maps, kWarpsPerBlock), kWarpsPerBlock * 32, 0, s>>>(p, lt, ht, R1p, R2p);
  WM_CUDA_LAUNCH_CHECK();
  if (p.corr || p.edges) {
    dim3 grid(ceil_div(p.R2, kBN), ceil_div(p.R1, kBM));
    gemm_kernel<T><<<grid, kGemmThreads, 0, s>>>(p, lt, ht, R1p, R2p);
    WM_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace

void avsl_cam_correlation_cuda(const CamCorrParams& p, void* stream) {
  check_cam_corr(p);
  if (p.R1 == 0 && p.R2 == 0) return;
  WM_CUDA_CHECK_PENDING("avsl_cam_correlation");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::F64) corr_launch<double>(p, s);
  else corr_launch<float>(p, s);
}

void avsl_cam_reliability_cuda(const CamRelParams& p, void* stream) {
  check_cam_rel(p);
  if (p.B * p.R == 0) return;
  WM_CUDA_CHECK_PENDING("avsl_cam_reliability");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::F64) rel_launch<double>(p, s);
  else rel_launch<float>(p, s);
}

}  // namespace whymatch
