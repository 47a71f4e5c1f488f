"""Freed memory kept for reuse while whymatch runs batches on a CPU (glibc's malloc).

An explainer's batches allocate and free the same large activations over and over. With glibc's
defaults each block above its mmap threshold (at most 32 MiB) is a fresh ``mmap`` and ``munmap``,
every page faulted in and zeroed again: RISE with 500 masks against 3 references on EfficientNet-lite0
at 224 px spent 31.7 s of system time in 26.8 s of wall time on 2 cores (batches of 256), and took
9.9 s of wall time with freed memory kept and batches of 64 (``benchmarks/results/rise_heap.md``).

:func:`reusing` is the scope the explainers and the insertion / deletion metrics run their CPU
batches in: while the first of them runs, glibc keeps freed blocks of up to 1 GiB in the heap
(``mallopt`` M_MMAP_THRESHOLD and M_TRIM_THRESHOLD); when the last one ends, the thresholds go to
glibc's own dynamic ceilings (32 MiB and 64 MiB, what a long-running process reaches by itself) and
``malloc_trim`` hands the kept memory back, so the process does not stay larger than it was.

Nothing happens where the C library is not glibc, where the environment sets glibc's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (the user's choice wins), where
``WHYMATCH_REUSE_MEMORY=0``, or after :func:`set_reuse` ``(False)``. The ``whymatch`` command keeps
freed memory for its whole run instead (:func:`keep_freed_memory`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["reusing", "set_reuse", "reuse_enabled", "keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_KEEP = 1 << 30  # blocks up to this size stay in the heap while a scope runs
_CEILING_MMAP, _CEILING_TRIM = 32 << 20, 64 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX and twice it

_lock = threading.Lock()
_depth = 0  # scopes running now, in every thread
_process_wide = False  # keep_freed_memory() applied: scopes leave the thresholds alone
_enabled = os.environ.get("WHYMATCH_REUSE_MEMORY", "").strip() != "0"
_libc_handle: object = None
_libc_loaded = False


def _libc():
    """glibc through ctypes (with mallopt and malloc_trim), or None."""
    global _libc_handle, _libc_loaded
    if not _libc_loaded:
        _libc_loaded = True
        try:
            import ctypes

            lib = ctypes.CDLL("libc.so.6")
            if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") and hasattr(lib, "gnu_get_libc_version"):
                _libc_handle = lib
        except OSError:
            _libc_handle = None
    return _libc_handle


def _user_tuned() -> bool:
    return bool(os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"))


def set_reuse(enabled: bool) -> None:
    """Turn :func:`reusing` on (the default) or off for this process; a scope already running is not changed."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _enabled = enabled


def reuse_enabled() -> bool:
    """Whether :func:`reusing` changes anything here: on, glibc, and no threshold set by the environment."""
    return _enabled and not _user_tuned() and _libc() is not None


@contextmanager
def reusing(active: bool = True) -> Iterator[bool]:
    """Keep freed heap memory while the block runs (``active=False``: a no-op, for GPU work); yields whether
    this scope changed glibc's thresholds. Safe in several threads at once: the first scope in sets them,
    the last one out restores them and trims."""
    global _depth
    lib = _libc() if active and reuse_enabled() else None
    if lib is None:
        yield False
        return
    with _lock:
        if _process_wide:
            lib = None
        else:
            _depth += 1
            if _depth == 1:
                lib.mallopt(_M_MMAP_THRESHOLD, _KEEP)
                lib.mallopt(_M_TRIM_THRESHOLD, _KEEP)
    if lib is None:
        yield False
        return
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and not _process_wide:
                lib.mallopt(_M_MMAP_THRESHOLD, _CEILING_MMAP)
                lib.mallopt(_M_TRIM_THRESHOLD, _CEILING_TRIM)
                lib.malloc_trim(0)


def keep_freed_memory() -> bool:
    """Keep freed heap memory (blocks up to 1 GiB) for the rest of the process, as the ``whymatch`` command
    does; returns whether it applied (see the module's docstring for where it does not)."""
    global _process_wide
    lib = _libc() if not _user_tuned() else None
    if lib is None:
        return False
    with _lock:
        ok = bool(lib.mallopt(_M_MMAP_THRESHOLD, _KEEP)) and bool(lib.mallopt(_M_TRIM_THRESHOLD, _KEEP))
        _process_wide = _process_wide or ok
    return ok
