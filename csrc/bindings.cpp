// Module whymatch._C: the CPU kernels. Always built; needs no CUDA.
#include "bindings_common.h"
#include "bindings_avsl.h"
#include "bindings_avsl_cam.h"
#include "bindings_mining.h"
#include "common/cpu_isa.h"

#include <cstring>

PYBIND11_MODULE(_C, m) {
  m.doc() = "whymatch CPU kernels (torch-agnostic: raw pointers, sizes, a thread count)";
  whymatch::bind_ops<int>(
      m, [](const whymatch::RiseApplyParams& p, int t) { whymatch::rise_apply_cpu(p, t); },
      [](const whymatch::RiseSaliencyParams& p, int t) { whymatch::rise_saliency_cpu(p, t); },
      [](const whymatch::RankedBlendParams& p, int t) { whymatch::ranked_blend_cpu(p, t); });
  whymatch::bind_mining_ops<int>(
      m, [](const whymatch::SoftMaskParams& p, int t) { whymatch::soft_mask_cpu(p, t); },
      [](const whymatch::SoftMaskParams& p, int t) { whymatch::soft_mask_backward_cpu(p, t); });
  whymatch::bind_avsl_ops<int>(
      m, [](const whymatch::AvslParams& p, int t) { whymatch::avsl_distance_cpu(p, t); },
      [](const whymatch::AvslParams& p, int t) { whymatch::avsl_distance_backward_cpu(p, t); },
      [](const whymatch::AvslParams& p, int t) { whymatch::avsl_topk_cpu(p, t); },
      [](const whymatch::AvslParams&, int) -> int64_t { return 0; },
      [](void* dst, uintptr_t src, int64_t bytes, int) {
        std::memcpy(dst, reinterpret_cast<const void*>(src), static_cast<size_t>(bytes));
      });
  whymatch::bind_avsl_cam_ops<int>(
      m, [](const whymatch::CamCorrParams& p, int t) { whymatch::avsl_cam_correlation_cpu(p, t); },
      [](const whymatch::CamRelParams& p, int t) { whymatch::avsl_cam_reliability_cpu(p, t); },
      [](int64_t B, int64_t J) { return whymatch::cam_corr_chunk_images_cpu(B, J); });
  m.def(
      "cpu_isa",
      [] {
        switch (whymatch::cpu_isa()) {
          case whymatch::CpuIsa::kAvx512: return "avx512";
          case whymatch::CpuIsa::kAvx2: return "avx2";
          default: return "base";
        }
      },
      "The instruction set the CPU kernels' hot loops use (capped by WHYMATCH_CPU_ISA=base|avx2|avx512).");
}
