// The RISE mask geometry of rise_grid.h in 32-bit device arithmetic, for rise_apply_cuda.cu and
// rise_saliency_cuda.cu. The values are rise_lerp's / rise_sample's: the same float operations on
// the same values (the scale s / up is one correctly rounded division, made once on the host; an
// int32 and an int64 convert to the same float).
#pragma once
#include <cstdint>

#include "common/check.h"
#include "perturb/rise_grid.h"

namespace whymatch {

struct RiseGeom32 {
  int w, hw, s;            // every in-image and in-grid index fits 32 bits (rise_geom32 checks)
  float scale_h, scale_w;  // s / up_h, s / up_w: rise_lerp's scale
};

inline RiseGeom32 rise_geom32(const char* op, int64_t c, int64_t h, int64_t w, int64_t s) {
  const int64_t cell_h = ceil_div64(h, s), cell_w = ceil_div64(w, s);
  const int64_t up_h = (s + 1) * cell_h, up_w = (s + 1) * cell_w, lim = 2147483647LL;
  WM_CHECK(c * h * w <= lim && up_h <= lim && up_w <= lim && s * s <= lim,
           op << ": the CUDA kernel indexes an image and a grid with 32 bits; got c*h*w = " << c * h * w
              << ", s*s = " << s * s << ", upsampled " << up_h << " x " << up_w);
  RiseGeom32 g;
  g.w = static_cast<int>(w);
  g.hw = static_cast<int>(h * w);
  g.s = static_cast<int>(s);
  g.scale_h = static_cast<float>(s) / static_cast<float>(up_h);
  g.scale_w = static_cast<float>(s) / static_cast<float>(up_w);
  return g;
}

// rise_lerp(o, up, s) with scale = s / up.
__device__ __forceinline__ Lerp rise_lerp32(int o, float scale, int s) {
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

// Mask n at pixel (y, x): rise_sample of grid n (the expression in its order; read-only loads).
__device__ __forceinline__ float rise_mask32(const float* grids, const int64_t* shifts, int64_t n, int y, int x,
                                             const RiseGeom32& g) {
  const int dy = static_cast<int>(__ldg(shifts + 2 * n)), dx = static_cast<int>(__ldg(shifts + 2 * n + 1));
  const Lerp ly = rise_lerp32(y + dy, g.scale_h, g.s), lx = rise_lerp32(x + dx, g.scale_w, g.s);
  const float* r0 = grids + n * g.s * g.s + ly.i0 * g.s;
  const float* r1 = r0 + (ly.i1 - ly.i0) * g.s;
  const float h0 = 1.f - ly.l, w0 = 1.f - lx.l;
  return h0 * (w0 * __ldg(r0 + lx.i0) + lx.l * __ldg(r0 + lx.i1)) +
         ly.l * (w0 * __ldg(r1 + lx.i0) + lx.l * __ldg(r1 + lx.i1));
}

}  // namespace whymatch
