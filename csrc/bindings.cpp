// Module whymatch._C: the CPU kernels. Always built; needs no CUDA.
#include "bindings_common.h"
#include "bindings_avsl.h"
#include "bindings_avsl_cam.h"
#include "bindings_mining.h"
#include "common/cpu_isa.h"
#include "common/parallel.h"
#include "op_table.h"

#include <atomic>
#include <cstring>
#include <stdexcept>
#include <vector>

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
      [](const whymatch::AvslParams&, whymatch::AvslWorkspace) -> int64_t { return 0; },
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
  m.def(
      "pool_stats",
      []() -> pybind11::tuple { return pybind11::make_tuple(whymatch::pool::threads_started(), whymatch::pool::jobs_run()); },
      "(threads started, jobs run) of this process's CPU thread pool (a forked child starts from (0, 0)).");
  m.def(
      "_parallel_selftest",
      [](int64_t n, int num_threads, int64_t grain, int64_t throw_at) {
        // parallel_for over [0, n) that counts every index (each must be visited exactly once) and
        // throws from the chunk holding index throw_at (-1: none); returns the visit counts.
        std::vector<std::atomic<int>> hits(static_cast<size_t>(std::max<int64_t>(0, n)));
        {
          pybind11::gil_scoped_release nogil;
          whymatch::parallel_for(n, num_threads, grain, [&](int64_t b, int64_t e) {
            for (int64_t i = b; i < e; ++i) {
              if (i == throw_at) throw std::invalid_argument("parallel_selftest: chunk failed at index " +
                                                             std::to_string(i));
              hits[static_cast<size_t>(i)].fetch_add(1, std::memory_order_relaxed);
            }
          });
        }
        std::vector<int> out(hits.size());
        for (size_t i = 0; i < hits.size(); ++i) out[i] = hits[i].load();
        return out;
      },
      pybind11::arg("n"), pybind11::arg("num_threads"), pybind11::arg("grain") = 1, pybind11::arg("throw_at") = -1,
      "For tests: run the thread pool over [0, n), return how often each index ran; throw at throw_at.");
  whymatch::bind_op_table(m);
}
