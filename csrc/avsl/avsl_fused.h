// Fused prologue / blend / epilogue kernels of the AVSL cuBLAS path (CUDA only, float32): the
// GEMM hat_{l-1} @ link*_{l-1} of each level runs in cuBLAS (torch.mm, python/whymatch/ops/avsl.py),
// everything around it here, so that each pairs x R intermediate is written once and read once.
//
// A chunk: queries [q0, q0 + nq) x gallery items [g0, g0 + ng), pair (row) m = (i - q0) ng + (j - g0).
// `hat` is the chunk's (nq ng, R) row-major buffer of one level (the GEMM's operand or output).
// With the notation of avsl/avsl_distance.h (level l: columns off_l of qe / ge, off_l - R_0 of rq /
// rg / coef / bias):
//
//   prologue (level 0):         hat[m, r] = (qe[i, r] - ge[j, r])^2                 (writes the GEMM operand)
//   blend (level 0 < l < L-1):  hat[m, c] = delta_l[c] p_l[c] + hat[m, c] (1 - p_l[c])  in place: the GEMM's
//                               output A_l becomes hat_l, the next GEMM's operand (read once, written once)
//   epilogue (level L-1):       d_ij = sum_c (delta_l[c] p_l[c] + hat[m, c] (1 - p_l[c])) (hat read once;
//                               level 0 of a one-level model: sum_c delta_0[c], no hat), then either
//                               out[i, j] = d_ij (the distance block), or fold d_ij into query i's
//                               running top-k, kept sorted in topk_values / topk_indices rows i: the
//                               chunks of one query come in increasing g0, every earlier chunk has
//                               covered [0, g0), so the list holds min(k, candidates in [0, g0)) entries.
//
// Chaining levels (as the published code: delta_hat = delta * p + (delta_hat_prev @ link*) * (1 - p),
// lower to upper): prologue -> mm -> blend -> mm -> ... -> mm -> epilogue. pairs x R_l crosses memory
// twice per GEMM (cuBLAS reads its operand, writes its output) and twice per blend, once for the
// prologue's write and once for the epilogue's read.
#pragma once
#include <cstdint>

namespace whymatch {

struct AvslFusedParams {
  const float* qe = nullptr;    // (Q, S) normalized embeddings of all levels
  const float* ge = nullptr;    // (G, S), row-major (not transposed: a pair's columns are contiguous)
  const float* rq = nullptr;    // (Q, S1) reliabilities of levels >= 1
  const float* rg = nullptr;    // (G, S1)
  const float* coef = nullptr;  // (S1)
  const float* bias = nullptr;  // (S1)
  int64_t Q = 0, G = 0, S = 0, S1 = 0;
  int64_t q0 = 0, nq = 0, g0 = 0, ng = 0;  // the chunk
  int level = 0;                           // this call's level
  int64_t off = 0, o1 = 0, R = 0;          // its columns: off in qe / ge, o1 = off - R_0 in rq / rg / coef / bias
  float gamma = 10.f;
  float* hat = nullptr;                    // (nq ng, R); null for the epilogue of level 0
  float* out = nullptr;                    // epilogue: (Q, G) distances, or null for the top-k
  float* topk_values = nullptr;            // epilogue, top-k: (Q, k)
  int64_t* topk_indices = nullptr;         // (Q, k)
  int64_t k = 0;
  bool exclude_self = false;
};

void avsl_fused_prologue_cuda(const AvslFusedParams& p, void* stream);
void avsl_fused_blend_cuda(const AvslFusedParams& p, void* stream);
void avsl_fused_epilogue_cuda(const AvslFusedParams& p, void* stream);

}  // namespace whymatch
