"""Perturbation ops: fused RISE masks, RISE saliency, ranked insertion/deletion images.

Each op is registered with torch.library (``whymatch::<name>``), so it works
under ``torch.compile(fullgraph=True)`` and passes ``torch.library.opcheck``.
The public functions validate their arguments and name the one that is wrong.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext, _validate as V
from . import reference as ref

__all__ = ["rise_apply", "rise_saliency", "ranked_blend"]


# ---------------------------------------------------------------------------
# registered ops (arguments already validated)
# ---------------------------------------------------------------------------

_F32 = (torch.float32,)
_I64 = (torch.int64,)
_OUT_DTYPES = tuple(_ext.DTYPE_CODES)


def _check_grids_shifts_op(op: str, grids: Tensor, shifts: Tensor, device: torch.device) -> tuple[int, int]:
    """The registered ops' checks of grids (N, s, s) float32 and shifts (N, 2) int64 (metadata only;
    the shift values are range-checked by the CPU kernel, and clamped to the canvas on CUDA)."""
    grids = V.op_tensor(op, "grids", grids, ndim=3, dtypes=_F32, device=device)
    n, s, s2 = grids.shape
    if s != s2 or s < 1:
        raise ValueError(f"{op}: grids must have shape (N, s, s) with s >= 1, got {tuple(grids.shape)}")
    V.op_tensor(op, "shifts", shifts, ndim=2, dtypes=_I64, device=device, shape=(n, 2))
    return n, s


def _check_shift_values(label: str, shifts: Tensor, size: tuple[int, int], s: int) -> None:
    """Range check of the shift values (they index the upsampled canvas): reads the data, so the
    registered ops call it only where no compiled kernel checks them (CUDA, the reference fallback)."""
    if torch.compiler.is_compiling() or shifts.device.type == "meta" or shifts.numel() == 0:
        return
    cell_h, cell_w, _, _ = ref.rise_grid_geometry(size, s)
    if size[0] and size[1]:
        dy, dx = shifts[:, 0], shifts[:, 1]
        bad = (dy < 0) | (dy >= cell_h) | (dx < 0) | (dx >= cell_w)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{label}[{i}] must lie in [0, {cell_h}) x [0, {cell_w}) (cell = ceil(size / s) for s={s}, "
                f"size={tuple(size)}), got {tuple(int(v) for v in shifts[i])}"
            )


def _check_rise_apply_op(op: str, grids, shifts, image, baseline) -> tuple[int, int, int, int]:
    image = V.op_tensor(op, "image", image, ndim=3, dtypes=_F32)
    n, _ = _check_grids_shifts_op(op, grids, shifts, image.device)
    V.op_tensor(op, "baseline", baseline, ndim=3, dtypes=_F32, device=image.device, shape=image.shape)
    V.maybe_finite(f"{op}: grids", grids)
    V.maybe_finite(f"{op}: image", image)
    V.maybe_finite(f"{op}: baseline", baseline)
    return (n, *image.shape)


def _launch_rise_apply(mod, grids: Tensor, shifts: Tensor, image: Tensor, baseline: Tensor, out: Tensor) -> None:
    """The compiled rise_apply into out (no device guard: the CPU launch, and the CUDA one inside its guard)."""
    n, s, _ = grids.shape
    c, h, w = image.shape
    channels_last = out.dim() == 4 and out.numel() > 0 and not out.is_contiguous()
    mod.rise_apply(_ext.buf(grids), _ext.buf(shifts), _ext.buf(image), _ext.buf(baseline), _ext.buf(out),
                   n, c, h, w, s, _ext.DTYPE_CODES[out.dtype], channels_last, _ext.extra_arg(image))


def _rise_apply_dtype(op: str, dtype: object) -> torch.dtype:
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"{op}: dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype  # type: ignore[return-value]


def _rise_apply_cpu(mod, grids, shifts, image, baseline, dtype, channels_last):
    """The CPU kernel (it range-checks the shift values itself, before writing anything)."""
    n, c, h, w = _check_rise_apply_op("rise_apply", grids, shifts, image, baseline)
    _rise_apply_dtype("rise_apply", dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = _ext.empty("rise_apply", "the output", (n, c, h, w), dtype=dtype, device=image.device, memory_format=fmt)
    _launch_rise_apply(mod, grids, shifts, image, baseline, out)
    return out


def _rise_apply_cuda(mod, grids, shifts, image, baseline, dtype, channels_last):
    """The CUDA kernel (it clamps the shifts to the canvas, so they are range-checked here)."""
    n, c, h, w = _check_rise_apply_op("rise_apply", grids, shifts, image, baseline)
    _rise_apply_dtype("rise_apply", dtype)
    _check_shift_values("rise_apply: shifts", shifts, (h, w), grids.shape[1])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = _ext.empty("rise_apply", "the output", (n, c, h, w), dtype=dtype, device=image.device, memory_format=fmt)
    with _ext.device_guard(image):
        _launch_rise_apply(mod, grids, shifts, image, baseline, out)
    return out


def _rise_apply_fallback(grids, shifts, image, baseline, dtype, channels_last):
    n, c, h, w = _check_rise_apply_op("rise_apply", grids, shifts, image, baseline)
    _rise_apply_dtype("rise_apply", dtype)
    _check_shift_values("rise_apply: shifts", shifts, (h, w), grids.shape[1])
    _ext.check_size("rise_apply", "the output", (n, c, h, w), dtype, image.device)
    return ref.rise_apply(grids, shifts, image, baseline, dtype, channels_last)


@torch.library.custom_op("whymatch::rise_apply", mutates_args=())
def _rise_apply(grids: Tensor, shifts: Tensor, image: Tensor, baseline: Tensor, dtype: torch.dtype,
                channels_last: bool) -> Tensor:
    _ext.no_kernel("rise_apply", image.device)
    return _rise_apply_fallback(grids, shifts, image, baseline, dtype, channels_last)


@_rise_apply.register_fake
def _(grids, shifts, image, baseline, dtype, channels_last):
    n, c, h, w = _check_rise_apply_op("rise_apply", grids, shifts, image, baseline)
    _rise_apply_dtype("rise_apply", dtype)
    _ext.check_size("rise_apply", "the output", (n, c, h, w), dtype, image.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((grids.shape[0], *image.shape), dtype=dtype, device=image.device, memory_format=fmt)


_ext.register_kernels(_rise_apply, "rise_apply", cpu=_rise_apply_cpu, cuda=_rise_apply_cuda,
                      fallback=_rise_apply_fallback)


def _check_rise_apply_out(grids, shifts, image, baseline, out) -> None:
    op = "rise_apply_out"
    n, c, h, w = _check_rise_apply_op(op, grids, shifts, image, baseline)
    V.op_tensor(op, "out", out, ndim=4, dtypes=_OUT_DTYPES, device=image.device, shape=(n, c, h, w),
                channels_last_ok=True)


def _rise_apply_out_cpu(mod, grids, shifts, image, baseline, out) -> None:
    _check_rise_apply_out(grids, shifts, image, baseline, out)
    _launch_rise_apply(mod, grids, shifts, image, baseline, out)


def _rise_apply_out_cuda(mod, grids, shifts, image, baseline, out) -> None:
    _check_rise_apply_out(grids, shifts, image, baseline, out)
    _check_shift_values("rise_apply_out: shifts", shifts, tuple(image.shape[1:]), grids.shape[1])
    with _ext.device_guard(image):
        _launch_rise_apply(mod, grids, shifts, image, baseline, out)


def _rise_apply_out_fallback(grids, shifts, image, baseline, out) -> None:
    _check_rise_apply_out(grids, shifts, image, baseline, out)
    _check_shift_values("rise_apply_out: shifts", shifts, tuple(image.shape[1:]), grids.shape[1])
    channels_last = out.numel() > 0 and not out.is_contiguous()
    out.copy_(ref.rise_apply(grids, shifts, image, baseline, out.dtype, channels_last))


@torch.library.custom_op("whymatch::rise_apply_out", mutates_args=("out",))
def _rise_apply_out(grids: Tensor, shifts: Tensor, image: Tensor, baseline: Tensor, out: Tensor) -> None:
    _ext.no_kernel("rise_apply", image.device)
    _rise_apply_out_fallback(grids, shifts, image, baseline, out)


@_rise_apply_out.register_fake
def _(grids, shifts, image, baseline, out):
    _check_rise_apply_out(grids, shifts, image, baseline, out)
    return None


_ext.register_kernels(_rise_apply_out, "rise_apply", cpu=_rise_apply_out_cpu, cuda=_rise_apply_out_cuda,
                      fallback=_rise_apply_out_fallback)


def _check_rise_saliency_op(grids, shifts, scores, height, width) -> int:
    op = "rise_saliency"
    scores = V.op_tensor(op, "scores", scores, ndim=2, dtypes=_F32)
    n, _ = _check_grids_shifts_op(op, grids, shifts, scores.device)
    V.op_tensor(op, "scores", scores, shape=(n, None))
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{op}: {name} must be an int >= 0, got {v!r}")
    _ext.check_size(op, "the output", (scores.shape[1], height, width), torch.float32, scores.device)
    V.maybe_finite(f"{op}: grids", grids)
    V.maybe_finite(f"{op}: scores", scores)
    return scores.shape[1]


def _launch_rise_saliency(mod, grids: Tensor, shifts: Tensor, scores: Tensor, height: int, width: int) -> Tensor:
    n, s, _ = grids.shape
    k = scores.shape[1]
    out = _ext.empty("rise_saliency", "the output", (k, height, width), dtype=torch.float32, device=scores.device)
    with _ext.device_guard(scores):
        mod.rise_saliency(_ext.buf(grids), _ext.buf(shifts), _ext.buf(scores), _ext.buf(out), n, k, height, width,
                          s, _ext.extra_arg(scores))
    return out


def _rise_saliency_cpu(mod, grids, shifts, scores, height, width):
    """The CPU kernel (it range-checks the shift values itself)."""
    _check_rise_saliency_op(grids, shifts, scores, height, width)
    return _launch_rise_saliency(mod, grids, shifts, scores, height, width)


def _rise_saliency_cuda(mod, grids, shifts, scores, height, width):
    """The CUDA kernel (it clamps the shifts, so they are range-checked here)."""
    _check_rise_saliency_op(grids, shifts, scores, height, width)
    _check_shift_values("rise_saliency: shifts", shifts, (height, width), grids.shape[1])
    return _launch_rise_saliency(mod, grids, shifts, scores, height, width)


def _rise_saliency_fallback(grids, shifts, scores, height, width):
    _check_rise_saliency_op(grids, shifts, scores, height, width)
    _check_shift_values("rise_saliency: shifts", shifts, (height, width), grids.shape[1])
    return ref.rise_saliency(grids, shifts, scores, (height, width))


@torch.library.custom_op("whymatch::rise_saliency", mutates_args=())
def _rise_saliency(grids: Tensor, shifts: Tensor, scores: Tensor, height: int, width: int) -> Tensor:
    _ext.no_kernel("rise_saliency", scores.device)
    return _rise_saliency_fallback(grids, shifts, scores, height, width)


@_rise_saliency.register_fake
def _(grids, shifts, scores, height, width):
    _check_rise_saliency_op(grids, shifts, scores, height, width)
    return scores.new_empty((scores.shape[1], height, width), dtype=torch.float32)


_ext.register_kernels(_rise_saliency, "rise_saliency", cpu=_rise_saliency_cpu, cuda=_rise_saliency_cuda,
                      fallback=_rise_saliency_fallback)


def _check_ranked_blend_op(first, second, rank, counts) -> tuple[int, int, int, int, int]:
    op = "ranked_blend"
    first = V.op_tensor(op, "first", first, ndim=4, dtypes=V.FLOAT_DTYPES)
    b, c, h, w = first.shape
    V.op_tensor(op, "second", second, ndim=4, dtypes=(first.dtype,), device=first.device, shape=first.shape)
    V.op_tensor(op, "rank", rank, ndim=2, dtypes=_I64, device=first.device, shape=(b, h * w))
    counts = V.op_tensor(op, "counts", counts, ndim=1, dtypes=_I64, device=first.device)
    t = counts.shape[0]
    _ext.check_size(op, "the output", (b, t, c, h, w), first.dtype, first.device)
    V.maybe_finite(f"{op}: first", first)
    V.maybe_finite(f"{op}: second", second)
    return b, t, c, h, w


def _launch_ranked_blend(mod, first: Tensor, second: Tensor, rank: Tensor, counts: Tensor) -> Tensor:
    b, c, h, w = first.shape
    t = counts.shape[0]
    out = _ext.empty("ranked_blend", "the output", (b, t, c, h, w), dtype=first.dtype, device=first.device)
    with _ext.device_guard(first):
        mod.ranked_blend(_ext.buf(first), _ext.buf(second), _ext.buf(rank), _ext.buf(counts), _ext.buf(out),
                         b, t, c, h * w, _ext.DTYPE_CODES[first.dtype], _ext.extra_arg(first))
    return out


def _ranked_blend_kernel(mod, first, second, rank, counts):
    """The CPU and the CUDA kernel (the same launch)."""
    _check_ranked_blend_op(first, second, rank, counts)
    return _launch_ranked_blend(mod, first, second, rank, counts)


def _ranked_blend_fallback(first, second, rank, counts):
    _check_ranked_blend_op(first, second, rank, counts)
    return ref.ranked_blend(first, second, rank, counts)


@torch.library.custom_op("whymatch::ranked_blend", mutates_args=())
def _ranked_blend(first: Tensor, second: Tensor, rank: Tensor, counts: Tensor) -> Tensor:
    _ext.no_kernel("ranked_blend", first.device)
    return _ranked_blend_fallback(first, second, rank, counts)


@_ranked_blend.register_fake
def _(first, second, rank, counts):
    b, t, c, h, w = _check_ranked_blend_op(first, second, rank, counts)
    return first.new_empty((b, t, c, h, w))


_ext.register_kernels(_ranked_blend, "ranked_blend", cpu=_ranked_blend_kernel, cuda=_ranked_blend_kernel,
                      fallback=_ranked_blend_fallback)


# ---------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------

def _direct_cpu_module(op: str, *tensors: Tensor):
    """The compiled CPU module when the public function may launch ``op``'s CPU kernel itself (plain
    eager CPU tensors, see _ext.eager_cpu; its arguments already checked and converted as the
    registered op requires), else None: go through torch.ops.whymatch.*."""
    return _ext.module_for(tensors[0].device, op) if _ext.eager_cpu(*tensors) else None


_constant_cache: tuple | None = None  # ((shape, value, device), tensor): the last constant baseline


def _constant_image(shape: tuple[int, int, int], value: float, device: torch.device) -> Tensor:
    """torch.full(shape, value) for a number baseline, the last one kept (a loop over batches asks for
    the same one every call; the kernels only read it, and it never leaves this module)."""
    global _constant_cache
    if torch.compiler.is_compiling():
        return torch.full(shape, value, device=device)
    key = (shape, value.hex(), device)  # (hex: -0.0 is not 0.0)
    cached = _constant_cache
    if cached is not None and cached[0] == key:
        return cached[1]
    t = torch.full(shape, value, device=device)
    if t.numel() <= (1 << 22):  # keep at most 16 MiB
        _constant_cache = (key, t)
    return t


def _check_grids_shifts(grids: object, shifts: object, size: tuple[int, int],
                        device: torch.device | None = None, scan: bool | None = None) -> tuple[Tensor, Tensor]:
    grids = V.tensor("grids", grids, ndim=3, dtypes=V.FLOAT_DTYPES, device=device)
    if grids.shape[1] != grids.shape[2] or grids.shape[1] < 1:
        raise ValueError(f"grids must have shape (N, s, s) with s >= 1, got {tuple(grids.shape)}")
    if scan is None or scan:
        V.maybe_finite("grids", grids)
    n, s, _ = grids.shape
    shifts = V.tensor("shifts", shifts, ndim=2, dtypes=(torch.int64, torch.int32), device=grids.device)
    if shifts.shape != (n, 2):  # (the generic check only to word the error: this runs on every call)
        V.shape("shifts", shifts, (n, 2))
    # the shift values are range-checked once, by the CPU kernel (before it writes anything) or by the
    # registered op where no compiled CPU kernel runs (CUDA, the reference fallback): not here, which
    # would cost a few tensor ops per call
    return grids.float().contiguous(), shifts.long().contiguous()


def rise_apply(grids: Tensor, shifts: Tensor, image: Tensor, baseline: Tensor | float = 0.0, *,
               dtype: torch.dtype | None = None, channels_last: bool = False, out: Tensor | None = None) -> Tensor:
    """Apply N RISE masks to one image, straight into a model input batch.

    Fuses grid upsampling, shift-crop and blending: ``out[n] = m_n * image +
    (1 - m_n) * baseline`` with ``m_n`` from :func:`whymatch.ops.reference.rise_masks`.
    No N x H x W mask tensor is ever stored.

    Args:
        grids: (N, s, s) float, the low-resolution grids (binary in RISE).
        shifts: (N, 2) int64, per-mask (dy, dx) in [0, ceil(H/s)) x [0, ceil(W/s)).
        image: (C, H, W) float, the image to perturb.
        baseline: (C, H, W) tensor or a number: what masked-out pixels become.
        dtype: output dtype (float32, float16 or bfloat16); default ``image.dtype``.
        channels_last: return the batch in channels_last memory format.
        out: optional (N, C, H, W) buffer to write into (its dtype is the output
            dtype; channels_last when ``channels_last``), so that a loop over
            batches reuses one model input buffer instead of allocating (and, on
            the CPU, page-faulting) a fresh one per batch.

    Returns:
        (N, C, H, W) tensor of ``dtype`` on the image's device (``out`` when given).
    """
    image = V.tensor("image", image, ndim=3, dtypes=V.FLOAT_DTYPES)
    scan = V.check_finite_enabled()  # (read once: the opt-in scans of the data)
    if scan:
        V.maybe_finite("image", image)
    c, h, w = image.shape
    grids, shifts = _check_grids_shifts(grids, shifts, (h, w), image.device, scan)
    if isinstance(baseline, torch.Tensor):
        V.tensor("baseline", baseline, dtypes=V.FLOAT_DTYPES, device=image.device)
        try:
            baseline = baseline.expand(c, h, w)
        except RuntimeError:
            raise ValueError(f"baseline must broadcast to the image shape {(c, h, w)}, got {tuple(baseline.shape)}") from None
        if scan:
            V.maybe_finite("baseline", baseline)
    else:
        V.real("baseline", baseline)
        baseline = _constant_image((c, h, w), float(baseline), image.device)
    image_dtype = image.dtype  # the default output dtype (before the float32 copy the kernels read)
    image, baseline = image.float().contiguous(), baseline.float().contiguous()
    if out is not None:
        V.tensor("out", out, ndim=4, dtypes=tuple(_ext.DTYPE_CODES), device=image.device)
        if out.shape != (grids.shape[0], c, h, w):
            V.shape("out", out, (grids.shape[0], c, h, w))
        if dtype is not None and out.dtype != dtype:
            raise ValueError(f"dtype must match out.dtype ({out.dtype}), got {dtype}")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if not out.is_contiguous(memory_format=fmt):
            want = "channels_last" if channels_last else "contiguous"
            raise ValueError(f"out must be {want} (channels_last={bool(channels_last)}), got strides {out.stride()}")
        mod = _direct_cpu_module("rise_apply", grids, shifts, image, baseline, out)
        if mod is None:
            torch.ops.whymatch.rise_apply_out(grids, shifts, image, baseline, out)
        else:  # what the registered op runs on the CPU, without the dispatcher's per-call cost
            _launch_rise_apply(mod, grids, shifts, image, baseline, out)
            torch.autograd.graph.increment_version(out)  # as the op's in-place write would
        return out
    dtype = image_dtype if dtype is None else dtype
    if dtype not in _ext.DTYPE_CODES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    mod = _direct_cpu_module("rise_apply", grids, shifts, image, baseline)
    if mod is None:
        return torch.ops.whymatch.rise_apply(grids, shifts, image, baseline, dtype, bool(channels_last))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = _ext.empty("rise_apply", "the output", (grids.shape[0], c, h, w), dtype=dtype, device=image.device,
                     memory_format=fmt)
    _launch_rise_apply(mod, grids, shifts, image, baseline, out)
    return out


def _upsample_matrix(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """(n_out, n_in) float32: row Y holds the weights of the n_in grid cells in upsampled position Y, exactly
    the 1-D factor of the reference's bilinear upsampling (``align_corners=False``, size-given scale)."""
    eye = torch.eye(n_in, device=device)[None, None]
    return F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=False)[0, 0]


def _shifted_factors(h: int, w: int, s: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """ay (H, cell_h*s) and bx (cell_w*s, W): ay[y, (dy, i)] = Uy[y + dy, i], bx[(dx, j), x] = Ux[x + dx, j],
    the 1-D upsampling factors at every shift side by side (constants of (H, W, s): cached, except while
    torch.compile traces, where they must be built as part of the graph)."""
    if torch.compiler.is_compiling():
        return _shifted_factors_uncached(h, w, s, device)
    return _shifted_factors_cached(h, w, s, device)


def _shifted_factors_uncached(h: int, w: int, s: int, device: torch.device) -> tuple[Tensor, Tensor]:
    cell_h, cell_w, up_h, up_w = ref.rise_grid_geometry((h, w), s)
    uy, ux = _upsample_matrix(s, up_h, device), _upsample_matrix(s, up_w, device)
    x_idx, y_idx = torch.arange(w, device=device), torch.arange(h, device=device)
    bx = ux[x_idx[None, :] + torch.arange(cell_w, device=device)[:, None]].permute(0, 2, 1).reshape(cell_w * s, w)
    ay = uy[y_idx[:, None] + torch.arange(cell_h, device=device)[None, :]].reshape(h, cell_h * s)
    return ay.contiguous(), bx.contiguous()


_shifted_factors_cached = functools.lru_cache(maxsize=16)(_shifted_factors_uncached)


def _rise_saliency_grouped(grids: Tensor, shifts: Tensor, scores: Tensor, size: tuple[int, int]) -> Tensor:
    """rise_saliency by linearity, never one mask at a time.

    A mask is ``crop_(dy, dx)(Uy G Ux^T)`` (Uy, Ux the 1-D bilinear factors), linear in the grid G, so
    ``out[k] = sum_(dy, dx) Uy[dy:dy+H] S[dy, dx, k] Ux[dx:dx+W]^T`` with ``S[dy, dx, k]`` the
    score-weighted sum of the s x s grids of the masks shifted by (dy, dx): one index_add over N small
    grids, then two matrix products of size K x (H x cell_h*s x W) and K x cell_h*s x (cell_w*s x W).
    The work no longer grows with N past the index_add (against N x H x W x K for the per-mask kernel).
    Works for any scores (centred or not) and any grid values; float32.
    """
    n, s, _ = grids.shape
    k = scores.shape[1]
    h, w = size
    cell_h, cell_w, up_h, up_w = ref.rise_grid_geometry((h, w), s)
    dev = grids.device
    if n == 0 or k == 0 or h == 0 or w == 0:
        return torch.zeros((k, h, w), dtype=torch.float32, device=dev)
    key = shifts[:, 0] * cell_w + shifts[:, 1]
    summed = torch.zeros((cell_h * cell_w, k * s * s), dtype=torch.float32, device=dev)
    weighted = (scores.float()[:, :, None] * grids.float().reshape(n, 1, s * s)).reshape(n, k * s * s)
    summed.index_put_((key,), weighted, accumulate=True)
    # (cell_h, K, s_i, cell_w * s_j): the grids of one row shift side by side along the column shifts
    summed = summed.view(cell_h, cell_w, k, s, s).permute(0, 2, 3, 1, 4).reshape(cell_h * k * s, cell_w * s)
    ay, bx = _shifted_factors(h, w, s, dev)
    rows = (summed @ bx).view(cell_h, k, s, w).permute(1, 0, 2, 3).reshape(k, cell_h * s, w)
    return torch.matmul(ay, rows)


def _grouped_is_cheaper(n: int, k: int, s: int, size: tuple[int, int]) -> bool:
    """Multiply-adds of the grouped path against the per-mask kernel's (N x H x W x (K + 2))."""
    h, w = size
    cell_h, cell_w, _, _ = ref.rise_grid_geometry((h, w), s) if h and w else (1, 1, 0, 0)
    grouped = n * k * s * s + k * cell_h * s * (cell_w * s * w + h * w)
    return 2 * grouped < n * h * w * (k + 2)


def rise_saliency(grids: Tensor, shifts: Tensor, scores: Tensor, size: tuple[int, int]) -> Tensor:
    """Score-weighted sum of RISE masks for K references at once.

    ``out[k] = sum_n scores[n, k] * mask_n``, the masks recomputed from the
    grids (never stored). No normalization: callers divide by N*p (RISE) or by
    the mean mask (SANE). When it is cheaper (many masks: N well above the
    cell_h x cell_w possible shifts), the grids are first summed per shift at
    low resolution and upsampled once per shift and reference, by two matrix
    products (upsampling and cropping are linear); otherwise the fused
    per-mask kernel (``torch.ops.whymatch.rise_saliency``) runs.

    Args:
        grids: (N, s, s) float grids; shifts: (N, 2) int64 as in :func:`rise_apply`.
        scores: (N, K) float, the similarity of perturbation n to reference k.
        size: (H, W) of the saliency maps (the image size the masks were applied at).

    Returns:
        (K, H, W) float32 tensor on the scores' device.
    """
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)):
        raise ValueError(f"size must be a pair of non-negative ints (H, W), got {size!r}")
    grids, shifts = _check_grids_shifts(grids, shifts, tuple(size))
    scores = V.tensor("scores", scores, ndim=2, dtypes=V.FLOAT_DTYPES, device=grids.device)
    V.shape("scores", scores, (grids.shape[0], None))
    V.maybe_finite("scores", scores)
    h, w = int(size[0]), int(size[1])
    if _grouped_is_cheaper(grids.shape[0], scores.shape[1], grids.shape[1], (h, w)):
        _check_shift_values("shifts", shifts, (h, w), grids.shape[1])
        return _rise_saliency_grouped(grids, shifts, scores, (h, w))
    scores = scores.float().contiguous()
    mod = _direct_cpu_module("rise_saliency", grids, shifts, scores)
    if mod is None:
        return torch.ops.whymatch.rise_saliency(grids, shifts, scores, h, w)
    _ext.check_size("rise_saliency", "the output", (scores.shape[1], h, w), torch.float32, scores.device)
    return _launch_rise_saliency(mod, grids, shifts, scores, h, w)


def ranked_blend(first: Tensor, second: Tensor, rank: Tensor, counts: Tensor) -> Tensor:
    """Images at each step of an insertion or deletion curve, for a batch of pairs.

    ``out[b, t, :, y, x] = first[b, :, y, x] if rank[b, y*W + x] < counts[t] else second[b, :, y, x]``.
    Insertion: ``first`` = image, ``second`` = substrate; deletion: the reverse.

    Args:
        first, second: (B, C, H, W) float tensors of one dtype.
        rank: (B, H*W) int64, the position of each pixel in descending saliency
            (0 = most salient), e.g. from :func:`whymatch.metrics.saliency_rank`.
        counts: (T,) int64, how many pixels come from ``first`` at each step.

    Returns:
        (B, T, C, H, W) tensor of ``first.dtype``.
    """
    first = V.tensor("first", first, ndim=4, dtypes=V.FLOAT_DTYPES)
    second = V.tensor("second", second, ndim=4, dtypes=(first.dtype,), device=first.device)
    V.shape("second", second, first.shape)
    b, c, h, w = first.shape
    rank = V.tensor("rank", rank, ndim=2, dtypes=(torch.int64, torch.int32), device=first.device)
    V.shape("rank", rank, (b, h * w))
    counts = V.tensor("counts", counts, ndim=1, dtypes=(torch.int64, torch.int32), device=first.device)
    V.maybe_finite("first", first)
    V.maybe_finite("second", second)
    first, second, rank, counts = first.contiguous(), second.contiguous(), rank.long().contiguous(), counts.long().contiguous()
    mod = _direct_cpu_module("ranked_blend", first, second, rank, counts)
    if mod is None:
        return torch.ops.whymatch.ranked_blend(first, second, rank, counts)
    return _launch_ranked_blend(mod, first, second, rank, counts)
