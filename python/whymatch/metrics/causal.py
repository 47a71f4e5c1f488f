"""Insertion and deletion for similarity (RISE's causal metrics, SANE section 4.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops
from ..memory import reusing
from ..ops import _validate as V
from ..similarity import SimilarityModel
from .substrate import make_substrate

__all__ = ["saliency_rank", "curve_auc", "normalize_curves", "CausalCurves", "CausalResult", "insertion_deletion"]


def saliency_rank(saliency: Tensor) -> Tensor:
    """Position of each pixel in descending saliency order, (B, H*W) int64 (0 = most salient).

    Ties keep raster order (stable sort), so the ranking is deterministic.
    """
    sal = V.tensor("saliency", saliency, ndim=3)
    b = sal.shape[0]
    flat = sal.reshape(b, -1).float()
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand(b, -1).contiguous())
    return rank


def curve_auc(curves: Tensor) -> Tensor:
    """Area under curves (B, T) sampled at T evenly spaced fractions of [0, 1] (trapezoid rule), (B,).

    Equals RISE's ``(sum - first/2 - last/2) / (T - 1)``; SANE reports this x100.
    """
    if curves.shape[-1] < 2:
        raise ValueError(f"curves need at least 2 points, got {curves.shape[-1]}")
    return (curves.sum(-1) - 0.5 * (curves[..., 0] + curves[..., -1])) / (curves.shape[-1] - 1)


def normalize_curves(curves: Tensor) -> Tensor:
    """Per-curve min-max normalization to [0, 1] (SANE), without NaN.

    A flat curve (max == min: the perturbation never changed the similarity)
    maps to a constant 0.5, so its AUC is 0.5 for both insertion and deletion:
    it says nothing either way, where SANE's code produced NaN.
    """
    lo = curves.min(dim=-1, keepdim=True).values
    hi = curves.max(dim=-1, keepdim=True).values
    span = hi - lo
    flat = span <= 1e-12 * hi.abs().clamp_min(1.0)
    return torch.where(flat, torch.full_like(curves, 0.5), (curves - lo) / torch.where(flat, 1.0, span))


@dataclass
class CausalCurves:
    """One mode's curves for B pairs.

    Attributes:
        curves: (B, T) similarity of the perturbed query to its reference at each step.
        normalized: (B, T) curves min-max normalized per pair (or equal to ``curves``).
        auc: (B,) area under ``normalized`` over the fraction axis [0, 1].
    """

    curves: Tensor
    normalized: Tensor
    auc: Tensor

    @property
    def mean_auc(self) -> float:
        return float(self.auc.mean())


@dataclass
class CausalResult:
    """Insertion and/or deletion results; ``fractions`` (T,) is the share of pixels changed at each step."""

    fractions: Tensor
    insertion: CausalCurves | None = None
    deletion: CausalCurves | None = None


@torch.no_grad()
def insertion_deletion(sim: SimilarityModel, queries: Tensor, references: Tensor, saliency: Tensor, *,
                       mode: str = "both", substrate: object = None, n_steps: int = 100,
                       batch_size: int = 256, normalize: str | None = "minmax", condition: object = None,
                       show_progress: bool = False) -> CausalResult:
    """Insertion and deletion curves of similarity for a batch of (query, reference, saliency).

    Deletion replaces the query's pixels by the substrate in descending saliency
    order; insertion reveals them over the substrate in the same order. At step
    t (of ``n_steps``, T = n_steps + 1 points) round(t / n_steps * H * W) pixels
    have changed; the similarity to the unperturbed reference is recorded. A good
    explanation has a low deletion AUC and a high insertion AUC.

    The images at every step come from the ranked-perturbation kernel
    (:func:`whymatch.ops.ranked_blend`), ``batch_size`` at a time, so memory stays
    bounded however many pairs and steps there are.

    Args:
        sim: the SimilarityModel that was explained.
        queries: (B, C, H, W) query images; references: (B, C, Hr, Wr) their fixed references.
        saliency: (B, H, W) maps, one per pair.
        mode: 'deletion', 'insertion' or 'both'.
        substrate: see :func:`make_substrate`; default 'blur' for insertion (RISE)
            and 'zeros' for deletion. A value given here is used for both.
        n_steps: number of steps (100: 1% of the pixels per step, as SANE).
        batch_size: perturbed images per forward pass.
        normalize: 'minmax' (per pair, SANE; flat curves -> 0.5) or None (raw similarity).
        condition: passed to a conditional similarity.
        show_progress: tqdm progress bar.

    Returns:
        A :class:`CausalResult`.
    """
    V.choice("mode", mode, ("deletion", "insertion", "both"))
    if normalize not in ("minmax", None):
        raise ValueError(f"normalize must be 'minmax' or None, got {normalize!r}")
    V.positive_int("n_steps", n_steps)
    V.positive_int("batch_size", batch_size)
    device = sim.device
    queries = sim.check_images("queries", queries, device=device)
    references = sim.check_images("references", references, device=device)
    b, c, h, w = queries.shape
    if references.shape[0] != b:
        raise ValueError(f"references must hold one image per query ({b}), got {references.shape[0]}")
    saliency = V.tensor("saliency", saliency, ndim=3, device=device)
    V.shape("saliency", saliency, (b, h, w))
    V.finite("saliency", saliency)

    dtype = sim.input_dtype(device)
    q = queries.to(dtype)
    rank = saliency_rank(saliency)
    counts = torch.round(torch.arange(n_steps + 1, device=device, dtype=torch.float64) / n_steps * (h * w)).long()
    ref_emb = sim.embed(references, batch_size)
    result = CausalResult(fractions=counts.float() / (h * w))

    todo = ["insertion", "deletion"] if mode == "both" else [mode]
    for which in todo:
        kind = substrate if substrate is not None else ("blur" if which == "insertion" else "zeros")
        sub = make_substrate(q, kind)
        first, second = (q, sub) if which == "insertion" else (sub, q)
        t = counts.numel()
        curves = torch.empty(b, t, device=device)
        # chunks of whole pairs, or of steps within a pair when one pair's curve exceeds the batch
        steps_per = max(1, min(t, batch_size))
        pairs_per = max(1, batch_size // t)
        chunks = [(i, min(b, i + pairs_per), 0, t) for i in range(0, b, pairs_per)] if steps_per == t else \
            [(i, i + 1, s0, min(t, s0 + steps_per)) for i in range(b) for s0 in range(0, t, steps_per)]
        if show_progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=which, unit="batch")
        with reusing(device.type == "cpu"):  # freed batch memory kept for the next chunk (whymatch.memory)
            for i0, i1, s0, s1 in chunks:
                imgs = ops.ranked_blend(first[i0:i1], second[i0:i1], rank[i0:i1], counts[s0:s1])
                emb = sim(imgs.reshape(-1, c, h, w)).view(i1 - i0, s1 - s0, -1)
                for j in range(i1 - i0):
                    curves[i0 + j, s0:s1] = sim.pairwise(emb[j], ref_emb[i0 + j:i0 + j + 1], condition)[:, 0]
        normed = normalize_curves(curves) if normalize == "minmax" else curves
        setattr(result, which, CausalCurves(curves=curves, normalized=normed, auc=curve_auc(normed)))
    return result
