"""Pure-PyTorch definitions of every whymatch op: the spec.

Written for clarity, not speed. The CPU and CUDA kernels must agree with these
functions on any valid input (tests/test_ops_*.py), and these functions run when
the compiled kernels are missing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["rise_grid_geometry", "rise_masks", "rise_apply", "rise_saliency", "ranked_blend", "soft_mask"]


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
