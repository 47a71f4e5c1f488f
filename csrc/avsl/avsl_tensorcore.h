// AVSL rectified distance and top-k on tensor cores (dense link*, 3xTF32), CUDA only; the same
// function as avsl/avsl_distance.h (float32 only).
//
// A tile = kAvslTcPairs = 64 pairs: 4 queries x 16 consecutive gallery items. Prologue: the tile's hat_0
// rows (64 x R_0, squared differences of the packed embeddings) in shared memory, zero-padded to
// Rp_0 = R_0 rounded up to 16. Each level l >= 1: A (64 x Rp_l) = hat_{l-1} @ link*_{l-1} on the
// tensor cores (nvcuda::wmma m16n16k8 tf32, float accumulate), each operand split x = hi + lo with
// hi = tf32(x), lo = tf32(x - hi), and A = a_hi b_lo + a_lo b_hi + a_hi b_hi (the a_lo b_lo term,
// ~2^-22 relative, dropped): float32-level accuracy. The accumulators of all 64 x Rp_l outputs stay
// in registers (8 warps x 4 row tiles x 4 column tiles), so that after a barrier the epilogue
// (sigmoid blend with delta_l) writes hat_l over hat_{l-1} in place: one buffer of 64 x (Rp + 4)
// floats per block, levels chained, nothing of size pairs x R leaves the SM. The last level's
// row sums are the distances; the top-k variant keeps each query's k best in its output rows (one
// block per 4 queries walks the whole gallery; thread q < 4 inserts query q's candidates).
//
// Limits: R_l <= kAvslTcMaxNodes (512) for every level, float32, sm_80 or newer, and
// 64 x (Rp_max + 4) x 4 + 256 bytes of shared memory (129 KiB at 512 nodes: above the 48 KiB
// default, within the opt-in of sm_80 / sm_90). Workspace: link* split into padded hi / lo
// matrices, 2 x Rp_{l-1} x Rp_l floats per level pair, built by a first kernel.
//
// Buffers: AvslParams with qe (Q, S), ge transposed (S, G), rq (Q, S1), rg transposed (S1, G),
// coef, bias (S1), and `values` = the dense links (sum_l R_{l-1} R_l floats, each row-major);
// col_ptr / row_idx are not used.
#pragma once
#include <cstdint>

#include "avsl/avsl_distance.h"

namespace whymatch {

constexpr int kAvslTcPairs = 64;
constexpr int64_t kAvslTcMaxNodes = 512;

inline int64_t avsl_tc_pad(int64_t r) { return (r + 15) / 16 * 16; }

// Whether the tensor-core kernel takes these sizes (every level <= 512 nodes, float32).
inline bool avsl_tc_fits(const AvslParams& p) {
  if (p.dtype != DType::F32 || p.L < 1) return false;
  for (int l = 0; l < p.L; ++l)
    if (p.R[l] > kAvslTcMaxNodes) return false;
  return true;
}

inline int64_t avsl_tc_smem_bytes(const AvslParams& p) {
  int64_t rp = 0;
  for (int l = 0; l < p.L; ++l) rp = avsl_tc_pad(p.R[l]) > rp ? avsl_tc_pad(p.R[l]) : rp;
  return (kAvslTcPairs * (rp + 4) + kAvslTcPairs) * 4;
}

int64_t avsl_tc_workspace_bytes(const AvslParams& p);
void avsl_tc_distance_cuda(const AvslParams& p, void* stream);
void avsl_tc_topk_cuda(const AvslParams& p, void* stream);

}  // namespace whymatch
