"""Input handling shared by the explainers: one place for the checks, the
reference embeddings, the random generator and the progress bar."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import _validate as V
from ..similarity import SimilarityModel


@dataclass
class PairInputs:
    query: Tensor             # (C, H, W) float32 on the model's device
    references: Tensor | None  # (K, C, Hr, Wr) or None when embeddings were given
    ref_embeddings: Tensor    # (K, D) float32 embeddings of the unperturbed references


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


class Explainer:
    """What every explainer shares: ``sim``, the cheap :meth:`check` and the entry ``attribute``."""

    sim: SimilarityModel
    batch_size: int

    def check(self, query: Tensor, references: Tensor | None = None, *, reference_embeddings: Tensor | None = None,
              condition: object = None) -> None:
        """Validate a call cheaply before the expensive work: the inputs as ``attribute`` would, one forward pass
        of the query and the references (finite embeddings and scores) and the method's own settings against
        the query's size. Raises ValueError / TypeError naming what is wrong; returns None.
        """
        sim = self.sim
        inp = prepare(sim, query, references, reference_embeddings=reference_embeddings,
                      batch_size=self.batch_size, need_images=not getattr(self, "fixed_reference", True))
        with torch.no_grad():
            fq = check_output(sim(inp.query[None].to(sim.input_dtype(inp.query.device))), "the query")
            check_output(sim.pairwise(fq, inp.ref_embeddings, condition), "the query against the references",
                         "similarity scores")
        self._check_settings(inp)

    def _check_settings(self, inp: PairInputs) -> None:
        """Method-specific checks of the settings against the prepared inputs (none by default)."""


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


def prepare(sim: SimilarityModel, query: object, references: object, *, reference_embeddings: object = None,
            batch_size: int, need_images: bool = False) -> PairInputs:
    """Validate a query (C, H, W) or (1, C, H, W) and K references (K, C, H, W) or (C, H, W)."""
    if isinstance(query, Tensor) and query.dim() == 4:
        if query.shape[0] != 1:
            raise ValueError(f"query must be one image (C, H, W) or (1, C, H, W), got shape {tuple(query.shape)}; "
                             "explain several queries with one call each")
        query = query[0]
    device = sim.device
    query = sim.check_images("query", query, batch=False, device=device)
    if references is None and reference_embeddings is None:
        raise ValueError("references must be given (K, C, H, W) images, or reference_embeddings (K, D)")
    if references is not None and reference_embeddings is not None:
        raise ValueError("give either references or reference_embeddings, not both")
    refs = None
    if references is not None:
        if isinstance(references, Tensor) and references.dim() == 3:
            references = references[None]
        refs = sim.check_images("references", references, device=device)
        emb = check_output(sim.embed(refs.to(sim.input_dtype(device)), batch_size), "the references")
    else:
        if need_images:
            raise ValueError("this mode perturbs the references, so references must be images, "
                             "not reference_embeddings")
        emb = V.tensor("reference_embeddings", reference_embeddings, ndim=2, dtypes=V.FLOAT_DTYPES,
                       device=device, nonempty=True)
        V.finite("reference_embeddings", emb)
        emb = emb.float()
    return PairInputs(query=query.float().contiguous(), references=refs, ref_embeddings=emb)


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


def batches(n: int, batch_size: int, *, show: bool, desc: str) -> Iterator[tuple[int, int]]:
    """(start, stop) slices of range(n), with a tqdm bar when ``show``."""
    starts: Iterable[int] = range(0, n, batch_size)
    if show:
        from tqdm.auto import tqdm

        starts = tqdm(starts, total=(n + batch_size - 1) // batch_size, desc=desc, unit="batch")
    for i in starts:
        yield i, min(n, i + batch_size)


def query_as_pairs(sim: SimilarityModel, query: object, references: object,
                   reference_embeddings: object) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One query against K references as K pairs for an ``attribute_pairs``.

    Returns (queries (K, C, H, W), an expanded view of the query; references (K, C, Hr, Wr) or
    None; reference_embeddings (K, D) or None).
    """
    if isinstance(query, Tensor) and query.dim() == 4 and query.shape[0] == 1:
        query = query[0]
    q = sim.check_images("query", query, batch=False, device=sim.device)
    if references is not None:
        references = V.tensor("references", references, ndim=(3, 4), nonempty=True)
        references = references[None] if references.dim() == 3 else references
        k = references.shape[0]
    elif reference_embeddings is not None:
        k = V.tensor("reference_embeddings", reference_embeddings, ndim=2, nonempty=True).shape[0]
    else:
        raise ValueError("references must be given (K, C, H, W) images, or reference_embeddings (K, D)")
    return q[None].expand(k, -1, -1, -1), references, reference_embeddings


def check_pairs(sim: SimilarityModel, queries: object, references: object, reference_embeddings: object, *,
                need_images: bool) -> tuple[Tensor, Tensor]:
    """Validate B pairs: queries (B, C, H, W) with references (B, C, Hr, Wr) or reference_embeddings (B, D).

    Returns (queries, references or reference embeddings), on the model's device.
    """
    dev = sim.device
    q = sim.check_images("queries", queries, device=dev)
    if (references is None) == (reference_embeddings is None):
        raise ValueError("give exactly one of references (B, C, H, W) or reference_embeddings (B, D)")
    if references is not None:
        r = sim.check_images("references", references, device=dev)
    else:
        if need_images:
            raise ValueError("this mode perturbs the references, so references must be images, "
                             "not reference_embeddings")
        r = V.finite("reference_embeddings", V.tensor("reference_embeddings", reference_embeddings, ndim=2,
                                                      dtypes=V.FLOAT_DTYPES, device=dev, nonempty=True))
    if r.shape[0] != q.shape[0]:
        raise ValueError(f"queries and references must pair up one to one: got {q.shape[0]} queries and "
                         f"{r.shape[0]} references")
    return q, r
