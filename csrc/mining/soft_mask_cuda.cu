#include <algorithm>

#include "common/cuda_utils.cuh"
#include "mining/soft_mask.h"

namespace whymatch {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ double to_acc_d(double v) { return v; }
template <typename T> __device__ __forceinline__ float to_acc_d(T v) { return to_f32(v); }
template <typename T, typename A> __device__ __forceinline__ T from_acc_d(A v) { return from_f32<T>(v); }
template <> __device__ __forceinline__ double from_acc_d<double, double>(double v) { return v; }

__device__ __forceinline__ float exp_acc(float v) { return __expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

// 1 - sigmoid(alpha * (u - beta)) at output pixel (y, x) of image bi.
template <typename acc_t>
__device__ __forceinline__ acc_t keep_at(const SoftMaskParams& p, int64_t bi, int64_t y, int64_t x, acc_t alpha,
                                         acc_t beta) {
  const acc_t* m = static_cast<const acc_t*>(p.attention) + bi * p.Ha * p.Wa;
  const SmLerp<acc_t> ly = sm_lerp<acc_t>(y, p.H, p.Ha), lx = sm_lerp<acc_t>(x, p.W, p.Wa);
  const acc_t* r0 = m + ly.i0 * p.Wa;
  const acc_t* r1 = m + ly.i1 * p.Wa;
  const acc_t w0 = acc_t(1) - lx.l, w1 = lx.l;
  const acc_t u = (acc_t(1) - ly.l) * (w0 * __ldg(r0 + lx.i0) + w1 * __ldg(r0 + lx.i1)) +
                  ly.l * (w0 * __ldg(r1 + lx.i0) + w1 * __ldg(r1 + lx.i1));
  return acc_t(1) / (acc_t(1) + exp_acc(alpha * (u - beta)));
}

// Element (bi, c, pix) and the distance between channels.
__device__ __forceinline__ int64_t base_of(const SoftMaskParams& p, int64_t bi, int64_t pix) {
  return p.channels_last ? (bi * p.H * p.W + pix) * p.C : bi * p.C * p.H * p.W + pix;
}
__device__ __forceinline__ int64_t cstride(const SoftMaskParams& p) { return p.channels_last ? 1 : p.H * p.W; }

// One thread per output pixel: the mask value once, applied to every channel.
template <typename T>
__global__ void soft_mask_kernel(SoftMaskParams p, int64_t total) {
  using acc_t = typename Acc<T>::type;
  const acc_t alpha = *static_cast<const acc_t*>(p.alpha), beta = *static_cast<const acc_t*>(p.beta);
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int64_t hw = p.H * p.W, cs = cstride(p);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t bi = i / hw, pix = i % hw;
    const acc_t k = keep_at<acc_t>(p, bi, pix / p.W, pix % p.W, alpha, beta);
    const int64_t base = base_of(p, bi, pix);
    for (int64_t c = 0; c < p.C; ++c) {
      const int64_t o = base + c * cs;
      out[o] = from_acc_d<T>(static_cast<acc_t>(to_acc_d(x[o])) * k);
    }
  }
}

// Backward pass 1, one thread per output pixel: grad_x and q = -s (1 - s) sum_c g x.
template <typename T>
__global__ void soft_mask_backward_pixels(SoftMaskParams p, int64_t total) {
  using acc_t = typename Acc<T>::type;
  const acc_t alpha = *static_cast<const acc_t*>(p.alpha), beta = *static_cast<const acc_t*>(p.beta);
  const T* x = static_cast<const T*>(p.x);
  const T* g = static_cast<const T*>(p.grad_out);
  T* gx = static_cast<T*>(p.grad_x);
  acc_t* q = static_cast<acc_t*>(p.workspace);
  const int64_t hw = p.H * p.W, cs = cstride(p);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t bi = i / hw, pix = i % hw;
    const acc_t k = keep_at<acc_t>(p, bi, pix / p.W, pix % p.W, alpha, beta);
    const int64_t base = base_of(p, bi, pix);
    acc_t sgx = acc_t(0);
    for (int64_t c = 0; c < p.C; ++c) {
      const int64_t o = base + c * cs;
      const acc_t gv = to_acc_d(g[o]);
      if (gx) gx[o] = from_acc_d<T>(gv * k);
      if (q) sgx += gv * static_cast<acc_t>(to_acc_d(x[o]));
    }
    if (q) q[i] = -k * (acc_t(1) - k) * sgx;
  }
}

// Backward pass 2, one warp per attention cell (bi, i, j): the weighted sum of q over the
// output pixels that read the cell (a window of about 2H/h x 2W/w), in a fixed order.
template <typename acc_t>
__global__ void soft_mask_backward_cells(SoftMaskParams p, int64_t cells) {
  const int lane = threadIdx.x & 31;
  const int64_t cell = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  if (cell >= cells) return;
  const int64_t bi = cell / (p.Ha * p.Wa), ij = cell % (p.Ha * p.Wa), i = ij / p.Wa, j = ij % p.Wa;
  int64_t ylo, yhi, xlo, xhi;
  sm_range<acc_t>(i, p.H, p.Ha, &ylo, &yhi);
  sm_range<acc_t>(j, p.W, p.Wa, &xlo, &xhi);
  const acc_t* q = static_cast<const acc_t*>(p.workspace) + bi * p.H * p.W;
  acc_t acc = acc_t(0);
  for (int64_t y = ylo; y < yhi; ++y) {
    const acc_t wy = sm_weight(sm_lerp<acc_t>(y, p.H, p.Ha), i);
    const acc_t* row = q + y * p.W;
    acc_t racc = acc_t(0);
    for (int64_t x = xlo + lane; x < xhi; x += 32) racc += sm_weight(sm_lerp<acc_t>(x, p.W, p.Wa), j) * row[x];
    acc += wy * racc;
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) static_cast<acc_t*>(p.grad_attention)[cell] = acc;
}

unsigned int blocks_for(int64_t total, int threads) {
  return static_cast<unsigned int>(std::min<int64_t>((total + threads - 1) / threads, 65535LL * 32));
}

}  // namespace

void soft_mask_cuda(const SoftMaskParams& p, void* stream) {
  check_soft_mask(p, false);
  const int64_t total = p.B * p.H * p.W;
  if (total == 0 || p.C == 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  const int threads = 256;
  WM_CUDA_CHECK_PENDING("soft_mask");
  WM_DISPATCH_FLOAT64_CUDA(p.dtype, "soft_mask", [&] {
    soft_mask_kernel<scalar_t><<<blocks_for(total, threads), threads, 0, st>>>(p, total);
  });
  WM_CUDA_LAUNCH_CHECK();
}

void soft_mask_backward_cuda(const SoftMaskParams& p, void* stream) {
  check_soft_mask(p, true);
  auto st = static_cast<cudaStream_t>(stream);
  const bool f64 = p.dtype == DType::F64;
  const int64_t cells = p.B * p.Ha * p.Wa;
  const int64_t total = p.B * p.H * p.W;
  WM_CUDA_CHECK_PENDING("soft_mask_backward");
  if (p.grad_attention && cells > 0 && p.C * total == 0) {  // nothing reads the maps: zero gradient
    WM_CUDA_CHECK(cudaMemsetAsync(p.grad_attention, 0, cells * (f64 ? sizeof(double) : sizeof(float)), st));
    return;
  }
  if (total == 0 || p.C == 0) return;
  const int threads = 256;
  SoftMaskParams q = p;
  if (!p.grad_attention) q.workspace = nullptr;
  WM_DISPATCH_FLOAT64_CUDA(p.dtype, "soft_mask_backward", [&] {
    soft_mask_backward_pixels<scalar_t><<<blocks_for(total, threads), threads, 0, st>>>(q, total);
  });
  WM_CUDA_LAUNCH_CHECK();
  if (!p.grad_attention) return;
  const int64_t warps_per_block = threads / 32;
  const int64_t blocks = (cells + warps_per_block - 1) / warps_per_block;
  WM_CHECK(blocks <= 2147483647LL, "soft_mask_backward: too many attention cells (" << cells << ")");
  if (f64) {
    soft_mask_backward_cells<double><<<static_cast<unsigned int>(blocks), threads, 0, st>>>(p, cells);
  } else {
    soft_mask_backward_cells<float><<<static_cast<unsigned int>(blocks), threads, 0, st>>>(p, cells);
  }
  WM_CUDA_LAUNCH_CHECK();
}

}  // namespace whymatch
