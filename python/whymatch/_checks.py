"""Argument checks shared by every part of whymatch: data, models, explainers, trainers and ops.

Every message names the argument, what was expected and what arrived. This module needs nothing
of whymatch, so importing it (from ``whymatch.data`` or ``whymatch.similarity``) registers no op;
``whymatch.ops._validate`` re-exports these checks and adds the ops' own.
"""

from __future__ import annotations

import math
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


def first_line(exc: BaseException) -> str:
    """An exception's message as one line: its first paragraph, newlines escaped, at most 500 characters."""
    text = str(exc).strip()
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = f"missing key {exc.args[0]!r}"
    if not text:
        return type(exc).__name__
    text = printable(text.split("\n\n", 1)[0].strip().replace("\n", " "))
    return text if len(text) <= 500 else text[:497] + "..."


def printable(text: str) -> str:
    """``text`` with control characters escaped (\\r, \\x1b...): a file name cannot split the line or drive the
    terminal."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
