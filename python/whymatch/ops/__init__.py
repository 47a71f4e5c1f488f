"""whymatch ops: the only layer that touches the compiled kernels.

Public functions validate their arguments and call ops registered with
torch.library as ``torch.ops.whymatch.*``; ``reference`` holds the pure-PyTorch
definitions that the kernels are tested against.

The boundary. Every registered op checks, from metadata alone, everything its kernel relies
on: each tensor's dtype, rank, shape (and how the shapes agree), device and layout
(contiguous, or channels_last where allowed), sizes and whether the output fits (an output or
workspace whose element count overflows int64 or whose bytes exceed the device's memory,
``WHYMATCH_MAX_OUTPUT_BYTES`` overriding, is refused by name before the allocator is asked:
``_ext.OutputTooLargeError``, a ValueError). Its fake (meta) implementation runs the same
checks. Values that become addresses are range-checked: RISE shifts (by the CPU kernel, or
by the op on other devices) and the AVSL compressed links (by the compiled entry). Errors are
ValueError/TypeError with one line naming the op, the argument, the expected and the actual
value. The compiled modules ``whymatch._C`` / ``whymatch._C_cuda`` are private: they take
buffers as (address, bytes) pairs and check every size and byte count against what the kernel
touches, but cannot tell whether an address really holds the bytes claimed; call the ops.

NaN and Inf. By default the ops check metadata only and never scan float data (a scan would
synchronize the GPU on every call): NaN/Inf in float inputs propagate as in any torch op
(the outputs equal the reference's, NaN included). Top-k ranks NaN distances last (ties and
NaNs by the lower gallery index), so its indices are always valid, distinct gallery indices.
AVSL link weights that are exactly zero are structural (skipped, as in a sparse product), so a
NaN node reaches only the nodes it is linked to (the dense reference would multiply it by 0).
Scalar hyperparameters (alpha, beta, gamma, momentum, a number baseline) given as Python numbers
must be finite and are always checked (cheap); alpha / beta given as one-element tensors are data,
scanned only with the opt-in checks below (a scan would synchronize the GPU). ``set_check_finite(True)``, or the environment variable
``WHYMATCH_CHECK_FINITE=1`` (read at each call), turns on a finiteness scan of every op's
float inputs, each refusal a ValueError naming the argument. Explainers check their model's
outputs themselves, once per call.
"""

from . import reference
from ._ext import OutputTooLargeError, get_num_threads, set_num_threads
from ._validate import check_finite_enabled, set_check_finite
from .avsl import avsl_distance, avsl_topk, cam_correlation, cam_reliability, cam_statistics, link_star
from .mining import soft_mask
from .perturb import ranked_blend, rise_apply, rise_saliency
from ._lazy_dynamo import defer_dynamo_import as _defer_dynamo_import

_defer_dynamo_import()  # the first op call no longer imports torch._dynamo (1-8 s): see _lazy_dynamo

__all__ = ["reference", "set_check_finite", "check_finite_enabled", "OutputTooLargeError", "set_num_threads", "get_num_threads", "rise_apply", "rise_saliency", "ranked_blend", "soft_mask", "cam_reliability",
           "cam_correlation", "cam_statistics", "link_star", "avsl_distance", "avsl_topk"]
