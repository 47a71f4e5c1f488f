#include "perturb/rise_apply.h"

#include <algorithm>
#include <cstring>
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
// mask) and image/baseline transposed to HWC once per call.
//
// Cache blocking: the image and the baseline are read once per output pixel, 2 x C x H x W floats
// per mask (1.2 MB at 3 x 224 x 224: more than a core's L2), so a mask at a time would stream them
// from L3 for every mask. Instead the masks of a chunk go in blocks: each mask's interpolated grid
// rows are computed once per block, and the block writes its masks one band of rows at a time, the
// band's image and baseline rows (about kBandBytes) staying in L2 across the block's masks.
constexpr int64_t kBandBytes = int64_t(192) << 10;   // image + baseline rows of one band
constexpr int64_t kBlockBytes = int64_t(128) << 10;  // interpolated grid rows of one block of masks

template <typename T>
void rise_apply_impl(const RiseApplyParams& p, int num_threads) {
  const RiseCanvas cv(p.H, p.W, p.S);
  // every shift before any write: its values index the canvas tables
  for (int64_t n = 0; n < p.N; ++n) cv.check_shift(n, p.shifts[2 * n], p.shifts[2 * n + 1], "rise_apply");
  T* out = static_cast<T*>(p.out);
  const int64_t hw = p.H * p.W, chw = p.C * hw;
  const bool stream = blend::use_stream(p.N * chw * static_cast<int64_t>(sizeof(T)));
  const blend::LerpFn lerp = blend::pick_lerp();
  // A baseline plane with one value throughout (RISE's default 0, a per-channel mean) is read as that
  // value: one load stream less per output element (bitwise equality, so -0.0 and NaN planes take the
  // general path and every result is the same as with it)
  const auto constant = [](const float* v, int64_t n) {
    for (int64_t i = 1; i < n; ++i)
      if (std::memcmp(v + i, v, sizeof(float)) != 0) return false;
    return true;
  };
  std::vector<blend::MixFn<T>> plane_mix(static_cast<size_t>(p.C));  // NCHW: channel c's blend
  bool all_same = true;  // channels_last: one value in every plane
  for (int64_t c = 0; c < p.C; ++c) {
    const bool k = constant(p.baseline + c * hw, hw);
    plane_mix[c] = k ? blend::pick_mix<T, true>() : blend::pick_mix<T, false>();
    all_same = all_same && k && std::memcmp(p.baseline + c * hw, p.baseline, sizeof(float)) == 0;
  }
  const blend::MixFn<T> row_mix = all_same ? blend::pick_mix<T, true>() : blend::pick_mix<T, false>();

  std::vector<float> im_hwc, bl_hwc;
  const bool expand = p.channels_last && p.C > 1;  // rows of W x C values: grid rows repeated per channel
  if (expand) {
    im_hwc.resize(static_cast<size_t>(chw));
    bl_hwc.resize(static_cast<size_t>(chw));
    for (int64_t c = 0; c < p.C; ++c)
      for (int64_t i = 0; i < hw; ++i) {
        im_hwc[i * p.C + c] = p.image[c * hw + i];
        bl_hwc[i * p.C + c] = p.baseline[c * hw + i];
      }
  }
  const float* im_rows = expand ? im_hwc.data() : p.image;  // (H, W, C) when channels_last
  const float* bl_rows = expand ? bl_hwc.data() : p.baseline;
  // per mask: its grid rows interpolated horizontally (s x up_w values, each repeated per channel when expand)
  const int64_t rep = expand ? p.C : 1;
  const int64_t hrows_n = p.S * cv.up_w * rep;
  const int64_t row_n = p.channels_last ? p.W * p.C : p.W;  // values of one mask row as the mix reads it
  const int64_t band = std::max<int64_t>(1, kBandBytes / (2 * p.C * p.W * int64_t(sizeof(float))));
  const int64_t block = std::max<int64_t>(1, kBlockBytes / (hrows_n * int64_t(sizeof(float))));

  // at least ~32K output elements per chunk: a tiny batch is not worth waking the pool for
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, chw));
  parallel_for(p.N, num_threads, grain, [&](int64_t begin, int64_t end) {
    const int64_t nb = std::min(block, end - begin);
    std::vector<float> local;
    float* hrows = scratch(local, nb * hrows_n + p.S * cv.up_w + row_n);
    float* plain = hrows + nb * hrows_n;  // one mask's rows before the repeat (expand only)
    float* mrow = plain + p.S * cv.up_w;
    for (int64_t n0 = begin; n0 < end; n0 += nb) {
      const int64_t n1 = std::min(end, n0 + nb);
      for (int64_t n = n0; n < n1; ++n) {
        float* hr = hrows + (n - n0) * hrows_n;
        if (!expand) {
          cv.horizontal_rows(p.grids + n * p.S * p.S, hr);
          continue;
        }
        cv.horizontal_rows(p.grids + n * p.S * p.S, plain);
        for (int64_t i = 0; i < p.S * cv.up_w; ++i)
          for (int64_t c = 0; c < p.C; ++c) hr[i * p.C + c] = plain[i];
      }
      for (int64_t y0 = 0; y0 < p.H; y0 += band) {
        const int64_t y1 = std::min(p.H, y0 + band);
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t dy = p.shifts[2 * n], dx = p.shifts[2 * n + 1];
          const float* hr = hrows + (n - n0) * hrows_n;
          T* o = out + n * chw;
          for (int64_t y = y0; y < y1; ++y) {
            // the mask at canvas row y + dy, columns dx .. dx + W - 1 (RiseCanvas::mask_row), per channel if expand
            const Lerp& l = cv.ty[y + dy];
            lerp(mrow, hr + (l.i0 * cv.up_w + dx) * rep, hr + (l.i1 * cv.up_w + dx) * rep, 1.f - l.l, l.l,
                 p.W * rep);
            if (!p.channels_last) {  // C output rows of one mask row, which stays in L1
              for (int64_t c = 0; c < p.C; ++c)
                plane_mix[c](o + c * hw + y * p.W, mrow, p.image + c * hw + y * p.W, p.baseline + c * hw + y * p.W,
                             p.W, stream);
            } else {
              row_mix(o + y * row_n, mrow, im_rows + y * row_n, bl_rows + y * row_n, row_n, stream);
            }
          }
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
