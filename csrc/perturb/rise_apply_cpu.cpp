#include "perturb/rise_apply.h"

#include <algorithm>
#include <vector>

#include "common/parallel.h"
#include "perturb/rise_grid_cpu.h"

namespace whymatch {

namespace {

template <typename T>
void rise_apply_impl(const RiseApplyParams& p, int num_threads) {
  const RiseCanvas cv(p.h, p.w, p.s);
  // every shift before any write: its values index the canvas tables
  for (int64_t n = 0; n < p.n; ++n) cv.check_shift(n, p.shifts[2 * n], p.shifts[2 * n + 1], "rise_apply");
  T* out = static_cast<T*>(p.out);
  const int64_t hw = p.h * p.w;

  // at least ~32K output elements per chunk: a tiny batch is not worth waking the pool for
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.c * hw));
  parallel_for(p.n, num_threads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> hrows(p.s * cv.up_w), mrow(p.w);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t dy = p.shifts[2 * n], dx = p.shifts[2 * n + 1];
      cv.horizontal_rows(p.grids + n * p.s * p.s, hrows.data());
      for (int64_t y = 0; y < p.h; ++y) {
        cv.mask_row(hrows.data(), y + dy, dx, p.w, mrow.data());
        if (p.channels_last) {
          T* o = out + (n * hw + y * p.w) * p.c;
          for (int64_t x = 0; x < p.w; ++x) {
            const float m = mrow[x];
            for (int64_t c = 0; c < p.c; ++c) {
              const int64_t src = c * hw + y * p.w + x;
              o[x * p.c + c] = from_float<T>(m * p.image[src] + (1.f - m) * p.baseline[src]);
            }
          }
        } else {
          for (int64_t c = 0; c < p.c; ++c) {
            T* o = out + ((n * p.c + c) * p.h + y) * p.w;
            const float* im = p.image + c * hw + y * p.w;
            const float* bl = p.baseline + c * hw + y * p.w;
            for (int64_t x = 0; x < p.w; ++x) {
              const float m = mrow[x];
              o[x] = from_float<T>(m * im[x] + (1.f - m) * bl[x]);
            }
          }
        }
      }
    }
  });
}

}  // namespace

void rise_apply_cpu(const RiseApplyParams& p, int num_threads) {
  check_rise_apply(p);
  if (p.n * p.c * p.h * p.w == 0) return;
  WM_DISPATCH_FLOAT_HOST(p.out_dtype, "rise_apply", [&] { rise_apply_impl<scalar_t>(p, num_threads); });
}

}  // namespace whymatch
