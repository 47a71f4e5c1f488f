// The one table the compiled modules export to Python (m.attr("table")), created in one place, after
// every binding family has bound its entries: the kernels' op names, the dtype codes
// (common/dtype.h), the limits and the workspace codes. python/whymatch/ops/_ext.py reads its
// constants from it and checks that they are the ones the Python side was written for;
// tests/test_build.py derives the expected op set from it.
#pragma once
#include <pybind11/pybind11.h>

#include <iterator>

#include "avsl/avsl_distance.h"
#include "common/check.h"
#include "common/dtype.h"

namespace whymatch {

// The compiled entry behind each registered op (torch.ops.whymatch.*), bound by both modules.
inline constexpr const char* kOpNames[] = {
    "rise_apply",    "rise_saliency",          "ranked_blend", "soft_mask",            "soft_mask_backward",
    "avsl_distance", "avsl_distance_backward", "avsl_topk",    "avsl_cam_correlation", "avsl_cam_reliability",
};

// Sets m.table, m.ops (its op names) and m.__version__; every op of the table must have been bound.
inline void bind_op_table(pybind11::module_& m) {
  namespace py = pybind11;
  py::tuple ops(std::size(kOpNames));
  for (size_t i = 0; i < std::size(kOpNames); ++i) {
    WM_CHECK(py::hasattr(m, kOpNames[i]), "op table: the module binds no entry " << kOpNames[i]);
    ops[i] = py::str(kOpNames[i]);
  }
  py::dict dtype_codes;
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::F64}) dtype_codes[dtype_name(t)] = static_cast<int>(t);
  py::dict limits;
  limits["avsl_max_levels"] = kAvslMaxLevels;
  py::dict avsl_workspace;
  avsl_workspace["distance"] = static_cast<int>(AvslWorkspace::kDistance);
  avsl_workspace["backward"] = static_cast<int>(AvslWorkspace::kBackward);
  avsl_workspace["topk"] = static_cast<int>(AvslWorkspace::kTopk);
  py::dict table;
  table["ops"] = ops;
  table["dtype_codes"] = dtype_codes;
  table["limits"] = limits;
  table["avsl_workspace"] = avsl_workspace;
  m.attr("table") = table;
  m.attr("ops") = ops;
  m.attr("__version__") = WHYMATCH_VERSION;
}

}  // namespace whymatch
