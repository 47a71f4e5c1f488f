"""A user's model named on the command line or in a config: 'package.module:factory'.

Used by the CLI (``--model``) and the SANE attribute trainer (``similarity=``), so that a trainer
never imports the CLI.
"""

from __future__ import annotations

import importlib

from .._checks import first_line
from ..similarity import SimilarityModel


def factory(spec: str, option: str = "--model"):
    """The callable that 'package.module:factory' names (the module is imported; the factory is not called)."""
    if ":" not in spec:
        raise ValueError(f"{option} must look like 'package.module:factory', got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 (ImportError, or whatever the module does on import)
        raise ValueError(f"{option}: cannot import module {mod_name!r}: {type(exc).__name__}: "
                         f"{first_line(exc)}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{option}: module {mod_name!r} has no callable {fn_name!r}")
    return fn


def load_user_model(spec: str, option: str = "--model") -> SimilarityModel:
    """'package.module:factory' -> SimilarityModel (a plain nn.Module is wrapped with cosine similarity); errors
    name ``option``."""
    import torch

    make = factory(spec, option)
    try:
        model = make()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 (the user's factory: any failure is theirs, named)
        raise ValueError(f"{option}: {spec}() raised {type(exc).__name__}: {first_line(exc)}") from None
    if isinstance(model, SimilarityModel):
        return model
    if isinstance(model, torch.nn.Module):
        return SimilarityModel(model.eval())
    raise ValueError(f"{option}: {spec} must return a whymatch.SimilarityModel or a torch.nn.Module, "
                     f"got {type(model).__name__}")
