"""Mining ops: the fused soft mask of the similarity-mining loss (Zheng et al.).

``soft_mask`` is registered with torch.library (``whymatch::soft_mask`` and its
backward ``whymatch::soft_mask_backward``) with autograd, so it works under
``torch.compile`` and passes ``torch.library.opcheck``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate as V
from . import reference as ref

__all__ = ["soft_mask"]

MASK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _scalar(name: str, v: object, device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(v.shape)}")
        if not v.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {v.dtype}")
        V.finite(name, v)
        return v.reshape(()).to(device=device, dtype=dtype)
    return torch.tensor(V.real(name, v), device=device, dtype=dtype)


def soft_mask(x: Tensor, attention: Tensor, alpha: Tensor | float, beta: Tensor | float) -> Tensor:
    """Erase the attended regions of a batch of images, softly (similarity mining, Zheng et al. Eq. 1).

    ``out = x * (1 - sigmoid(alpha * (up(attention) - beta)))`` where ``up`` upsamples
    the attention bilinearly to the image size (half-pixel centres, as
    ``F.interpolate(mode='bilinear', align_corners=False)``). Upsampling, sigmoid and
    product are fused: forward and backward each read ``x`` once and save nothing but
    the inputs (the backward recomputes the mask).

    Args:
        x: (B, C, H, W) images, float32, float16, bfloat16 or float64.
        attention: (B, h, w) or (B, 1, h, w) maps on x's device, any float dtype, usually
            normalized to [0, 1]; h, w >= 1 (any size: upsampled or downsampled to H x W).
        alpha: sharpness of the soft threshold, a number or a one-element tensor (learnable).
        beta: the threshold, a number or a one-element tensor (learnable).

    Returns:
        (B, C, H, W) tensor of x's dtype. Differentiable in x, attention, alpha and beta.
    """
    x = V.tensor("x", x, ndim=4, dtypes=MASK_DTYPES)
    attention = V.tensor("attention", attention, ndim=(3, 4), dtypes=MASK_DTYPES, device=x.device)
    if attention.dim() == 4:
        if attention.shape[1] != 1:
            raise ValueError(f"attention must have shape (B, h, w) or (B, 1, h, w), got {tuple(attention.shape)}")
        attention = attention[:, 0]
    b = x.shape[0]
    if attention.shape[0] != b:
        raise ValueError(f"attention must hold one map per image: expected batch {b}, got {attention.shape[0]}")
    if x.numel() > 0 and (attention.shape[1] < 1 or attention.shape[2] < 1):
        raise ValueError(f"attention maps must be at least 1 x 1, got {tuple(attention.shape[1:])}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    alpha_t = _scalar("alpha", alpha, x.device, acc)
    beta_t = _scalar("beta", beta, x.device, acc)
    return ref.soft_mask(x, attention, alpha_t, beta_t)
