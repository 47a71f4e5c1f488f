// Shared by bindings.cpp (module _C) and bindings_cuda.cpp (module _C_cuda):
// each op is bound with the same Python signature, buffers as (address, bytes)
// pairs, sizes, and the last argument a thread count (CPU) or a cudaStream_t (CUDA).
// The GIL is released while a kernel runs.
//
// These modules are private (only python/whymatch/ops calls them; the supported
// boundary is torch.ops.whymatch.*, which checks every tensor's dtype, shape, device
// and layout). They cannot see a tensor, so each entry checks what it can: every size
// is non-negative and their products fit int64, every buffer it will touch is non-null,
// aligned and at least as many bytes as the sizes imply (need() below), and index
// buffers whose values become addresses (the AVSL compressed links) are range-checked.
// An address that does not point at the bytes claimed cannot be detected here.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "common/dtype.h"
#include "perturb/ranked_blend.h"
#include "perturb/rise_apply.h"
#include "perturb/rise_saliency.h"

namespace whymatch {
namespace py = pybind11;

template <typename T>
const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }

// A caller's buffer: (address, size in bytes). (0, 0) is "absent" where an entry allows it.
using Buf = std::pair<uintptr_t, int64_t>;

inline int64_t dtype_bytes(DType t) { return t == DType::F64 ? 8 : (t == DType::F32 ? 4 : 2); }

// The address of `b` after checking that it holds `count` elements of `elem` bytes: an
// invalid_argument (Python ValueError) naming the op, the buffer, the expected and the actual size.
inline uintptr_t need(const char* op, const char* name, const Buf& b, int64_t count, int64_t elem) {
  WM_CHECK(b.second >= 0, op << ": " << name << " byte count must be >= 0, got " << b.second);
  const int64_t bytes = checked_product(op, name, {count, elem});
  if (count == 0) return b.first;
  WM_CHECK(b.first != 0, op << ": " << name << " must not be null (it holds " << count << " values)");
  WM_CHECK(b.first % static_cast<uintptr_t>(elem) == 0,
           op << ": " << name << " must be aligned to " << elem << " bytes, got address " << b.first);
  WM_CHECK(b.second >= bytes, op << ": " << name << " must hold at least " << bytes << " bytes (" << count
                                 << " values of " << elem << " bytes), got " << b.second);
  return b.first;
}

// As need(), for an optional buffer: (0, 0) means absent and returns 0.
inline uintptr_t need_opt(const char* op, const char* name, const Buf& b, int64_t count, int64_t elem) {
  if (b.first == 0 && b.second == 0) return 0;
  uintptr_t p = need(op, name, b, count, elem);
  WM_CHECK(p != 0 || count == 0, op << ": " << name << " must not be null");
  return p;
}

// Launch is void(const Params&, Extra) where Extra is int (threads) or void* (stream).
template <typename Extra, typename RiseApplyFn, typename RiseSalFn, typename RankedFn>
void bind_ops(py::module_& m, RiseApplyFn rise_apply, RiseSalFn rise_saliency, RankedFn ranked_blend) {
  const char* extra_doc = std::is_same<Extra, int>::value ? "num_threads" : "stream";
  m.def(
      "rise_apply",
      [rise_apply](Buf grids, Buf shifts, Buf image, Buf baseline, Buf out,
                   int64_t n, int64_t c, int64_t h, int64_t w, int64_t s, int dtype, bool channels_last,
                   uintptr_t extra) {
        const char* op = "rise_apply";
        RiseApplyParams p;
        p.out_dtype = dtype_from_code(dtype);
        WM_CHECK(p.out_dtype != DType::F64, op << ": dtype must be float32, float16 or bfloat16, got float64");
        WM_CHECK(s >= 1, op << ": grid size s must be >= 1, got " << s);
        const int64_t chw = checked_product(op, "c*h*w", {c, h, w});
        const int64_t nout = checked_product(op, "n*c*h*w", {n, chw});
        const bool any = nout > 0;  // the kernel touches nothing otherwise
        p.grids = cptr<float>(need(op, "grids", grids, any ? checked_product(op, "n*s*s", {n, s, s}) : 0, 4));
        p.shifts = cptr<int64_t>(need(op, "shifts", shifts, any ? checked_product(op, "n*2", {n, 2}) : 0, 8));
        p.image = cptr<float>(need(op, "image", image, any ? chw : 0, 4));
        p.baseline = cptr<float>(need(op, "baseline", baseline, any ? chw : 0, 4));
        p.out = reinterpret_cast<void*>(need(op, "out", out, nout, dtype_bytes(p.out_dtype)));
        p.N = n; p.C = c; p.H = h; p.W = w; p.S = s;
        p.channels_last = channels_last;
        py::gil_scoped_release nogil;
        rise_apply(p, (Extra)extra);
      },
      py::arg("grids"), py::arg("shifts"), py::arg("image"), py::arg("baseline"), py::arg("out"), py::arg("n"),
      py::arg("c"), py::arg("h"), py::arg("w"), py::arg("s"), py::arg("dtype"), py::arg("channels_last"),
      py::arg(extra_doc), "RISE masks applied to one image into an [n, c, h, w] batch (see perturb/rise_apply.h).");
  m.def(
      "rise_saliency",
      [rise_saliency](Buf grids, Buf shifts, Buf scores, Buf out, int64_t n, int64_t k,
                      int64_t h, int64_t w, int64_t s, uintptr_t extra) {
        const char* op = "rise_saliency";
        WM_CHECK(s >= 1, op << ": grid size s must be >= 1, got " << s);
        const int64_t nout = checked_product(op, "k*h*w", {k, h, w});
        const bool any = checked_product(op, "n*k*h*w", {n, nout}) > 0;
        RiseSaliencyParams p;
        p.grids = cptr<float>(need(op, "grids", grids, any ? checked_product(op, "n*s*s", {n, s, s}) : 0, 4));
        p.shifts = cptr<int64_t>(need(op, "shifts", shifts, any ? checked_product(op, "n*2", {n, 2}) : 0, 8));
        p.scores = cptr<float>(need(op, "scores", scores, any ? checked_product(op, "n*k", {n, k}) : 0, 4));
        p.out = reinterpret_cast<float*>(need(op, "out", out, nout, 4));
        p.N = n; p.K = k; p.H = h; p.W = w; p.S = s;
        py::gil_scoped_release nogil;
        rise_saliency(p, (Extra)extra);
      },
      py::arg("grids"), py::arg("shifts"), py::arg("scores"), py::arg("out"), py::arg("n"), py::arg("k"),
      py::arg("h"), py::arg("w"), py::arg("s"), py::arg(extra_doc),
      "Score-weighted sum of RISE masks for k references (see perturb/rise_saliency.h).");
  m.def(
      "ranked_blend",
      [ranked_blend](Buf first, Buf second, Buf rank, Buf counts, Buf out, int64_t b,
                     int64_t t, int64_t c, int64_t hw, int dtype, uintptr_t extra) {
        const char* op = "ranked_blend";
        RankedBlendParams p;
        p.dtype = dtype_from_code(dtype);
        WM_CHECK(p.dtype != DType::F64, op << ": dtype must be float32, float16 or bfloat16, got float64");
        const int64_t es = dtype_bytes(p.dtype);
        const int64_t nout = checked_product(op, "b*t*c*hw", {b, t, c, hw});
        const bool any = nout > 0;
        p.first = reinterpret_cast<const void*>(need(op, "first", first, any ? b * c * hw : 0, es));
        p.second = reinterpret_cast<const void*>(need(op, "second", second, any ? b * c * hw : 0, es));
        p.rank = cptr<int64_t>(need(op, "rank", rank, any ? b * hw : 0, 8));
        p.counts = cptr<int64_t>(need(op, "counts", counts, any ? t : 0, 8));
        p.out = reinterpret_cast<void*>(need(op, "out", out, nout, es));
        p.B = b; p.T = t; p.C = c; p.HW = hw;
        py::gil_scoped_release nogil;
        ranked_blend(p, (Extra)extra);
      },
      py::arg("first"), py::arg("second"), py::arg("rank"), py::arg("counts"), py::arg("out"), py::arg("b"),
      py::arg("t"), py::arg("c"), py::arg("hw"), py::arg("dtype"), py::arg(extra_doc),
      "Images along an insertion/deletion curve (see perturb/ranked_blend.h).");
}

}  // namespace whymatch
