#include "perturb/rise_saliency.h"

#include <algorithm>
#include <vector>

#include "common/parallel.h"
#include "perturb/rise_grid_cpu.h"

namespace whymatch {

// Work is split into tiles of output rows small enough that a tile's K
// accumulator rows stay in cache (about 256 KiB); each worker streams all N
// masks over one tile at a time, building a mask row once and accumulating it
// into the tile's K output rows.
void rise_saliency_cpu(const RiseSaliencyParams& p, int num_threads) {
  check_rise_saliency(p);
  const int64_t hw = p.H * p.W;
  if (p.K * hw == 0) return;
  std::fill(p.out, p.out + p.K * hw, 0.f);
  if (p.N == 0) return;
  const RiseCanvas cv(p.H, p.W, p.S);
  for (int64_t n = 0; n < p.N; ++n) cv.check_shift(n, p.shifts[2 * n], p.shifts[2 * n + 1], "rise_saliency");

  const int64_t budget = 256 * 1024 / static_cast<int64_t>(sizeof(float));
  int64_t tile = std::max<int64_t>(1, budget / std::max<int64_t>(1, p.K * p.W));
  // several tiles per thread, claimed dynamically, so that a descheduled thread holds up little work
  const int64_t min_tiles = std::max(1, num_threads) * 4;
  tile = std::min(tile, (p.H + min_tiles - 1) / min_tiles);
  tile = std::max<int64_t>(1, tile);
  const int64_t n_tiles = (p.H + tile - 1) / tile;
  // below ~64K multiply-adds the whole call is cheaper on one thread than waking the pool
  if (p.N * p.K * hw < 65536) num_threads = 1;

  parallel_for(n_tiles, num_threads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> hrows(p.S * cv.up_w), mrow(p.W);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t y0 = t * tile, y1 = std::min(p.H, y0 + tile);
      for (int64_t n = 0; n < p.N; ++n) {
        const int64_t dy = p.shifts[2 * n], dx = p.shifts[2 * n + 1];
        cv.horizontal_rows(p.grids + n * p.S * p.S, hrows.data(), y0 + dy, y1 + dy);
        const float* sc = p.scores + n * p.K;
        for (int64_t y = y0; y < y1; ++y) {
          cv.mask_row(hrows.data(), y + dy, dx, p.W, mrow.data());
          for (int64_t k = 0; k < p.K; ++k) {
            const float wgt = sc[k];
            float* __restrict__ o = p.out + k * hw + y * p.W;
            const float* __restrict__ m = mrow.data();
            for (int64_t x = 0; x < p.W; ++x) o[x] += wgt * m[x];
          }
        }
      }
    }
  });
}

}  // namespace whymatch
