"""Argument checks shared by the ops and the explainers.

Every message names the argument, what was expected and what arrived.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    nonempty: bool = False,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be a {want} tensor, got {t.dim()}-D with shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype {want}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {t.device}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    return t


def finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """Refuse NaN/inf. Skipped while torch.compile traces: the check reads the data (a graph break)."""
    if torch.compiler.is_compiling():
        return t
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} must be finite, got {bad} NaN or infinite value(s)")
    return t


def shape(name: str, t: torch.Tensor, expected: Sequence[int | None]) -> torch.Tensor:
    exp = tuple(expected)
    ok = t.dim() == len(exp) and all(e is None or e == s for e, s in zip(exp, t.shape))
    if not ok:
        shown = "(" + ", ".join("*" if e is None else str(e) for e in exp) + ")"
        raise ValueError(f"{name} must have shape {shown}, got {tuple(t.shape)}")
    return t


def positive_int(name: str, v: object, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def real(name: str, v: object, *, low: float | None = None, high: float | None = None,
         open_low: bool = False, open_high: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    lo_bad = low is not None and (v <= low if open_low else v < low)
    hi_bad = high is not None and (v >= high if open_high else v > high)
    if lo_bad or hi_bad:
        lb = "(" if open_low else "["
        hb = ")" if open_high else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{hb}, got {v:g}")
    return v


def choice(name: str, v: object, options: Sequence[str]) -> str:
    if v not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}, got {v!r}")
    return v  # type: ignore[return-value]


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
