#include <algorithm>

#include "common/cuda_utils.cuh"
#include "perturb/rise_apply.h"
#include "perturb/rise_grid.h"

namespace whymatch {
namespace {

constexpr int kThreads = 256;

// 32-bit twin of rise_lerp (rise_grid.h) with the scale up/s precomputed on the host: the same
// float operations on the same values (s / up is one correctly rounded division on either side, an
// int32 and an int64 convert to the same float), so the same mask.
__device__ __forceinline__ Lerp lerp32(int o, float scale, int s) {
  float src = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  int i0 = static_cast<int>(src);
  if (i0 > s - 1) i0 = s - 1;
  Lerp r;
  r.i0 = i0;
  r.i1 = i0 + (i0 < s - 1 ? 1 : 0);
  r.l = src - static_cast<float>(i0);
  return r;
}

struct RiseApplyDims {
  int c, w, hw, s;           // every in-image index fits 32 bits (checked on the host)
  float scale_h, scale_w;    // s / up_h, s / up_w (rise_lerp's scale)
};

// 2-D grid: x = pixels (32-bit index math, y and x divided out once per thread), y = masks (a loop
// when N > gridDim.y). The mask value is computed once per (mask, pixel) and blended into every
// channel; 64-bit math only for the mask's base offsets.
template <typename T>
__global__ void __launch_bounds__(kThreads) rise_apply_kernel(RiseApplyParams p, RiseApplyDims d) {
  const unsigned int upix = blockIdx.x * kThreads + threadIdx.x;  // unsigned: no overflow near 2^31
  if (upix >= static_cast<unsigned int>(d.hw)) return;
  const int pix = static_cast<int>(upix);
  const int y = pix / d.w, x = pix - y * d.w;
  const float* img = p.image + pix;
  const float* base = p.baseline + pix;
  T* out = static_cast<T*>(p.out);
  for (int64_t n = blockIdx.y; n < p.n; n += gridDim.y) {
    const int dy = static_cast<int>(__ldg(p.shifts + 2 * n)), dx = static_cast<int>(__ldg(p.shifts + 2 * n + 1));
    const Lerp ly = lerp32(y + dy, d.scale_h, d.s), lx = lerp32(x + dx, d.scale_w, d.s);
    const float* r0 = p.grids + n * d.s * d.s + ly.i0 * d.s;
    const float* r1 = r0 + (ly.i1 - ly.i0) * d.s;
    const float h0 = 1.f - ly.l, w0 = 1.f - lx.l;  // rise_sample's expression, in its order
    const float m = h0 * (w0 * __ldg(r0 + lx.i0) + lx.l * __ldg(r0 + lx.i1)) +
                    ly.l * (w0 * __ldg(r1 + lx.i0) + lx.l * __ldg(r1 + lx.i1));
    if (p.channels_last) {
      T* o = out + (n * d.hw + pix) * d.c;
      for (int c = 0; c < d.c; ++c)
        o[c] = from_f32<T>(m * __ldg(img + c * d.hw) + (1.f - m) * __ldg(base + c * d.hw));
    } else {
      T* o = out + n * d.c * d.hw + pix;
      for (int c = 0; c < d.c; ++c)
        o[c * d.hw] = from_f32<T>(m * __ldg(img + c * d.hw) + (1.f - m) * __ldg(base + c * d.hw));
    }
  }
}

}  // namespace

void rise_apply_cuda(const RiseApplyParams& p, void* stream) {
  check_rise_apply(p);
  const int64_t hw = p.h * p.w;
  if (p.n * hw == 0 || p.c == 0) return;
  const int64_t cell_h = ceil_div64(p.h, p.s), cell_w = ceil_div64(p.w, p.s);
  const int64_t up_h = (p.s + 1) * cell_h, up_w = (p.s + 1) * cell_w, lim = 2147483647LL;
  WM_CHECK(p.c * hw <= lim && up_h <= lim && up_w <= lim && p.s * p.s <= lim,
           "rise_apply: the CUDA kernel indexes an image and a grid with 32 bits; got c*h*w = "
               << p.c * hw << ", s*s = " << p.s * p.s << ", upsampled " << up_h << " x " << up_w);
  RiseApplyDims d;
  d.c = static_cast<int>(p.c);
  d.w = static_cast<int>(p.w);
  d.hw = static_cast<int>(hw);
  d.s = static_cast<int>(p.s);
  d.scale_h = static_cast<float>(p.s) / static_cast<float>(up_h);
  d.scale_w = static_cast<float>(p.s) / static_cast<float>(up_w);
  const dim3 grid(ceil_div(hw, kThreads), static_cast<unsigned int>(std::min<int64_t>(p.n, 65535)));
  auto st = static_cast<cudaStream_t>(stream);
  WM_CUDA_CHECK_PENDING("rise_apply");
  WM_DISPATCH_FLOAT_CUDA(p.out_dtype, "rise_apply", [&] {
    rise_apply_kernel<scalar_t><<<grid, kThreads, 0, st>>>(p, d);
  });
  WM_CUDA_LAUNCH_CHECK();
}

}  // namespace whymatch
