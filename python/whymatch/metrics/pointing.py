"""Ground-truth scores for saliency: the pointing game and the saliency mass on a mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import _validate as V

__all__ = ["pointing_game", "mass_on_mask", "chance_level"]


def _check(saliency: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Finite (B, H, W) maps and (B, H, W) masks that are bool or hold only 0 and 1 (a soft mask would be
    rounded silently, and NaN would win every argmax): a named ValueError otherwise."""
    saliency = V.tensor("saliency", saliency, ndim=3)
    masks = _masks(masks, device=saliency.device)
    V.shape("masks", masks, saliency.shape)
    if saliency.is_complex():
        raise TypeError(f"saliency must be a real tensor, got {saliency.dtype}")
    V.finite("saliency", saliency)
    return saliency.float(), masks


def _masks(masks: Tensor, device=None) -> Tensor:
    masks = V.tensor("masks", masks, ndim=3, device=device)
    if masks.dtype != torch.bool:
        if masks.is_complex() or not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError(f"masks must be bool (or hold only 0 and 1), got {masks.dtype} with other values")
        masks = masks.bool()
    return masks


def pointing_game(saliency: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """Does each map's maximum fall on its ground-truth mask? (B,) bool.

    Zhang et al.'s pointing game; it reads only the argmax, so it is the same for a map and the map plus a
    constant, but a map's argmax is meaningful only where the map is centred (RISE ``normalize='rise'``
    maps peak where the masks overlap most, not where the scores are high). ``tolerance`` pixels of slack (they used 15 px
    at 224) dilate the mask with a square. Ties: the first maximum in raster order.

    Args:
        saliency: (B, H, W) maps; masks: (B, H, W) bool ground truth.
    """
    saliency, masks = _check(saliency, masks)
    V.positive_int("tolerance", tolerance, 0)
    if tolerance:
        k = 2 * tolerance + 1
        masks = F.max_pool2d(masks[:, None].float(), k, stride=1, padding=tolerance)[:, 0] > 0
    b = saliency.shape[0]
    peak = saliency.reshape(b, -1).argmax(dim=1)
    return masks.reshape(b, -1).gather(1, peak[:, None])[:, 0]


def mass_on_mask(saliency: Tensor, masks: Tensor, shift: str = "none") -> Tensor:
    """Fraction of each map's positive saliency mass inside its mask, (B,) float in [0, 1].

    Maps must be centred: zero means "this pixel has no effect on the similarity",
    positive "it supports the match". Every whymatch explainer returns such maps with
    its defaults (RISE ``normalize='centered'``, the sliding window's similarity drop,
    LIME's coefficients, Mask's 1 - mask, the gradient methods' ReLU maps). With
    ``shift='none'`` (default) the score is the share of the positive part
    ``max(map, 0)`` that falls inside the mask: a map that is right but small
    elsewhere scores high, and a map that is flat scores the mask's share of the image.

    ``shift='min'`` subtracts each map's minimum first (the energy-based pointing
    game of Score-CAM, Wang et al. 2020) and ``shift='mean'`` its mean: for
    uncentred maps (RISE ``normalize='rise'`` or ``'sane'``, whose level is the mean
    similarity of the perturbed images). 'min' is biased towards the mask's share of
    the image when the map's minimum is an outlier: most of the mass is then the
    offset, spread evenly. A map without positive mass scores 0.
    """
    saliency, masks = _check(saliency, masks)
    V.choice("shift", shift, ("none", "min", "mean"))
    if shift == "min":
        pos = saliency - saliency.amin(dim=(1, 2), keepdim=True)
    elif shift == "mean":
        pos = (saliency - saliency.mean(dim=(1, 2), keepdim=True)).clamp_min(0)
    else:
        pos = saliency.clamp_min(0)
    total = pos.sum(dim=(1, 2))
    inside = (pos * masks).sum(dim=(1, 2))
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))


def chance_level(masks: Tensor) -> Tensor:
    """Share of each image covered by its mask, (B,): the pointing game's rate for a random point."""
    return _masks(masks).float().mean(dim=(1, 2))
