// RISE masks applied to an image, written straight into the model's input batch:
//   out[n, c, y, x] = m * image[c, y, x] + (1 - m) * baseline[c, y, x],  m = mask_n(y, x)
// (mask geometry in rise_grid.h). N full-size masks are never stored.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace whymatch {

struct RiseApplyParams {
  const float* grids = nullptr;     // [N, S, S]
  const int64_t* shifts = nullptr;  // [N, 2]: (dy, dx), 0 <= dy < cell_h, 0 <= dx < cell_w
  const float* image = nullptr;     // [C, H, W]
  const float* baseline = nullptr;  // [C, H, W]
  void* out = nullptr;              // [N, C, H, W], or [N, H, W, C] when channels_last
  int64_t N = 0, C = 0, H = 0, W = 0, S = 0;
  DType out_dtype = DType::F32;
  bool channels_last = false;
};

inline void check_rise_apply(const RiseApplyParams& p) {
  WM_CHECK(p.N >= 0 && p.C >= 0 && p.H >= 0 && p.W >= 0, "rise_apply: sizes must be non-negative");
  WM_CHECK(p.S >= 1, "rise_apply: grid size s must be >= 1, got " << p.S);
  if (p.N * p.C * p.H * p.W > 0) {
    WM_CHECK(p.grids && p.shifts && p.image && p.baseline && p.out, "rise_apply: null pointer");
  }
}
void rise_apply_cpu(const RiseApplyParams& p, int num_threads);
void rise_apply_cuda(const RiseApplyParams& p, void* stream);

}  // namespace whymatch
