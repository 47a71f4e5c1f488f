// AVSL CAM statistics of one level pair (Zhang et al., CVPR 2022, Sec. 3.2-3.3), fused:
//
//   low'[b, m, :]  = l2norm(adaptive_avg_pool(cam_low[b, m], H2 x W2))      (J = H2 * W2 positions)
//   high'[b, n, :] = l2norm(cam_high[b, n])
//   corr[m, n]     = (1 / B) sum_b sum_j low'[b, m, j] * high'[b, n, j]       (R1 x R2)
//   edges          = corr                                 (first)
//                  = momentum * edges + (1 - momentum) * corr                 (otherwise; optional, in place)
//   rel[b, r]      = std_unbiased(l1norm(cam[b, r] - min cam[b, r]))          (optional, for both levels)
//
// Pooling bins are torch's adaptive_avg_pool2d: rows [floor(i H1 / H2), ceil((i + 1) H1 / H2)).
// l2norm / l1norm are F.normalize: x / max(||x||, 1e-12). The minimum of the reliability is over
// the whole map, or over each row (the last axis) when `published` (the published code's FIXME).
//
// One call: a first pass reads every CAM once (pooling, normalization, reliability) and writes the
// normalized maps, K-major, into the caller's workspace (K = B * J rows of R1p + R2p columns: at
// most the size of the CAMs, never B x R1 x R2); a second pass is the (R1 x K) x (K x R2) product,
// blocked for cache on the CPU and tiled in shared memory on CUDA; the epilogue writes corr and
// updates edges. The CPU alternates the two passes over chunks of images (a workspace of a few
// MB that stays in cache, corr as the accumulator). The reliability-only entry point reads one
// level's CAMs and writes (B, R).
//
// Storage: everything in `dtype`, float32 or float64 (float64 for exact tests); contiguous NCHW
// CAMs, row-major (R1, R2) corr and edges, (B, R) rel.
#pragma once
#include <cstdint>

#include "common/check.h"
#include "common/dtype.h"

namespace whymatch {

struct CamCorrParams {
  const void* low = nullptr;   // [B, R1, H1, W1]
  const void* high = nullptr;  // [B, R2, H2, W2]
  void* corr = nullptr;        // [R1, R2] (may be null: edges only)
  void* edges = nullptr;       // [R1, R2], updated in place (may be null)
  void* rel_low = nullptr;     // [B, R1] (may be null)
  void* rel_high = nullptr;    // [B, R2] (may be null)
  void* workspace = nullptr;   // cam_corr_workspace_bytes(...) bytes
  int64_t B = 0, R1 = 0, H1 = 0, W1 = 0, R2 = 0, H2 = 0, W2 = 0;
  double momentum = 0.5;
  bool first = false;          // edges = corr
  bool published = false;      // reliability minimum over the last axis only
  DType dtype = DType::F32;
};

// Padded widths (row strides) of the K-major workspace panels; padding columns are never read.
inline int64_t cam_corr_pad(int64_t r, int64_t to) { return (r + to - 1) / to * to; }
constexpr int64_t kCamMR = 8, kCamNR = 16;

// Images per chunk of the CPU kernel (pass 1 and pass 2 alternate over chunks of about 1,024
// positions x images, so that a chunk's normalized maps stay in cache); CUDA takes the whole batch.
inline int64_t cam_corr_chunk_images_cpu(int64_t B, int64_t J) {
  const int64_t c = 1024 / (J > 0 ? J : 1);
  return B < 1 ? 1 : (c < 1 ? 1 : (c > B ? B : c));
}

// Workspace of B images (CUDA: the batch; CPU: cam_corr_chunk_images_cpu(B, H2 * W2)).
inline int64_t cam_corr_workspace_bytes(int64_t B, int64_t R1, int64_t R2, int64_t H2, int64_t W2, DType dtype) {
  const int64_t elem = dtype == DType::F64 ? 8 : 4;
  return B * H2 * W2 * (cam_corr_pad(R1, kCamMR) + cam_corr_pad(R2, kCamNR)) * elem;
}

// Source window [start, end) of output index i of an adaptive average pool from `in` to `out`.
WM_HOST_DEVICE int64_t cam_pool_start(int64_t i, int64_t in, int64_t out) { return (i * in) / out; }
WM_HOST_DEVICE int64_t cam_pool_end(int64_t i, int64_t in, int64_t out) { return ((i + 1) * in + out - 1) / out; }

inline void check_cam_corr(const CamCorrParams& p) {
  WM_CHECK(p.B >= 0 && p.R1 >= 0 && p.R2 >= 0 && p.H1 >= 1 && p.W1 >= 1 && p.H2 >= 1 && p.W2 >= 1,
           "avsl_cam_correlation: bad sizes B=" << p.B << " R1=" << p.R1 << " H1=" << p.H1 << " W1=" << p.W1
                                                << " R2=" << p.R2 << " H2=" << p.H2 << " W2=" << p.W2);
  WM_CHECK(p.B >= 1, "avsl_cam_correlation: the batch must not be empty (a batch mean of nothing)");
  WM_CHECK(p.dtype == DType::F32 || p.dtype == DType::F64,
           "avsl_cam_correlation: dtype must be float32 or float64, got " << dtype_name(p.dtype));
  if (p.R1 * p.R2 > 0) WM_CHECK(p.low && p.high && p.workspace, "avsl_cam_correlation: null input/workspace pointer");
  WM_CHECK(p.corr || p.edges || p.rel_low || p.rel_high || p.R1 * p.R2 == 0, "avsl_cam_correlation: no output");
  WM_CHECK(p.momentum >= 0.0 && p.momentum <= 1.0, "avsl_cam_correlation: momentum must be in [0, 1], got "
                                                       << p.momentum);
}

// Reliability of one level only: rel [B, R] from cam [B, R, H, W] (H * W >= 2).
struct CamRelParams {
  const void* cam = nullptr;
  void* rel = nullptr;
  int64_t B = 0, R = 0, H = 0, W = 0;
  bool published = false;
  DType dtype = DType::F32;
};

inline void check_cam_rel(const CamRelParams& p) {
  WM_CHECK(p.B >= 0 && p.R >= 0 && p.H >= 1 && p.W >= 1 && p.H * p.W >= 2,
           "avsl_cam_reliability: bad sizes B=" << p.B << " R=" << p.R << " H=" << p.H << " W=" << p.W
                                                << " (at least 2 positions per map)");
  WM_CHECK(p.dtype == DType::F32 || p.dtype == DType::F64,
           "avsl_cam_reliability: dtype must be float32 or float64, got " << dtype_name(p.dtype));
  if (p.B * p.R > 0) WM_CHECK(p.cam && p.rel, "avsl_cam_reliability: null pointer");
}

void avsl_cam_correlation_cpu(const CamCorrParams& p, int num_threads);
void avsl_cam_reliability_cpu(const CamRelParams& p, int num_threads);
void avsl_cam_correlation_cuda(const CamCorrParams& p, void* stream);
void avsl_cam_reliability_cuda(const CamRelParams& p, void* stream);

}  // namespace whymatch
