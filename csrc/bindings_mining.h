// Binding of the mining ops (soft_mask and its backward) into _C and _C_cuda, with the
// same conventions as bindings_common.h: raw pointers as integers, sizes, and a last
// argument that is a thread count (CPU) or a cudaStream_t (CUDA). GIL released.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "mining/soft_mask.h"

namespace whymatch {

template <typename Extra, typename FwdFn, typename BwdFn>
void bind_mining_ops(pybind11::module_& m, FwdFn forward, BwdFn backward) {
  namespace py = pybind11;
  const char* extra_doc = std::is_same<Extra, int>::value ? "num_threads" : "stream";
  auto vp = [](uintptr_t v) { return reinterpret_cast<void*>(v); };
  m.def(
      "soft_mask",
      [forward, vp](uintptr_t x, uintptr_t attention, uintptr_t alpha, uintptr_t beta, uintptr_t out, int64_t b,
                    int64_t c, int64_t H, int64_t W, int64_t h, int64_t w, int dtype, bool channels_last,
                    uintptr_t extra) {
        SoftMaskParams p;
        p.x = vp(x); p.attention = vp(attention); p.alpha = vp(alpha); p.beta = vp(beta); p.out = vp(out);
        p.b = b; p.c = c; p.H = H; p.W = W; p.h = h; p.w = w;
        p.dtype = dtype_from_code(dtype);
        p.channels_last = channels_last;
        py::gil_scoped_release nogil;
        forward(p, (Extra)extra);
      },
      py::arg("x"), py::arg("attention"), py::arg("alpha"), py::arg("beta"), py::arg("out"), py::arg("b"),
      py::arg("c"), py::arg("H"), py::arg("W"), py::arg("h"), py::arg("w"), py::arg("dtype"),
      py::arg("channels_last"), py::arg(extra_doc),
      "x * (1 - sigmoid(alpha * (up(attention) - beta))), upsampling fused (see mining/soft_mask.h).");
  m.def(
      "soft_mask_backward",
      [backward, vp](uintptr_t grad_out, uintptr_t x, uintptr_t attention, uintptr_t alpha, uintptr_t beta,
                     uintptr_t grad_x, uintptr_t grad_attention, uintptr_t workspace, int64_t b, int64_t c,
                     int64_t H, int64_t W, int64_t h, int64_t w, int dtype, bool channels_last, uintptr_t extra) {
        SoftMaskParams p;
        p.grad_out = vp(grad_out); p.x = vp(x); p.attention = vp(attention); p.alpha = vp(alpha);
        p.beta = vp(beta); p.grad_x = vp(grad_x); p.grad_attention = vp(grad_attention);
        p.workspace = vp(workspace);
        p.b = b; p.c = c; p.H = H; p.W = W; p.h = h; p.w = w;
        p.dtype = dtype_from_code(dtype);
        p.channels_last = channels_last;
        py::gil_scoped_release nogil;
        backward(p, (Extra)extra);
      },
      py::arg("grad_out"), py::arg("x"), py::arg("attention"), py::arg("alpha"), py::arg("beta"),
      py::arg("grad_x"), py::arg("grad_attention"), py::arg("workspace"), py::arg("b"), py::arg("c"),
      py::arg("H"), py::arg("W"), py::arg("h"), py::arg("w"), py::arg("dtype"), py::arg("channels_last"),
      py::arg(extra_doc),
      "grad_x and the attention adjoint G of soft_mask (see mining/soft_mask.h); null pointers skip an output.");
  py::tuple ops = m.attr("ops");
  m.attr("ops") = ops + py::make_tuple("soft_mask", "soft_mask_backward");
}

}  // namespace whymatch
