"""The ops' argument checks: the generic ones of whymatch._checks (re-exported) and the ops' own.

Every message names the argument, what was expected and what arrived.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .._checks import FLOAT_DTYPES, choice, finite, positive_int, real, shape, tensor  # noqa: F401  (the generic checks, re-exported)


# ---------------------------------------------------------------------------
# The ops' NaN/Inf rule (see the whymatch.ops docstring): by default float data is not scanned;
# scalar hyperparameters are always checked (real() above). set_check_finite(True) or the
# environment variable WHYMATCH_CHECK_FINITE=1 (read at call time) turns the scans on.
# ---------------------------------------------------------------------------

_check_finite: bool | None = None  # None: follow the environment


def set_check_finite(enabled: bool | None) -> None:
    """Turn the ops' finiteness scans of float inputs on (True) or off (False); None follows
    the environment variable WHYMATCH_CHECK_FINITE (1/true/yes/on)."""
    global _check_finite
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {type(enabled).__name__}")
    _check_finite = enabled


def check_finite_enabled() -> bool:
    """Whether the ops scan their float inputs for NaN/Inf (set_check_finite, else WHYMATCH_CHECK_FINITE)."""
    if _check_finite is not None:
        return _check_finite
    v = os.environ.get("WHYMATCH_CHECK_FINITE")
    return bool(v) and v.strip().lower() in ("1", "true", "yes", "on")


def maybe_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """finite(name, t) when the opt-in scans are on (check_finite_enabled()), else nothing (no data read)."""
    if check_finite_enabled() and t.device.type != "meta" and not _is_fake(t):  # the cheap test first
        finite(name, t)
    return t


def _is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor (torch.compile / opcheck tracing): it has metadata but no data to scan."""
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


def op_tensor(op: str, name: str, t: object, *, ndim: int | Sequence[int] | None = None,
              dtypes: Sequence[torch.dtype] | None = None, device: torch.device | None = None,
              shape: Sequence[int | None] | None = None, contiguous: bool = True,
              channels_last_ok: bool = False) -> torch.Tensor:
    """The registered ops' own check of one tensor argument (metadata only, no data read): its
    type, rank, dtype, device, shape and layout, with a message "<op>: <name> must ..., got ..."."""
    label = f"{op}: {name}"
    t = tensor(label, t, ndim=ndim, dtypes=dtypes, device=device)
    if shape is not None:
        globals()["shape"](label, t, shape)
    if contiguous and not t.is_contiguous():
        if not (channels_last_ok and t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
            want = "contiguous or channels_last" if channels_last_ok else "contiguous"
            raise ValueError(f"{label} must be {want}, got shape {tuple(t.shape)} with strides {t.stride()}")
    return t
