"""AVSL attribution (Eq. 11): which similarity nodes of which level make a pair's distance, and where.

For one pair the overall distance is a chain over the levels (low l = 0 to high L-1):

    hat_0 = delta_0,  hat_l = delta_l * p_l + (hat_{l-1} @ link*_l) * (1 - p_l),  d = sum(hat_{L-1})

with the reliabilities p_l and the rectification weights link*_l constant for the pair. The
sensitivity lambda_l = dd/d delta_l is therefore, with g_{L-1} = 1 and
g_{l-1} = link*_l @ (g_l * (1 - p_l)):

    lambda_l = g_l * p_l (l >= 1),   lambda_0 = g_0.

A top node passes the share (1 - p) of its weight, the part its reliability does not
vouch for, down to the lower nodes it is most correlated with, split by link*. As d is
linear in the nodes, d = sum over levels and nodes of lambda * delta exactly: the
``contributions`` lambda * delta add up to the distance. whymatch computes lambda with
autograd on this reference chain, for the one pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import _validate as V

__all__ = ["AVSLExplanation", "LevelExplanation", "explain_pair", "node_sensitivities"]


@dataclass
class LevelExplanation:
    """The top nodes of one level for a pair.

    Attributes:
        level: the backbone module name of the level.
        nodes: (top,) int64 node indices, most important first.
        lambdas: (top,) float32 sensitivities dd/d delta of those nodes.
        contributions: (top,) float32 lambda * delta (their share of the distance).
        cam1, cam2: (top, H, W) float32 CAMs of those nodes for x1 and x2, bilinearly
            upsampled to the image size (signed, unnormalized).
    """

    level: str
    nodes: Tensor
    lambdas: Tensor
    contributions: Tensor
    cam1: Tensor
    cam2: Tensor


@dataclass
class AVSLExplanation:
    """Result of :meth:`AVSL.explain`: the distance, every node's lambda, and the top nodes per level."""

    distance: float
    levels: list[LevelExplanation]
    lambdas: list[Tensor]
    deltas: list[Tensor]


def node_sensitivities(deltas: list[Tensor], probs: list[Tensor], links: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Distance and lambda per level for one pair, by autograd on the rectified chain.

    Args:
        deltas: (R_l,) nodes per level; probs: (R_l,) reliabilities p_l (probs[0] unused);
        links: (R_{l-1}, R_l) link* per level pair.
    Returns:
        (distance (), [lambda_l (R_l,)]).
    """
    leaves = [d.detach().float().clone().requires_grad_(True) for d in deltas]
    with torch.enable_grad():
        hat = leaves[0]
        for lv in range(1, len(leaves)):
            p = probs[lv].detach().float()
            hat = leaves[lv] * p + (hat @ links[lv - 1].detach().float()) * (1 - p)
        d = hat.sum()
        grads = torch.autograd.grad(d, leaves)
    return d.detach(), [g.detach() for g in grads]


def _one(name: str, x: Tensor) -> Tensor:
    x = V.tensor(name, x, ndim=(3, 4), dtypes=V.FLOAT_DTYPES, nonempty=True)
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"{name} must be one image (C, H, W) or (1, C, H, W), got shape {tuple(x.shape)}")
        x = x[0]
    return V.finite(name, x)


@torch.no_grad()
def explain_pair(model, x1: Tensor, x2: Tensor, top: int = 5, *, by: str = "lambda") -> AVSLExplanation:
    """Top nodes per level of the pair (x1, x2) by their sensitivity lambda (Eq. 11), with CAMs.

    The model runs in eval mode (edges frozen, batch-norm statistics used) and is put back
    in its previous mode.

    Args:
        model: an :class:`whymatch.avsl.AVSL`.
        x1, x2: images (C, H, W) or (1, C, H, W) of the same size.
        top: nodes per level (at most the level's node count).
        by: 'lambda' (the sensitivity, Eq. 11) or 'contribution' (lambda * delta).
    """
    x1, x2 = _one("x1", x1), _one("x2", x2)
    if x1.shape != x2.shape:
        raise ValueError(f"x2 must have x1's shape {tuple(x1.shape)}, got {tuple(x2.shape)}")
    V.positive_int("top", top)
    if top > model.dim:
        raise ValueError(f"top must be <= the nodes per level ({model.dim}), got {top}")
    V.choice("by", by, ("lambda", "contribution"))
    was = model.training
    model.eval()
    try:
        enc = model.encode(torch.stack([x1, x2]), keep_cams=True)
    finally:
        model.train(was)
    coef, bias = model.coefs()
    deltas, probs = [], []
    for lv, e in enumerate(enc.embeddings):
        en = F.normalize(e, dim=-1)
        deltas.append((en[0] - en[1]) ** 2)
        r = enc.reliabilities[lv]
        probs.append(torch.sigmoid(model.gamma * (r[0] * r[1] * coef[lv] + bias[lv])))
    for lv, (e, r) in enumerate(zip(enc.embeddings, enc.reliabilities)):
        for what, t in (("embeddings", e), ("reliabilities", r)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"the AVSL model produced non-finite {what} (NaN or Inf) at level {lv} "
                                 f"({model.levels[lv]!r}) for the pair (x1, x2): check the model's weights")
    d, lambdas = node_sensitivities(deltas, probs, model.links())
    size = tuple(x1.shape[-2:])
    levels = []
    for lv, name in enumerate(model.levels):
        contrib = lambdas[lv] * deltas[lv]
        score = lambdas[lv] if by == "lambda" else contrib
        idx = torch.topk(score, top).indices
        cams = F.interpolate(enc.cams[lv][:, idx].float(), size=size, mode="bilinear", align_corners=False)
        levels.append(LevelExplanation(name, idx, lambdas[lv][idx], contrib[idx], cams[0], cams[1]))
    return AVSLExplanation(float(d), levels, lambdas, [t.detach() for t in deltas])
