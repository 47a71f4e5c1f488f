// Shared by bindings.cpp (module _C) and bindings_cuda.cpp (module _C_cuda):
// each op is bound with the same Python signature, raw pointers as integers,
// sizes, and the last argument a thread count (CPU) or a cudaStream_t (CUDA).
// The GIL is released while a kernel runs.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "perturb/ranked_blend.h"
#include "perturb/rise_apply.h"
#include "perturb/rise_saliency.h"

namespace whymatch {
namespace py = pybind11;

template <typename T>
const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }

// Launch is void(const Params&, Extra) where Extra is int (threads) or void* (stream).
template <typename Extra, typename RiseApplyFn, typename RiseSalFn, typename RankedFn>
void bind_ops(py::module_& m, RiseApplyFn rise_apply, RiseSalFn rise_saliency, RankedFn ranked_blend) {
  const char* extra_doc = std::is_same<Extra, int>::value ? "num_threads" : "stream";
  m.def(
      "rise_apply",
      [rise_apply](uintptr_t grids, uintptr_t shifts, uintptr_t image, uintptr_t baseline, uintptr_t out,
                   int64_t n, int64_t c, int64_t h, int64_t w, int64_t s, int dtype, bool channels_last,
                   uintptr_t extra) {
        RiseApplyParams p;
        p.grids = cptr<float>(grids);
        p.shifts = cptr<int64_t>(shifts);
        p.image = cptr<float>(image);
        p.baseline = cptr<float>(baseline);
        p.out = reinterpret_cast<void*>(out);
        p.n = n; p.c = c; p.h = h; p.w = w; p.s = s;
        p.out_dtype = dtype_from_code(dtype);
        p.channels_last = channels_last;
        py::gil_scoped_release nogil;
        rise_apply(p, (Extra)extra);
      },
      py::arg("grids"), py::arg("shifts"), py::arg("image"), py::arg("baseline"), py::arg("out"), py::arg("n"),
      py::arg("c"), py::arg("h"), py::arg("w"), py::arg("s"), py::arg("dtype"), py::arg("channels_last"),
      py::arg(extra_doc), "RISE masks applied to one image into an [n, c, h, w] batch (see perturb/rise_apply.h).");
  m.def(
      "rise_saliency",
      [rise_saliency](uintptr_t grids, uintptr_t shifts, uintptr_t scores, uintptr_t out, int64_t n, int64_t k,
                      int64_t h, int64_t w, int64_t s, uintptr_t extra) {
        RiseSaliencyParams p;
        p.grids = cptr<float>(grids);
        p.shifts = cptr<int64_t>(shifts);
        p.scores = cptr<float>(scores);
        p.out = reinterpret_cast<float*>(out);
        p.n = n; p.k = k; p.h = h; p.w = w; p.s = s;
        py::gil_scoped_release nogil;
        rise_saliency(p, (Extra)extra);
      },
      py::arg("grids"), py::arg("shifts"), py::arg("scores"), py::arg("out"), py::arg("n"), py::arg("k"),
      py::arg("h"), py::arg("w"), py::arg("s"), py::arg(extra_doc),
      "Score-weighted sum of RISE masks for k references (see perturb/rise_saliency.h).");
  m.def(
      "ranked_blend",
      [ranked_blend](uintptr_t first, uintptr_t second, uintptr_t rank, uintptr_t counts, uintptr_t out, int64_t b,
                     int64_t t, int64_t c, int64_t hw, int dtype, uintptr_t extra) {
        RankedBlendParams p;
        p.first = reinterpret_cast<const void*>(first);
        p.second = reinterpret_cast<const void*>(second);
        p.rank = cptr<int64_t>(rank);
        p.counts = cptr<int64_t>(counts);
        p.out = reinterpret_cast<void*>(out);
        p.b = b; p.t = t; p.c = c; p.hw = hw;
        p.dtype = dtype_from_code(dtype);
        py::gil_scoped_release nogil;
        ranked_blend(p, (Extra)extra);
      },
      py::arg("first"), py::arg("second"), py::arg("rank"), py::arg("counts"), py::arg("out"), py::arg("b"),
      py::arg("t"), py::arg("c"), py::arg("hw"), py::arg("dtype"), py::arg(extra_doc),
      "Images along an insertion/deletion curve (see perturb/ranked_blend.h).");
  m.attr("__version__") = WHYMATCH_VERSION;
  m.attr("ops") = py::make_tuple("rise_apply", "rise_saliency", "ranked_blend");
}

}  // namespace whymatch
