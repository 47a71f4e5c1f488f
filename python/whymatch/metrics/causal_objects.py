"""Saliency against causal object removal: does a map name the object the similarity relies on?

Causal ground truth (:func:`causal_object_effects`): for each object k of a query, the query is
re-rendered without it (``dataset.render(q, hide=[k])``: the background shows instead, every other
pixel identical) and d_k = s(q, r) - s(q without k, r) is the drop in similarity. The causal object
of the pair is the object with the largest drop.

Which object a saliency map names (:func:`saliency_top_object`), two definitions:

- ``rule='mass'``: the object whose mask holds the largest sum of the (centred) map, i.e. the
  object the map attributes the most similarity to, as an attribution summed over a group of pixels;
  no object (-1) when that largest sum is not positive (the map says no object supports the match).
  Maps must be centred (zero = no effect), as every whymatch explainer's default map is;
  ``shift='mean'`` subtracts each map's mean first, for uncentred maps (RISE ``normalize='rise'``).
- ``rule='point'``: the object under the map's maximum (the pointing game's pixel: the first
  maximum in raster order); no object (-1) when it lies on the background.

:func:`causal_object_agreement` scores the named object against the causal one, and
:func:`causal_object_chance` gives what a random choice scores under each rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import _validate as V
from ..similarity import SimilarityModel
from .attributes import rowwise_similarity

__all__ = ["CausalObjectEffects", "causal_object_effects", "pad_object_masks", "saliency_top_object",
           "causal_object_agreement", "causal_object_chance"]

_TIE = 1e-6


@dataclass
class CausalObjectEffects:
    """Causal ground truth of P pairs (:func:`causal_object_effects`).

    Attributes:
        effects: (P, O) float32, the drop in similarity when object k is removed from the query
            (positive: the object supports the match); NaN for k >= the query's object count.
        base: (P,) float32 similarity of the original pairs.
        n_objects: (P,) int64 objects per query.
    """

    effects: Tensor
    base: Tensor
    n_objects: Tensor

    def __len__(self) -> int:
        return self.effects.shape[0]

    @property
    def top(self) -> Tensor:
        """(P,) int64: each pair's causal object (largest drop; the first of ties)."""
        return torch.nan_to_num(self.effects, nan=-float("inf")).argmax(1)


def causal_object_effects(similarity: SimilarityModel, dataset: object, query_index: Tensor | Sequence[int],
                          reference_embeddings: Tensor, *, batch_size: int = 256) -> CausalObjectEffects:
    """The drop in similarity when each object of the query is removed, for P pairs.

    Args:
        similarity: the SimilarityModel being explained.
        dataset: a data set with ``sample(i)`` (its ``objects``) and ``render(i, hide=[k])`` (ShapesWorld).
        query_index: (P,) query indices into ``dataset``.
        reference_embeddings: (P, D) embeddings of each pair's reference.
        batch_size: images per embedding call.

    Returns:
        :class:`CausalObjectEffects`, objects in ``dataset.sample(i).objects`` order (0: the key object).
    """
    if not isinstance(similarity, SimilarityModel):
        raise TypeError(f"similarity must be a SimilarityModel, got {type(similarity).__name__}")
    for meth in ("sample", "render"):
        if not callable(getattr(dataset, meth, None)):
            raise TypeError(f"dataset must have a {meth}() method (ShapesWorld has), got {type(dataset).__name__}")
    q = torch.as_tensor(query_index)
    if q.is_floating_point() or q.dtype == torch.bool:
        raise TypeError(f"query_index must hold integer indices, got {q.dtype}")
    q = q.long().flatten()
    V.tensor("reference_embeddings", reference_embeddings, ndim=2)
    if reference_embeddings.shape[0] != q.shape[0]:
        raise ValueError(f"reference_embeddings must have one row per query ({q.shape[0]}), "
                         f"got {reference_embeddings.shape[0]}")
    V.positive_int("batch_size", batch_size)
    rows: list[Tensor] = []
    base = torch.empty(q.shape[0])
    ref = reference_embeddings.detach()
    cache: dict[int, Tensor] = {}  # query index -> embeddings of [original, without object 0, 1, ...]
    with torch.no_grad():
        for row, qi in enumerate(q.tolist()):
            if qi not in cache:
                smp = dataset.sample(qi)
                images = [smp.image] + [dataset.render(qi, hide=[k]) for k in range(len(smp.objects))]
                cache[qi] = similarity.embed(torch.stack(images), batch_size)
            emb = cache[qi]
            s = rowwise_similarity(similarity, emb, ref[row:row + 1].to(emb.device).expand(emb.shape[0], -1)).cpu()
            base[row] = s[0]
            rows.append(s[0] - s[1:])
    n_obj = torch.tensor([r.shape[0] for r in rows], dtype=torch.int64)
    width = int(n_obj.max()) if rows else 0
    effects = torch.full((len(rows), width), float("nan"))
    for row, r in enumerate(rows):
        effects[row, :r.shape[0]] = r
    return CausalObjectEffects(effects=effects, base=base, n_objects=n_obj)


def pad_object_masks(masks: Sequence[Tensor]) -> Tensor:
    """Stack per-image (n_i, H, W) object masks into one (B, max n_i, H, W) bool tensor; padding objects
    are empty masks (they are never named by :func:`saliency_top_object`)."""
    if isinstance(masks, Tensor) or not isinstance(masks, Sequence) or not masks:
        raise TypeError(f"masks must be a non-empty sequence of (n_objects, H, W) tensors, got {type(masks).__name__}")
    hw = None
    for i, m in enumerate(masks):
        V.tensor(f"masks[{i}]", m, ndim=3)
        if hw is None:
            hw = tuple(m.shape[1:])
        elif tuple(m.shape[1:]) != hw:
            raise ValueError(f"masks[{i}] must be (n, {hw[0]}, {hw[1]}) like masks[0], got {tuple(m.shape)}")
    out = torch.zeros((len(masks), max(m.shape[0] for m in masks), *hw), dtype=torch.bool, device=masks[0].device)
    for i, m in enumerate(masks):
        out[i, :m.shape[0]] = m.to(out.device) != 0
    return out


def _check_maps_masks(saliency: Tensor, object_masks: Tensor) -> tuple[Tensor, Tensor]:
    saliency = V.tensor("saliency", saliency, ndim=3)
    if saliency.is_complex() or saliency.dtype == torch.bool:
        raise TypeError(f"saliency must be a real floating tensor, got {saliency.dtype}")
    V.finite("saliency", saliency)
    object_masks = V.tensor("object_masks", object_masks, ndim=4, device=saliency.device)
    if object_masks.shape[0] != saliency.shape[0] or object_masks.shape[2:] != saliency.shape[1:]:
        raise ValueError(f"object_masks must be (B, O, H, W) = ({saliency.shape[0]}, O, {saliency.shape[1]}, "
                         f"{saliency.shape[2]}) for saliency {tuple(saliency.shape)}, got {tuple(object_masks.shape)}")
    if object_masks.dtype != torch.bool:
        if object_masks.is_complex() or not bool(((object_masks == 0) | (object_masks == 1)).all()):
            raise ValueError(f"object_masks must be bool (or hold only 0 and 1), got {object_masks.dtype} "
                             "with other values")
        object_masks = object_masks.bool()
    return saliency.float(), object_masks


def saliency_top_object(saliency: Tensor, object_masks: Tensor, rule: str = "mass", shift: str = "none") -> Tensor:
    """The object each map names: (B,) int64 object positions, -1 for none.

    Args:
        saliency: (B, H, W) maps over the queries.
        object_masks: (B, O, H, W) bool, one mask per object (:func:`pad_object_masks` pads ragged counts
            with empty masks).
        rule: 'mass' (the object with the largest sum of the map over its mask, if that sum is > 0) or
            'point' (the object under the map's first maximum; -1 on the background).
        shift: 'none' (maps already centred) or 'mean' (subtract each map's mean first; 'mass' only).

    Returns:
        (B,) int64 in [-1, O).
    """
    saliency, masks = _check_maps_masks(saliency, object_masks)
    V.choice("rule", rule, ("mass", "point"))
    V.choice("shift", shift, ("none", "mean"))
    b, o = masks.shape[:2]
    if rule == "point":
        peak = saliency.reshape(b, -1).argmax(1)
        on = masks.reshape(b, o, -1).gather(2, peak[:, None, None].expand(b, o, 1))[:, :, 0]  # (B, O)
        return torch.where(on.any(1), on.float().argmax(1), torch.full((b,), -1, dtype=torch.int64,
                                                                       device=saliency.device))
    if shift == "mean":
        saliency = saliency - saliency.mean(dim=(1, 2), keepdim=True)
    sums = torch.einsum("bhw,bohw->bo", saliency, masks.float())
    sums = torch.where(masks.flatten(2).any(2), sums, torch.full_like(sums, -float("inf")))
    best, top = sums.max(1)
    return torch.where(best > 0, top, torch.full_like(top, -1))


def _effects(effects: Tensor | CausalObjectEffects) -> Tensor:
    if isinstance(effects, CausalObjectEffects):
        effects = effects.effects
    return V.tensor("effects", effects, ndim=2).float()


def causal_object_agreement(chosen: Tensor, effects: Tensor | CausalObjectEffects) -> Tensor:
    """1 where the named object is the causal one (its removal drops the similarity most; ties within 1e-6
    count), 0 otherwise (also for -1, no object); NaN for a pair without any defined effect.

    Args:
        chosen: (P,) int64 object positions from :func:`saliency_top_object` (-1: none).
        effects: (P, O) :attr:`CausalObjectEffects.effects` (or the object itself).

    Returns:
        (P,) float32 in {0, 1} (NaN where undefined).
    """
    eff = _effects(effects)
    chosen = V.tensor("chosen", torch.as_tensor(chosen), ndim=1)
    if chosen.is_floating_point() or chosen.dtype == torch.bool:
        raise TypeError(f"chosen must hold integer object positions, got {chosen.dtype}")
    if chosen.shape[0] != eff.shape[0]:
        raise ValueError(f"chosen must hold one object per pair ({eff.shape[0]}), got {chosen.shape[0]}")
    if chosen.numel() and (int(chosen.min()) < -1 or int(chosen.max()) >= eff.shape[1]):
        raise ValueError(f"chosen must hold object positions in [-1, {eff.shape[1]}), "
                         f"got [{int(chosen.min())}, {int(chosen.max())}]")
    chosen = chosen.long().to(eff.device)
    filled = torch.nan_to_num(eff, nan=-float("inf"))
    best = filled.amax(1)
    got = filled.gather(1, chosen.clamp_min(0)[:, None])[:, 0]
    hit = ((got >= best - _TIE) & (chosen >= 0)).float()
    return torch.where(torch.isinf(best), torch.full_like(hit, float("nan")), hit)


def causal_object_chance(object_masks: Tensor, effects: Tensor | CausalObjectEffects, rule: str = "mass") -> Tensor:
    """What a random choice scores in :func:`causal_object_agreement`, per pair: (P,) float32.

    'mass': a uniformly random object, (number of causal objects, ties included) / (number of objects).
    'point': a uniformly random pixel, the causal objects' share of the image.

    Args:
        object_masks: (P, O, H, W) bool object masks (padding objects empty).
        effects: (P, O) :attr:`CausalObjectEffects.effects` (or the object itself).
        rule: 'mass' or 'point'.
    """
    eff = _effects(effects)
    V.choice("rule", rule, ("mass", "point"))
    masks = V.tensor("object_masks", object_masks, ndim=4)
    if masks.shape[:2] != eff.shape:
        raise ValueError(f"object_masks must be (P, O, H, W) with (P, O) = {tuple(eff.shape)}, got "
                         f"{tuple(masks.shape)}")
    masks = masks.bool().to(eff.device)
    filled = torch.nan_to_num(eff, nan=-float("inf"))
    best = filled.amax(1, keepdim=True)
    causal = (filled >= best - _TIE) & torch.isfinite(filled)
    if rule == "mass":
        present = masks.flatten(2).any(2)
        return (causal & present).sum(1).float() / present.sum(1).clamp_min(1).float()
    hw = masks.shape[2] * masks.shape[3]
    return (masks & causal[:, :, None, None]).any(1).flatten(1).sum(1).float() / hw
