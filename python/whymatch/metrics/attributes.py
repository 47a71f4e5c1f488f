"""Metrics for attribute explanations: attribute recognition mAP (SANE section 4.1).

The attribute insertion and deletion metrics of SANE section 4.2 live here too
(:func:`attribute_insertion_deletion`): they swap the whole query for another database image,
so they also reward changes of layout. Where a data set can re-render a scene with one
attribute changed (ShapesWorld's :meth:`~whymatch.data.ShapesWorld.counterfactual`), the
causal ground truth is measured instead (:func:`causal_attribute_effects`): the drop in
similarity when that attribute alone changes, and the explanations are scored against it
(:func:`causal_top1`, :func:`causal_attribute_deletion`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import _validate as V
from ..similarity import SimilarityModel, pairwise_similarity

__all__ = ["average_precision", "mean_average_precision", "AttributeCounterfactuals",
           "attribute_insertion_deletion", "rowwise_similarity", "CausalAttributeEffects",
           "causal_attribute_effects", "causal_attribute_deletion", "causal_top1"]


def average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Average precision of every column: rank the rows by score, average the precision at each positive.

    Ties are broken by row order after a stable sort on descending score, so the result is
    deterministic. This is the non-interpolated AP of scikit-learn's
    ``average_precision_score`` when scores have no ties.

    Args:
        scores: (N, A) float, higher = more likely to have the attribute.
        labels: (N, A) bool or {0, 1}.

    Returns:
        (A,) float64 AP per attribute; NaN for an attribute with no positive row.
    """
    V.tensor("scores", scores, ndim=2)
    V.tensor("labels", labels, ndim=2)
    if scores.shape != labels.shape:
        raise ValueError(f"labels must have the shape of scores {tuple(scores.shape)}, got {tuple(labels.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating tensor, got {scores.dtype}")
    V.finite("scores", scores)
    lab = labels.detach().cpu()
    if lab.dtype != torch.bool:
        if not bool(((lab == 0) | (lab == 1)).all()):
            raise ValueError("labels must be bool or 0/1")
        lab = lab.bool()
    s = scores.detach().double().cpu()
    n, a = s.shape
    if n == 0:
        return torch.full((a,), float("nan"), dtype=torch.float64)
    order = torch.sort(s, dim=0, descending=True, stable=True).indices
    hits = torch.gather(lab, 0, order).double()                    # (N, A), ranked
    cum = hits.cumsum(0)
    ranks = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1)
    n_pos = hits.sum(0)
    ap = (cum / ranks * hits).sum(0) / n_pos
    return torch.where(n_pos > 0, ap, torch.full_like(ap, float("nan")))


def mean_average_precision(scores: Tensor, labels: Tensor) -> tuple[float, Tensor]:
    """Attribute recognition mAP: the mean AP over the attributes that have a positive row.

    Args:
        scores: (N, A) float attribute scores (e.g. the AttributeModel's confidences).
        labels: (N, A) bool or {0, 1} ground truth.

    Returns:
        (mAP, per-attribute AP (A,) float64 with NaN where an attribute has no positive).
        mAP is NaN when no attribute has a positive.
    """
    ap = average_precision(scores, labels)
    valid = ~torch.isnan(ap)
    return (float(ap[valid].mean()) if bool(valid.any()) else float("nan")), ap


# ------------------------------------------------------------ attribute insertion / deletion
def rowwise_similarity(similarity: str | Callable | SimilarityModel, a: Tensor, b: Tensor, *,
                       chunk: int = 1024) -> Tensor:
    """Similarity of the row pairs (a[i], b[i]): (P,) float32.

    Args:
        similarity: 'cosine', 'dot', 'neg_l2', a callable ``f(a, b) -> (Na, Nb)`` or a SimilarityModel
            (its ``.pairwise``).
        a, b: (P, D) embeddings.
        chunk: rows per call of a callable / SimilarityModel (its (chunk, chunk) output's diagonal is kept).
    """
    if a.shape != b.shape:
        raise ValueError(f"the two embedding batches must have the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if isinstance(similarity, str):
        a, b = a.float(), b.float()
        if similarity == "cosine":
            return (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1)
        if similarity == "dot":
            return (a * b).sum(1)
        if similarity == "neg_l2":
            return -(a - b).norm(dim=1)
        raise ValueError(f"similarity must be 'cosine', 'dot', 'neg_l2', a callable or a SimilarityModel, "
                         f"got {similarity!r}")
    fn = similarity.pairwise if isinstance(similarity, SimilarityModel) else similarity
    if not callable(fn):
        raise TypeError(f"similarity must be a string, a callable or a SimilarityModel, got {type(similarity).__name__}")
    out = [fn(a[i:i + chunk], b[i:i + chunk]).diagonal() for i in range(0, a.shape[0], chunk)]
    return torch.cat(out).float() if out else a.new_zeros(0, dtype=torch.float32)


@dataclass
class AttributeCounterfactuals:
    """Attribute deletion / insertion scores of chosen attributes (see :func:`attribute_insertion_deletion`).

    Attributes:
        deletion: (P,) float in [-1, 1]; higher is better. 0 where the query lacks the attribute.
        insertion: (P,) float in [-1, 1]; higher is better.
        deletion_index, insertion_index: (P,) int64 database rows used as the counterfactual
            (-1 where there was none: that pair's score is NaN and left out of the means).
        base_index: (P,) int64 database row of the query without the attribute (insertion's start).
        similarity: (P,) the similarity of each query to its reference.
    """

    deletion: Tensor
    insertion: Tensor
    deletion_index: Tensor
    insertion_index: Tensor
    base_index: Tensor
    similarity: Tensor

    @property
    def mean_deletion(self) -> float:
        v = self.deletion[~torch.isnan(self.deletion)]
        return float(v.mean()) if v.numel() else float("nan")

    @property
    def mean_insertion(self) -> float:
        v = self.insertion[~torch.isnan(self.insertion)]
        return float(v.mean()) if v.numel() else float("nan")


def _binary(name: str, t: object, shape: tuple[int | None, ...]) -> Tensor:
    V.tensor(name, t, ndim=len(shape))
    V.shape(name, t, shape)
    if t.dtype != torch.bool:
        if t.is_floating_point() or t.is_complex() or not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must be bool or 0/1 integers, got dtype {t.dtype}")
        t = t.bool()
    return t


def _closest_in_other_attributes(target: Tensor, target_emb: Tensor, chosen: Tensor, db_attr: Tensor,
                                 db_emb_n: Tensor, want: bool, allowed: Tensor, similarity) -> Tensor:
    """Per row: the allowed database row with attribute ``chosen`` == want that agrees with ``target`` on the
    most other attributes; ties go to the highest embedding similarity to the target. -1 when none."""
    p, a = target.shape
    # agreement on every attribute, minus the chosen column (where they differ by construction or not at all)
    agree = (target.float() @ db_attr.float().T) + ((~target).float() @ (~db_attr).float().T)   # (P, N)
    col = db_attr[:, chosen].T                                                                      # (P, N)
    same_chosen = col == target.gather(1, chosen[:, None])
    agree = agree - same_chosen.float()
    ok = allowed & (col == want)
    tie = _pairwise(similarity, target_emb, db_emb_n)                                         # (P, N)
    tie = (tie - tie.amin(1, keepdim=True)) / (tie.amax(1, keepdim=True) - tie.amin(1, keepdim=True) + 1)
    score = torch.where(ok, agree + tie, torch.full_like(agree, -1.0))
    best = score.argmax(1)
    return torch.where(ok.any(1), best, torch.full_like(best, -1))


def _pairwise(similarity, a: Tensor, b: Tensor) -> Tensor:
    """(Na, Nb) similarity for a string kind, a callable or a SimilarityModel."""
    if isinstance(similarity, str):
        return pairwise_similarity(a, b, similarity)
    fn = similarity.pairwise if isinstance(similarity, SimilarityModel) else similarity
    return fn(a, b).float()


def _signed_fraction(change: Tensor, room_up: Tensor, room_down: Tensor, floor: float) -> Tensor:
    """change / room_up where change >= 0, change / room_down where it is negative: a value in [-1, 1]
    (the rooms are floored at ``floor`` so that a pair at a bound does not divide noise by zero)."""
    return torch.where(change >= 0, change / room_up.clamp(min=floor), change / room_down.clamp(min=floor))


@torch.no_grad()
def attribute_insertion_deletion(query_embeddings: Tensor, reference_embeddings: Tensor, chosen: Tensor,
                                 query_attributes: Tensor, database_embeddings: Tensor, database_attributes: Tensor,
                                 *, similarity: str | Callable | SimilarityModel = "cosine",
                                 query_index: Tensor | None = None, reference_index: Tensor | None = None,
                                 query_types: Tensor | None = None,
                                 database_types: Tensor | None = None,
                                 similarity_range: tuple[float, float] = (-1.0, 1.0)) -> AttributeCounterfactuals:
    """SANE's attribute deletion and insertion metrics (section 4.2) for one chosen attribute per pair.

    An attribute explanation claims that attribute ``a`` makes query q match reference r. The
    metrics swap q for a real database image that differs from q in ``a`` and as little as
    possible otherwise, and measure how the similarity to r moves:

    - Deletion: q- = the database image that LACKS ``a`` and agrees with q on the most other
      attributes (ties: the one most similar to q in the embedding). With s = sim(q, r) and
      [lo, hi] = ``similarity_range``, ``deletion = (s - sim(q-, r)) / (s - lo)``: the fraction of
      the possible drop that removing ``a`` caused. 1 is the bound (q- as dissimilar as possible).
      When removing ``a`` raises the similarity instead, the score is minus the fraction of the
      possible rise, ``(s - sim(q-, r)) / (hi - s)``, so that it lies in [-1, 1] and one bad pair
      cannot outweigh many good ones. A query that lacks ``a`` has nothing to delete: its score is 0.
    - Insertion: start from b = q- (the query without ``a``) and take q+ = the image that HAS
      ``a`` and agrees with b on the most other attributes (ties: most similar to b);
      ``insertion = (sim(q+, r) - sim(b, r)) / (hi - sim(b, r))``: the fraction of the possible
      gain that adding ``a`` back produced (bound 1); a loss is divided by ``sim(b, r) - lo``
      instead, so the score lies in [-1, 1].

    Candidates are restricted to the query's item type when types are given (Polyvore), and never
    include the query or its reference (``query_index``, ``reference_index``). Every denominator is
    floored at 5% of ``hi - lo`` so that a pair already at a bound does not divide noise by zero;
    the floor keeps both scores in [-1, 1]. The paper states the procedure in words only; the
    normalization by the similarity range and insertion's start from q- are whymatch's reading,
    chosen so that higher is better and both scores are bounded by 1 for any similarity range.

    Args:
        query_embeddings: (P, D) query embeddings; reference_embeddings: (P, D) their references.
        chosen: (P,) int64 attribute index chosen by the explanation of each pair.
        query_attributes: (P, A) bool attributes of each query.
        database_embeddings: (N, D); database_attributes: (N, A) bool: the images to draw from.
        similarity: the model's similarity: 'cosine', 'dot', 'neg_l2', a callable or a SimilarityModel.
        query_index: (P,) int64 row of each query in the database (excluded), or -1 / None.
        reference_index: (P,) int64 row of each reference in the database (excluded), or -1 / None.
        query_types, database_types: (P,) and (N,) int64 item types, or None.
        similarity_range: (lo, hi) bounds of the similarity (cosine: (-1, 1)); every similarity used
            must lie inside.

    Returns:
        :class:`AttributeCounterfactuals` with (P,) scores.
    """
    V.tensor("query_embeddings", query_embeddings, ndim=2)
    p, d = query_embeddings.shape
    dev = query_embeddings.device
    V.tensor("reference_embeddings", reference_embeddings, ndim=2, device=dev)
    V.shape("reference_embeddings", reference_embeddings, (p, d))
    V.tensor("database_embeddings", database_embeddings, ndim=2, device=dev, nonempty=True)
    n = database_embeddings.shape[0]
    V.shape("database_embeddings", database_embeddings, (n, d))
    db_attr = _binary("database_attributes", database_attributes, (n, None)).to(dev)
    a = db_attr.shape[1]
    q_attr = _binary("query_attributes", query_attributes, (p, a)).to(dev)
    V.tensor("chosen", chosen, ndim=1)
    V.shape("chosen", chosen, (p,))
    if chosen.dtype not in (torch.int64, torch.int32) or (p and (int(chosen.min()) < 0 or int(chosen.max()) >= a)):
        raise ValueError(f"chosen must hold int attribute indices in [0, {a}), got {chosen.dtype} "
                         f"{chosen.tolist()[:8]}")
    chosen = chosen.to(dev, torch.int64)
    lo, hi = (float(v) for v in similarity_range)
    if not lo < hi:
        raise ValueError(f"similarity_range must be (lo, hi) with lo < hi, got {similarity_range}")
    allowed = torch.ones(p, n, dtype=torch.bool, device=dev)
    for name, index in (("query_index", query_index), ("reference_index", reference_index)):
        if index is None:
            continue
        V.tensor(name, index, ndim=1)
        V.shape(name, index, (p,))
        qi = index.to(dev, torch.int64)
        if p and (int(qi.max()) >= n or int(qi.min()) < -1):
            raise ValueError(f"{name} must hold database rows in [0, {n}) or -1, got values in "
                             f"[{int(qi.min())}, {int(qi.max())}]")
        rows = torch.nonzero(qi >= 0).flatten()
        allowed[rows, qi[rows]] = False
    if (query_types is None) != (database_types is None):
        raise ValueError("query_types and database_types must be given together")
    if query_types is not None:
        V.tensor("query_types", query_types, ndim=1)
        V.shape("query_types", query_types, (p,))
        V.tensor("database_types", database_types, ndim=1)
        V.shape("database_types", database_types, (n,))
        allowed &= query_types.to(dev)[:, None] == database_types.to(dev)[None, :]

    s = rowwise_similarity(similarity, query_embeddings, reference_embeddings)
    nan = torch.full((p,), float("nan"), device=dev)
    minus = _closest_in_other_attributes(q_attr, query_embeddings, chosen, db_attr, database_embeddings,
                                         False, allowed, similarity)
    has = q_attr.gather(1, chosen[:, None])[:, 0]
    s_minus = torch.where(minus >= 0, rowwise_similarity(similarity, database_embeddings[minus.clamp(min=0)],
                                                         reference_embeddings), nan)
    floor = 0.05 * (hi - lo)
    deletion = torch.where(has, _signed_fraction(s - s_minus, s - lo, hi - s, floor), torch.zeros_like(s))
    deletion = torch.where(has & (minus < 0), nan, deletion)

    base_attr = db_attr[minus.clamp(min=0)]
    base_emb = database_embeddings[minus.clamp(min=0)]
    allowed_b = allowed.clone()
    rows = torch.nonzero(minus >= 0).flatten()
    allowed_b[rows, minus[rows]] = False
    plus = _closest_in_other_attributes(base_attr, base_emb, chosen, db_attr, database_embeddings,
                                        True, allowed_b, similarity)
    plus = torch.where(minus >= 0, plus, torch.full_like(plus, -1))
    s_plus = torch.where(plus >= 0, rowwise_similarity(similarity, database_embeddings[plus.clamp(min=0)],
                                                       reference_embeddings), nan)
    insertion = _signed_fraction(s_plus - s_minus, hi - s_minus, s_minus - lo, floor)
    for name, v in (("the query-reference similarity", s), ("a counterfactual's similarity", s_minus),
                    ("a counterfactual's similarity", s_plus)):
        v = v[~torch.isnan(v)]
        if v.numel() and (float(v.min()) < lo - 1e-5 or float(v.max()) > hi + 1e-5):
            raise ValueError(f"similarity_range must bound every similarity: {name} spans "
                             f"[{float(v.min()):.4g}, {float(v.max()):.4g}], outside {similarity_range}")
    return AttributeCounterfactuals(deletion=deletion, insertion=insertion, deletion_index=minus,
                                    insertion_index=plus, base_index=minus, similarity=s)


# ------------------------------------------------------------------ causal ground truth
_KINDS = ("shape", "colour", "pattern", "size")


@dataclass
class CausalAttributeEffects:
    """Causal ground truth of P pairs (:func:`causal_attribute_effects`).

    Attributes:
        effects: (P, A) float32, the drop in similarity when attribute a alone is changed in the
            query (mean over its alternative values; the object holding it that the similarity
            relies on most when several do); NaN where no object of the query has attribute a, or
            none of its alternatives can be rendered (a size that does not fit).
        base: (P,) float32 similarity of the original pairs.
        object_effects: per pair, an (n_objects, 4) float32 tensor: the mean drop when the
            object's shape, colour, pattern or size changes (NaN: no feasible alternative).
        n_renders: counterfactual images rendered and embedded.
    """

    effects: Tensor
    base: Tensor
    object_effects: list[Tensor]
    n_renders: int

    def __len__(self) -> int:
        return self.effects.shape[0]

    @property
    def top(self) -> Tensor:
        """(P,) int64: the causal top attribute of each pair (largest drop; -1 when none is defined)."""
        filled = torch.nan_to_num(self.effects, nan=-float("inf"))
        top = filled.argmax(1)
        return torch.where(torch.isinf(filled.amax(1)), torch.full_like(top, -1), top)


def causal_attribute_effects(similarity: SimilarityModel, dataset: object, query_index: Tensor | list[int],
                             reference_embeddings: Tensor, *, attribute_names: tuple[str, ...] | None = None,
                             batch_size: int = 256) -> CausalAttributeEffects:
    """Causal ground truth for P pairs: how much the similarity relies on each attribute of the query.

    For every object k of query q and every kind (shape, colour, pattern, size), the query is
    re-rendered with that one attribute of that one object set to each alternative value
    (``dataset.counterfactual(q, k, kind, v)``, everything else pixel-identical) and
    d(k, kind) = mean over v of (s(q, r) - s(q', r)), a drop in similarity units (positive when
    the change hurts the match). The effect of attribute name a = kind:value is the largest
    d(k, kind) over the objects k that have it: the model's real reliance on that attribute.

    Args:
        similarity: the SimilarityModel being explained.
        dataset: a data set with ``object_attributes(i)``, ``alternatives(i, k, kind)``,
            ``counterfactual(i, k, kind, v)`` and ``sample(i)`` (ShapesWorld).
        query_index: (P,) query indices into ``dataset``.
        reference_embeddings: (P, D) embeddings of each pair's reference.
        attribute_names: names of the A attributes, ``kind:value`` (default the data set module's
            ``ATTRIBUTE_NAMES``).
        batch_size: images per embedding call.

    Returns:
        :class:`CausalAttributeEffects`.
    """
    if not isinstance(similarity, SimilarityModel):
        raise TypeError(f"similarity must be a SimilarityModel, got {type(similarity).__name__}")
    for meth in ("object_attributes", "alternatives", "counterfactual", "sample"):
        if not callable(getattr(dataset, meth, None)):
            raise TypeError(f"dataset must have a {meth}() method (ShapesWorld has), got {type(dataset).__name__}")
    q = torch.as_tensor(query_index).long().flatten()
    V.tensor("reference_embeddings", reference_embeddings, ndim=2)
    if reference_embeddings.shape[0] != q.shape[0]:
        raise ValueError(f"reference_embeddings must have one row per query ({q.shape[0]}), "
                         f"got {reference_embeddings.shape[0]}")
    if attribute_names is None:
        from ..data.shapesworld import ATTRIBUTE_NAMES as attribute_names  # noqa: N811
    names = tuple(attribute_names)
    col = {n: j for j, n in enumerate(names)}
    V.positive_int("batch_size", batch_size)
    p = q.shape[0]
    effects = torch.full((p, len(names)), float("nan"))
    base = torch.empty(p)
    per_object: list[Tensor] = []
    n_renders = 0
    ref = reference_embeddings.detach()
    with torch.no_grad():
        for row, qi in enumerate(q.tolist()):
            smp = dataset.sample(qi)
            jobs: list[tuple[int, int]] = []                     # (object, kind) of each image
            images = [smp.image]
            for k in range(len(smp.objects)):
                for t, kind in enumerate(_KINDS):
                    for v in dataset.alternatives(qi, k, kind):
                        images.append(dataset.counterfactual(qi, k, kind, v).image)
                        jobs.append((k, t))
            batch = torch.stack(images)
            emb = similarity.embed(batch, batch_size)
            s = rowwise_similarity(similarity, emb, ref[row:row + 1].to(emb.device).expand(emb.shape[0], -1)).cpu()
            n_renders += len(jobs)
            base[row] = s[0]
            drops = torch.zeros(len(smp.objects), len(_KINDS))
            counts = torch.zeros(len(smp.objects), len(_KINDS))
            for (k, t), sv in zip(jobs, s[1:].tolist()):
                drops[k, t] += float(s[0]) - sv
                counts[k, t] += 1
            d = torch.where(counts > 0, drops / counts.clamp_min(1), torch.full_like(drops, float("nan")))
            per_object.append(d)
            for k, o in enumerate(smp.objects):
                for t, kind in enumerate(_KINDS):
                    j = col.get(f"{kind}:{getattr(o, kind)}")
                    if j is None or torch.isnan(d[k, t]):
                        continue
                    if torch.isnan(effects[row, j]) or d[k, t] > effects[row, j]:
                        effects[row, j] = d[k, t]
    return CausalAttributeEffects(effects=effects, base=base, object_effects=per_object, n_renders=n_renders)


def _check_chosen(chosen: object, effects: object) -> tuple[Tensor, Tensor]:
    if isinstance(effects, CausalAttributeEffects):
        effects = effects.effects
    V.tensor("effects", effects, ndim=2)
    chosen = V.tensor("chosen", torch.as_tensor(chosen), ndim=1)
    if chosen.is_floating_point() or chosen.dtype == torch.bool:
        raise TypeError(f"chosen must hold integer attribute indices, got {chosen.dtype}")
    if chosen.shape[0] != effects.shape[0]:
        raise ValueError(f"chosen must hold one attribute per pair ({effects.shape[0]}), got {chosen.shape[0]}")
    if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= effects.shape[1]):
        raise ValueError(f"chosen must hold attribute indices in [0, {effects.shape[1]}), "
                         f"got [{int(chosen.min())}, {int(chosen.max())}]")
    return chosen.long(), effects.float()


def causal_attribute_deletion(chosen: Tensor, effects: Tensor | CausalAttributeEffects) -> Tensor:
    """Causal attribute deletion: the drop in similarity when the chosen attribute alone is changed.

    Higher is better: an explanation that names what the model relies on scores the largest drop.
    An attribute the query does not have (or cannot change) scores 0: changing it changes nothing.

    Args:
        chosen: (P,) int64 attribute index chosen by an explanation for each pair.
        effects: (P, A) :attr:`CausalAttributeEffects.effects` (or the object itself).

    Returns:
        (P,) float32 drops in similarity units.
    """
    chosen, eff = _check_chosen(chosen, effects)
    return torch.nan_to_num(eff.gather(1, chosen[:, None])[:, 0], nan=0.0)


def causal_top1(chosen: Tensor, effects: Tensor | CausalAttributeEffects) -> Tensor:
    """Top-1 agreement with the causal top attribute: 1 where the chosen attribute is the one whose
    change drops the similarity most (ties: any attribute within 1e-6 of the largest drop counts).

    Args:
        chosen: (P,) int64 attribute indices.
        effects: (P, A) :attr:`CausalAttributeEffects.effects` (or the object itself).

    Returns:
        (P,) float32 in {0, 1}; NaN for a pair with no defined effect.
    """
    chosen, eff = _check_chosen(chosen, effects)
    filled = torch.nan_to_num(eff, nan=-float("inf"))
    best = filled.amax(1)
    got = filled.gather(1, chosen[:, None])[:, 0]
    hit = (got >= best - 1e-6).float()
    return torch.where(torch.isinf(best), torch.full_like(hit, float("nan")), hit)
