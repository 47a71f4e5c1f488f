// Binding of the AVSL rectified-distance ops (forward, backward, top-k) into _C and _C_cuda, with
// the conventions of bindings_common.h: buffers as (address, bytes), each checked, sizes, and a last argument that
// is a thread count (CPU) or a cudaStream_t (CUDA). GIL released. See avsl/avsl_distance.h for the
// packed layout.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "avsl/avsl_distance.h"
#include "bindings_common.h"
#include "common/dtype.h"

namespace whymatch {

// The checked inputs shared by the three entries: sizes, dtype, and every input buffer against
// the bytes the kernels read. `ToHost` copies `bytes` at a buffer address into host memory (a
// memcpy on the CPU, a synchronizing cudaMemcpy on CUDA): the compressed links' pointer and index
// arrays are read there, because their values become addresses in the kernels.
struct AvslBufs {
  Buf qe, ge, rq, rg, coef, bias, col_ptr, row_idx, values;
};

// Checks a compressed form of the links: `ptrs` holds, for each level pair l = 1..L-1, a segment
// of n_l + 1 non-decreasing positions starting at seg_l; positions index `idx` (int32) and `vals`;
// idx values in level l's range must lie in [0, bound_l).
template <typename ToHost>
void check_compressed(const char* op, const char* ptr_name, const char* idx_name, const char* val_name,
                      const Buf& ptrs, const Buf& idx, const Buf& vals, int64_t total_ptrs,
                      const std::vector<int64_t>& seg, const std::vector<int64_t>& len,
                      const std::vector<int64_t>& bound, int64_t elem, ToHost to_host) {
  need(op, ptr_name, ptrs, total_ptrs, 8);
  std::vector<int64_t> hp(static_cast<size_t>(total_ptrs));
  if (total_ptrs) to_host(hp.data(), ptrs.first, total_ptrs * 8);
  int64_t nnz = 0;
  for (size_t l = 0; l < seg.size(); ++l) {
    for (int64_t i = 0; i <= len[l]; ++i) {
      const int64_t v = hp[static_cast<size_t>(seg[l] + i)];
      WM_CHECK(v >= 0, op << ": " << ptr_name << "[" << seg[l] + i << "] must be >= 0, got " << v);
      if (i) {
        const int64_t u = hp[static_cast<size_t>(seg[l] + i - 1)];
        WM_CHECK(v >= u, op << ": " << ptr_name << " must be non-decreasing within a level, got " << u << " then "
                            << v << " at " << seg[l] + i);
      }
      nnz = v > nnz ? v : nnz;
    }
  }
  need(op, idx_name, idx, nnz, 4);
  need(op, val_name, vals, nnz, elem);
  std::vector<int32_t> hi(static_cast<size_t>(nnz));
  if (nnz) to_host(hi.data(), idx.first, nnz * 4);
  for (size_t l = 0; l < seg.size(); ++l) {
    const int64_t a = hp[static_cast<size_t>(seg[l])], b = hp[static_cast<size_t>(seg[l] + len[l])];
    for (int64_t k = a; k < b; ++k) {
      const int64_t v = hi[static_cast<size_t>(k)];
      WM_CHECK(v >= 0 && v < bound[l], op << ": " << idx_name << "[" << k << "] must be in [0, " << bound[l]
                                          << ") (level pair " << l << "), got " << v);
    }
  }
}

inline AvslParams avsl_params(const char* op, const AvslBufs& b, int64_t Q, int64_t G,
                              const std::vector<int64_t>& sizes, double gamma, int dtype, bool check_bufs = true) {
  WM_CHECK(!sizes.empty() && sizes.size() <= static_cast<size_t>(kAvslMaxLevels),
           op << ": sizes must list 1 to " << kAvslMaxLevels << " levels, got " << sizes.size());
  WM_CHECK(Q >= 0 && G >= 0, op << ": Q and G must be >= 0, got Q=" << Q << " G=" << G);
  AvslParams p;
  p.Q = Q; p.G = G;
  p.L = static_cast<int>(sizes.size());
  int64_t S = 0;
  for (size_t l = 0; l < sizes.size(); ++l) {
    WM_CHECK(sizes[l] >= 1 && sizes[l] <= (int64_t(1) << 31) - 1,
             op << ": sizes[" << l << "] must be in [1, 2^31), got " << sizes[l]);
    p.R[l] = sizes[l];
    S += sizes[l];
  }
  p.gamma = gamma;
  WM_CHECK(std::isfinite(gamma), op << ": gamma must be finite, got " << gamma);
  p.dtype = dtype_from_code(dtype);
  WM_CHECK(p.dtype == DType::F32 || p.dtype == DType::F64,
           op << ": dtype must be float32 or float64, got " << dtype_name(p.dtype));
  checked_product(op, "Q*G", {Q, G});
  if (!check_bufs) return p;
  const int64_t es = dtype_bytes(p.dtype), S1 = S - sizes[0];
  p.qe = reinterpret_cast<const void*>(need(op, "qe", b.qe, checked_product(op, "Q*S", {Q, S}), es));
  p.ge = reinterpret_cast<const void*>(need(op, "ge", b.ge, checked_product(op, "G*S", {G, S}), es));
  p.rq = reinterpret_cast<const void*>(need(op, "rq", b.rq, checked_product(op, "Q*S1", {Q, S1}), es));
  p.rg = reinterpret_cast<const void*>(need(op, "rg", b.rg, checked_product(op, "G*S1", {G, S1}), es));
  p.coef = reinterpret_cast<const void*>(need(op, "coef", b.coef, S1, es));
  p.bias = reinterpret_cast<const void*>(need(op, "bias", b.bias, S1, es));
  p.col_ptr = reinterpret_cast<const int64_t*>(b.col_ptr.first);
  p.row_idx = reinterpret_cast<const int32_t*>(b.row_idx.first);
  p.values = reinterpret_cast<const void*>(b.values.first);
  return p;
}

// Compressed columns of link_{l-1} (l >= 1): level l's R_l + 1 entries at off_l - R_0 + (l - 1), rows < R_{l-1}.
template <typename ToHost>
void check_columns(const char* op, const AvslParams& p, const AvslBufs& b, ToHost to_host) {
  if (p.L < 2) return;
  std::vector<int64_t> seg, len, bound;
  for (int l = 1; l < p.L; ++l) {
    seg.push_back(p.off(l) - p.R[0] + (l - 1));
    len.push_back(p.R[l]);
    bound.push_back(p.R[l - 1]);
  }
  check_compressed(op, "col_ptr", "row_idx", "values", b.col_ptr, b.row_idx, b.values, p.S1() + p.L - 1, seg, len,
                   bound, dtype_bytes(p.dtype), to_host);
}

// Compressed rows of link_{l-1} (l >= 1): level l-1's R_{l-1} + 1 entries at off_{l-1} + (l - 1), columns < R_l.
template <typename ToHost>
void check_rows(const char* op, const AvslParams& p, const Buf& row_ptr, const Buf& col_idx, const Buf& row_values,
                ToHost to_host) {
  if (p.L < 2) return;
  std::vector<int64_t> seg, len, bound;
  for (int l = 1; l < p.L; ++l) {
    seg.push_back(p.off(l - 1) + (l - 1));
    len.push_back(p.R[l - 1]);
    bound.push_back(p.R[l]);
  }
  check_compressed(op, "row_ptr", "col_idx", "row_values", row_ptr, col_idx, row_values,
                   p.S() - p.R[p.L - 1] + p.L - 1, seg, len, bound, dtype_bytes(p.dtype), to_host);
}

// to_host(void* dst, uintptr_t src, int64_t bytes, Extra extra): see AvslBufs.
template <typename Extra, typename FwdFn, typename BwdFn, typename TopkFn, typename WsFn, typename ToHostFn>
void bind_avsl_ops(pybind11::module_& m, FwdFn forward, BwdFn backward, TopkFn topk, WsFn workspace_bytes,
                   ToHostFn to_host) {
  namespace py = pybind11;
  const char* extra_doc = std::is_same<Extra, int>::value ? "num_threads" : "stream";
  auto ws_check = [workspace_bytes](const char* op, AvslParams& p, AvslWorkspace which, const Buf& ws) {
    const int64_t bytes = workspace_bytes(p, which);
    p.workspace = reinterpret_cast<void*>(need(op, "workspace", ws, bytes, 1));
  };
  m.def(
      "avsl_distance",
      [forward, to_host, ws_check](Buf qe, Buf ge, Buf rq, Buf rg, Buf coef, Buf bias, Buf col_ptr, Buf row_idx,
                                   Buf values, Buf out, int64_t Q, int64_t G, std::vector<int64_t> sizes,
                                   double gamma, int dtype, Buf workspace, uintptr_t extra) {
        const char* op = "avsl_distance";
        const AvslBufs b{qe, ge, rq, rg, coef, bias, col_ptr, row_idx, values};
        AvslParams p = avsl_params(op, b, Q, G, sizes, gamma, dtype);
        auto th = [&](void* d, uintptr_t s, int64_t n) { to_host(d, s, n, (Extra)extra); };
        check_columns(op, p, b, th);
        p.out = reinterpret_cast<void*>(need(op, "out", out, Q * G, dtype_bytes(p.dtype)));
        ws_check(op, p, AvslWorkspace::kDistance, workspace);
        py::gil_scoped_release nogil;
        forward(p, (Extra)extra);
      },
      py::arg("qe"), py::arg("ge"), py::arg("rq"), py::arg("rg"), py::arg("coef"), py::arg("bias"),
      py::arg("col_ptr"), py::arg("row_idx"), py::arg("values"), py::arg("out"), py::arg("Q"), py::arg("G"),
      py::arg("sizes"), py::arg("gamma"), py::arg("dtype"), py::arg("workspace"), py::arg(extra_doc),
      "AVSL rectified distance of every (query, gallery) pair, (Q, G) (see avsl/avsl_distance.h).");
  m.def(
      "avsl_distance_backward",
      [backward, to_host, ws_check](Buf grad_out, Buf qe, Buf ge, Buf rq, Buf rg, Buf coef, Buf bias, Buf col_ptr,
                                    Buf row_idx, Buf values, Buf row_ptr, Buf col_idx, Buf row_values,
                                    Buf grad_coef, Buf grad_bias, int64_t Q, int64_t G, std::vector<int64_t> sizes,
                                    double gamma, int dtype, Buf workspace, uintptr_t extra) {
        const char* op = "avsl_distance_backward";
        const AvslBufs b{qe, ge, rq, rg, coef, bias, col_ptr, row_idx, values};
        AvslParams p = avsl_params(op, b, Q, G, sizes, gamma, dtype);
        auto th = [&](void* d, uintptr_t s, int64_t n) { to_host(d, s, n, (Extra)extra); };
        check_columns(op, p, b, th);
        check_rows(op, p, row_ptr, col_idx, row_values, th);
        const int64_t es = dtype_bytes(p.dtype);
        p.grad_out = reinterpret_cast<const void*>(need(op, "grad_out", grad_out, Q * G, es));
        p.row_ptr = reinterpret_cast<const int64_t*>(row_ptr.first);
        p.col_idx = reinterpret_cast<const int32_t*>(col_idx.first);
        p.row_values = reinterpret_cast<const void*>(row_values.first);
        p.grad_coef = reinterpret_cast<void*>(need(op, "grad_coef", grad_coef, p.S1(), es));
        p.grad_bias = reinterpret_cast<void*>(need(op, "grad_bias", grad_bias, p.S1(), es));
        ws_check(op, p, AvslWorkspace::kBackward, workspace);
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
      [topk, to_host, ws_check](Buf qe, Buf ge, Buf rq, Buf rg, Buf coef, Buf bias, Buf col_ptr, Buf row_idx,
                                Buf values, Buf out_values, Buf out_indices, int64_t Q, int64_t G,
                                std::vector<int64_t> sizes, double gamma, int64_t k, bool exclude_self, int dtype,
                                Buf workspace, uintptr_t extra) {
        const char* op = "avsl_topk";
        const AvslBufs b{qe, ge, rq, rg, coef, bias, col_ptr, row_idx, values};
        const int64_t cand = G - (exclude_self ? 1 : 0);
        WM_CHECK(k >= 1 && k <= cand, op << ": k must be in [1, " << cand << "] (the gallery candidates), got " << k);
        WM_CHECK(!exclude_self || Q == G, op << ": exclude_self needs Q == G, got Q=" << Q << " G=" << G);
        AvslParams p = avsl_params(op, b, Q, G, sizes, gamma, dtype);
        auto th = [&](void* d, uintptr_t s, int64_t n) { to_host(d, s, n, (Extra)extra); };
        check_columns(op, p, b, th);
        p.k = k;
        p.exclude_self = exclude_self;
        p.topk_values = reinterpret_cast<void*>(need(op, "out_values", out_values, Q * k, dtype_bytes(p.dtype)));
        p.topk_indices = reinterpret_cast<int64_t*>(need(op, "out_indices", out_indices, Q * k, 8));
        ws_check(op, p, AvslWorkspace::kTopk, workspace);
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
        WM_CHECK(op >= 0 && op <= 2, "avsl_workspace_bytes: op must be 0, 1 or 2, got " << op);
        const auto kernel = static_cast<AvslWorkspace>(op);
        AvslParams p = avsl_params("avsl_workspace_bytes", AvslBufs{}, Q, G, sizes, 10.0, dtype, false);
        WM_CHECK(kernel != AvslWorkspace::kTopk || k >= 1, "avsl_workspace_bytes: k must be >= 1 for top-k, got " << k);
        p.k = k;
        return workspace_bytes(p, kernel);
      },
      py::arg("op"), py::arg("Q"), py::arg("G"), py::arg("sizes"), py::arg("k"), py::arg("dtype"),
      "Bytes of workspace the caller allocates for a kernel code of table['avsl_workspace'] (AvslWorkspace).");
}

}  // namespace whymatch
