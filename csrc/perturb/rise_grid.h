// The RISE mask geometry shared by rise_apply and rise_saliency.
//
// Mask n at pixel (y, x) of an H x W image:
//   up_n = bilinear upsample of grid n (s x s) to ((s+1)*cell_h, (s+1)*cell_w),
//          cell_h = ceil(H/s), cell_w = ceil(W/s), half-pixel centres
//          (torch's align_corners=False; equal to skimage's mode='edge'),
//   mask_n(y, x) = up_n(y + dy_n, x + dx_n), with 0 <= dy_n < cell_h, 0 <= dx_n < cell_w.
// The arithmetic mirrors torch.nn.functional.interpolate(mode='bilinear',
// align_corners=False) so that the reference in ops/reference.py is the spec.
#pragma once
#include <cstdint>

#include "common/check.h"

namespace whymatch {

struct Lerp {
  int i0;    // first source index
  int i1;    // second source index (== i0 at the last row/column)
  float l;   // weight of i1; i0 gets 1 - l
};

WM_HOST_DEVICE Lerp rise_lerp(int64_t o, int64_t up, int64_t s) {
  const float scale = static_cast<float>(s) / static_cast<float>(up);
  float src = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  int i0 = static_cast<int>(src);
  if (i0 > s - 1) i0 = static_cast<int>(s - 1);
  Lerp r;
  r.i0 = i0;
  r.i1 = i0 + (i0 < s - 1 ? 1 : 0);
  r.l = src - static_cast<float>(i0);
  return r;
}

// Value of a bilinear sample from a row-major s x s grid.
WM_HOST_DEVICE float rise_sample(const float* g, int64_t s, const Lerp& ly, const Lerp& lx) {
  const float* r0 = g + static_cast<int64_t>(ly.i0) * s;
  const float* r1 = g + static_cast<int64_t>(ly.i1) * s;
  const float h0 = 1.f - ly.l, w0 = 1.f - lx.l;
  return h0 * (w0 * r0[lx.i0] + lx.l * r0[lx.i1]) + ly.l * (w0 * r1[lx.i0] + lx.l * r1[lx.i1]);
}

WM_HOST_DEVICE int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace whymatch
