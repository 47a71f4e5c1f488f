// CPU kernels of the fused AVSL CAM correlation (see avsl/cam_correlation.h).
//
// Pass 1 (parallel over groups of 16 maps of one image and level): pool and l2-normalize each map
// into a small buffer, store the group K-major in the workspace (lt: K x R1p, ht: K x R2p,
// K = B * J; one cache line per position, not one per value), and the reliability of each raw map.
// Pass 2 (parallel over MC x NC tiles of corr): for each KC slice of K, pack the tile's panels of
// lt and ht contiguously (zero-filled past R1, R2) and run a register-blocked micro-kernel: 6 x 32
// (AVX-512) or 6 x 16 (AVX2) float32 in intrinsics, a compiler-vectorized 8 x 16 otherwise and for
// float64, chosen once at load time; the epilogue writes corr and updates edges.
#include <algorithm>
#include <cstring>
#include <cmath>
#include <vector>

#include "avsl/cam_correlation.h"
#include "common/cpu_isa.h"
#include "common/parallel.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace whymatch {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define WM_CAM_X86 1
#define WM_CAM_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))
#define WM_CAM_AVX2 __attribute__((target("avx2,fma")))
#define WM_CAM_INLINE __attribute__((always_inline)) inline
#else
#define WM_CAM_X86 0
#define WM_CAM_INLINE inline
#endif


// ---- pass 1: one map ----

// Reductions over n values with 8 independent partial results (a single chain of adds or mins
// is latency-bound: ~4 cycles a value); the compiler vectorizes the 8 lanes.
constexpr int kLanes = 8;

template <typename F>
double sum_lanes(int64_t n, F f) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma GCC unroll 8
    for (int l = 0; l < kLanes; ++l) acc[l] += f(i + l);
  for (; i < n; ++i) acc[0] += f(i);
  double s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

template <typename T>
T min_lanes(const T* x, int64_t n) {
  T acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = x[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma GCC unroll 8
    for (int l = 0; l < kLanes; ++l) acc[l] = x[i + l] < acc[l] ? x[i + l] : acc[l];
  for (; i < n; ++i) acc[0] = x[i] < acc[0] ? x[i] : acc[0];
  T m = acc[0];
  for (int l = 1; l < kLanes; ++l) m = acc[l] < m ? acc[l] : m;
  return m;
}

// Reliability statistic of one raw map x [H, W] (see the header). With z = x - min (in T, as the
// reference), d = max(sum |z|, 1e-12) and y = z / d: std(y) = sqrt(sum (z - mean z)^2 / (N - 1)) / d,
// so no per-element division; sums in double.
template <typename T>
T reliability(const T* x, int64_t H, int64_t W, bool published, T* z) {
  const int64_t N = H * W;
  if (published) {
    for (int64_t y = 0; y < H; ++y) {
      const T mn = min_lanes(x + y * W, W);
      for (int64_t c = 0; c < W; ++c) z[y * W + c] = x[y * W + c] - mn;
    }
  } else {
    const T mn = min_lanes(x, N);
    for (int64_t i = 0; i < N; ++i) z[i] = x[i] - mn;
  }
  const double s = sum_lanes(N, [z](int64_t i) { return static_cast<double>(std::fabs(z[i])); });
  const double d = std::max(s, 1e-12), mean = s / static_cast<double>(N);
  const double var = sum_lanes(N, [z, mean](int64_t i) {
    const double e = static_cast<double>(z[i]) - mean;
    return e * e;
  });
  return static_cast<T>(std::sqrt(var / static_cast<double>(N - 1)) / d);
}

// Pooling bins of one axis, computed once per call.
struct Bins {
  std::vector<int64_t> lo, hi;
  Bins(int64_t in, int64_t out) : lo(out), hi(out) {
    for (int64_t i = 0; i < out; ++i) lo[i] = cam_pool_start(i, in, out), hi[i] = cam_pool_end(i, in, out);
  }
};

// Pool x [H1, W1] to out [H2, W2] (adaptive average: for each output row, the bin's rows summed
// column-wise into colsum [W1], then each column bin) and l2-normalize it in place.
template <typename T>
void pool_normalize(const T* x, int64_t H1, int64_t W1, int64_t H2, int64_t W2, const Bins& by, const Bins& bx,
                    T* out, T* colsum) {
  const int64_t J = H2 * W2;
  if (H1 == H2 && W1 == W2) {
    std::copy(x, x + J, out);
  } else {
    for (int64_t i = 0; i < H2; ++i) {
      const int64_t y0 = by.lo[i], y1 = by.hi[i];
      std::copy(x + y0 * W1, x + (y0 + 1) * W1, colsum);
      for (int64_t y = y0 + 1; y < y1; ++y) {
        const T* __restrict__ row = x + y * W1;
        for (int64_t c = 0; c < W1; ++c) colsum[c] += row[c];
      }
      for (int64_t k = 0; k < W2; ++k) {
        const int64_t x0 = bx.lo[k], x1 = bx.hi[k];
        T s = colsum[x0];
        for (int64_t c = x0 + 1; c < x1; ++c) s += colsum[c];
        out[i * W2 + k] = s / static_cast<T>((y1 - y0) * (x1 - x0));
      }
    }
  }
  const double ss = sum_lanes(J, [out](int64_t j) { return static_cast<double>(out[j]) * static_cast<double>(out[j]); });
  const T d = std::max(static_cast<T>(std::sqrt(ss)), static_cast<T>(1e-12));
  for (int64_t j = 0; j < J; ++j) out[j] = out[j] / d;
}

constexpr int64_t kGroup = 16;  // maps per task of pass 1: one 64-byte line per position when stored

// Pass 1 for images [b0, b1): their rows of lt and ht (row 0 = image b0's first position).
template <typename T>
void prepare(const CamCorrParams& p, int num_threads, T* lt, T* ht, int64_t b0, int64_t b1) {
  const int64_t J = p.H2 * p.W2, R1p = cam_corr_pad(p.R1, kCamMR), R2p = cam_corr_pad(p.R2, kCamNR);
  const int64_t g1 = (p.R1 + kGroup - 1) / kGroup, g2 = (p.R2 + kGroup - 1) / kGroup;
  const int64_t n1 = (b1 - b0) * g1, n2 = (b1 - b0) * g2;
  const int64_t big = std::max(p.H1 * p.W1, J);
  const Bins by1(p.H1, p.H2), bx1(p.W1, p.W2), by2(p.H2, p.H2), bx2(p.W2, p.W2);
  parallel_for(n1 + n2, num_threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(kGroup * J), scratch(big), colsum(std::max(p.W1, p.W2));
    for (int64_t task = begin; task < end; ++task) {
      const bool is_low = task < n1;
      const int64_t u = is_low ? task : task - n1, groups = is_low ? g1 : g2;
      const int64_t R = is_low ? p.R1 : p.R2, ld = is_low ? R1p : R2p;
      const int64_t H = is_low ? p.H1 : p.H2, W = is_low ? p.W1 : p.W2;
      const int64_t b = b0 + u / groups, r0 = (u % groups) * kGroup, cnt = std::min(kGroup, R - r0);
      const T* x0 = static_cast<const T*>(is_low ? p.low : p.high) + (b * R + r0) * H * W;
      T* rel = static_cast<T*>(is_low ? p.rel_low : p.rel_high);
      for (int64_t i = 0; i < cnt; ++i) {
        const T* x = x0 + i * H * W;
        pool_normalize(x, H, W, p.H2, p.W2, is_low ? by1 : by2, is_low ? bx1 : bx2, buf.data() + i * J,
                       colsum.data());
        if (rel) rel[b * R + r0 + i] = reliability(x, H, W, p.published, scratch.data());
      }
      T* dst = (is_low ? lt : ht) + (b - b0) * J * ld + r0;
      for (int64_t j = 0; j < J; ++j)
        for (int64_t i = 0; i < cnt; ++i) dst[j * ld + i] = buf[i * J + j];
    }
  });
}

// ---- pass 2: one MC x NC tile of corr ----

constexpr int64_t MC = 96, NC = 256, KC = 256;  // MC: a multiple of every MR, NC of every NR

// c [MR x NR] (row stride ldc) += a^T b over kc: a packed [kc][MR], b packed [kc][NR].
template <typename T, int MR, int NR>
WM_CAM_INLINE void micro_generic(const T* __restrict__ a, const T* __restrict__ b, int64_t kc, T* __restrict__ c,
                                 int64_t ldc) {
  T acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[i][j] = T(0);
  for (int64_t k = 0; k < kc; ++k) {
    const T* ak = a + k * MR;
    const T* bk = b + k * NR;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const T ai = ak[i];
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) acc[i][j] += ai * bk[j];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) c[i * ldc + j] += acc[i][j];
}

void micro_f32_base(const float* a, const float* b, int64_t kc, float* c, int64_t ldc) {
  micro_generic<float, 8, 16>(a, b, kc, c, ldc);
}
void micro_f64_base(const double* a, const double* b, int64_t kc, double* c, int64_t ldc) {
  micro_generic<double, 8, 16>(a, b, kc, c, ldc);
}

#if WM_CAM_X86
WM_CAM_AVX512 void micro_f32_avx512(const float* __restrict__ a, const float* __restrict__ b, int64_t kc,
                                    float* __restrict__ c, int64_t ldc) {
  __m512 acc[6][2];
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * 32), b1 = _mm512_loadu_ps(b + k * 32 + 16);
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      const __m512 ai = _mm512_set1_ps(a[k * 6 + i]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) {
    float* ci = c + i * ldc;
    _mm512_storeu_ps(ci, _mm512_add_ps(_mm512_loadu_ps(ci), acc[i][0]));
    _mm512_storeu_ps(ci + 16, _mm512_add_ps(_mm512_loadu_ps(ci + 16), acc[i][1]));
  }
}

WM_CAM_AVX2 void micro_f32_avx2(const float* __restrict__ a, const float* __restrict__ b, int64_t kc,
                                float* __restrict__ c, int64_t ldc) {
  __m256 acc[6][2];
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * 16), b1 = _mm256_loadu_ps(b + k * 16 + 8);
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + k * 6 + i);
      acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) {
    float* ci = c + i * ldc;
    _mm256_storeu_ps(ci, _mm256_add_ps(_mm256_loadu_ps(ci), acc[i][0]));
    _mm256_storeu_ps(ci + 8, _mm256_add_ps(_mm256_loadu_ps(ci + 8), acc[i][1]));
  }
}

WM_CAM_AVX512 void micro_f64_avx512(const double* a, const double* b, int64_t kc, double* c, int64_t ldc) {
  micro_generic<double, 8, 16>(a, b, kc, c, ldc);
}
WM_CAM_AVX2 void micro_f64_avx2(const double* a, const double* b, int64_t kc, double* c, int64_t ldc) {
  micro_generic<double, 8, 16>(a, b, kc, c, ldc);
}

using Isa = CpuIsa;  // chosen once from what the CPU supports (common/cpu_isa.h)
inline Isa isa() { return cpu_isa(); }
#endif

// Copies columns [c0, c0 + n) of rows [k0, k0 + kc) of a K-major panel (row stride ld) into
// dst [kc][W], zero-filling columns n..W-1.
template <typename T, int W>
void pack(const T* src, int64_t ld, int64_t k0, int64_t kc, int64_t c0, int64_t n, T* dst) {
  for (int64_t k = 0; k < kc; ++k) {
    const T* s = src + (k0 + k) * ld + c0;
    T* d = dst + k * W;
    int64_t i = 0;
    for (; i < n; ++i) d[i] = s[i];
    for (; i < W; ++i) d[i] = T(0);
  }
}

// C [MC x NC] (row stride NC) = lt[:, m0:m0+MC]^T ht[:, n0:n0+NC] (rows and columns past R1, R2 zero).
template <typename T, int MR, int NR, void (*Micro)(const T*, const T*, int64_t, T*, int64_t)>
void tile_product(const T* lt, const T* ht, int64_t K, int64_t ld1, int64_t ld2, int64_t R1, int64_t R2,
                  int64_t m0, int64_t n0, T* C, T* ap, T* bp) {
  const int64_t rows = std::min(MC, R1 - m0), cols = std::min(NC, R2 - n0);
  const int64_t mp = (rows + MR - 1) / MR * MR, np = (cols + NR - 1) / NR * NR;
  std::fill(C, C + MC * NC, T(0));
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    for (int64_t mi = 0; mi < mp; mi += MR)
      pack<T, MR>(lt, ld1, k0, kc, m0 + mi, std::min<int64_t>(MR, rows - mi), ap + mi * kc);
    for (int64_t ni = 0; ni < np; ni += NR)
      pack<T, NR>(ht, ld2, k0, kc, n0 + ni, std::min<int64_t>(NR, cols - ni), bp + ni * kc);
    for (int64_t ni = 0; ni < np; ni += NR)
      for (int64_t mi = 0; mi < mp; mi += MR) Micro(ap + mi * kc, bp + ni * kc, kc, C + mi * NC + ni, NC);
  }
}

using TileFn = void (*)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                        float*, float*, float*);
using TileFn64 = void (*)(const double*, const double*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                          int64_t, double*, double*, double*);

TileFn tile_fn(float*) {
#if WM_CAM_X86
  switch (isa()) {
    case Isa::kAvx512: return tile_product<float, 6, 32, micro_f32_avx512>;
    case Isa::kAvx2: return tile_product<float, 6, 16, micro_f32_avx2>;
    default: break;
  }
#endif
  return tile_product<float, 8, 16, micro_f32_base>;
}

TileFn64 tile_fn(double*) {
#if WM_CAM_X86
  switch (isa()) {
    case Isa::kAvx512: return tile_product<double, 8, 16, micro_f64_avx512>;
    case Isa::kAvx2: return tile_product<double, 8, 16, micro_f64_avx2>;
    default: break;
  }
#endif
  return tile_product<double, 8, 16, micro_f64_base>;
}

// Pass 2 for K rows of lt and ht: acc [R1, R2] += lt^T ht.
template <typename T>
void correlate(const CamCorrParams& p, int num_threads, const T* lt, const T* ht, int64_t K, T* acc) {
  const int64_t R1p = cam_corr_pad(p.R1, kCamMR), R2p = cam_corr_pad(p.R2, kCamNR);
  const int64_t tm = (p.R1 + MC - 1) / MC, tn = (p.R2 + NC - 1) / NC;
  const auto fn = tile_fn(static_cast<T*>(nullptr));
  parallel_for(tm * tn, num_threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> C(MC * NC), ap(MC * KC), bp(NC * KC);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m0 = (task / tn) * MC, n0 = (task % tn) * NC;
      fn(lt, ht, K, R1p, R2p, p.R1, p.R2, m0, n0, C.data(), ap.data(), bp.data());
      const int64_t m1 = std::min(p.R1, m0 + MC), n1 = std::min(p.R2, n0 + NC);
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = n0; n < n1; ++n) acc[m * p.R2 + n] += C[(m - m0) * NC + (n - n0)];
    }
  });
}

// Pass 1 and pass 2 alternate over chunks of images (cam_corr_chunk_images_cpu: about 1,024 rows
// of K), so that a chunk's normalized maps stay in cache; corr is the accumulator.
template <typename T>
void corr_impl(const CamCorrParams& p, int num_threads) {
  const int64_t J = p.H2 * p.W2, bc = cam_corr_chunk_images_cpu(p.B, J);
  T* lt = static_cast<T*>(p.workspace);
  T* ht = lt + bc * J * cam_corr_pad(p.R1, kCamMR);
  const bool product = (p.corr || p.edges) && p.R1 * p.R2 > 0;
  std::vector<T> own;
  T* acc = static_cast<T*>(p.corr);
  if (product && !acc) {
    own.assign(p.R1 * p.R2, T(0));
    acc = own.data();
  } else if (product) {
    std::fill(acc, acc + p.R1 * p.R2, T(0));
  }
  for (int64_t b0 = 0; b0 < p.B; b0 += bc) {
    const int64_t b1 = std::min(p.B, b0 + bc);
    prepare<T>(p, num_threads, lt, ht, b0, b1);
    if (product) correlate<T>(p, num_threads, lt, ht, (b1 - b0) * J, acc);
  }
  if (!product) return;
  T* edges = static_cast<T*>(p.edges);
  const T mom = static_cast<T>(p.momentum), keep = static_cast<T>(1.0 - p.momentum), nb = static_cast<T>(p.B);
  parallel_for(p.R1, num_threads, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.R2)),
               [&](int64_t begin, int64_t end) {
                 for (int64_t i = begin * p.R2; i < end * p.R2; ++i) {
                   const T c = acc[i] / nb;
                   acc[i] = c;
                   if (edges) edges[i] = p.first ? c : edges[i] * mom + c * keep;
                 }
               });
}

template <typename T>
void rel_impl(const CamRelParams& p, int num_threads) {
  const T* cam = static_cast<const T*>(p.cam);
  T* rel = static_cast<T*>(p.rel);
  const int64_t N = p.H * p.W;
  parallel_for(p.B * p.R, num_threads, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(N);
    for (int64_t t = begin; t < end; ++t) rel[t] = reliability(cam + t * N, p.H, p.W, p.published, scratch.data());
  });
}

}  // namespace

void avsl_cam_correlation_cpu(const CamCorrParams& p, int num_threads) {
  check_cam_corr(p);
  if (p.R1 == 0 && p.R2 == 0) return;
  if (p.dtype == DType::F64) corr_impl<double>(p, num_threads);
  else corr_impl<float>(p, num_threads);
}

void avsl_cam_reliability_cpu(const CamRelParams& p, int num_threads) {
  check_cam_rel(p);
  if (p.B * p.R == 0) return;
  if (p.dtype == DType::F64) rel_impl<double>(p, num_threads);
  else rel_impl<float>(p, num_threads);
}

}  // namespace whymatch
