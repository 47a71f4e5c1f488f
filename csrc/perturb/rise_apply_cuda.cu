#include <algorithm>

#include "common/cuda_utils.cuh"
#include "perturb/rise_apply.h"
#include "perturb/rise_grid_cuda.cuh"

namespace whymatch {
namespace {

constexpr int kThreads = 256;
constexpr int kMasks = 4;  // masks per thread: each image / baseline value loaded serves kMasks outputs

// 2-D grid: x = pixels (32-bit index math, y and x divided out once per thread), y = groups of
// kMasks masks (a loop when N / kMasks > gridDim.y). Each mask value is computed once per (mask,
// pixel); the image and baseline values of a channel are loaded once per group and blended into
// every mask of it. 64-bit math only for the masks' base offsets.
template <typename T>
__global__ void __launch_bounds__(kThreads) rise_apply_kernel(RiseApplyParams p, RiseGeom32 g, int nc) {
  const unsigned int upix = blockIdx.x * kThreads + threadIdx.x;  // unsigned: no overflow near 2^31
  if (upix >= static_cast<unsigned int>(g.hw)) return;
  const int pix = static_cast<int>(upix);
  const int y = pix / g.w, x = pix - y * g.w;
  const float* img = p.image + pix;
  const float* base = p.baseline + pix;
  T* out = static_cast<T*>(p.out);
  for (int64_t n0 = blockIdx.y * static_cast<int64_t>(kMasks); n0 < p.N; n0 += gridDim.y * static_cast<int64_t>(kMasks)) {
    const int nm = static_cast<int>(p.N - n0 < kMasks ? p.N - n0 : kMasks);
    float m[kMasks];
#pragma unroll
    for (int u = 0; u < kMasks; ++u) m[u] = u < nm ? rise_mask32(p.grids, p.shifts, n0 + u, y, x, g) : 0.f;
    // output (n, c, pixel) at n * nc * hw + pixel * nc + c (channels_last) or + c * hw + pixel
    T* o[kMasks];
#pragma unroll
    for (int u = 0; u < kMasks; ++u) o[u] = out + (n0 + (u < nm ? u : 0)) * nc * g.hw + (p.channels_last ? pix * nc : pix);
    const int cstride = p.channels_last ? 1 : g.hw;
    for (int c = 0; c < nc; ++c) {
      const float iv = __ldg(img + c * g.hw), bv = __ldg(base + c * g.hw);
#pragma unroll
      for (int u = 0; u < kMasks; ++u) {
        const float mu = m[u];
        if (u < nm) o[u][c * cstride] = from_f32<T>(mu * iv + (1.f - mu) * bv);
      }
    }
  }
}

}  // namespace

void rise_apply_cuda(const RiseApplyParams& p, void* stream) {
  check_rise_apply(p);
  const int64_t hw = p.H * p.W;
  if (p.N * hw == 0 || p.C == 0) return;
  const RiseGeom32 g = rise_geom32("rise_apply", p.C, p.H, p.W, p.S);
  const dim3 grid(ceil_div(hw, kThreads), static_cast<unsigned int>(std::min<int64_t>(ceil_div(p.N, kMasks), 65535)));
  auto st = static_cast<cudaStream_t>(stream);
  WM_CUDA_CHECK_PENDING("rise_apply");
  WM_DISPATCH_FLOAT_CUDA(p.out_dtype, "rise_apply", [&] {
    rise_apply_kernel<scalar_t><<<grid, kThreads, 0, st>>>(p, g, static_cast<int>(p.C));
  });
  WM_CUDA_LAUNCH_CHECK();
}

}  // namespace whymatch
