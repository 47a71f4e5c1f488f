// Module whymatch._C_cuda: the CUDA kernels, built only when nvcc was found.
// cudart is linked statically, so importing this module needs no CUDA
// installation; calling a kernel needs a driver and a device.
#include <cuda_runtime.h>

#include "bindings_common.h"
#include "bindings_avsl.h"
#include "bindings_avsl_tc.h"
#include "bindings_avsl_fused.h"
#include "bindings_avsl_cam.h"
#include "bindings_mining.h"
#include "op_table.h"

namespace {

pybind11::dict device_info() {
  pybind11::dict d;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  d["error"] = err == cudaSuccess ? pybind11::none() : pybind11::cast(std::string(cudaGetErrorString(err)));
  if (err != cudaSuccess && cudaPeekAtLastError() == err) (void)cudaGetLastError();  // its own "no driver" error only
  pybind11::list devs;
  if (err == cudaSuccess) {
    for (int i = 0; i < count; ++i) {
      cudaDeviceProp prop;
      if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
      devs.append(pybind11::make_tuple(std::string(prop.name), prop.major * 10 + prop.minor));
    }
  }
  d["devices"] = devs;
  int rt = 0;
  cudaRuntimeGetVersion(&rt);
  d["runtime_version"] = rt;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "whymatch CUDA kernels (torch-agnostic: raw device pointers, sizes, a cudaStream_t)";
  auto as_stream = [](uintptr_t s) { return reinterpret_cast<void*>(s); };
  whymatch::bind_ops<uintptr_t>(
      m, [as_stream](const whymatch::RiseApplyParams& p, uintptr_t s) { whymatch::rise_apply_cuda(p, as_stream(s)); },
      [as_stream](const whymatch::RiseSaliencyParams& p, uintptr_t s) { whymatch::rise_saliency_cuda(p, as_stream(s)); },
      [as_stream](const whymatch::RankedBlendParams& p, uintptr_t s) { whymatch::ranked_blend_cuda(p, as_stream(s)); });
  whymatch::bind_mining_ops<uintptr_t>(
      m, [as_stream](const whymatch::SoftMaskParams& p, uintptr_t s) { whymatch::soft_mask_cuda(p, as_stream(s)); },
      [as_stream](const whymatch::SoftMaskParams& p, uintptr_t s) {
        whymatch::soft_mask_backward_cuda(p, as_stream(s));
      });
  whymatch::bind_avsl_ops<uintptr_t>(
      m, [as_stream](const whymatch::AvslParams& p, uintptr_t s) { whymatch::avsl_distance_cuda(p, as_stream(s)); },
      [as_stream](const whymatch::AvslParams& p, uintptr_t s) {
        whymatch::avsl_distance_backward_cuda(p, as_stream(s));
      },
      [as_stream](const whymatch::AvslParams& p, uintptr_t s) { whymatch::avsl_topk_cuda(p, as_stream(s)); },
      [](const whymatch::AvslParams& p, whymatch::AvslWorkspace w) { return whymatch::avsl_workspace_bytes_cuda(p, w); },
      [as_stream](void* dst, uintptr_t src, int64_t bytes, uintptr_t s) {
        // the compressed links' positions and indices, read on the host before the launch (their
        // values become addresses in the kernels); ordered after the work that wrote them
        auto st = static_cast<cudaStream_t>(as_stream(s));
        pybind11::gil_scoped_release nogil;  // the sync waits for queued work: let other threads run
        // the error reported is the failing call's own (cudaGetLastError here could name, and clear,
        // an unrelated earlier one); it is taken back only while it is the pending one
        cudaError_t e = cudaMemcpyAsync(dst, reinterpret_cast<const void*>(src), static_cast<size_t>(bytes),
                                        cudaMemcpyDeviceToHost, st);
        if (e == cudaSuccess) e = cudaStreamSynchronize(st);
        if (e != cudaSuccess && cudaPeekAtLastError() == e) (void)cudaGetLastError();
        WM_CHECK(e == cudaSuccess, "avsl: could not read the compressed links from the device: "
                                       << cudaGetErrorName(e) << " (" << cudaGetErrorString(e) << ")");
      });
  whymatch::bind_avsl_cam_ops<uintptr_t>(
      m,
      [as_stream](const whymatch::CamCorrParams& p, uintptr_t s) {
        whymatch::avsl_cam_correlation_cuda(p, as_stream(s));
      },
      [as_stream](const whymatch::CamRelParams& p, uintptr_t s) {
        whymatch::avsl_cam_reliability_cuda(p, as_stream(s));
      },
      [](int64_t B, int64_t) { return B; });
  whymatch::bind_avsl_tc_ops(
      m, [as_stream](const whymatch::AvslParams& p, uintptr_t s) { whymatch::avsl_tc_distance_cuda(p, as_stream(s)); },
      [as_stream](const whymatch::AvslParams& p, uintptr_t s) { whymatch::avsl_tc_topk_cuda(p, as_stream(s)); });
  whymatch::bind_avsl_fused_ops(
      m,
      [as_stream](const whymatch::AvslFusedParams& p, uintptr_t s) {
        whymatch::avsl_fused_prologue_cuda(p, as_stream(s));
      },
      [as_stream](const whymatch::AvslFusedParams& p, uintptr_t s) { whymatch::avsl_fused_blend_cuda(p, as_stream(s)); },
      [as_stream](const whymatch::AvslFusedParams& p, uintptr_t s) {
        whymatch::avsl_fused_epilogue_cuda(p, as_stream(s));
      });
  m.attr("cuda_architectures") = WHYMATCH_CUDA_ARCHS;
  m.attr("cuda_compiler_version") = WHYMATCH_CUDA_VERSION;
  m.def("device_info", &device_info, "Devices visible to the CUDA runtime linked into this module.");
  whymatch::bind_op_table(m);
}
