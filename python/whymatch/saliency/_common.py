"""Helpers shared by the explainers: output checks, constant-map warnings, the random generator and the
baseline image. The base class, the batches and the input validation are in :mod:`whymatch.saliency.base`."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import _validate as V
from ..similarity import SimilarityModel


class ConstantMapWarning(RuntimeWarning):
    """An explainer returned a constant map (e.g. all zero): it singles out no pixel.

    Raised with ``warnings.warn``; the report and CLI show it. :func:`constant_maps`
    gives the same test as a (K,) bool flag for maps already computed.
    """


def constant_maps(maps: Tensor, atol: float = 0.0) -> Tensor:
    """(K,) bool: which of the maps (K, H, W) are constant (max - min <= atol), e.g. all zero.

    ``atol``: what counts as no variation, in the map's units (an explainer passes a small multiple of
    its scores' scale, so that rounding noise of a fit or a centring does not count as a map).
    """
    maps = V.tensor("maps", maps, ndim=3)
    if maps.numel() == 0:
        return torch.zeros(maps.shape[0], dtype=torch.bool, device=maps.device)
    flat = maps.detach().flatten(1)
    return (flat.amax(dim=1) - flat.amin(dim=1)) <= atol


def _outside_level() -> int:
    """``stacklevel`` for a warnings.warn in the caller of this function: the first frame outside
    whymatch.saliency (the user's call)."""
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(2), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        frame, level = frame.f_back, level + 1
    return level


def warn_if_constant(maps: Tensor, method: str, why: str, stacklevel: int | None = None,
                     atol: float = 0.0) -> Tensor:
    """Warn (:class:`ConstantMapWarning`, naming ``method``) when some of the maps (K, H, W) are
    constant; returns the (K,) flags. ``why`` says what usually causes it for this method."""
    const = constant_maps(maps, atol)
    n = int(const.sum())
    if n:
        import warnings

        value = float(maps.detach().flatten(1)[const.nonzero()[0, 0], 0])
        warnings.warn(f"{method}: {n} of {maps.shape[0]} maps are constant ({value:g} everywhere) {why}",
                      ConstantMapWarning, stacklevel=_outside_level() if stacklevel is None else stacklevel)
    return const


class NonFiniteOutputError(ValueError):
    """The similarity model (or its similarity function) produced NaN or Inf during an explanation."""


def check_output(t: Tensor, what: str, kind: str = "embeddings") -> Tensor:
    """Raise :class:`NonFiniteOutputError` when the model's output ``t`` for ``what`` holds NaN or Inf.

    One reduction over ``t`` (called once per kind of output per call: embeddings of the query, the
    references, a perturbed batch; similarity scores; maps).
    """
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = ~torch.isfinite(t)
        rows = int(bad.reshape(t.shape[0], -1).any(dim=1).sum()) if t.dim() else 1
        nan = bool(torch.isnan(t).any())
        raise NonFiniteOutputError(
            f"the similarity model produced non-finite {kind} ({'NaN' if nan else 'Inf'}) for {what}: "
            f"{rows} of {t.shape[0] if t.dim() else 1} rows; check the model's weights and its forward "
            "(for example a division by zero or an overflow)")
    return t


def check_maps(maps: Tensor, method: str) -> Tensor:
    """Raise a ValueError naming ``method`` when its maps (K, H, W) hold NaN or Inf (an overflow inside it)."""
    if maps.numel() and not bool(torch.isfinite(maps).all()):
        raise NonFiniteOutputError(f"{method} produced non-finite maps (NaN or Inf) from finite similarity "
                                   "scores: the scores or their gradients overflow; rescale the similarity")
    return maps


#: The most elements an explainer allocates for its random draws (RISE grids, LIME samples): 8 GiB of float32.
MAX_DRAWN = 2**31


def check_drawn(n: int, per: int, what: str, names: str) -> None:
    """Refuse, naming the settings, a request for more than MAX_DRAWN random values (n draws of ``per``)."""
    if n * per > MAX_DRAWN:
        raise ValueError(f"{names} ask for {n} x {per} = {n * per} random values for the {what}, more than "
                         f"{MAX_DRAWN} (lower {names.split(' and ')[0]})")


def check_model(sim: object) -> SimilarityModel:
    if not isinstance(sim, SimilarityModel):
        raise TypeError(f"sim must be a whymatch.SimilarityModel, got {type(sim).__name__}")
    return sim


def generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded from ``seed`` (nondeterministic when None); global RNG state is untouched."""
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
        g.manual_seed(seed)
    return g


def baseline_image(baseline: object, image: Tensor) -> Tensor:
    """The (C, H, W) image that perturbed pixels take: a number, 'mean' (per-channel mean) or a tensor."""
    c, h, w = image.shape
    if isinstance(baseline, str):
        V.choice("baseline", baseline, ("mean",))
        return image.mean(dim=(1, 2), keepdim=True).expand(c, h, w).contiguous()
    if isinstance(baseline, Tensor):
        V.tensor("baseline", baseline, dtypes=V.FLOAT_DTYPES, device=image.device)
        try:
            out = baseline.float().expand(c, h, w)
        except RuntimeError:
            raise ValueError(f"baseline must broadcast to {(c, h, w)}, got shape {tuple(baseline.shape)}") from None
        return V.finite("baseline", out.contiguous())
    return torch.full((c, h, w), V.real("baseline", baseline), device=image.device)
