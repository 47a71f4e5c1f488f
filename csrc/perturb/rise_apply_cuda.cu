#include <algorithm>

#include "common/cuda_utils.cuh"
#include "perturb/rise_apply.h"
#include "perturb/rise_grid_cuda.cuh"

namespace whymatch {
namespace {

constexpr int kThreads = 256;

// 2-D grid: x = pixels (32-bit index math, y and x divided out once per thread), y = masks (a loop
// when N > gridDim.y). The mask value is computed once per (mask, pixel) and blended into every
// channel; 64-bit math only for the mask's base offsets.
template <typename T>
__global__ void __launch_bounds__(kThreads) rise_apply_kernel(RiseApplyParams p, RiseGeom32 g, int nc) {
  const unsigned int upix = blockIdx.x * kThreads + threadIdx.x;  // unsigned: no overflow near 2^31
  if (upix >= static_cast<unsigned int>(g.hw)) return;
  const int pix = static_cast<int>(upix);
  const int y = pix / g.w, x = pix - y * g.w;
  const float* img = p.image + pix;
  const float* base = p.baseline + pix;
  T* out = static_cast<T*>(p.out);
  for (int64_t n = blockIdx.y; n < p.n; n += gridDim.y) {
    const float m = rise_mask32(p.grids, p.shifts, n, y, x, g);
    if (p.channels_last) {
      T* o = out + (n * g.hw + pix) * nc;
      for (int c = 0; c < nc; ++c)
        o[c] = from_f32<T>(m * __ldg(img + c * g.hw) + (1.f - m) * __ldg(base + c * g.hw));
    } else {
      T* o = out + n * nc * g.hw + pix;
      for (int c = 0; c < nc; ++c)
        o[c * g.hw] = from_f32<T>(m * __ldg(img + c * g.hw) + (1.f - m) * __ldg(base + c * g.hw));
    }
  }
}

}  // namespace

void rise_apply_cuda(const RiseApplyParams& p, void* stream) {
  check_rise_apply(p);
  const int64_t hw = p.h * p.w;
  if (p.n * hw == 0 || p.c == 0) return;
  const RiseGeom32 g = rise_geom32("rise_apply", p.c, p.h, p.w, p.s);
  const dim3 grid(ceil_div(hw, kThreads), static_cast<unsigned int>(std::min<int64_t>(p.n, 65535)));
  auto st = static_cast<cudaStream_t>(stream);
  WM_CUDA_CHECK_PENDING("rise_apply");
  WM_DISPATCH_FLOAT_CUDA(p.out_dtype, "rise_apply", [&] {
    rise_apply_kernel<scalar_t><<<grid, kThreads, 0, st>>>(p, g, static_cast<int>(p.c));
  });
  WM_CUDA_LAUNCH_CHECK();
}

}  // namespace whymatch
