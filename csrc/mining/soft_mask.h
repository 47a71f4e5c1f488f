// Soft mask of the similarity-mining loss (Zheng et al.), fused with bilinear upsampling:
//
//   u[b, Y, X]   = bilinear(attention[b], Y, X)          (h x w -> H x W, half-pixel centres,
//                                                         torch's align_corners=False, no anti-aliasing)
//   s            = sigmoid(alpha * (u - beta))
//   out[b,c,Y,X] = x[b,c,Y,X] * (1 - s)
//
// Backward (g = dL/dout):
//   grad_x[b,c,Y,X] = g * (1 - s)
//   q[b, Y, X]      = -s * (1 - s) * sum_c g * x          (= dL/dz, z = alpha * (u - beta))
//   G[b, i, j]      = sum_{Y,X} wy(Y, i) wx(X, j) q       (the adjoint of the upsampling)
// from which the caller forms dL/dattention = alpha * G, dL/dbeta = -alpha * sum(G),
// dL/dalpha = sum(attention * G) - beta * sum(G) (bilinear weights of a pixel sum to 1).
//
// Storage: x, out, g, grad_x in `dtype` (float32, float16, bfloat16 or float64), NCHW or
// NHWC (channels_last); attention, G, alpha, beta in the compute type: double for
// float64, float otherwise. Nothing but the inputs is needed by the backward.
#pragma once
#include <cstdint>

#include "common/check.h"
#include "common/dtype.h"

namespace whymatch {

struct SoftMaskParams {
  const void* x = nullptr;          // [b, c, H, W] (or [b, H, W, c] when channels_last), dtype
  const void* attention = nullptr;  // [b, h, w], compute type
  const void* alpha = nullptr;      // one compute-type value (device memory for CUDA)
  const void* beta = nullptr;       // one compute-type value
  void* out = nullptr;              // forward: like x
  const void* grad_out = nullptr;   // backward: like x
  void* grad_x = nullptr;           // backward: like x (may be null: not needed)
  void* grad_attention = nullptr;   // backward: G, [b, h, w], compute type (may be null)
  void* workspace = nullptr;        // backward: b * H * w compute-type values (CPU) / b * H * W (CUDA)
  int64_t B = 0, C = 0, H = 0, W = 0, Ha = 0, Wa = 0;  // Ha x Wa: the attention maps
  DType dtype = DType::F32;
  bool channels_last = false;
};

// Bilinear source position of output index o along an axis upsampled from `in` to `out`
// (the arithmetic of torch's upsample_bilinear2d with align_corners=False and no scale).
template <typename acc_t>
struct SmLerp {
  int64_t i0, i1;  // source indices (i1 == i0 at the last one)
  acc_t l;         // weight of i1; i0 gets 1 - l
};

template <typename acc_t>
WM_HOST_DEVICE SmLerp<acc_t> sm_lerp(int64_t o, int64_t out, int64_t in) {
  const acc_t scale = static_cast<acc_t>(in) / static_cast<acc_t>(out);
  acc_t src = scale * (static_cast<acc_t>(o) + acc_t(0.5)) - acc_t(0.5);
  if (src < acc_t(0)) src = acc_t(0);
  int64_t i0 = static_cast<int64_t>(src);
  if (i0 > in - 1) i0 = in - 1;
  SmLerp<acc_t> r;
  r.i0 = i0;
  r.i1 = i0 + (i0 < in - 1 ? 1 : 0);
  r.l = src - static_cast<acc_t>(i0);
  return r;
}

// Output indices [lo, hi) whose bilinear sample reads source index i (i0 in {i - 1, i}):
// i0 is non-decreasing in the output index, so two binary searches find the range.
template <typename acc_t>
WM_HOST_DEVICE void sm_range(int64_t i, int64_t out, int64_t in, int64_t* lo, int64_t* hi) {
  int64_t a = 0, b = out;  // first o with i0(o) >= i - 1
  while (a < b) {
    const int64_t m = (a + b) / 2;
    if (sm_lerp<acc_t>(m, out, in).i0 >= i - 1) b = m; else a = m + 1;
  }
  *lo = a;
  a = *lo, b = out;  // first o with i0(o) > i
  while (a < b) {
    const int64_t m = (a + b) / 2;
    if (sm_lerp<acc_t>(m, out, in).i0 > i) b = m; else a = m + 1;
  }
  *hi = a;
}

// Weight of source index i in the sample at output index o.
template <typename acc_t>
WM_HOST_DEVICE acc_t sm_weight(const SmLerp<acc_t>& l, int64_t i) {
  return (l.i0 == i ? acc_t(1) - l.l : acc_t(0)) + (l.i1 == i ? l.l : acc_t(0));
}

inline void check_soft_mask(const SoftMaskParams& p, bool backward) {
  WM_CHECK(p.B >= 0 && p.C >= 0 && p.H >= 0 && p.W >= 0 && p.Ha >= 0 && p.Wa >= 0,
           "soft_mask: sizes must be non-negative, got b=" << p.B << " c=" << p.C << " H=" << p.H << " W=" << p.W
                                                         << " h=" << p.Ha << " w=" << p.Wa);
  if (p.B * p.H * p.W > 0) {
    WM_CHECK(p.Ha >= 1 && p.Wa >= 1, "soft_mask: attention maps must be at least 1 x 1, got " << p.Ha << " x " << p.Wa);
    WM_CHECK(p.attention && p.alpha && p.beta, "soft_mask: null attention/alpha/beta pointer");
    if (p.C > 0) WM_CHECK(p.x, "soft_mask: null x pointer");
    if (backward) {
      if (p.C > 0) WM_CHECK(p.grad_out, "soft_mask_backward: null grad_out pointer");
      if (p.grad_x && p.C > 0) WM_CHECK(p.x, "soft_mask_backward: null x pointer");
      if (p.grad_attention) WM_CHECK(p.workspace, "soft_mask_backward: null workspace pointer");
    } else if (p.C > 0) {
      WM_CHECK(p.out, "soft_mask: null out pointer");
    }
  }
}

void soft_mask_cpu(const SoftMaskParams& p, int num_threads);
void soft_mask_backward_cpu(const SoftMaskParams& p, int num_threads);
void soft_mask_cuda(const SoftMaskParams& p, void* stream);
void soft_mask_backward_cuda(const SoftMaskParams& p, void* stream);

}  // namespace whymatch
