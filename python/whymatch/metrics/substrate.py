"""Substrates: what removed (deletion) or not-yet-inserted (insertion) pixels become."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import _validate as V

__all__ = ["make_substrate", "gaussian_blur"]


def gaussian_blur(images: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    """Depthwise separable Gaussian blur with reflect padding (RISE's insertion substrate: 11, sigma 5).

    Args:
        images: (B, C, H, W) float.
    Returns:
        (B, C, H, W) of the same dtype.
    """
    b, c, h, w = images.shape
    half = kernel_size // 2
    x = torch.arange(kernel_size, dtype=torch.float32, device=images.device) - half
    k = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).to(images.dtype)
    out = images
    # reflect padding needs pad < size; fall back to replicate on tiny images
    mode = "reflect" if min(h, w) > half else "replicate"
    out = F.pad(out, (half, half, half, half), mode=mode)
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out


def make_substrate(images: Tensor, kind: str | float | Sequence[float] | Tensor = "blur") -> Tensor:
    """The substrate image for each image, (B, C, H, W).

    Args:
        images: (B, C, H, W) float in the space the SimilarityModel receives
            (with ``preprocess`` inside the model this is the natural [0, 1] space,
            so 'zeros' is black; RISE's 'zeros' was zeros in normalized space,
            i.e. the data set's mean colour: pass that colour to reproduce it).
        kind: 'blur' (Gaussian, kernel 11, sigma 5; RISE insertion), 'zeros',
            'mean' (per-image, per-channel mean colour), a number or a
            per-channel sequence (a constant colour, as SANE: grey 0.5 / white 1.0),
            or a tensor broadcastable to ``images``.
    """
    if isinstance(kind, Tensor):
        V.tensor("substrate", kind, dtypes=V.FLOAT_DTYPES, device=images.device)
        try:
            return V.finite("substrate", kind.to(images.dtype).expand_as(images).contiguous())
        except RuntimeError:
            raise ValueError(f"substrate must broadcast to {tuple(images.shape)}, got {tuple(kind.shape)}") from None
    if isinstance(kind, str):
        V.choice("substrate", kind, ("blur", "zeros", "mean"))
        if kind == "blur":
            return gaussian_blur(images)
        if kind == "zeros":
            return torch.zeros_like(images)
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()
    if isinstance(kind, (int, float)) and not isinstance(kind, bool):
        return torch.full_like(images, V.real("substrate", kind))
    if isinstance(kind, Sequence) and len(kind) == images.shape[1]:
        vals = [V.real(f"substrate[{i}]", v) for i, v in enumerate(kind)]
        col = torch.tensor(vals, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return col.expand_as(images).contiguous()
    raise ValueError(f"substrate must be 'blur', 'zeros', 'mean', a number, {images.shape[1]} per-channel "
                     f"values or a tensor, got {kind!r}")


