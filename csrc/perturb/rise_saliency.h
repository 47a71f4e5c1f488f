// RISE saliency for K references at once, masks recomputed from the grids:
//   out[k, y, x] = sum_n scores[n, k] * mask_n(y, x)
// (mask geometry in rise_grid.h). Normalization (1/(N p), or SANE's 1/mean mask)
// is applied by the Python caller; this op is the raw weighted sum.
#pragma once
#include <cstdint>

#include "common/check.h"

namespace whymatch {

struct RiseSaliencyParams {
  const float* grids = nullptr;     // [N, S, S]
  const int64_t* shifts = nullptr;  // [N, 2]
  const float* scores = nullptr;    // [N, K]
  float* out = nullptr;             // [K, H, W]
  int64_t N = 0, K = 0, H = 0, W = 0, S = 0;
};

inline void check_rise_saliency(const RiseSaliencyParams& p) {
  WM_CHECK(p.N >= 0 && p.K >= 0 && p.H >= 0 && p.W >= 0, "rise_saliency: sizes must be non-negative");
  WM_CHECK(p.S >= 1, "rise_saliency: grid size s must be >= 1, got " << p.S);
  if (p.K * p.H * p.W > 0) WM_CHECK(p.out, "rise_saliency: null output pointer");
  if (p.N * p.K * p.H * p.W > 0) WM_CHECK(p.grids && p.shifts && p.scores, "rise_saliency: null pointer");
}

void rise_saliency_cpu(const RiseSaliencyParams& p, int num_threads);
void rise_saliency_cuda(const RiseSaliencyParams& p, void* stream);

}  // namespace whymatch
