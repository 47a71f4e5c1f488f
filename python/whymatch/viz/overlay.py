"""Saliency maps as pictures. Normalization and colour maps live here, not in the explainers."""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["to_pil", "colorize", "overlay", "mark_point", "contour", "colorbar", "is_constant", "map_range"]

#: A map whose max - min is at most ``CONSTANT_ATOL + CONSTANT_RTOL * max(|min|, |max|)`` is constant:
#: it ranks no pixel above another, so it explains nothing (e.g. a gradient map of a saturated layer).
CONSTANT_RTOL = 1e-5
CONSTANT_ATOL = 1e-12


def _jet(x: np.ndarray) -> np.ndarray:
    """The 'jet' colour map for values in [0, 1] -> (..., 3) float in [0, 1]."""
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return np.stack([r, g, b], axis=-1)


def _diverging(x: np.ndarray) -> np.ndarray:
    """Blue (0) - white (0.5) - red (1) for signed maps."""
    t = 2 * x - 1
    pos, neg = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    return np.stack([1 - neg, 1 - pos - neg, 1 - pos], axis=-1)


def to_pil(image: Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> PIL RGB image (values clamped)."""
    arr = (image.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def map_range(saliency: Tensor) -> tuple[float, float]:
    """(min, max) of a map as Python floats."""
    s = saliency.detach().float()
    return float(s.min()), float(s.max())


def is_constant(saliency: Tensor, rtol: float = CONSTANT_RTOL, atol: float = CONSTANT_ATOL) -> bool:
    """True when a map's max - min is within ``atol + rtol * max(|min|, |max|)`` (it ranks no pixel first)."""
    lo, hi = map_range(saliency)
    return not (hi - lo > atol + rtol * max(abs(lo), abs(hi)))


def colorbar(width: int = 256, height: int = 14) -> Image.Image:
    """The unsigned colour map ('jet') from 0 (left) to 1 (right) as a PIL image, for a report's legend."""
    x = np.linspace(0.0, 1.0, width, dtype=np.float64)[None, :].repeat(height, axis=0)
    return Image.fromarray((_jet(x) * 255 + 0.5).astype(np.uint8), "RGB")


def colorize(saliency: Tensor, cmap: str = "jet", signed: bool = False, *, vmin: float | None = None,
             vmax: float | None = None, gain: float = 1.0) -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8 colours.

    Unsigned: (value - vmin) / (vmax - vmin), clipped to [0, 1], times ``gain``, through 'jet';
    vmin and vmax default to the map's own min and max (min-max scaling). Signed: symmetric around
    0 with a blue-white-red map. A constant map (or vmax <= vmin) is drawn at the bottom of the
    scale (or white when signed), never as NaN.
    """
    s = saliency.detach().float().cpu().numpy()
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"saliency must be a non-empty (H, W) map, got shape {tuple(s.shape)}")
    if not np.isfinite(s).all():
        raise ValueError(f"saliency must be finite, got {int((~np.isfinite(s)).sum())} NaN or infinite values "
                         "(the explainer or the model produced them)")
    if signed:
        m = float(np.abs(s).max())
        x = 0.5 + 0.5 * s / m if m > 0 else np.full_like(s, 0.5)
        rgb = _diverging(x)
    else:
        if not (0.0 <= gain <= 1.0):
            raise ValueError(f"gain must be in [0, 1], got {gain!r}")
        lo = float(s.min()) if vmin is None else float(vmin)
        hi = float(s.max()) if vmax is None else float(vmax)
        x = np.clip((s - lo) / (hi - lo), 0.0, 1.0) * gain if hi > lo else np.zeros_like(s)
        if cmap != "jet":
            raise ValueError(f"cmap must be 'jet', got {cmap!r}")
        rgb = _jet(x)
    return (rgb * 255 + 0.5).astype(np.uint8)


def overlay(image: Tensor, saliency: Tensor, alpha: float = 0.5, signed: bool = False, *,
            vmin: float | None = None, vmax: float | None = None, gain: float = 1.0) -> Image.Image:
    """The image with its saliency map blended on top (the map resized bilinearly to the image;
    ``vmin``, ``vmax``, ``gain``: the colour scale, see :func:`colorize`)."""
    h, w = image.shape[1:]
    if tuple(saliency.shape) != (h, w):
        saliency = F.interpolate(saliency[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    heat = colorize(saliency, signed=signed, vmin=vmin, vmax=vmax, gain=gain).astype(np.float32)
    base = np.asarray(to_pil(image), dtype=np.float32)
    return Image.fromarray((base * (1 - alpha) + heat * alpha + 0.5).astype(np.uint8), "RGB")


def mark_point(img: Image.Image, yx: tuple[int, int], size: int = 4, colour=(255, 255, 255)) -> Image.Image:
    """Draw a small cross at pixel (y, x) (e.g. the saliency peak); returns the image."""
    y, x = yx
    d = ImageDraw.Draw(img)
    d.line([(x - size, y), (x + size, y)], fill=colour, width=1)
    d.line([(x, y - size), (x, y + size)], fill=colour, width=1)
    return img


def contour(img: Image.Image, mask: Tensor, colour=(255, 255, 255)) -> Image.Image:
    """Draw the outline of a boolean (H, W) mask (e.g. the ground-truth key object)."""
    m = mask.bool().cpu()
    m = F.interpolate(m[None, None].float(), size=(img.height, img.width), mode="nearest")[0, 0] > 0.5
    eroded = -F.max_pool2d(-m[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0.5
    edge = (m & ~eroded).numpy()
    arr = np.asarray(img).copy()
    arr[edge] = colour
    return Image.fromarray(arr, "RGB")
