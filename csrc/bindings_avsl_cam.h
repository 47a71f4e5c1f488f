// Binding of the fused AVSL CAM ops (correlation + edge update + reliability, and reliability
// alone) into _C and _C_cuda, with the conventions of bindings_common.h: buffers as (address, bytes),
// each checked against what the kernel touches ((0, 0) = absent output), sizes, and a last argument that is a thread count (CPU) or a cudaStream_t
// (CUDA). GIL released. See avsl/cam_correlation.h.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <type_traits>

#include "avsl/cam_correlation.h"
#include "bindings_common.h"
#include "common/dtype.h"

namespace whymatch {

// workspace_images(B, J): the images the kernel's workspace holds at once (CPU: a chunk; CUDA: B).
template <typename Extra, typename CorrFn, typename RelFn, typename ImagesFn>
void bind_avsl_cam_ops(pybind11::module_& m, CorrFn correlation, RelFn reliability, ImagesFn workspace_images) {
  namespace py = pybind11;
  const char* extra_doc = std::is_same<Extra, int>::value ? "num_threads" : "stream";
  auto vp = [](uintptr_t v) { return reinterpret_cast<void*>(v); };
  m.def(
      "avsl_cam_correlation",
      [correlation, workspace_images, vp](Buf low, Buf high, Buf corr, Buf edges, Buf rel_low, Buf rel_high,
                                          Buf workspace, int64_t B, int64_t R1, int64_t H1, int64_t W1, int64_t R2,
                                          int64_t H2, int64_t W2, double momentum, bool first, bool published,
                                          int dtype, uintptr_t extra) {
        const char* op = "avsl_cam_correlation";
        CamCorrParams p;
        p.B = B; p.R1 = R1; p.H1 = H1; p.W1 = W1; p.R2 = R2; p.H2 = H2; p.W2 = W2;
        p.momentum = momentum; p.first = first; p.published = published;
        p.dtype = dtype_from_code(dtype);
        const int64_t es = dtype_bytes(p.dtype);
        const int64_t nlow = checked_product(op, "B*R1*H1*W1", {B, R1, H1, W1});
        const int64_t nhigh = checked_product(op, "B*R2*H2*W2", {B, R2, H2, W2});
        const int64_t rr = checked_product(op, "R1*R2", {R1, R2});
        p.low = vp(need(op, "low", low, nlow, es));
        p.high = vp(need(op, "high", high, nhigh, es));
        p.corr = vp(need_opt(op, "corr", corr, rr, es));
        p.edges = vp(need_opt(op, "edges", edges, rr, es));
        p.rel_low = vp(need_opt(op, "rel_low", rel_low, B * R1, es));
        p.rel_high = vp(need_opt(op, "rel_high", rel_high, B * R2, es));
        if ((p.rel_low && R1 > 0) || (p.rel_high && R2 > 0))
          WM_CHECK((p.rel_low == nullptr || H1 * W1 >= 2) && (p.rel_high == nullptr || H2 * W2 >= 2),
                   op << ": the reliability needs at least 2 positions per map, got " << H1 << " x " << W1
                      << " and " << H2 << " x " << W2);
        checked_product(op, "workspace", {B, H2, W2, R1 + R2 + kCamMR + kCamNR, 8});
        const int64_t ws = cam_corr_workspace_bytes(workspace_images(B, checked_product(op, "H2*W2", {H2, W2})), R1, R2, H2, W2, p.dtype);
        p.workspace = vp(need(op, "workspace", workspace, ws, 1));
        check_cam_corr(p);  // sizes, dtype, momentum
        py::gil_scoped_release nogil;
        correlation(p, (Extra)extra);
      },
      py::arg("low"), py::arg("high"), py::arg("corr"), py::arg("edges"), py::arg("rel_low"), py::arg("rel_high"),
      py::arg("workspace"), py::arg("B"), py::arg("R1"), py::arg("H1"), py::arg("W1"), py::arg("R2"), py::arg("H2"),
      py::arg("W2"), py::arg("momentum"), py::arg("first"), py::arg("published"), py::arg("dtype"),
      py::arg(extra_doc),
      "Batch-mean CAM correlation of two levels, the in-place edge update and both levels' reliability, "
      "in one call (see avsl/cam_correlation.h); null pointers skip an output.");
  m.def(
      "avsl_cam_reliability",
      [reliability, vp](Buf cam, Buf rel, int64_t B, int64_t R, int64_t H, int64_t W, bool published,
                        int dtype, uintptr_t extra) {
        const char* op = "avsl_cam_reliability";
        CamRelParams p;
        p.B = B; p.R = R; p.H = H; p.W = W; p.published = published;
        p.dtype = dtype_from_code(dtype);
        const int64_t es = dtype_bytes(p.dtype);
        p.cam = vp(need(op, "cam", cam, checked_product(op, "B*R*H*W", {B, R, H, W}), es));
        p.rel = vp(need(op, "rel", rel, B * R, es));
        check_cam_rel(p);
        py::gil_scoped_release nogil;
        reliability(p, (Extra)extra);
      },
      py::arg("cam"), py::arg("rel"), py::arg("B"), py::arg("R"), py::arg("H"), py::arg("W"), py::arg("published"),
      py::arg("dtype"), py::arg(extra_doc), "AVSL reliability statistic (B, R) of CAMs (B, R, H, W).");
  m.def(
      "avsl_cam_workspace_bytes",
      [workspace_images](int64_t B, int64_t R1, int64_t R2, int64_t H2, int64_t W2, int dtype) -> int64_t {
        const char* op = "avsl_cam_workspace_bytes";
        WM_CHECK(B >= 0 && R1 >= 0 && R2 >= 0 && H2 >= 1 && W2 >= 1,
                 op << ": bad sizes B=" << B << " R1=" << R1 << " R2=" << R2 << " H2=" << H2 << " W2=" << W2);
        checked_product(op, "workspace", {B, H2, W2, R1 + R2 + kCamMR + kCamNR, 8});
        return cam_corr_workspace_bytes(workspace_images(B, H2 * W2), R1, R2, H2, W2, dtype_from_code(dtype));
      },
      py::arg("B"), py::arg("R1"), py::arg("R2"), py::arg("H2"), py::arg("W2"), py::arg("dtype"),
      "Bytes of workspace the caller allocates for avsl_cam_correlation (the normalized maps, K-major).");
}

}  // namespace whymatch
