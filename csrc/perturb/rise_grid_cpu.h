// Host-side helpers for RISE masks: interpolation tables over the upsampled
// canvas, so that one mask row costs two loads and a lerp per pixel.
#pragma once
#include <cstdint>
#include <vector>

#include "perturb/rise_grid.h"

namespace whymatch {

struct RiseCanvas {
  int64_t s, cell_h, cell_w, up_h, up_w;
  std::vector<Lerp> ty, tx;  // per upsampled row / column

  RiseCanvas(int64_t h, int64_t w, int64_t s_)
      : s(s_), cell_h(ceil_div64(h, s_)), cell_w(ceil_div64(w, s_)),
        up_h((s_ + 1) * cell_h), up_w((s_ + 1) * cell_w), ty(up_h), tx(up_w) {
    for (int64_t i = 0; i < up_h; ++i) ty[i] = rise_lerp(i, up_h, s);
    for (int64_t i = 0; i < up_w; ++i) tx[i] = rise_lerp(i, up_w, s);
  }

  void check_shift(int64_t n, int64_t dy, int64_t dx, const char* op) const {
    WM_CHECK(dy >= 0 && dy < cell_h && dx >= 0 && dx < cell_w,
             op << ": shifts[" << n << "] must lie in [0, " << cell_h << ") x [0, " << cell_w << ") (cell = ceil(size / s)"
                << " for s=" << s << "), got (" << dy << ", " << dx << ")");
  }

  // hrows[i * up_w + X] = grid row i interpolated horizontally at canvas column X,
  // for the grid rows that canvas rows [Y0, Y1) read (all rows by default).
  void horizontal_rows(const float* g, float* hrows, int64_t Y0 = 0, int64_t Y1 = -1) const {
    int64_t i0 = 0, i1 = s - 1;
    if (Y1 > Y0) {
      i0 = ty[Y0].i0;
      i1 = ty[Y1 - 1].i1;
    }
    for (int64_t i = i0; i <= i1; ++i) {
      const float* gr = g + i * s;
      float* hr = hrows + i * up_w;
      for (int64_t X = 0; X < up_w; ++X) {
        const Lerp& l = tx[X];
        hr[X] = (1.f - l.l) * gr[l.i0] + l.l * gr[l.i1];
      }
    }
  }

  // mrow[x] = mask at canvas row Y, canvas columns dx .. dx + w - 1.
  void mask_row(const float* hrows, int64_t Y, int64_t dx, int64_t w, float* mrow) const {
    const Lerp& l = ty[Y];
    const float* __restrict__ r0 = hrows + l.i0 * up_w + dx;
    const float* __restrict__ r1 = hrows + l.i1 * up_w + dx;
    const float a = 1.f - l.l, b = l.l;
    for (int64_t x = 0; x < w; ++x) mrow[x] = a * r0[x] + b * r1[x];
  }
};

}  // namespace whymatch
