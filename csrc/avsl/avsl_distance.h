// AVSL rectified distance (Zhang et al., CVPR 2022) for every (query, gallery) pair, fused:
// nothing of size Q x G x R is ever formed. Levels l = 0..L-1 with R_l nodes each:
//
//   hat_0[r] = (a0_i[r] - b0_j[r])^2                       (a, b: l2-normalized embeddings)
//   z_l[c]   = gamma * (rq_l[i,c] * rg_l[j,c] * coef_l[c] + bias_l[c]),  p_l = sigmoid(z_l)
//   A_l[c]   = sum_r hat_{l-1}[r] * link_{l-1}[r, c]        (link* in compressed-column form)
//   hat_l[c] = delta_l[c] * p_l[c] + A_l[c] * (1 - p_l[c]),  delta_l[c] = (a_l_i[c] - b_l_j[c])^2
//   d_ij     = sum_c hat_{L-1}[c]
//
// Backward (g = dL/dd, (Q, G)): gradients for coef_l and bias_l (l >= 1) only; embeddings,
// reliabilities and links are constants (the published code trains only coef and bias here).
// With u_{L-1} = g_ij, s_l = u_l * (delta_l - A_l) * p_l * (1 - p_l) and
// u_{l-1} = link_{l-1} @ (u_l * (1 - p_l)) (compressed-row form):
//   dL/dbias_l[c] = gamma * sum_ij s_l[c],   dL/dcoef_l[c] = gamma * sum_ij s_l[c] * rq_l[i,c] * rg_l[j,c]
// Each pair's forward is recomputed; partial sums per fixed work chunk (CPU) or per block (CUDA)
// are reduced in a fixed order, so the result does not depend on the thread count or timing.
//
// Top-k: each query's k smallest d_ij with their gallery indices, ascending, ties (and NaN, which
// sorts last) broken by the lower index; exclude_self skips j == i. Memory O(Q k).
//
// Packed layout (built by python/whymatch/ops/avsl.py); T is the compute type (float or double):
//   qe (Q, S), ge (G, S)     normalized embeddings of all levels, level l in columns [off_l, off_l + R_l),
//                            S = sum R_l
//   rq (Q, S1), rg (G, S1)   reliabilities of levels 1..L-1, level l at columns off_l - R_0, S1 = S - R_0
//   coef, bias (S1)          the same columns
//   CSC of link_{l-1} (R_{l-1} x R_l), l >= 1: col_ptr (int64, S1 + L - 1 entries: level l's R_l + 1
//   entries start at cp_off_l = off_l - R_0 + (l - 1)) holds absolute positions into row_idx (int32,
//   rows of level l-1) and values (T). CSR (backward only): row_ptr (int64, S - R_{L-1} + L - 1
//   entries: level l-1's R_{l-1} + 1 entries start at off_{l-1} + (l - 1)) into col_idx (int32) and
//   row_values (T).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/check.h"
#include "common/dtype.h"

namespace whymatch {

constexpr int kAvslMaxLevels = 8;

// Which kernel a workspace is sized for (avsl_workspace_bytes; the codes are in the op table, op_table.h).
enum class AvslWorkspace : int { kDistance = 0, kBackward = 1, kTopk = 2 };

struct AvslParams {
  const void* qe = nullptr;        // (Q, S), T
  const void* ge = nullptr;        // (G, S), T
  const void* rq = nullptr;        // (Q, S1), T
  const void* rg = nullptr;        // (G, S1), T
  const void* coef = nullptr;      // (S1), T
  const void* bias = nullptr;      // (S1), T
  const int64_t* col_ptr = nullptr;
  const int32_t* row_idx = nullptr;
  const void* values = nullptr;    // T
  const int64_t* row_ptr = nullptr;  // backward only
  const int32_t* col_idx = nullptr;  // backward only
  const void* row_values = nullptr;  // backward only, T
  void* out = nullptr;             // forward: (Q, G) T
  const void* grad_out = nullptr;  // backward: (Q, G) T
  void* grad_coef = nullptr;       // backward: (S1) T
  void* grad_bias = nullptr;       // backward: (S1) T
  void* topk_values = nullptr;     // top-k: (Q, k) T
  int64_t* topk_indices = nullptr; // top-k: (Q, k) int64
  void* workspace = nullptr;       // CUDA only: see avsl_workspace_bytes_cuda
  int64_t Q = 0, G = 0, k = 0;
  int L = 0;
  int64_t R[kAvslMaxLevels] = {0};
  double gamma = 10.0;
  bool exclude_self = false;
  DType dtype = DType::F32;        // F32 or F64

  int64_t S() const { int64_t s = 0; for (int l = 0; l < L; ++l) s += R[l]; return s; }
  int64_t off(int l) const { int64_t s = 0; for (int m = 0; m < l; ++m) s += R[m]; return s; }
  int64_t S1() const { return L > 0 ? S() - R[0] : 0; }
  int64_t Rmax() const { int64_t m = 0; for (int l = 0; l < L; ++l) m = R[l] > m ? R[l] : m; return m; }
};

// (d1, j1) before (d2, j2): smaller distance first, NaN last, then the lower index.
template <typename T>
WM_HOST_DEVICE bool avsl_before(T d1, int64_t j1, T d2, int64_t j2) {
  const bool n1 = d1 != d1, n2 = d2 != d2;
  if (n1 != n2) return n2;
  if (!n1 && d1 != d2) return d1 < d2;
  return j1 < j2;
}

// Inserts (v, j) into a list (ld, lj) of cnt <= k entries sorted by avsl_before: when the list is
// full, (v, j) replaces the last entry if it comes before it. cnt grows up to k (k >= 1). The serial
// insertion of the GPU top-k kernels (SIMT, tensor-core, fused cuBLAS epilogue): one thread per list.
template <typename T>
WM_HOST_DEVICE void avsl_topk_insert(T v, int64_t j, T* ld, int64_t* lj, int64_t& cnt, int64_t k) {
  if (cnt == k && !avsl_before(v, j, ld[k - 1], lj[k - 1])) return;
  int64_t pos = cnt < k ? cnt++ : k - 1;  // full: the last entry drops out
  while (pos > 0 && avsl_before(v, j, ld[pos - 1], lj[pos - 1])) {
    ld[pos] = ld[pos - 1];
    lj[pos] = lj[pos - 1];
    --pos;
  }
  ld[pos] = v;
  lj[pos] = j;
}

inline void check_avsl(const AvslParams& p, const char* what, bool backward, bool topk) {
  WM_CHECK(p.L >= 1 && p.L <= kAvslMaxLevels,
           what << ": the number of levels must be in [1, " << kAvslMaxLevels << "], got " << p.L);
  WM_CHECK(p.Q >= 0 && p.G >= 0, what << ": sizes must be non-negative, got Q=" << p.Q << " G=" << p.G);
  for (int l = 0; l < p.L; ++l) WM_CHECK(p.R[l] >= 1, what << ": level " << l << " has " << p.R[l] << " nodes");
  WM_CHECK(p.dtype == DType::F32 || p.dtype == DType::F64,
           what << ": compute dtype must be float32 or float64, got " << dtype_name(p.dtype));
  WM_CHECK(std::isfinite(p.gamma), what << ": gamma must be finite");
  if (p.Q * p.G == 0) return;
  WM_CHECK(p.qe && p.ge, what << ": null embedding pointer");
  // values/row_idx may be null when every link is zero (no stored entries; the bindings check their sizes)
  if (p.L > 1) WM_CHECK(p.rq && p.rg && p.coef && p.bias && p.col_ptr,
                        what << ": null reliability/coef/bias/link pointer");
  if (backward) {
    WM_CHECK(p.grad_out, what << ": null grad_out pointer");
    if (p.L > 1) WM_CHECK(p.grad_coef && p.grad_bias, what << ": null gradient pointer");
    if (p.L > 2) WM_CHECK(p.row_ptr, what << ": null compressed-row link pointer");
  } else if (topk) {
    WM_CHECK(p.k >= 1 && p.k <= p.G - (p.exclude_self ? 1 : 0),
             what << ": k must be in [1, " << p.G - (p.exclude_self ? 1 : 0) << "], got " << p.k);
    WM_CHECK(!p.exclude_self || p.Q == p.G, what << ": exclude_self needs Q == G, got Q=" << p.Q << " G=" << p.G);
    WM_CHECK(p.topk_values && p.topk_indices, what << ": null output pointer");
  } else {
    WM_CHECK(p.out, what << ": null output pointer");
  }
}

void avsl_distance_cpu(const AvslParams& p, int num_threads);
void avsl_distance_backward_cpu(const AvslParams& p, int num_threads);
void avsl_topk_cpu(const AvslParams& p, int num_threads);

// CUDA: bytes of device workspace that each op needs (the caller allocates it, p.workspace).
int64_t avsl_workspace_bytes_cuda(const AvslParams& p, AvslWorkspace kernel);
void avsl_distance_cuda(const AvslParams& p, void* stream);
void avsl_distance_backward_cuda(const AvslParams& p, void* stream);
void avsl_topk_cuda(const AvslParams& p, void* stream);

}  // namespace whymatch
