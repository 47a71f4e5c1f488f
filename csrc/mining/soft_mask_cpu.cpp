#include <algorithm>
#include <cmath>
#include <vector>

#include "common/parallel.h"
#include "mining/soft_mask.h"

namespace whymatch {

// keep[i] = 1 / (1 + exp(alpha * (u[i] - beta))), in soft_mask_math_cpu.cpp (built so that exp vectorizes).
void sigmoid_keep(const float* u, float alpha, float beta, float* keep, int64_t n);
void sigmoid_keep(const double* u, double alpha, double beta, double* keep, int64_t n);

namespace {

template <typename acc_t>
struct Tables {
  std::vector<SmLerp<acc_t>> ty, tx;  // per output row / column
  Tables(const SoftMaskParams& p) : ty(p.H), tx(p.W) {
    for (int64_t y = 0; y < p.H; ++y) ty[y] = sm_lerp<acc_t>(y, p.H, p.Ha);
    for (int64_t x = 0; x < p.W; ++x) tx[x] = sm_lerp<acc_t>(x, p.W, p.Wa);
  }
};

// keep[x] = 1 - sigmoid(alpha * (u(y, x) - beta)) = 1 / (1 + exp(alpha * (u - beta))) along one output row.
template <typename acc_t>
void keep_row(const SoftMaskParams& p, const Tables<acc_t>& tb, int64_t bi, int64_t y, acc_t alpha, acc_t beta,
              acc_t* u, acc_t* keep) {
  const acc_t* m = static_cast<const acc_t*>(p.attention) + bi * p.Ha * p.Wa;
  const SmLerp<acc_t>& ly = tb.ty[y];
  const acc_t* r0 = m + ly.i0 * p.Wa;
  const acc_t* r1 = m + ly.i1 * p.Wa;
  const acc_t h0 = acc_t(1) - ly.l, h1 = ly.l;
  for (int64_t x = 0; x < p.W; ++x) {
    const SmLerp<acc_t>& lx = tb.tx[x];
    const acc_t w0 = acc_t(1) - lx.l, w1 = lx.l;
    u[x] = h0 * (w0 * r0[lx.i0] + w1 * r0[lx.i1]) + h1 * (w0 * r1[lx.i0] + w1 * r1[lx.i1]);
  }
  sigmoid_keep(u, alpha, beta, keep, p.W);  // vectorized exp (soft_mask_math_cpu.cpp)
}

// Element (bi, c, y, 0) of a row and the distance between neighbours along x.
inline int64_t row_base(const SoftMaskParams& p, int64_t bi, int64_t c, int64_t y) {
  return p.channels_last ? (bi * p.H + y) * p.W * p.C + c : ((bi * p.C + c) * p.H + y) * p.W;
}

int64_t row_grain(const SoftMaskParams& p) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.W * p.C)); }

template <typename T>
void forward_impl(const SoftMaskParams& p, int num_threads) {
  using acc_t = typename AccType<T>::type;
  const Tables<acc_t> tb(p);
  const acc_t alpha = *static_cast<const acc_t*>(p.alpha), beta = *static_cast<const acc_t*>(p.beta);
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  parallel_for(p.B * p.H, num_threads, row_grain(p), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> u(p.W), keep(p.W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bi = r / p.H, y = r % p.H;
      keep_row(p, tb, bi, y, alpha, beta, u.data(), keep.data());
      for (int64_t c = 0; c < p.C; ++c) {
        const int64_t base = row_base(p, bi, c, y);
        if (p.channels_last) {
          for (int64_t xx = 0; xx < p.W; ++xx)
            out[base + xx * p.C] = from_acc<T>(static_cast<acc_t>(to_acc(x[base + xx * p.C])) * keep[xx]);
        } else {
          const T* __restrict__ xr = x + base;
          T* __restrict__ orow = out + base;
          for (int64_t xx = 0; xx < p.W; ++xx) orow[xx] = from_acc<T>(static_cast<acc_t>(to_acc(xr[xx])) * keep[xx]);
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const SoftMaskParams& p, int num_threads) {
  using acc_t = typename AccType<T>::type;
  const Tables<acc_t> tb(p);
  const acc_t alpha = *static_cast<const acc_t*>(p.alpha), beta = *static_cast<const acc_t*>(p.beta);
  const T* x = static_cast<const T*>(p.x);
  const T* g = static_cast<const T*>(p.grad_out);
  T* gx = static_cast<T*>(p.grad_x);
  acc_t* qh = static_cast<acc_t*>(p.workspace);  // [b, H, w]: q summed horizontally onto the source columns
  const bool want_att = p.grad_attention != nullptr;

  // Pass 1, one output row at a time: grad_x, and q pulled back through the horizontal interpolation.
  parallel_for(p.B * p.H, num_threads, row_grain(p), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> u(p.W), keep(p.W), sgx(p.W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bi = r / p.H, y = r % p.H;
      keep_row(p, tb, bi, y, alpha, beta, u.data(), keep.data());
      std::fill(sgx.begin(), sgx.end(), acc_t(0));
      const int64_t step = p.channels_last ? p.C : 1;
      for (int64_t c = 0; c < p.C; ++c) {
        const int64_t base = row_base(p, bi, c, y);
        const T* __restrict__ gr = g + base;
        const T* __restrict__ xr = x + base;
        if (gx) {
          T* __restrict__ gxr = gx + base;
          for (int64_t xx = 0; xx < p.W; ++xx) gxr[xx * step] = from_acc<T>(to_acc(gr[xx * step]) * keep[xx]);
        }
        if (want_att)
          for (int64_t xx = 0; xx < p.W; ++xx)
            sgx[xx] += to_acc(gr[xx * step]) * static_cast<acc_t>(to_acc(xr[xx * step]));
      }
      if (!want_att) continue;
      acc_t* row = qh + r * p.Wa;
      std::fill(row, row + p.Wa, acc_t(0));
      for (int64_t xx = 0; xx < p.W; ++xx) {
        const acc_t k = keep[xx];
        const acc_t q = -k * (acc_t(1) - k) * sgx[xx];
        const SmLerp<acc_t>& lx = tb.tx[xx];
        row[lx.i0] += (acc_t(1) - lx.l) * q;
        row[lx.i1] += lx.l * q;
      }
    }
  });
  if (!want_att) return;

  // Pass 2, one source row (bi, i) at a time: gather the output rows that read it.
  acc_t* G = static_cast<acc_t*>(p.grad_attention);
  parallel_for(p.B * p.Ha, num_threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bi = r / p.Ha, i = r % p.Ha;
      acc_t* out = G + r * p.Wa;
      std::fill(out, out + p.Wa, acc_t(0));
      int64_t lo = 0, hi = 0;
      sm_range<acc_t>(i, p.H, p.Ha, &lo, &hi);
      for (int64_t y = lo; y < hi; ++y) {
        const acc_t wy = sm_weight(tb.ty[y], i);
        if (wy == acc_t(0)) continue;
        const acc_t* row = qh + (bi * p.H + y) * p.Wa;
        for (int64_t j = 0; j < p.Wa; ++j) out[j] += wy * row[j];
      }
    }
  });
}

}  // namespace

void soft_mask_cpu(const SoftMaskParams& p, int num_threads) {
  check_soft_mask(p, false);
  if (p.B * p.C * p.H * p.W == 0) return;
  WM_DISPATCH_FLOAT64_HOST(p.dtype, "soft_mask", [&] { forward_impl<scalar_t>(p, num_threads); });
}

void soft_mask_backward_cpu(const SoftMaskParams& p, int num_threads) {
  check_soft_mask(p, true);
  if (p.grad_attention && p.B * p.Ha * p.Wa > 0 && p.C * p.H * p.W == 0) {  // nothing reads the maps: zero gradient
    WM_DISPATCH_FLOAT64_HOST(p.dtype, "soft_mask_backward", [&] {
      using acc_t = typename AccType<scalar_t>::type;
      std::fill_n(static_cast<acc_t*>(p.grad_attention), p.B * p.Ha * p.Wa, acc_t(0));
    });
    return;
  }
  if (p.B * p.C * p.H * p.W == 0) return;
  WM_DISPATCH_FLOAT64_HOST(p.dtype, "soft_mask_backward", [&] { backward_impl<scalar_t>(p, num_threads); });
}

}  // namespace whymatch
