// Binding of the AVSL tensor-core kernels (avsl/avsl_tensorcore.h) into _C_cuda, with the
// conventions of bindings_common.h: buffers as (address, bytes), each checked against the bytes the
// kernels read, and a last argument that is the cudaStream_t. GIL released. float32 only.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "avsl/avsl_tensorcore.h"
#include "bindings_avsl.h"
#include "bindings_common.h"

namespace whymatch {

// The checked packed inputs of the tensor-core ops: qe, ge (transposed), rq, rg (transposed), coef,
// bias as in avsl_params, and `links`, the dense link* of every level pair (sum R_{l-1} R_l floats).
inline AvslParams avsl_tc_params(const char* op, Buf qe, Buf ge, Buf rq, Buf rg, Buf coef, Buf bias, Buf links,
                                 int64_t Q, int64_t G, const std::vector<int64_t>& sizes, double gamma) {
  AvslParams p = avsl_params(op, AvslBufs{qe, ge, rq, rg, coef, bias, Buf{0, 0}, Buf{0, 0}, Buf{0, 0}}, Q, G, sizes,
                             gamma, /*float32*/ 0);
  WM_CHECK(avsl_tc_fits(p), op << ": the tensor-core kernel takes at most " << kAvslTcMaxNodes
                               << " nodes per level, got R_max " << p.Rmax());
  int64_t nl = 0;
  for (int l = 1; l < p.L; ++l) nl += p.R[l - 1] * p.R[l];
  p.values = reinterpret_cast<const void*>(need_opt(op, "links", links, nl, 4));
  return p;
}

template <typename RunDist, typename RunTopk>
void bind_avsl_tc_ops(pybind11::module_& m, RunDist run_distance, RunTopk run_topk) {
  namespace py = pybind11;
  m.def(
      "avsl_tc_distance",
      [run_distance](Buf qe, Buf ge, Buf rq, Buf rg, Buf coef, Buf bias, Buf links, Buf out, int64_t Q, int64_t G,
                     std::vector<int64_t> sizes, double gamma, Buf workspace, uintptr_t stream) {
        const char* op = "avsl_tc_distance";
        AvslParams p = avsl_tc_params(op, qe, ge, rq, rg, coef, bias, links, Q, G, sizes, gamma);
        p.out = reinterpret_cast<void*>(need(op, "out", out, Q * G, 4));
        p.workspace = reinterpret_cast<void*>(need_opt(op, "workspace", workspace, avsl_tc_workspace_bytes(p), 1));
        py::gil_scoped_release nogil;
        run_distance(p, stream);
      },
      py::arg("qe"), py::arg("ge"), py::arg("rq"), py::arg("rg"), py::arg("coef"), py::arg("bias"), py::arg("links"),
      py::arg("out"), py::arg("Q"), py::arg("G"), py::arg("sizes"), py::arg("gamma"), py::arg("workspace"),
      py::arg("stream"), "AVSL rectified distance (Q, G) on tensor cores, 3xTF32 (see avsl/avsl_tensorcore.h).");
  m.def(
      "avsl_tc_topk",
      [run_topk](Buf qe, Buf ge, Buf rq, Buf rg, Buf coef, Buf bias, Buf links, Buf out_values, Buf out_indices,
                 int64_t Q, int64_t G, std::vector<int64_t> sizes, double gamma, int64_t k, bool exclude_self,
                 Buf workspace, uintptr_t stream) {
        const char* op = "avsl_tc_topk";
        const int64_t cand = G - (exclude_self ? 1 : 0);
        WM_CHECK(k >= 1 && k <= cand, op << ": k must be in [1, " << cand << "] (the gallery candidates), got " << k);
        WM_CHECK(!exclude_self || Q == G, op << ": exclude_self needs Q == G, got Q=" << Q << " G=" << G);
        AvslParams p = avsl_tc_params(op, qe, ge, rq, rg, coef, bias, links, Q, G, sizes, gamma);
        p.k = k;
        p.exclude_self = exclude_self;
        p.topk_values = reinterpret_cast<void*>(need(op, "out_values", out_values, Q * k, 4));
        p.topk_indices = reinterpret_cast<int64_t*>(need(op, "out_indices", out_indices, Q * k, 8));
        p.workspace = reinterpret_cast<void*>(need_opt(op, "workspace", workspace, avsl_tc_workspace_bytes(p), 1));
        py::gil_scoped_release nogil;
        run_topk(p, stream);
      },
      py::arg("qe"), py::arg("ge"), py::arg("rq"), py::arg("rg"), py::arg("coef"), py::arg("bias"), py::arg("links"),
      py::arg("out_values"), py::arg("out_indices"), py::arg("Q"), py::arg("G"), py::arg("sizes"), py::arg("gamma"),
      py::arg("k"), py::arg("exclude_self"), py::arg("workspace"), py::arg("stream"),
      "Each query's k smallest AVSL distances on tensor cores, 3xTF32 (see avsl/avsl_tensorcore.h).");
  m.def(
      "avsl_tc_workspace_bytes",
      [](int64_t Q, int64_t G, std::vector<int64_t> sizes) -> int64_t {
        AvslParams p = avsl_params("avsl_tc_workspace_bytes", AvslBufs{}, Q, G, sizes, 10.0, 0, false);
        return avsl_tc_workspace_bytes(p);
      },
      py::arg("Q"), py::arg("G"), py::arg("sizes"), "Bytes of workspace of the tensor-core ops (the split links).");
  m.def(
      "avsl_tc_smem_bytes",
      [](std::vector<int64_t> sizes) -> int64_t {
        AvslParams p = avsl_params("avsl_tc_smem_bytes", AvslBufs{}, 0, 0, sizes, 10.0, 0, false);
        return avsl_tc_smem_bytes(p);
      },
      py::arg("sizes"), "Dynamic shared memory per block of the tensor-core kernels, bytes.");
}

}  // namespace whymatch
