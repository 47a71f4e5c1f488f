"""Mining ops: the fused soft mask of the similarity-mining loss (Zheng et al.).

``soft_mask`` is registered with torch.library (``whymatch::soft_mask`` and its
backward ``whymatch::soft_mask_backward``) with autograd, so it works under
``torch.compile`` and passes ``torch.library.opcheck``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext, _validate as V
from . import reference as ref

__all__ = ["soft_mask"]

MASK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------
# registered ops (arguments already validated: x (B, C, H, W) contiguous or channels_last,
# attention (B, h, w) contiguous in the compute dtype, alpha and beta 0-d in the compute dtype)
# ---------------------------------------------------------------------------

def _channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _like(x: Tensor) -> Tensor:
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _check_op(op: str, x, attention, alpha, beta, grad=None) -> None:
    """The registered ops' own checks (metadata only): x (B, C, H, W) of MASK_DTYPES, contiguous or
    channels_last; attention (B, h, w) contiguous in the compute dtype (float64 for float64 x, else
    float32), h, w >= 1; alpha, beta one-element compute-dtype tensors; grad like x; one device."""
    x = V.op_tensor(op, "x", x, ndim=4, dtypes=MASK_DTYPES, channels_last_ok=True)
    acc = (torch.float64,) if x.dtype == torch.float64 else (torch.float32,)
    b, _, hh, ww = x.shape
    attention = V.op_tensor(op, "attention", attention, ndim=3, dtypes=acc, device=x.device, shape=(b, None, None))
    if b * hh * ww > 0 and (attention.shape[1] < 1 or attention.shape[2] < 1):
        raise ValueError(f"{op}: attention maps must be at least 1 x 1, got {tuple(attention.shape[1:])}")
    for name, v in (("alpha", alpha), ("beta", beta)):
        v = V.op_tensor(op, name, v, dtypes=acc, device=x.device)
        if v.numel() != 1:
            raise ValueError(f"{op}: {name} must be a one-element tensor, got shape {tuple(v.shape)}")
    if grad is not None:
        V.op_tensor(op, "grad", grad, ndim=4, dtypes=(x.dtype,), device=x.device, shape=x.shape, contiguous=False)
        V.maybe_finite(f"{op}: grad", grad)
    V.maybe_finite(f"{op}: x", x)
    V.maybe_finite(f"{op}: attention", attention)
    V.maybe_finite(f"{op}: alpha", alpha)
    V.maybe_finite(f"{op}: beta", beta)


def _soft_mask_kernel(mod, x, attention, alpha, beta):
    """The CPU and the CUDA kernel (the same launch)."""
    _check_op("soft_mask", x, attention, alpha, beta)
    out = _like(x)
    b, c, hh, ww = x.shape
    with _ext.device_guard(x):
        mod.soft_mask(_ext.buf(x), _ext.buf(attention), _ext.buf(alpha), _ext.buf(beta), _ext.buf(out), b, c, hh, ww,
                      attention.shape[1], attention.shape[2], _ext.dtype_code(x), _channels_last(x), _ext.extra_arg(x))
    return out


def _soft_mask_fallback(x, attention, alpha, beta):
    _check_op("soft_mask", x, attention, alpha, beta)
    return ref.soft_mask(x, attention, alpha, beta).contiguous(
        memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)


@torch.library.custom_op("whymatch::soft_mask", mutates_args=())
def _soft_mask(x: Tensor, attention: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    _ext.no_kernel("soft_mask", x.device)
    return _soft_mask_fallback(x, attention, alpha, beta)


@_soft_mask.register_fake
def _(x, attention, alpha, beta):
    _check_op("soft_mask", x, attention, alpha, beta)
    return _like(x)


_ext.register_kernels(_soft_mask, "soft_mask", cpu=_soft_mask_kernel, cuda=_soft_mask_kernel,
                      fallback=_soft_mask_fallback)


def _soft_mask_backward_kernel(mod, grad, x, attention, alpha, beta, need_x, need_attention, *, ws_width):
    """The CPU and the CUDA kernels; their workspace (B, H, ws_width(W, w)) differs: the CPU kernel keeps
    the low-resolution columns (w), the CUDA one the full rows (W)."""
    _check_op("soft_mask_backward", x, attention, alpha, beta, grad)
    b, c, hh, ww = x.shape
    _, h, w = attention.shape
    grad = grad.contiguous(memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)
    grad_x = _like(x) if need_x else x.new_empty(0)
    g_att = torch.empty_like(attention) if need_attention else attention.new_empty(0)
    ws = _ext.empty("soft_mask_backward", "the workspace", (b * hh * ws_width(ww, w) if need_attention else 0,),
                    dtype=attention.dtype, device=x.device)
    with _ext.device_guard(x):
        mod.soft_mask_backward(_ext.buf(grad), _ext.buf(x), _ext.buf(attention), _ext.buf(alpha), _ext.buf(beta),
                               _ext.buf(grad_x) if need_x else _ext.no_buf(),
                               _ext.buf(g_att) if need_attention else _ext.no_buf(),
                               _ext.buf(ws), b, c, hh, ww, h, w, _ext.dtype_code(x), _channels_last(x),
                               _ext.extra_arg(x))
    return grad_x, g_att


def _soft_mask_backward_fallback(grad, x, attention, alpha, beta, need_x, need_attention):
    _check_op("soft_mask_backward", x, attention, alpha, beta, grad)
    return _reference_backward(grad, x, attention, alpha, beta, need_x, need_attention)


@torch.library.custom_op("whymatch::soft_mask_backward", mutates_args=())
def _soft_mask_backward(grad: Tensor, x: Tensor, attention: Tensor, alpha: Tensor, beta: Tensor,
                        need_x: bool, need_attention: bool) -> tuple[Tensor, Tensor]:
    """(grad_x like x, G (B, h, w) compute dtype): G is the upsampling adjoint of dL/dz."""
    _ext.no_kernel("soft_mask", x.device)
    return _soft_mask_backward_fallback(grad, x, attention, alpha, beta, need_x, need_attention)


@_soft_mask_backward.register_fake
def _(grad, x, attention, alpha, beta, need_x, need_attention):
    _check_op("soft_mask_backward", x, attention, alpha, beta, grad)
    return (_like(x) if need_x else x.new_empty(0)), (torch.empty_like(attention) if need_attention
                                                      else attention.new_empty(0))


_ext.register_kernels(_soft_mask_backward, "soft_mask",
                      cpu=functools.partial(_soft_mask_backward_kernel, ws_width=lambda full, low: low),
                      cuda=functools.partial(_soft_mask_backward_kernel, ws_width=lambda full, low: full),
                      fallback=_soft_mask_backward_fallback)


def _interp_matrix(n_in: int, n_out: int, like: Tensor) -> Tensor:
    """(n_out, n_in): row o holds the bilinear weights of output o (F.interpolate, align_corners=False)."""
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device)[:, None, :, None]
    return F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T


def _reference_backward(grad, x, attention, alpha, beta, need_x, need_attention):
    """The backward in plain PyTorch, without autograd (the fallback when the kernels are missing)."""
    acc = attention.dtype
    b, c, hh, ww = x.shape
    up = F.interpolate(attention[:, None], size=(hh, ww), mode="bilinear", align_corners=False)
    keep = 1 - torch.sigmoid(alpha * (up - beta))
    g = grad.to(acc)
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    grad_x = (g * keep).to(x.dtype).contiguous(memory_format=fmt) if need_x else x.new_empty(0)
    if not need_attention:
        return grad_x, attention.new_empty(0)
    q = -(keep * (1 - keep))[:, 0] * (g * x.to(acc)).sum(1)  # dL/dz, (B, H, W)
    wy = _interp_matrix(attention.shape[1], hh, attention)
    wx = _interp_matrix(attention.shape[2], ww, attention)
    return grad_x, torch.einsum("yi,byx,xj->bij", wy, q, wx).contiguous()


def _setup_context(ctx, inputs, output):
    x, attention, alpha, beta = inputs
    ctx.save_for_backward(x, attention, alpha, beta)


def _backward(ctx, grad):
    x, attention, alpha, beta = ctx.saved_tensors
    need_x, need_att, need_alpha, need_beta = ctx.needs_input_grad
    need_g = need_att or need_alpha or need_beta
    grad_x, g = torch.ops.whymatch.soft_mask_backward(grad, x, attention, alpha, beta, bool(need_x), bool(need_g))
    d_x = grad_x if need_x else None
    d_att = alpha * g if need_att else None
    sum_g = g.sum() if (need_alpha or need_beta) else None
    d_alpha = (attention * g).sum() - beta * sum_g if need_alpha else None
    d_beta = -alpha * sum_g if need_beta else None
    return d_x, d_att, d_alpha, d_beta


torch.library.register_autograd("whymatch::soft_mask", _backward, setup_context=_setup_context)
_ext.refuse_double_backward("whymatch::soft_mask_backward", "whymatch::soft_mask")


def _scalar(name: str, v: object, device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(v.shape)}")
        if not v.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {v.dtype}")
        V.maybe_finite(name, v)  # a tensor's value is data: scanned only when the opt-in checks are on (no GPU sync)
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
    V.maybe_finite("attention", attention)  # data scans are opt-in (whymatch.ops docstring: NaN rule)
    V.maybe_finite("x", x)
    b = x.shape[0]
    if attention.shape[0] != b:
        raise ValueError(f"attention must hold one map per image: expected batch {b}, got {attention.shape[0]}")
    if x.numel() > 0 and (attention.shape[1] < 1 or attention.shape[2] < 1):
        raise ValueError(f"attention maps must be at least 1 x 1, got {tuple(attention.shape[1:])}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    alpha_t = _scalar("alpha", alpha, x.device, acc)
    beta_t = _scalar("beta", beta, x.device, acc)
    if not (x.is_contiguous() or _channels_last(x)):
        x = x.contiguous()
    return torch.ops.whymatch.soft_mask(x, attention.to(acc).contiguous(), alpha_t, beta_t)
