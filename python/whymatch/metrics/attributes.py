"""Metrics for attribute explanations: attribute recognition mAP (SANE section 4.1).

The attribute insertion and deletion metrics of SANE section 4.2 live here too
(:func:`attribute_insertion_deletion`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import _validate as V

__all__ = ["average_precision", "mean_average_precision"]


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
