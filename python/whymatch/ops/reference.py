"""Pure-PyTorch definitions of every whymatch op: the spec.

Written for clarity, not speed. The CPU and CUDA kernels must agree with these
functions on any valid input (tests/test_ops_*.py), and these functions run when
the compiled kernels are missing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["rise_grid_geometry", "rise_masks", "rise_apply", "rise_saliency", "ranked_blend", "soft_mask",
           "avsl_cam_reliability", "avsl_cam_correlation", "avsl_link_star", "avsl_nodes", "avsl_distance", "avsl_topk"]


def rise_grid_geometry(size: tuple[int, int], s: int) -> tuple[int, int, int, int]:
    """(cell_h, cell_w, up_h, up_w) for RISE masks of an image of ``size`` from s x s grids.

    cell = ceil(H / s) as in RISE (Petsiuk et al. 2018); the grid is upsampled to
    (s + 1) * cell so that every shift in [0, cell) leaves a full H x W crop.
    """
    h, w = size
    cell_h, cell_w = math.ceil(h / s), math.ceil(w / s)
    return cell_h, cell_w, (s + 1) * cell_h, (s + 1) * cell_w


def rise_masks(grids: torch.Tensor, shifts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """RISE masks (N, H, W), float32.

    Each grid (s x s, values in [0, 1], binary in RISE) is upsampled bilinearly
    with half-pixel centres (``align_corners=False``; the same as skimage's
    ``resize(order=1, mode='edge')``; RISE's published code uses mode='reflect',
    which differs only in a border band of half a cell) to ((s+1)*cell_h,
    (s+1)*cell_w) and cropped to H x W at offset ``shifts[n] = (dy, dx)``.
    """
    n, s, _ = grids.shape
    h, w = size
    _, _, up_h, up_w = rise_grid_geometry(size, s)
    if n == 0 or h == 0 or w == 0:
        return grids.new_zeros((n, h, w), dtype=torch.float32)
    up = F.interpolate(grids.float()[:, None], size=(up_h, up_w), mode="bilinear", align_corners=False)[:, 0]
    rows = shifts[:, 0, None] + torch.arange(h, device=grids.device)  # (N, H)
    cols = shifts[:, 1, None] + torch.arange(w, device=grids.device)  # (N, W)
    idx = torch.arange(n, device=grids.device)[:, None, None]
    return up[idx, rows[:, :, None], cols[:, None, :]]


def rise_apply(grids: torch.Tensor, shifts: torch.Tensor, image: torch.Tensor, baseline: torch.Tensor,
               dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """out[n] = m_n * image + (1 - m_n) * baseline, (N, C, H, W) in ``dtype``.

    The blend is computed in float32 and rounded once to ``dtype``.
    """
    c, h, w = image.shape
    m = rise_masks(grids, shifts, (h, w))[:, None]
    out = (m * image.float() + (1 - m) * baseline.float()).to(dtype)
    if channels_last:
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def rise_saliency(grids: torch.Tensor, shifts: torch.Tensor, scores: torch.Tensor,
                  size: tuple[int, int]) -> torch.Tensor:
    """out[k] = sum_n scores[n, k] * mask_n, (K, H, W) float32; no normalization."""
    masks = rise_masks(grids, shifts, size)
    return torch.einsum("nk,nhw->khw", scores.float(), masks)


def ranked_blend(first: torch.Tensor, second: torch.Tensor, rank: torch.Tensor,
                 counts: torch.Tensor) -> torch.Tensor:
    """Images along an insertion/deletion curve, (B, T, C, H, W).

    out[b, t, :, y, x] = first[b, :, y, x] if rank[b, y*W + x] < counts[t] else second[b, :, y, x].
    """
    b, c, h, w = first.shape
    keep = rank[:, None, :] < counts[None, :, None]  # (B, T, HW)
    keep = keep.view(b, counts.numel(), 1, h, w)
    return torch.where(keep, first[:, None], second[:, None]).contiguous()


def soft_mask(x: torch.Tensor, attention: torch.Tensor, alpha: torch.Tensor | float,
              beta: torch.Tensor | float) -> torch.Tensor:
    """Soft masking of the similarity-mining loss (Zheng et al.), (B, C, H, W) in ``x.dtype``.

    out = x * (1 - sigmoid(alpha * (up(attention) - beta))), with up = bilinear
    upsampling of the (B, h, w) attention to (H, W) with half-pixel centres
    (``F.interpolate(mode='bilinear', align_corners=False)``, no anti-aliasing).
    Computed in float64 for float64 inputs and in float32 otherwise, rounded once.
    Differentiable in x, attention, alpha and beta.
    """
    b, c, h, w = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.numel() == 0:
        return x.clone()
    up = F.interpolate(attention.to(acc)[:, None], size=(h, w), mode="bilinear", align_corners=False)
    keep = 1 - torch.sigmoid(torch.as_tensor(alpha, dtype=acc, device=x.device)
                             * (up - torch.as_tensor(beta, dtype=acc, device=x.device)))
    return (x.to(acc) * keep).to(x.dtype)


# ---------------------------------------------------------------------------
# AVSL (Zhang et al., "Attributable Visual Similarity Learning", CVPR 2022)
# ---------------------------------------------------------------------------

def avsl_cam_reliability(cam: torch.Tensor, published: bool = False) -> torch.Tensor:
    """Per-node CAM statistic eta of AVSL's reliability, (B, R) float32 from CAMs (B, R, H, W).

    The one name of this statistic below the public :func:`whymatch.ops.cam_reliability` (as
    ``avsl_cam_correlation`` is :func:`whymatch.ops.cam_correlation`'s): the registered op
    ``whymatch::avsl_cam_reliability`` and its kernels are named so too.

    Each CAM is shifted by its minimum, L1-normalized over its H*W positions, and the
    (unbiased) standard deviation over the positions is the statistic: a peaked CAM
    (a node that looks at one place) gets a high value. The minimum is taken over the
    whole map; ``published=True`` takes it over the last axis only (one minimum per
    row), as the published code does (marked FIXME there).
    """
    x = cam.float()
    if published:
        x = x - x.amin(dim=-1, keepdim=True)
    else:
        x = x - x.flatten(2).amin(dim=-1)[..., None, None]
    x = F.normalize(x.flatten(2), p=1, dim=-1)
    return x.std(dim=-1)


def avsl_reliability(cam: torch.Tensor, published: bool = False) -> torch.Tensor:
    """Deprecated name of :func:`avsl_cam_reliability` (the same statistic)."""
    import warnings

    warnings.warn("whymatch.ops.reference.avsl_reliability is deprecated: use avsl_cam_reliability (the same "
                  "statistic)", DeprecationWarning, stacklevel=2)
    return avsl_cam_reliability(cam, published)


def avsl_cam_correlation(cam_low: torch.Tensor, cam_high: torch.Tensor) -> torch.Tensor:
    """Batch-mean correlation of two levels' CAMs, (R_low, R_high) float32 (AVSL edges).

    The lower level's CAMs (B, R_low, H_l, W_l) are adaptive-average-pooled to the upper
    level's size (H_h, W_h); every CAM is flattened and l2-normalized over its
    positions; corr[m, n] = mean over the batch of <low_m, high_n>.
    """
    low, high = cam_low.float(), cam_high.float()
    if low.shape[2:] != high.shape[2:]:
        low = F.adaptive_avg_pool2d(low, tuple(high.shape[2:]))
    low = F.normalize(low.flatten(2), p=2, dim=-1)
    high = F.normalize(high.flatten(2), p=2, dim=-1)
    return torch.einsum("bmj,bnj->mn", low, high) / low.shape[0]


def avsl_link_star(edges: torch.Tensor, k: int) -> torch.Tensor:
    """The rectification weights from an edge matrix (R_low, R_high): link* of AVSL Eq. 7-8.

    relu(edges), keep in each column its k largest entries (every entry within 1e-8 of the
    k-th largest, so ties can keep more than k, as in the published code), and normalize
    each column to sum 1 (+1e-8). k larger than R_low keeps every entry.
    """
    link = F.relu(edges.float())
    kk = min(int(k), link.shape[0])
    if kk > 0:
        bound = link.topk(kk, dim=0).values.amin(dim=0, keepdim=True) - 1e-8
        link = link * (link >= bound)
    return link / (link.sum(dim=0, keepdim=True) + 1e-8)


def avsl_nodes(query: torch.Tensor, gallery: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Similarity nodes delta (Q, G, R) = (e_q - e_g)^2 of l2-normalized embeddings, computed in ``dtype``."""
    a, b = F.normalize(query.to(dtype), dim=1), F.normalize(gallery.to(dtype), dim=1)
    return (a[:, None, :] - b[None, :, :]) ** 2


def avsl_distance(queries: list[torch.Tensor], galleries: list[torch.Tensor], rel_q: list[torch.Tensor],
                  rel_g: list[torch.Tensor], links: list[torch.Tensor], coef: list[torch.Tensor],
                  bias: list[torch.Tensor], gamma: float = 10.0) -> torch.Tensor:
    """The overall AVSL distance of every (query, gallery) pair, (Q, G) float32, or float64 (computed in
    float64 throughout) when a coef or bias of a level >= 1 is float64, as in the kernels.

    Levels l = 0..L-1 from low to high, each with embeddings queries[l] (Q, R_l) and
    galleries[l] (G, R_l) (l2-normalized here), reliability statistics rel_q[l] (Q, R_l)
    and rel_g[l] (G, R_l), and for l >= 1 the rectification weights links[l-1]
    (R_{l-1}, R_l) (:func:`avsl_link_star`) and coef[l], bias[l] (R_l,):

        hat_0 = delta_0
        p_l   = sigmoid(gamma * (rel_q[l]_i * rel_g[l]_j * coef[l] + bias[l]))
        hat_l = delta_l * p_l + (hat_{l-1} @ links[l-1]) * (1 - p_l)
        d     = sum over the nodes of hat_{L-1}

    Nodes are treated as constants (the published code detaches them: the overall distance
    trains only coef and bias); gradients flow to coef and bias. coef[0], bias[0] are unused.
    """
    wide = any(t.dtype == torch.float64 for t in list(coef[1:]) + list(bias[1:]))
    acc = torch.float64 if wide else torch.float32
    hat = None
    for lv in range(len(queries)):
        delta = avsl_nodes(queries[lv], galleries[lv], acc).detach()
        if hat is None:
            hat = delta
            continue
        p = torch.sigmoid(gamma * (rel_q[lv].to(acc)[:, None, :] * rel_g[lv].to(acc)[None, :, :] * coef[lv].to(acc)
                                   + bias[lv].to(acc)))
        hat = delta * p + (hat @ links[lv - 1].to(acc)) * (1 - p)
    return hat.sum(dim=-1)


def avsl_topk(queries: list[torch.Tensor], galleries: list[torch.Tensor], rel_q: list[torch.Tensor],
              rel_g: list[torch.Tensor], links: list[torch.Tensor], coef: list[torch.Tensor],
              bias: list[torch.Tensor], gamma: float, k: int,
              exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's k nearest gallery items by the AVSL distance: (Q, k) distances (ascending), (Q, k) int64.

    ``exclude_self``: the gallery is the query set (Q == G) and item i is not a neighbour of
    query i. Ties: the lower gallery index first.
    """
    d = avsl_distance(queries, galleries, rel_q, rel_g, links, coef, bias, gamma).detach()
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    # stable ascending order: sort by (distance, index)
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return d.gather(1, order), order


def avsl_distance_float64(queries: list[torch.Tensor], galleries: list[torch.Tensor], rel_q: list[torch.Tensor],
                          rel_g: list[torch.Tensor], links: list[torch.Tensor], coef: list[torch.Tensor],
                          bias: list[torch.Tensor], gamma: float = 10.0) -> torch.Tensor:
    """:func:`avsl_distance` with every input and every step in float64 (also for one level, where
    :func:`avsl_distance` stays in float32): the oracle that the float32 kernels' errors are measured
    against (tests of the GPU paths). (Q, G) float64, no gradient."""
    def f64(ts):
        return [t.detach().to(torch.float64) for t in ts]

    with torch.no_grad():
        c64, b64 = f64(coef), f64(bias)
        if len(queries) == 1:  # no level >= 1: hat_0 summed
            return avsl_nodes(queries[0], galleries[0], torch.float64).sum(dim=-1)
        return avsl_distance(f64(queries), f64(galleries), f64(rel_q), f64(rel_g), f64(links), c64, b64, gamma)
