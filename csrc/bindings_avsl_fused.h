// Binding of the fused kernels of the AVSL cuBLAS path (avsl/avsl_fused.h) into _C_cuda, with the
// conventions of bindings_common.h: buffers as (address, bytes), each checked against the bytes the
// kernels touch, and a last argument that is the cudaStream_t. GIL released. float32 only; the
// packed inputs as avsl_params (ge and rg NOT transposed).
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "avsl/avsl_fused.h"
#include "bindings_avsl.h"
#include "bindings_common.h"

namespace whymatch {

// The checked packed inputs, the chunk and the level; `hat` (nq ng, R_level) floats (absent allowed
// unless hat_required).
inline AvslFusedParams avsl_fused_params(const char* op, Buf qe, Buf ge, Buf rq, Buf rg, Buf coef, Buf bias, Buf hat,
                                         int64_t Q, int64_t G, const std::vector<int64_t>& sizes, int64_t level,
                                         double gamma, int64_t q0, int64_t nq, int64_t g0, int64_t ng,
                                         bool hat_required) {
  AvslParams a = avsl_params(op, AvslBufs{qe, ge, rq, rg, coef, bias, Buf{0, 0}, Buf{0, 0}, Buf{0, 0}}, Q, G, sizes,
                             gamma, /*float32*/ 0);
  WM_CHECK(level >= 0 && level < a.L, op << ": level must be in [0, " << a.L << "), got " << level);
  WM_CHECK(q0 >= 0 && nq >= 0 && q0 + nq <= Q,
           op << ": the query chunk [q0, q0 + nq) must lie in [0, " << Q << "), got q0=" << q0 << " nq=" << nq);
  WM_CHECK(g0 >= 0 && ng >= 0 && g0 + ng <= G,
           op << ": the gallery chunk [g0, g0 + ng) must lie in [0, " << G << "), got g0=" << g0 << " ng=" << ng);
  AvslFusedParams p;
  p.qe = static_cast<const float*>(a.qe);
  p.ge = static_cast<const float*>(a.ge);
  p.rq = static_cast<const float*>(a.rq);
  p.rg = static_cast<const float*>(a.rg);
  p.coef = static_cast<const float*>(a.coef);
  p.bias = static_cast<const float*>(a.bias);
  p.Q = Q;
  p.G = G;
  p.S = a.S();
  p.S1 = a.S1();
  p.q0 = q0;
  p.nq = nq;
  p.g0 = g0;
  p.ng = ng;
  p.level = static_cast<int>(level);
  p.off = a.off(p.level);
  p.o1 = p.off - a.R[0];
  p.R = a.R[p.level];
  p.gamma = static_cast<float>(gamma);
  const int64_t n = checked_product(op, "nq*ng*R", {nq, ng, p.R});
  p.hat = reinterpret_cast<float*>(hat_required ? need(op, "hat", hat, n, 4) : need_opt(op, "hat", hat, n, 4));
  return p;
}

template <typename RunPrologue, typename RunBlend, typename RunEpilogue>
void bind_avsl_fused_ops(pybind11::module_& m, RunPrologue prologue, RunBlend blend, RunEpilogue epilogue) {
  namespace py = pybind11;
  m.def(
      "avsl_fused_prologue",
      [prologue](Buf qe, Buf ge, Buf rq, Buf rg, Buf coef, Buf bias, Buf hat, int64_t Q, int64_t G,
                 std::vector<int64_t> sizes, int64_t q0, int64_t nq, int64_t g0, int64_t ng, uintptr_t stream) {
        const char* op = "avsl_fused_prologue";
        AvslFusedParams p = avsl_fused_params(op, qe, ge, rq, rg, coef, bias, hat, Q, G, sizes, 0, 10.0, q0, nq, g0,
                                              ng, true);
        py::gil_scoped_release nogil;
        prologue(p, stream);
      },
      py::arg("qe"), py::arg("ge"), py::arg("rq"), py::arg("rg"), py::arg("coef"), py::arg("bias"), py::arg("hat"),
      py::arg("Q"), py::arg("G"), py::arg("sizes"), py::arg("q0"), py::arg("nq"), py::arg("g0"), py::arg("ng"),
      py::arg("stream"), "hat_0 (nq ng, R_0) of a chunk: the first GEMM's operand (see avsl/avsl_fused.h).");
  m.def(
      "avsl_fused_blend",
      [blend](Buf qe, Buf ge, Buf rq, Buf rg, Buf coef, Buf bias, Buf hat, int64_t Q, int64_t G,
                          std::vector<int64_t> sizes, int64_t level, double gamma, int64_t q0, int64_t nq, int64_t g0,
                          int64_t ng, uintptr_t stream) {
        const char* op = "avsl_fused_blend";
        AvslFusedParams p = avsl_fused_params(op, qe, ge, rq, rg, coef, bias, hat, Q, G, sizes, level, gamma, q0, nq,
                                              g0, ng, true);
        WM_CHECK(level >= 1, op << ": level must be >= 1 (level 0 is the prologue's), got " << level);
        py::gil_scoped_release nogil;
        blend(p, stream);
      },
      py::arg("qe"), py::arg("ge"), py::arg("rq"), py::arg("rg"), py::arg("coef"), py::arg("bias"), py::arg("hat"),
      py::arg("Q"), py::arg("G"), py::arg("sizes"), py::arg("level"), py::arg("gamma"), py::arg("q0"), py::arg("nq"),
      py::arg("g0"), py::arg("ng"), py::arg("stream"),
      "In place: the GEMM output A_l (nq ng, R_l) of a chunk becomes hat_l, the next GEMM's operand.");
  m.def(
      "avsl_fused_epilogue",
      [epilogue](Buf qe, Buf ge, Buf rq, Buf rg, Buf coef, Buf bias, Buf hat, Buf out, Buf out_values,
                 Buf out_indices, int64_t Q, int64_t G, std::vector<int64_t> sizes, int64_t level, double gamma,
                 int64_t q0, int64_t nq, int64_t g0, int64_t ng, int64_t k, bool exclude_self, uintptr_t stream) {
        const char* op = "avsl_fused_epilogue";
        AvslFusedParams p = avsl_fused_params(op, qe, ge, rq, rg, coef, bias, hat, Q, G, sizes, level, gamma, q0, nq,
                                              g0, ng, false);
        WM_CHECK(level == static_cast<int64_t>(sizes.size()) - 1,
                 op << ": level must be the last one, " << sizes.size() - 1 << ", got " << level);
        WM_CHECK((level == 0) == (p.hat == nullptr) || nq * ng == 0,
                 op << ": hat must be given exactly when level >= 1 (level " << level << ")");
        if (out.first != 0 || out.second != 0) {
          p.out = reinterpret_cast<float*>(need(op, "out", out, checked_product(op, "Q*G", {Q, G}), 4));
          WM_CHECK(p.out || Q * G == 0, op << ": out must not be null");
        } else {
          const int64_t cand = G - (exclude_self ? 1 : 0);
          WM_CHECK(k >= 1 && k <= cand, op << ": k must be in [1, " << cand << "] (the gallery candidates), got " << k);
          WM_CHECK(!exclude_self || Q == G, op << ": exclude_self needs Q == G, got Q=" << Q << " G=" << G);
          p.k = k;
          p.exclude_self = exclude_self;
          p.topk_values = reinterpret_cast<float*>(need(op, "out_values", out_values, Q * k, 4));
          p.topk_indices = reinterpret_cast<int64_t*>(need(op, "out_indices", out_indices, Q * k, 8));
        }
        py::gil_scoped_release nogil;
        epilogue(p, stream);
      },
      py::arg("qe"), py::arg("ge"), py::arg("rq"), py::arg("rg"), py::arg("coef"), py::arg("bias"), py::arg("hat"),
      py::arg("out"), py::arg("out_values"), py::arg("out_indices"), py::arg("Q"), py::arg("G"), py::arg("sizes"),
      py::arg("level"), py::arg("gamma"), py::arg("q0"), py::arg("nq"), py::arg("g0"), py::arg("ng"), py::arg("k"),
      py::arg("exclude_self"), py::arg("stream"),
      "The last level's blend and row sum of a chunk into out (Q, G), or (out absent) folded into each query's "
      "running top-k (out_values, out_indices (Q, k), chunks in increasing g0).");
}

}  // namespace whymatch
