#include "perturb/rise_apply.h"

#include <algorithm>
#include <vector>

#include "common/parallel.h"
#include "perturb/blend_cpu.h"
#include "perturb/rise_grid_cpu.h"

namespace whymatch {

namespace {

// A per-thread scratch buffer kept between calls (the pool's threads persist), so that a chunk
// does not allocate (and page-fault) its mask buffer again; requests above kKeepFloats use `local`.
float* scratch(std::vector<float>& local, int64_t n) {
  constexpr int64_t kKeepFloats = int64_t(1) << 20;  // 4 MiB per thread at most
  thread_local std::vector<float> kept;
  if (n > kKeepFloats) {
    local.resize(static_cast<size_t>(n));
    return local.data();
  }
  if (static_cast<int64_t>(kept.size()) < n) kept.resize(static_cast<size_t>(n));
  return kept.data();
}

// Mask n is built a row at a time (two loads and a lerp per pixel from the rows of its grid
// interpolated horizontally) into a buffer that stays in L1, then blended into the output with
// blend::pick_mix: for NCHW the row of each channel plane (C output streams, each contiguous over
// the mask), for channels_last the row's pixels x channels in one pass, the mask row computed
// already repeated per channel (from the grid's interpolated rows repeated per channel, once per
// mask) and image/baseline transposed to HWC once per call. (Building the whole H x W mask first
// and then writing each plane in one pass measured the same, with a buffer in L2 instead of L1.)
template <typename T>
void rise_apply_impl(const RiseApplyParams& p, int num_threads) {
  const RiseCanvas cv(p.H, p.W, p.S);
  // every shift before any write: its values index the canvas tables
  for (int64_t n = 0; n < p.N; ++n) cv.check_shift(n, p.shifts[2 * n], p.shifts[2 * n + 1], "rise_apply");
  T* out = static_cast<T*>(p.out);
  const int64_t hw = p.H * p.W, chw = p.C * hw;
  const bool stream = blend::use_stream(p.N * chw * static_cast<int64_t>(sizeof(T)));
  const blend::MixFn<T> mix = blend::pick_mix<T>();
  const blend::LerpFn lerp = blend::pick_lerp();
  // RiseCanvas::mask_row at the kernels' instruction set: the mask at canvas row Y, columns dx .. dx + w - 1
  const auto mask_row = [&](const float* hrows, int64_t Y, int64_t dx, float* o) {
    const Lerp& l = cv.ty[Y];
    lerp(o, hrows + l.i0 * cv.up_w + dx, hrows + l.i1 * cv.up_w + dx, 1.f - l.l, l.l, p.W);
  };

  std::vector<float> im_hwc, bl_hwc;
  if (p.channels_last && p.C > 1) {
    im_hwc.resize(static_cast<size_t>(chw));
    bl_hwc.resize(static_cast<size_t>(chw));
    for (int64_t c = 0; c < p.C; ++c)
      for (int64_t i = 0; i < hw; ++i) {
        im_hwc[i * p.C + c] = p.image[c * hw + i];
        bl_hwc[i * p.C + c] = p.baseline[c * hw + i];
      }
  }
  const float* im_rows = im_hwc.empty() ? p.image : im_hwc.data();  // (H, W, C) when channels_last
  const float* bl_rows = bl_hwc.empty() ? p.baseline : bl_hwc.data();

  // at least ~32K output elements per chunk: a tiny batch is not worth waking the pool for
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, chw));
  parallel_for(p.N, num_threads, grain, [&](int64_t begin, int64_t end) {
    const int64_t hrows_n = p.S * cv.up_w;
    const bool expand = p.channels_last && p.C > 1;  // hrows repeated per channel: (s, up_w, C)
    const int64_t mask_n = expand ? hrows_n * p.C + p.W * p.C : p.W;
    std::vector<float> local;
    float* hrows = scratch(local, hrows_n + mask_n);
    float* mask = hrows + hrows_n;
    for (int64_t n = begin; n < end; ++n) {
      const int64_t dy = p.shifts[2 * n], dx = p.shifts[2 * n + 1];
      cv.horizontal_rows(p.grids + n * p.S * p.S, hrows);
      if (!p.channels_last) {
        for (int64_t y = 0; y < p.H; ++y) {  // the mask row stays in L1 for the C output rows
          mask_row(hrows, y + dy, dx, mask);
          const int64_t row = y * p.W;
          for (int64_t c = 0; c < p.C; ++c)
            mix(out + n * chw + c * hw + row, mask, p.image + c * hw + row, p.baseline + c * hw + row, p.W, stream);
        }
      } else {
        // each value of the grid's horizontally interpolated rows repeated per channel (once per mask,
        // s x up_w x C values), so that a mask row repeated per channel is one vector lerp of W x C values
        const int64_t row = p.W * p.C;
        const float* hr = hrows;
        float* mrow = mask;
        if (expand) {
          float* hexp = mask;
          mrow = mask + hrows_n * p.C;
          for (int64_t i = 0; i < hrows_n; ++i)
            for (int64_t c = 0; c < p.C; ++c) hexp[i * p.C + c] = hrows[i];
          hr = hexp;
        }
        for (int64_t y = 0; y < p.H; ++y) {
          const Lerp& l = cv.ty[y + dy];
          lerp(mrow, hr + (l.i0 * cv.up_w + dx) * p.C, hr + (l.i1 * cv.up_w + dx) * p.C, 1.f - l.l, l.l, row);
          mix(out + n * chw + y * row, mrow, im_rows + y * row, bl_rows + y * row, row, stream);
        }
      }
    }
    blend::fence(stream);
  });
}

}  // namespace

void rise_apply_cpu(const RiseApplyParams& p, int num_threads) {
  check_rise_apply(p);
  if (p.N * p.C * p.H * p.W == 0) return;
  WM_DISPATCH_FLOAT_HOST(p.out_dtype, "rise_apply", [&] { rise_apply_impl<scalar_t>(p, num_threads); });
}

}  // namespace whymatch
