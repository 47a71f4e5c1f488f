#include "perturb/rise_saliency.h"

#include <algorithm>
#include <vector>

#include "common/parallel.h"
#include "perturb/rise_grid_cpu.h"

namespace whymatch {

// Each worker owns a band of output rows for every reference and streams over
// all N masks; a mask row is built once and accumulated into K output rows.
void rise_saliency_cpu(const RiseSaliencyParams& p, int num_threads) {
  check_rise_saliency(p);
  const int64_t hw = p.h * p.w;
  if (p.k * hw == 0) return;
  std::fill(p.out, p.out + p.k * hw, 0.f);
  if (p.n == 0) return;
  const RiseCanvas cv(p.h, p.w, p.s);
  for (int64_t n = 0; n < p.n; ++n) cv.check_shift(n, p.shifts[2 * n], p.shifts[2 * n + 1], "rise_saliency");

  parallel_for(p.h, num_threads, 4, [&](int64_t y0, int64_t y1) {
    std::vector<float> hrows(p.s * cv.up_w), mrow(p.w);
    for (int64_t n = 0; n < p.n; ++n) {
      const int64_t dy = p.shifts[2 * n], dx = p.shifts[2 * n + 1];
      cv.horizontal_rows(p.grids + n * p.s * p.s, hrows.data());
      const float* sc = p.scores + n * p.k;
      for (int64_t y = y0; y < y1; ++y) {
        cv.mask_row(hrows.data(), y + dy, dx, p.w, mrow.data());
        for (int64_t k = 0; k < p.k; ++k) {
          const float wgt = sc[k];
          float* o = p.out + k * hw + y * p.w;
          for (int64_t x = 0; x < p.w; ++x) o[x] += wgt * mrow[x];
        }
      }
    }
  });
}

}  // namespace whymatch
