"""The explainer base, modelled on captum's ``Attribution``: what every saliency explainer shares.

Every explainer is built from a :class:`~whymatch.SimilarityModel` (``sim``, the first argument), is
configured in its constructor and does its work in ``attribute(query, references, **kw)``, which returns
(K, H, W) maps of the query, one per reference. The base holds, in one place:

- the model (``sim``; an explainer that takes a bare ``nn.Module`` wraps it with cosine similarity) and the
  device (``device``: the model's; inputs are moved there by the validation below);
- the batch size and its default policy (:data:`DEFAULT_BATCH_SIZE`, :func:`default_batch_size`);
- the progress bar over the batches (``show_progress``, :meth:`Explainer._batches`);
- the validation of the inputs: one query against K references (:meth:`Explainer._inputs`), the same as
  K pairs (:meth:`Explainer._as_pairs`), or B independent pairs (:meth:`Explainer._pairs`);
- the cheap :meth:`Explainer.check` the jobs run before any expensive work.

The registry of the explainers (names, CLI options, defaults) is :mod:`whymatch.saliency.registry`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..memory import reusing
from ..ops import _validate as V
from ..similarity import SimilarityModel
from . import _common

__all__ = ["Explainer", "PairInputs", "DEFAULT_BATCH_SIZE", "default_batch_size", "batches"]

#: The default batch size policy, by what one batch holds (an explainer's ``batch_kind``):
#:
#: - ``'images'``: perturbed images through one forward pass without gradients (RISE, SlidingWindow, LIME):
#:   256. Only the inputs and one layer's activations live at a time; 256 fills a GPU for small models and
#:   keeps the CPU's per-call overhead small, and peak memory grows with it, not with the number of masks.
#: - ``'pairs'``: pairs (or tuples) through a forward and a backward pass (EmbeddingGradCAM,
#:   SimilarityAttention; Mask's optimization steps): 64. Every activation is kept for the backward pass,
#:   several times the memory of a forward-only image.
#:
#: ``batch_size=None`` (every explainer's default) means this policy; results do not depend on the batch size.
#: On a CPU an 'images' batch also holds at most :data:`CPU_BATCH_BYTES` of input images (at least 8 images):
#: 69 images at 3 x 224 x 224, the full 256 at 96 px.
DEFAULT_BATCH_SIZE: dict[str, int] = {"images": 256, "pairs": 64}
#: The CPU's cap on one default 'images' batch, in bytes of float32 input. Each batch's activations are
#: allocated and freed again; at 224 px, 256 images' activations (GiBs) outgrow what the heap keeps
#: (:mod:`whymatch.memory`) and are mapped and faulted in anew every batch: RISE with 500 masks on
#: EfficientNet-lite0 took 1.8x the wall time at 256 as at 64 (benchmarks/results/rise_heap.md).
CPU_BATCH_BYTES = 40 << 20


def default_batch_size(kind: str) -> int:
    """The default batch size of an explainer whose batches hold ``kind`` ('images' or 'pairs')."""
    return DEFAULT_BATCH_SIZE[V.choice("kind", kind, tuple(DEFAULT_BATCH_SIZE))]


@dataclass
class PairInputs:
    query: Tensor             # (C, H, W) float32 on the model's device
    references: Tensor | None  # (K, C, Hr, Wr) or None when embeddings were given
    ref_embeddings: Tensor    # (K, D) float32 embeddings of the unperturbed references


def batches(n: int, batch_size: int, *, show: bool, desc: str) -> Iterator[tuple[int, int]]:
    """(start, stop) slices of range(n), with a tqdm bar when ``show``."""
    starts: Iterable[int] = range(0, n, batch_size)
    if show:
        from tqdm.auto import tqdm

        starts = tqdm(starts, total=(n + batch_size - 1) // batch_size, desc=desc, unit="batch")
    for i in starts:
        yield i, min(n, i + batch_size)


class Explainer:
    """Base of every saliency explainer: ``sim``, ``batch_size``, ``show_progress``, ``device``, the input
    validation, :meth:`check` and the entry :meth:`attribute`.

    Subclasses call ``super().__init__(sim, batch_size=..., show_progress=...)`` first, set ``batch_kind``
    ('images' or 'pairs', see :data:`DEFAULT_BATCH_SIZE`) and implement :meth:`attribute`; a method with
    settings that depend on the input size implements :meth:`_check_settings`.
    """

    #: what one batch holds: 'images' (forward passes only) or 'pairs' (forward and backward passes)
    batch_kind: ClassVar[str] = "images"
    #: whether a bare nn.Module is accepted as ``sim`` (wrapped in a cosine SimilarityModel)
    wraps_modules: ClassVar[bool] = False

    sim: SimilarityModel
    batch_size: int
    show_progress: bool

    def __init__(self, sim: SimilarityModel, *, batch_size: int | None = None, show_progress: bool = False) -> None:
        if self.wraps_modules and isinstance(sim, nn.Module) and not isinstance(sim, SimilarityModel):
            sim = SimilarityModel(sim)
        self.sim = _common.check_model(sim)
        self.batch_size = (default_batch_size(self.batch_kind) if batch_size is None
                           else V.positive_int("batch_size", batch_size))
        self._default_batch = batch_size is None
        self.show_progress = bool(show_progress)

    @property
    def device(self) -> torch.device:
        """The model's device: inputs are moved there, and the maps come back on it."""
        return self.sim.device

    def attribute(self, query: Tensor, references: Tensor | None = None, **kwargs) -> Tensor:
        """Saliency (K, H, W) of the query (C, H, W) for each of K references (K, C, Hr, Wr)."""
        raise NotImplementedError(f"{type(self).__name__} must implement attribute(query, references, **kw)")

    # ------------------------------------------------------------ batches and progress
    def _batch_for(self, image: Tensor) -> int:
        """The batch size for perturbed copies of ``image``: ``batch_size``, capped on a CPU by
        :data:`CPU_BATCH_BYTES` when it is the default (neither given nor set on the explainer since)."""
        default = self._default_batch and self.batch_size == default_batch_size(self.batch_kind)
        if not default or self.device.type != "cpu" or self.batch_kind != "images":
            return self.batch_size
        return max(8, min(self.batch_size, CPU_BATCH_BYTES // max(1, image.numel() * 4)))

    def _batches(self, n: int, desc: str, *, bar: bool = True, size: int | None = None) -> Iterator[tuple[int, int]]:
        """(start, stop) slices of ``n`` items, ``size`` (default ``batch_size``) at a time, with a bar when
        ``show_progress`` (and ``bar``); on a CPU the loop runs with freed memory kept for the next batch
        (:func:`whymatch.memory.reusing`)."""
        with reusing(self.device.type == "cpu"):
            yield from batches(n, size or self.batch_size, show=self.show_progress and bar, desc=desc)

    # ------------------------------------------------------------ input validation
    def _inputs(self, query: object, references: object, reference_embeddings: object = None, *,
                need_images: bool = False) -> PairInputs:
        """One query (C, H, W) or (1, C, H, W) against K references (K, C, H, W) or (C, H, W), or K reference
        embeddings (K, D) (``need_images``: a method that perturbs the references refuses embeddings)."""
        return prepare(self.sim, query, references, reference_embeddings=reference_embeddings,
                       batch_size=self.batch_size, need_images=need_images)

    def _as_pairs(self, query: object, references: object,
                  reference_embeddings: object) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """One query against K references as K pairs for an ``attribute_pairs`` (see :func:`query_as_pairs`)."""
        return query_as_pairs(self.sim, query, references, reference_embeddings)

    def _pairs(self, queries: object, references: object, reference_embeddings: object, *,
               need_images: bool) -> tuple[Tensor, Tensor]:
        """B independent pairs (see :func:`check_pairs`), on the model's device."""
        return check_pairs(self.sim, queries, references, reference_embeddings, need_images=need_images)

    def check(self, query: Tensor, references: Tensor | None = None, *, reference_embeddings: Tensor | None = None,
              condition: object = None) -> None:
        """Validate a call cheaply before the expensive work: the inputs as ``attribute`` would, one forward pass
        of the query and the references (finite embeddings and scores) and the method's own settings against
        the query's size. Raises ValueError / TypeError naming what is wrong; returns None.
        """
        sim = self.sim
        inp = self._inputs(query, references, reference_embeddings,
                           need_images=not getattr(self, "fixed_reference", True))
        with torch.no_grad():
            fq = _common.check_output(sim(inp.query[None].to(sim.input_dtype(inp.query.device))), "the query")
            _common.check_output(sim.pairwise(fq, inp.ref_embeddings, condition),
                                 "the query against the references", "similarity scores")
        self._check_settings(inp)

    def _check_settings(self, inp: PairInputs) -> None:
        """Method-specific checks of the settings against the prepared inputs (none by default)."""


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
        emb = _common.check_output(sim.embed(refs.to(sim.input_dtype(device)), batch_size), "the references")
    else:
        if need_images:
            raise ValueError("this mode perturbs the references, so references must be images, "
                             "not reference_embeddings")
        emb = V.tensor("reference_embeddings", reference_embeddings, ndim=2, dtypes=V.FLOAT_DTYPES,
                       device=device, nonempty=True)
        V.finite("reference_embeddings", emb)
        emb = emb.float()
    return PairInputs(query=query.float().contiguous(), references=refs, ref_embeddings=emb)


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
