"""AVSL ops (Zhang et al., CVPR 2022): CAM reliability statistic, CAM correlation edges with
momentum, and the rectified distance of every (query, gallery) pair with its top-k variant.

The public functions validate their arguments and compute; the definitions are in
``ops/reference.py`` (``avsl_*``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate as V
from . import reference as ref

__all__ = ["cam_reliability", "cam_correlation", "link_star", "avsl_distance", "avsl_topk"]


def cam_reliability(cam: Tensor, *, published: bool = False) -> Tensor:
    """The per-node CAM statistic of AVSL's reliability: (B, R) float32 from CAMs (B, R, H, W).

    See :func:`whymatch.ops.reference.avsl_reliability`; ``published=True`` reproduces the
    published code's minimum over the last axis only.
    """
    cam = V.tensor("cam", cam, ndim=4, dtypes=V.FLOAT_DTYPES + (torch.float64,))
    if cam.shape[2] * cam.shape[3] < 2:
        raise ValueError(f"cam must have at least 2 positions per map for a standard deviation, got "
                         f"{tuple(cam.shape[2:])}")
    return ref.avsl_reliability(cam, published=bool(published))


def cam_correlation(cam_low: Tensor, cam_high: Tensor, *, edges: Tensor | None = None, momentum: float = 0.5,
                    first: bool = False) -> Tensor:
    """Batch-mean CAM correlation of two levels, (R_low, R_high) float32; optionally updates edges in place.

    With ``edges`` (R_low, R_high) float32: ``edges = corr`` when ``first`` else
    ``edges = momentum * edges + (1 - momentum) * corr`` (in place, no gradient).

    Args:
        cam_low: (B, R_low, H_l, W_l) CAMs of the lower level; cam_high: (B, R_high, H_h, W_h)
            of the upper one (the lower is average-pooled to the upper's size).
    """
    cam_low = V.tensor("cam_low", cam_low, ndim=4, dtypes=V.FLOAT_DTYPES + (torch.float64,), nonempty=True)
    cam_high = V.tensor("cam_high", cam_high, ndim=4, dtypes=V.FLOAT_DTYPES + (torch.float64,),
                        device=cam_low.device, nonempty=True)
    if cam_high.shape[0] != cam_low.shape[0]:
        raise ValueError(f"cam_high must have cam_low's batch size {cam_low.shape[0]}, got {cam_high.shape[0]}")
    m = V.real("momentum", momentum, low=0.0, high=1.0)
    with torch.no_grad():
        corr = ref.avsl_cam_correlation(cam_low.detach(), cam_high.detach())
        if edges is not None:
            edges = V.tensor("edges", edges, ndim=2, dtypes=(torch.float32,), device=cam_low.device)
            V.shape("edges", edges, tuple(corr.shape))
            if first:
                edges.copy_(corr)
            else:
                edges.mul_(m).add_(corr, alpha=1.0 - m)
    return corr


def link_star(edges: Tensor, k: int) -> Tensor:
    """Rectification weights (R_low, R_high): relu, top-k per column (ties kept), column-normalized."""
    edges = V.tensor("edges", edges, ndim=2, dtypes=V.FLOAT_DTYPES + (torch.float64,))
    V.positive_int("k", k)
    return ref.avsl_link_star(edges, k)


def _check_levels(queries, galleries, rel_q, rel_g, links, coef, bias):
    n = len(queries)
    for name, seq, want in (("galleries", galleries, n), ("rel_q", rel_q, n), ("rel_g", rel_g, n),
                            ("links", links, n - 1), ("coef", coef, n), ("bias", bias, n)):
        if not isinstance(seq, (list, tuple)) or len(seq) != want:
            raise ValueError(f"{name} must be a list of {want} tensors (one per level"
                             f"{' pair' if name == 'links' else ''}), got "
                             f"{len(seq) if isinstance(seq, (list, tuple)) else type(seq).__name__}")
    if n < 1:
        raise ValueError("queries must hold at least one level")
    dev = queries[0].device
    q0, g0 = queries[0].shape[0], galleries[0].shape[0]
    for lv in range(n):
        q = V.tensor(f"queries[{lv}]", queries[lv], ndim=2, device=dev)
        r = q.shape[1]
        V.shape(f"queries[{lv}]", q, (q0, r))
        V.shape(f"galleries[{lv}]", V.tensor(f"galleries[{lv}]", galleries[lv], ndim=2, device=dev), (g0, r))
        V.shape(f"rel_q[{lv}]", V.tensor(f"rel_q[{lv}]", rel_q[lv], ndim=2, device=dev), (q0, r))
        V.shape(f"rel_g[{lv}]", V.tensor(f"rel_g[{lv}]", rel_g[lv], ndim=2, device=dev), (g0, r))
        V.shape(f"coef[{lv}]", V.tensor(f"coef[{lv}]", coef[lv], ndim=1, device=dev), (r,))
        V.shape(f"bias[{lv}]", V.tensor(f"bias[{lv}]", bias[lv], ndim=1, device=dev), (r,))
        if lv:
            rp = queries[lv - 1].shape[1]
            V.shape(f"links[{lv - 1}]", V.tensor(f"links[{lv - 1}]", links[lv - 1], ndim=2, device=dev), (rp, r))


def avsl_distance(queries: list[Tensor], galleries: list[Tensor], rel_q: list[Tensor], rel_g: list[Tensor],
                  links: list[Tensor], coef: list[Tensor], bias: list[Tensor], gamma: float = 10.0) -> Tensor:
    """Overall AVSL distance of every (query, gallery) pair, (Q, G) float32; see
    :func:`whymatch.ops.reference.avsl_distance`. Differentiable in coef and bias."""
    _check_levels(queries, galleries, rel_q, rel_g, links, coef, bias)
    V.real("gamma", gamma)
    return ref.avsl_distance(queries, galleries, rel_q, rel_g, links, coef, bias, gamma)


def avsl_topk(queries: list[Tensor], galleries: list[Tensor], rel_q: list[Tensor], rel_g: list[Tensor],
              links: list[Tensor], coef: list[Tensor], bias: list[Tensor], gamma: float, k: int, *,
              exclude_self: bool = False) -> tuple[Tensor, Tensor]:
    """Each query's k nearest gallery items by the AVSL distance: ((Q, k) float32, (Q, k) int64)."""
    _check_levels(queries, galleries, rel_q, rel_g, links, coef, bias)
    V.real("gamma", gamma)
    V.positive_int("k", k)
    g = galleries[0].shape[0] - (1 if exclude_self else 0)
    if k > g:
        raise ValueError(f"k must be <= the number of gallery candidates per query ({g}), got {k}")
    if exclude_self and queries[0].shape[0] != galleries[0].shape[0]:
        raise ValueError("exclude_self needs the gallery to be the query set (Q == G), got "
                         f"Q={queries[0].shape[0]}, G={galleries[0].shape[0]}")
    return ref.avsl_topk(queries, galleries, rel_q, rel_g, links, coef, bias, gamma, k, exclude_self)
