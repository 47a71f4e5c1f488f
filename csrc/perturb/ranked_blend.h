// Images along an insertion or deletion curve, from a pixel ranking:
//   out[b, t, c, p] = rank[b, p] < counts[t] ? first[b, c, p] : second[b, c, p]
// Insertion: first = image, second = substrate. Deletion: first = substrate,
// second = image. rank[b] is the position of each pixel in descending saliency.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace whymatch {

struct RankedBlendParams {
  const void* first = nullptr;      // [B, C, HW]
  const void* second = nullptr;     // [B, C, HW]
  const int64_t* rank = nullptr;    // [B, HW]
  const int64_t* counts = nullptr;  // [T]
  void* out = nullptr;              // [B, T, C, HW]
  int64_t B = 0, T = 0, C = 0, HW = 0;
  DType dtype = DType::F32;
};

inline void check_ranked_blend(const RankedBlendParams& p) {
  WM_CHECK(p.B >= 0 && p.T >= 0 && p.C >= 0 && p.HW >= 0, "ranked_blend: sizes must be non-negative");
  if (p.B * p.T * p.C * p.HW > 0)
    WM_CHECK(p.first && p.second && p.rank && p.counts && p.out, "ranked_blend: null pointer");
}

void ranked_blend_cpu(const RankedBlendParams& p, int num_threads);
void ranked_blend_cuda(const RankedBlendParams& p, void* stream);

}  // namespace whymatch
