// Binding of the mining ops (soft_mask and its backward) into _C and _C_cuda, with the
// same conventions as bindings_common.h: buffers as (address, bytes), sizes, and a last
// argument that is a thread count (CPU) or a cudaStream_t (CUDA). GIL released.
// Every buffer is checked against the bytes the kernel touches (need() in bindings_common.h).
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <type_traits>

#include "bindings_common.h"
#include "common/dtype.h"
#include "mining/soft_mask.h"

namespace whymatch {

// Sizes, dtype and the buffers both directions read: x (like `x_name`), attention, alpha, beta.
inline void soft_mask_common(const char* op, SoftMaskParams& p, const Buf& x, const Buf& attention,
                             const Buf& alpha, const Buf& beta, int64_t b, int64_t c, int64_t H, int64_t W,
                             int64_t h, int64_t w, int dtype, bool need_x) {
  p.dtype = dtype_from_code(dtype);
  const int64_t bhw = checked_product(op, "b*H*W", {b, H, W});
  const int64_t n = checked_product(op, "b*c*H*W", {bhw, c});
  const int64_t att = checked_product(op, "b*h*w", {b, h, w});
  WM_CHECK(bhw == 0 || (h >= 1 && w >= 1), op << ": attention maps must be at least 1 x 1, got " << h << " x " << w);
  const int64_t acc = p.dtype == DType::F64 ? 8 : 4;
  p.x = reinterpret_cast<const void*>(need(op, "x", x, need_x ? n : 0, dtype_bytes(p.dtype)));
  p.attention = reinterpret_cast<const void*>(need(op, "attention", attention, bhw > 0 ? att : 0, acc));
  p.alpha = reinterpret_cast<const void*>(need(op, "alpha", alpha, bhw > 0 ? 1 : 0, acc));
  p.beta = reinterpret_cast<const void*>(need(op, "beta", beta, bhw > 0 ? 1 : 0, acc));
  p.B = b; p.C = c; p.H = H; p.W = W; p.Ha = h; p.Wa = w;
}

template <typename Extra, typename FwdFn, typename BwdFn>
void bind_mining_ops(pybind11::module_& m, FwdFn forward, BwdFn backward) {
  namespace py = pybind11;
  const char* extra_doc = std::is_same<Extra, int>::value ? "num_threads" : "stream";
  auto vp = [](uintptr_t v) { return reinterpret_cast<void*>(v); };
  m.def(
      "soft_mask",
      [forward, vp](Buf x, Buf attention, Buf alpha, Buf beta, Buf out, int64_t b,
                    int64_t c, int64_t H, int64_t W, int64_t h, int64_t w, int dtype, bool channels_last,
                    uintptr_t extra) {
        const char* op = "soft_mask";
        SoftMaskParams p;
        soft_mask_common(op, p, x, attention, alpha, beta, b, c, H, W, h, w, dtype, true);
        p.out = vp(need(op, "out", out, b * c * H * W, dtype_bytes(p.dtype)));
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
      [backward, vp](Buf grad_out, Buf x, Buf attention, Buf alpha, Buf beta,
                     Buf grad_x, Buf grad_attention, Buf workspace, int64_t b, int64_t c,
                     int64_t H, int64_t W, int64_t h, int64_t w, int dtype, bool channels_last, uintptr_t extra) {
        const char* op = "soft_mask_backward";
        SoftMaskParams p;
        soft_mask_common(op, p, x, attention, alpha, beta, b, c, H, W, h, w, dtype, true);
        const int64_t n = b * c * H * W, es = dtype_bytes(p.dtype), acc = p.dtype == DType::F64 ? 8 : 4;
        p.grad_out = vp(need(op, "grad_out", grad_out, n, es));
        p.grad_x = vp(need_opt(op, "grad_x", grad_x, n, es));
        p.grad_attention = vp(need_opt(op, "grad_attention", grad_attention, b * h * w, acc));
        if (p.grad_attention) {
          // the workspace: b * H * w (CPU) or b * H * W (CUDA) compute-type values
          const int64_t ws = checked_product(op, "workspace", {b, H, std::is_same<Extra, int>::value ? w : W});
          p.workspace = vp(need(op, "workspace", workspace, ws, acc));
        }
        p.channels_last = channels_last;
        py::gil_scoped_release nogil;
        backward(p, (Extra)extra);
      },
      py::arg("grad_out"), py::arg("x"), py::arg("attention"), py::arg("alpha"), py::arg("beta"),
      py::arg("grad_x"), py::arg("grad_attention"), py::arg("workspace"), py::arg("b"), py::arg("c"),
      py::arg("H"), py::arg("W"), py::arg("h"), py::arg("w"), py::arg("dtype"), py::arg("channels_last"),
      py::arg(extra_doc),
      "grad_x and the attention adjoint G of soft_mask (see mining/soft_mask.h); null pointers skip an output.");
}

}  // namespace whymatch
