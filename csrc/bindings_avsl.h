// Binding of the AVSL rectified-distance ops (forward, backward, top-k) into _C and _C_cuda, with
// the conventions of bindings_common.h: raw pointers as integers, sizes, and a last argument that
// is a thread count (CPU) or a cudaStream_t (CUDA). GIL released. See avsl/avsl_distance.h for the
// packed layout.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "avsl/avsl_distance.h"
#include "common/dtype.h"

namespace whymatch {

inline AvslParams avsl_params(uintptr_t qe, uintptr_t ge, uintptr_t rq, uintptr_t rg, uintptr_t coef, uintptr_t bias,
                              uintptr_t col_ptr, uintptr_t row_idx, uintptr_t values, int64_t Q, int64_t G,
                              const std::vector<int64_t>& sizes, double gamma, int dtype) {
  WM_CHECK(!sizes.empty() && sizes.size() <= static_cast<size_t>(kAvslMaxLevels),
           "avsl: sizes must list 1 to " << kAvslMaxLevels << " levels, got " << sizes.size());
  AvslParams p;
  p.qe = reinterpret_cast<const void*>(qe); p.ge = reinterpret_cast<const void*>(ge);
  p.rq = reinterpret_cast<const void*>(rq); p.rg = reinterpret_cast<const void*>(rg);
  p.coef = reinterpret_cast<const void*>(coef); p.bias = reinterpret_cast<const void*>(bias);
  p.col_ptr = reinterpret_cast<const int64_t*>(col_ptr);
  p.row_idx = reinterpret_cast<const int32_t*>(row_idx);
  p.values = reinterpret_cast<const void*>(values);
  p.Q = Q; p.G = G;
  p.L = static_cast<int>(sizes.size());
  for (size_t l = 0; l < sizes.size(); ++l) p.R[l] = sizes[l];
  p.gamma = gamma;
  p.dtype = dtype_from_code(dtype);
  return p;
}

template <typename Extra, typename FwdFn, typename BwdFn, typename TopkFn, typename WsFn>
void bind_avsl_ops(pybind11::module_& m, FwdFn forward, BwdFn backward, TopkFn topk, WsFn workspace_bytes) {
  namespace py = pybind11;
  const char* extra_doc = std::is_same<Extra, int>::value ? "num_threads" : "stream";
  m.def(
      "avsl_distance",
      [forward](uintptr_t qe, uintptr_t ge, uintptr_t rq, uintptr_t rg, uintptr_t coef, uintptr_t bias,
                uintptr_t col_ptr, uintptr_t row_idx, uintptr_t values, uintptr_t out, int64_t Q, int64_t G,
                std::vector<int64_t> sizes, double gamma, int dtype, uintptr_t workspace, uintptr_t extra) {
        AvslParams p = avsl_params(qe, ge, rq, rg, coef, bias, col_ptr, row_idx, values, Q, G, sizes, gamma, dtype);
        p.out = reinterpret_cast<void*>(out);
        p.workspace = reinterpret_cast<void*>(workspace);
        py::gil_scoped_release nogil;
        forward(p, (Extra)extra);
      },
      py::arg("qe"), py::arg("ge"), py::arg("rq"), py::arg("rg"), py::arg("coef"), py::arg("bias"),
      py::arg("col_ptr"), py::arg("row_idx"), py::arg("values"), py::arg("out"), py::arg("Q"), py::arg("G"),
      py::arg("sizes"), py::arg("gamma"), py::arg("dtype"), py::arg("workspace"), py::arg(extra_doc),
      "AVSL rectified distance of every (query, gallery) pair, (Q, G) (see avsl/avsl_distance.h).");
  m.def(
      "avsl_distance_backward",
      [backward](uintptr_t grad_out, uintptr_t qe, uintptr_t ge, uintptr_t rq, uintptr_t rg, uintptr_t coef,
                 uintptr_t bias, uintptr_t col_ptr, uintptr_t row_idx, uintptr_t values, uintptr_t row_ptr,
                 uintptr_t col_idx, uintptr_t row_values, uintptr_t grad_coef, uintptr_t grad_bias, int64_t Q,
                 int64_t G, std::vector<int64_t> sizes, double gamma, int dtype, uintptr_t workspace,
                 uintptr_t extra) {
        AvslParams p = avsl_params(qe, ge, rq, rg, coef, bias, col_ptr, row_idx, values, Q, G, sizes, gamma, dtype);
        p.grad_out = reinterpret_cast<const void*>(grad_out);
        p.row_ptr = reinterpret_cast<const int64_t*>(row_ptr);
        p.col_idx = reinterpret_cast<const int32_t*>(col_idx);
        p.row_values = reinterpret_cast<const void*>(row_values);
        p.grad_coef = reinterpret_cast<void*>(grad_coef);
        p.grad_bias = reinterpret_cast<void*>(grad_bias);
        p.workspace = reinterpret_cast<void*>(workspace);
        py::gil_scoped_release nogil;
        backward(p, (Extra)extra);
      },
      py::arg("grad_out"), py::arg("qe"), py::arg("ge"), py::arg("rq"), py::arg("rg"), py::arg("coef"),
      py::arg("bias"), py::arg("col_ptr"), py::arg("row_idx"), py::arg("values"), py::arg("row_ptr"),
      py::arg("col_idx"), py::arg("row_values"), py::arg("grad_coef"), py::arg("grad_bias"), py::arg("Q"),
      py::arg("G"), py::arg("sizes"), py::arg("gamma"), py::arg("dtype"), py::arg("workspace"), py::arg(extra_doc),
      "Gradients of sum(grad_out * d) for the packed coef and bias of levels >= 1 (see avsl/avsl_distance.h).");
  m.def(
      "avsl_topk",
      [topk](uintptr_t qe, uintptr_t ge, uintptr_t rq, uintptr_t rg, uintptr_t coef, uintptr_t bias,
             uintptr_t col_ptr, uintptr_t row_idx, uintptr_t values, uintptr_t out_values, uintptr_t out_indices,
             int64_t Q, int64_t G, std::vector<int64_t> sizes, double gamma, int64_t k, bool exclude_self, int dtype,
             uintptr_t workspace, uintptr_t extra) {
        AvslParams p = avsl_params(qe, ge, rq, rg, coef, bias, col_ptr, row_idx, values, Q, G, sizes, gamma, dtype);
        p.topk_values = reinterpret_cast<void*>(out_values);
        p.topk_indices = reinterpret_cast<int64_t*>(out_indices);
        p.k = k;
        p.exclude_self = exclude_self;
        p.workspace = reinterpret_cast<void*>(workspace);
        py::gil_scoped_release nogil;
        topk(p, (Extra)extra);
      },
      py::arg("qe"), py::arg("ge"), py::arg("rq"), py::arg("rg"), py::arg("coef"), py::arg("bias"),
      py::arg("col_ptr"), py::arg("row_idx"), py::arg("values"), py::arg("out_values"), py::arg("out_indices"),
      py::arg("Q"), py::arg("G"), py::arg("sizes"), py::arg("gamma"), py::arg("k"), py::arg("exclude_self"),
      py::arg("dtype"), py::arg("workspace"), py::arg(extra_doc),
      "Each query's k smallest AVSL distances and their gallery indices (see avsl/avsl_distance.h).");
  m.def(
      "avsl_workspace_bytes",
      [workspace_bytes](int op, int64_t Q, int64_t G, std::vector<int64_t> sizes, int64_t k, int dtype) -> int64_t {
        AvslParams p = avsl_params(0, 0, 0, 0, 0, 0, 0, 0, 0, Q, G, sizes, 10.0, dtype);
        p.k = k;
        return workspace_bytes(p, op);
      },
      py::arg("op"), py::arg("Q"), py::arg("G"), py::arg("sizes"), py::arg("k"), py::arg("dtype"),
      "Bytes of workspace the caller allocates for op 0 (forward), 1 (backward) or 2 (top-k).");
  py::tuple ops = m.attr("ops");
  m.attr("ops") = ops + py::make_tuple("avsl_distance", "avsl_distance_backward", "avsl_topk");
}

}  // namespace whymatch
