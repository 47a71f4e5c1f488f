"""Keep the first call of a whymatch op from importing ``torch._dynamo``.

``torch.library.custom_op`` wraps every kernel in ``torch._disable_dynamo``, which imports
``torch._dynamo`` on the kernel's first call (about 2 s on an idle 2-core machine, 8 s on a loaded
one: most of the start-up of a short ``whymatch explain``). That wrapper exists so that torch.compile
does not trace into the kernel's Python frames; while ``torch._dynamo`` has never been imported,
nothing can be compiling and there is nothing to disable. :func:`defer_dynamo_import` gives each of
our kernels the disabled form that the wrapper caches on first use (``fn.__dynamo_disable``, see
``torch/_compile.py``): it calls the kernel directly while ``torch._dynamo`` is not loaded, and from
the first call after it is (torch.compile, opcheck) builds and keeps torch's own
``torch._dynamo.disable(fn)``, exactly what the wrapper would have built.

Only private attributes of torch are touched, each looked up defensively: on a torch whose internals
differ, nothing is changed and the ops behave as torch made them (the import then happens as before).
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def _deferred(fn: Callable) -> Callable:
    real: Callable | None = None

    def call(*args, **kwargs):
        nonlocal real
        if real is None:
            if "torch._dynamo" not in sys.modules:  # never imported: nothing compiles, nothing to disable
                return fn(*args, **kwargs)
            import torch._dynamo

            real = torch._dynamo.disable(fn, recursive=True, wrapping=False)  # what torch._disable_dynamo builds
        return real(*args, **kwargs)

    call.__whymatch_deferred__ = True  # type: ignore[attr-defined]
    return call


def defer_dynamo_import(namespace: str = "whymatch") -> int:
    """Defer the ``torch._dynamo`` import of every custom op of ``namespace``'s kernels; returns how many
    kernels now defer it (0 when this torch's internals are not the expected ones)."""
    try:
        from torch._library import custom_ops
    except ImportError:
        return 0
    opdefs = getattr(custom_ops, "OPDEFS", None)  # qualified name -> CustomOpDef (a WeakValueDictionary)
    if not hasattr(opdefs, "items"):
        return 0
    n = 0
    for name, op in list(opdefs.items()):
        if not str(name).startswith(f"{namespace}::"):
            continue
        fns = getattr(op, "_backend_fns", None)
        if not isinstance(fns, dict):
            continue
        for wrapper in fns.values():
            kernel = getattr(wrapper, "__wrapped__", None)  # the function torch._disable_dynamo wrapped
            if kernel is None or not callable(kernel):
                continue
            cached = getattr(kernel, "__dynamo_disable", None)
            if cached is None:
                setattr(kernel, "__dynamo_disable", _deferred(kernel))
                n += 1
            elif getattr(cached, "__whymatch_deferred__", False):
                n += 1
    return n


__all__ = ["defer_dynamo_import"]
