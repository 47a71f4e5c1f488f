"""AVSL ops (Zhang et al., CVPR 2022): CAM reliability statistic, CAM correlation edges with
momentum, and the rectified distance of every (query, gallery) pair with its top-k variant.

The CAM statistics run fused kernels (``csrc/avsl/cam_correlation.h``), registered as
``whymatch::avsl_cam_correlation(cam_low, cam_high, reliability, published) -> (corr, rel_low,
rel_high)``, ``whymatch::avsl_edge_update_(edges!, cam_low, cam_high, momentum, first,
reliability, published) -> (corr, rel_low, rel_high)`` (edges updated in place, in the same
launch) and ``whymatch::avsl_cam_reliability(cam, published) -> rel``: contiguous float32 (or
float64) CAMs, outputs of their dtype, the rel outputs (0,) when ``reliability`` is False; a
workspace of the CAMs' size, never B x R_low x R_high. No autograd (detached inputs).

The public functions validate their arguments and compute; the definitions are in
``ops/reference.py`` (``avsl_*``). The rectified distance and its top-k variant run fused
kernels (``whymatch::avsl_distance``, ``whymatch::avsl_distance_backward`` and
``whymatch::avsl_topk``, registered with torch.library; see ``csrc/avsl/avsl_distance.h``)
that never form a pairs x nodes tensor; without the compiled kernels they fall back to the
reference. On a GPU they choose between three paths (:func:`gpu_path`); the cuBLAS path runs
torch.mm between the fused kernels of ``csrc/avsl/avsl_fused.h`` (:func:`_fused_cublas`).

Packed form handed to the ops (built by :func:`_pack`, in the compute dtype: float64 when a
coef or bias of a level >= 1 is float64, else float32):

* ``qe`` (Q, S), ``ge`` (G, S): every level's l2-normalized embeddings side by side,
  S = sum R_l (normalized once here, in float32 as the reference does);
* ``rq`` (Q, S1), ``rg`` (G, S1), ``coef``, ``bias`` (S1,): levels 1..L-1, S1 = S - R_0;
* ``links`` (sum R_{l-1} R_l,): each link* flattened row-major, dense. The ops turn it into
  compressed columns (and rows, for the backward) themselves, so that no data-dependent
  shape reaches torch.compile; zero entries are skipped.
* ``sizes``: [R_0, ..., R_{L-1}] (at most 8 levels; more use the reference).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext, _validate as V
from . import reference as ref

_MAX_LEVELS = _ext.LIMITS["avsl_max_levels"]  # the kernels' (the op table's)
_FLOATS = (torch.float32, torch.float64)  # what the AVSL kernels take

__all__ = ["cam_reliability", "cam_correlation", "cam_statistics", "link_star", "avsl_distance", "avsl_topk"]


def cam_reliability(cam: Tensor, *, published: bool = False) -> Tensor:
    """The per-node CAM statistic of AVSL's reliability: (B, R) float32 from CAMs (B, R, H, W).

    See :func:`whymatch.ops.reference.avsl_cam_reliability`; ``published=True`` reproduces the
    published code's minimum over the last axis only. A fused kernel (``whymatch::avsl_cam_reliability``)
    reads each map once; no gradient (the published code computes it under no_grad).
    """
    cam = V.tensor("cam", cam, ndim=4, dtypes=V.FLOAT_DTYPES + (torch.float64,))
    if cam.shape[2] * cam.shape[3] < 2:
        raise ValueError(f"cam must have at least 2 positions per map for a standard deviation, got "
                         f"{tuple(cam.shape[2:])}")
    return torch.ops.whymatch.avsl_cam_reliability(_cam_input(cam), bool(published))


def _check_pair(cam_low: Tensor, cam_high: Tensor) -> tuple[Tensor, Tensor]:
    cam_low = V.tensor("cam_low", cam_low, ndim=4, dtypes=V.FLOAT_DTYPES + (torch.float64,), nonempty=True)
    cam_high = V.tensor("cam_high", cam_high, ndim=4, dtypes=V.FLOAT_DTYPES + (torch.float64,),
                        device=cam_low.device, nonempty=True)
    if cam_high.shape[0] != cam_low.shape[0]:
        raise ValueError(f"cam_high must have cam_low's batch size {cam_low.shape[0]}, got {cam_high.shape[0]}")
    return _cam_input(cam_low), _cam_input(cam_high)


def _check_edges(edges: Tensor, cam_low: Tensor, cam_high: Tensor) -> Tensor:
    edges = V.tensor("edges", edges, ndim=2, dtypes=(torch.float32,), device=cam_low.device)
    V.shape("edges", edges, (cam_low.shape[1], cam_high.shape[1]))
    if not edges.is_contiguous():
        raise ValueError(f"edges must be contiguous (it is updated in place), got strides {edges.stride()}")
    return edges


def cam_correlation(cam_low: Tensor, cam_high: Tensor, *, edges: Tensor | None = None, momentum: float = 0.5,
                    first: bool = False) -> Tensor:
    """Batch-mean CAM correlation of two levels, (R_low, R_high) float32; optionally updates edges in place.

    With ``edges`` (R_low, R_high) float32: ``edges = corr`` when ``first`` else
    ``edges = momentum * edges + (1 - momentum) * corr`` (in place, no gradient).

    One fused call (``whymatch::avsl_cam_correlation``, or ``whymatch::avsl_edge_update_`` with
    edges): pooling, normalization, the batch-mean product and the edge update, never forming a
    B x R_low x R_high tensor. No gradient (the published code computes it under no_grad).

    Args:
        cam_low: (B, R_low, H_l, W_l) CAMs of the lower level; cam_high: (B, R_high, H_h, W_h)
            of the upper one (the lower is average-pooled to the upper's size).
    """
    corr, _, _ = cam_statistics(cam_low, cam_high, edges=edges, momentum=momentum, first=first, reliability=False)
    return corr


def cam_statistics(cam_low: Tensor, cam_high: Tensor, *, edges: Tensor | None = None, momentum: float = 0.5,
                   first: bool = False, reliability: bool = True,
                   published: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Everything AVSL takes from the CAMs of a level pair in one pass: ``(corr, rel_low, rel_high)``.

    ``corr`` (R_low, R_high) float32 and the in-place edge update as :func:`cam_correlation`;
    ``rel_low`` (B, R_low) and ``rel_high`` (B, R_high) float32 as :func:`cam_reliability` of
    each level (empty (0,) tensors when ``reliability`` is False). Each CAM is read once.
    """
    cam_low, cam_high = _check_pair(cam_low, cam_high)
    m = V.real("momentum", momentum, low=0.0, high=1.0)
    rel = bool(reliability)
    if rel and (cam_low.shape[2] * cam_low.shape[3] < 2 or cam_high.shape[2] * cam_high.shape[3] < 2):
        raise ValueError("the reliability needs at least 2 positions per map for a standard deviation, got "
                         f"cam_low {tuple(cam_low.shape[2:])} and cam_high {tuple(cam_high.shape[2:])}")
    if edges is None:
        return torch.ops.whymatch.avsl_cam_correlation(cam_low, cam_high, rel, bool(published))
    edges = _check_edges(edges, cam_low, cam_high)
    return torch.ops.whymatch.avsl_edge_update_(edges, cam_low, cam_high, m, bool(first), rel, bool(published))


# ---------------------------------------------------------------------------
# CAM ops (arguments already validated: contiguous float32 CAMs, edges contiguous float32).
# float64 CAMs are accepted by the ops themselves (exact tests); the public functions use float32.
# ---------------------------------------------------------------------------

def _cam_input(cam: Tensor) -> Tensor:
    """CAMs as the ops take them: detached, float32 (as the reference computes), contiguous."""
    return cam.detach().to(torch.float32).contiguous()


def _cam_reference(cam_low, cam_high, edges, momentum, first, reliability, published):
    """The fallback: ops/reference.py in the CAMs' dtype (float32 there, cast back for float64)."""
    corr = ref.avsl_cam_correlation(cam_low, cam_high).to(cam_low.dtype)
    if edges is not None:
        if first:
            edges.copy_(corr)
        else:
            edges.mul_(momentum).add_(corr, alpha=1.0 - momentum)
    if not reliability:
        return corr, cam_low.new_empty(0), cam_high.new_empty(0)
    return (corr, ref.avsl_cam_reliability(cam_low, published).to(cam_low.dtype),
            ref.avsl_cam_reliability(cam_high, published).to(cam_high.dtype))


def _cam_kernel(mod, cam_low, cam_high, edges, momentum, first, reliability, published):
    """The CPU and the CUDA kernel of both CAM ops (the same launch; edges None: no update)."""
    b, r1, h1, w1 = cam_low.shape
    _, r2, h2, w2 = cam_high.shape
    code = _ext.dtype_code(cam_low)
    op, dt, dev = "avsl_cam_correlation", cam_low.dtype, cam_low.device
    corr = _ext.empty(op, "corr", (r1, r2), dtype=dt, device=dev)
    rel_low = _ext.empty(op, "rel_low", (b, r1) if reliability else (0,), dtype=dt, device=dev)
    rel_high = _ext.empty(op, "rel_high", (b, r2) if reliability else (0,), dtype=dt, device=dev)
    ws = _ext.empty(op, "the workspace", (int(mod.avsl_cam_workspace_bytes(b, r1, r2, h2, w2, code)),),
                    dtype=torch.uint8, device=dev)
    with _ext.device_guard(cam_low):
        mod.avsl_cam_correlation(_ext.buf(cam_low), _ext.buf(cam_high), _ext.buf(corr),
                                 _ext.buf(edges) if edges is not None else _ext.no_buf(), _ext.buf(rel_low),
                                 _ext.buf(rel_high),
                                 _ext.buf(ws), b, r1, h1, w1, r2, h2, w2, float(momentum), bool(first),
                                 bool(published), code, _ext.extra_arg(cam_low))
    return corr, rel_low, rel_high


def _check_cam_op(op: str, cam_low: Tensor, cam_high: Tensor, reliability: bool, edges: Tensor | None = None,
                  momentum: float | None = None) -> None:
    """The ops' own contract, metadata only (the public functions validate more and name the argument first)."""
    cam_low = V.op_tensor(op, "cam_low", cam_low, ndim=4, dtypes=_FLOATS)
    b = cam_low.shape[0]
    if b == 0:
        raise ValueError(f"{op}: cam_low must have a non-empty batch (a batch mean of nothing), got "
                         f"{tuple(cam_low.shape)}")
    cam_high = V.op_tensor(op, "cam_high", cam_high, ndim=4, dtypes=(cam_low.dtype,), device=cam_low.device,
                           shape=(b, None, None, None))
    for name, t in (("cam_low", cam_low), ("cam_high", cam_high)):
        if t.shape[2] < 1 or t.shape[3] < 1:
            raise ValueError(f"{op}: {name} maps must be at least 1 x 1, got {tuple(t.shape[2:])}")
        if reliability and t.shape[2] * t.shape[3] < 2:
            raise ValueError(f"{op}: {name} needs at least 2 positions per map for the reliability, got "
                             f"{tuple(t.shape[2:])}")
    if edges is not None:
        V.op_tensor(op, "edges", edges, ndim=2, dtypes=(cam_low.dtype,), device=cam_low.device,
                    shape=(cam_low.shape[1], cam_high.shape[1]))
        V.maybe_finite(f"{op}: edges", edges)
    if momentum is not None:
        V.real(f"{op}: momentum", momentum, low=0.0, high=1.0)
    V.maybe_finite(f"{op}: cam_low", cam_low)
    V.maybe_finite(f"{op}: cam_high", cam_high)


def _cam_correlation_kernel(mod, cam_low, cam_high, reliability, published):
    _check_cam_op("avsl_cam_correlation", cam_low, cam_high, reliability)
    return _cam_kernel(mod, cam_low, cam_high, None, 0.5, False, reliability, published)


def _cam_correlation_fallback(cam_low, cam_high, reliability, published):
    _check_cam_op("avsl_cam_correlation", cam_low, cam_high, reliability)
    return _cam_reference(cam_low, cam_high, None, 0.5, False, reliability, published)


@torch.library.custom_op("whymatch::avsl_cam_correlation", mutates_args=())
def _avsl_cam_correlation(cam_low: Tensor, cam_high: Tensor, reliability: bool,
                          published: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(corr (R1, R2), rel_low (B, R1), rel_high (B, R2)); the rel are (0,) when not reliability."""
    _ext.no_kernel("avsl_cam_correlation", cam_low.device)
    return _cam_correlation_fallback(cam_low, cam_high, reliability, published)


def _cam_fake(cam_low, cam_high, reliability):
    b, r1, r2 = cam_low.shape[0], cam_low.shape[1], cam_high.shape[1]
    return (cam_low.new_empty(r1, r2), cam_low.new_empty(b, r1) if reliability else cam_low.new_empty(0),
            cam_low.new_empty(b, r2) if reliability else cam_low.new_empty(0))


@_avsl_cam_correlation.register_fake
def _(cam_low, cam_high, reliability, published):
    _check_cam_op("avsl_cam_correlation", cam_low, cam_high, reliability)
    return _cam_fake(cam_low, cam_high, reliability)


_ext.register_kernels(_avsl_cam_correlation, "avsl_cam_correlation", cpu=_cam_correlation_kernel,
                      cuda=_cam_correlation_kernel, fallback=_cam_correlation_fallback)


def _edge_update_kernel(mod, edges, cam_low, cam_high, momentum, first, reliability, published):
    _check_cam_op("avsl_edge_update_", cam_low, cam_high, reliability, edges, momentum)
    return _cam_kernel(mod, cam_low, cam_high, edges, momentum, first, reliability, published)


def _edge_update_fallback(edges, cam_low, cam_high, momentum, first, reliability, published):
    _check_cam_op("avsl_edge_update_", cam_low, cam_high, reliability, edges, momentum)
    return _cam_reference(cam_low, cam_high, edges, momentum, first, reliability, published)


@torch.library.custom_op("whymatch::avsl_edge_update_", mutates_args=("edges",))
def _avsl_edge_update(edges: Tensor, cam_low: Tensor, cam_high: Tensor, momentum: float, first: bool,
                      reliability: bool, published: bool) -> tuple[Tensor, Tensor, Tensor]:
    """As avsl_cam_correlation, and edges (R1, R2) = corr (first) or momentum * edges + (1 - momentum) * corr."""
    _ext.no_kernel("avsl_cam_correlation", cam_low.device)
    return _edge_update_fallback(edges, cam_low, cam_high, momentum, first, reliability, published)


@_avsl_edge_update.register_fake
def _(edges, cam_low, cam_high, momentum, first, reliability, published):
    _check_cam_op("avsl_edge_update_", cam_low, cam_high, reliability, edges, momentum)
    return _cam_fake(cam_low, cam_high, reliability)


_ext.register_kernels(_avsl_edge_update, "avsl_cam_correlation", cpu=_edge_update_kernel, cuda=_edge_update_kernel,
                      fallback=_edge_update_fallback)


def _check_cam_rel_op(cam: Tensor) -> None:
    op = "avsl_cam_reliability"
    cam = V.op_tensor(op, "cam", cam, ndim=4, dtypes=_FLOATS)
    if cam.shape[2] < 1 or cam.shape[3] < 1 or cam.shape[2] * cam.shape[3] < 2:
        raise ValueError(f"{op}: cam must have at least 2 positions per map for a standard deviation, got "
                         f"{tuple(cam.shape[2:])}")
    V.maybe_finite(f"{op}: cam", cam)


def _cam_reliability_kernel(mod, cam, published):
    """The CPU and the CUDA kernel (the same launch)."""
    _check_cam_rel_op(cam)
    b, r, h, w = cam.shape
    rel = _ext.empty("avsl_cam_reliability", "rel", (b, r), dtype=cam.dtype, device=cam.device)
    with _ext.device_guard(cam):
        mod.avsl_cam_reliability(_ext.buf(cam), _ext.buf(rel), b, r, h, w, bool(published), _ext.dtype_code(cam),
                                 _ext.extra_arg(cam))
    return rel


def _cam_reliability_fallback(cam, published):
    _check_cam_rel_op(cam)
    return ref.avsl_cam_reliability(cam, published).to(cam.dtype)


@torch.library.custom_op("whymatch::avsl_cam_reliability", mutates_args=())
def _avsl_cam_reliability(cam: Tensor, published: bool) -> Tensor:
    """(B, R) reliability statistic of contiguous float32/float64 CAMs (B, R, H, W), H * W >= 2."""
    _ext.no_kernel("avsl_cam_reliability", cam.device)
    return _cam_reliability_fallback(cam, published)


@_avsl_cam_reliability.register_fake
def _(cam, published):
    _check_cam_rel_op(cam)
    return cam.new_empty(cam.shape[0], cam.shape[1])


_ext.register_kernels(_avsl_cam_reliability, "avsl_cam_reliability", cpu=_cam_reliability_kernel,
                      cuda=_cam_reliability_kernel, fallback=_cam_reliability_fallback)


def link_star(edges: Tensor, k: int) -> Tensor:
    """Rectification weights (R_low, R_high): relu, top-k per column (ties kept), column-normalized."""
    edges = V.tensor("edges", edges, ndim=2, dtypes=V.FLOAT_DTYPES + (torch.float64,))
    V.positive_int("k", k)
    return ref.avsl_link_star(edges, k)


def _check_levels(queries, galleries, rel_q, rel_g, links, coef, bias):
    if not isinstance(queries, (list, tuple)):
        raise TypeError(f"queries must be a list of tensors (one per level), got {type(queries).__name__}")
    n = len(queries)
    for name, seq, want in (("galleries", galleries, n), ("rel_q", rel_q, n), ("rel_g", rel_g, n),
                            ("links", links, n - 1), ("coef", coef, n), ("bias", bias, n)):
        if not isinstance(seq, (list, tuple)) or len(seq) != want:
            raise ValueError(f"{name} must be a list of {want} tensors (one per level"
                             f"{' pair' if name == 'links' else ''}), got "
                             f"{len(seq) if isinstance(seq, (list, tuple)) else type(seq).__name__}")
    if n < 1:
        raise ValueError("queries must hold at least one level, got an empty list")
    fl = V.FLOAT_DTYPES + (torch.float64,)
    dev = V.tensor("queries[0]", queries[0], ndim=2, dtypes=fl).device
    q0 = queries[0].shape[0]
    g0 = V.tensor("galleries[0]", galleries[0], ndim=2, dtypes=fl, device=dev).shape[0]
    for lv in range(n):
        q = V.tensor(f"queries[{lv}]", queries[lv], ndim=2, dtypes=fl, device=dev)
        r = q.shape[1]
        if r < 1:
            raise ValueError(f"queries[{lv}] must have at least one node (column), got shape {tuple(q.shape)}")
        checked = [(f"queries[{lv}]", q, (q0, r)),
                   (f"galleries[{lv}]", galleries[lv], (g0, r)), (f"rel_q[{lv}]", rel_q[lv], (q0, r)),
                   (f"rel_g[{lv}]", rel_g[lv], (g0, r)), (f"coef[{lv}]", coef[lv], (r,)),
                   (f"bias[{lv}]", bias[lv], (r,))]
        if lv:
            checked.append((f"links[{lv - 1}]", links[lv - 1], (queries[lv - 1].shape[1], r)))
        for name, t, want in checked:
            t = V.tensor(name, t, ndim=len(want), dtypes=fl, device=dev)
            V.shape(name, t, want)
            V.maybe_finite(name, t)


# ---------------------------------------------------------------------------
# packed form and the registered ops (arguments already validated and packed)
# ---------------------------------------------------------------------------

def _offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for r in sizes:
        out.append(acc)
        acc += r
    return out


def _compressed(links: Tensor, sizes: list[int], rows: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Compressed columns (rows=False) or rows (rows=True) of every link*, in the layout of
    csrc/avsl/avsl_distance.h: (ptr int64 with absolute positions, indices int32, values)."""
    ptrs, idx, vals = [], [], []
    base, pos = 0, 0
    for lv in range(1, len(sizes)):
        rp, r = sizes[lv - 1], sizes[lv]
        m = links[pos:pos + rp * r].view(rp, r)
        pos += rp * r
        if not rows:
            m = m.t()
        nz = (m != 0).nonzero()  # sorted by (major, minor)
        counts = torch.bincount(nz[:, 0], minlength=m.shape[0])
        ptrs.append(torch.cat([counts.new_zeros(1), counts.cumsum(0)]) + base)
        idx.append(nz[:, 1].to(torch.int32))
        vals.append(m[nz[:, 0], nz[:, 1]])
        base += nz.shape[0]
    if not ptrs:
        return (links.new_zeros(0, dtype=torch.int64), links.new_zeros(0, dtype=torch.int32), links.new_zeros(0))
    return torch.cat(ptrs).contiguous(), torch.cat(idx).contiguous(), torch.cat(vals).contiguous()


def _packed_reference(qe, ge, rq, rg, links, coef, bias, sizes, gamma, saved=None):
    """The rectified distance of the packed form in plain PyTorch (the fallback; differentiable in
    coef, bias). With a list ``saved``, each level >= 1 appends (columns, link, delta, A, p)."""
    off, hat, pos = _offsets(sizes), None, 0
    for lv, r in enumerate(sizes):
        delta = (qe[:, None, off[lv]:off[lv] + r] - ge[None, :, off[lv]:off[lv] + r]) ** 2
        if hat is None:
            hat = delta
            continue
        o1, rp = off[lv] - sizes[0], sizes[lv - 1]
        link = links[pos:pos + rp * r].view(rp, r)
        pos += rp * r
        sl = slice(o1, o1 + r)
        p = torch.sigmoid(gamma * (rq[:, None, sl] * rg[None, :, sl] * coef[sl] + bias[sl]))
        a = hat @ link
        if saved is not None:
            saved.append((sl, link, delta, a, p))
        hat = delta * p + a * (1 - p)
    return hat.sum(dim=-1)


def _packed_reference_backward(grad, qe, ge, rq, rg, links, coef, bias, sizes, gamma):
    """(dL/dcoef, dL/dbias) of the packed form in plain PyTorch, without autograd (the fallback)."""
    saved: list = []
    _packed_reference(qe, ge, rq, rg, links, coef, bias, sizes, gamma, saved)
    grad_coef, grad_bias = torch.zeros_like(coef), torch.zeros_like(bias)
    u = grad.to(qe.dtype)[:, :, None]
    for sl, link, delta, a, p in reversed(saved):
        s = u * (delta - a) * p * (1 - p)
        grad_bias[sl] = gamma * s.sum(dim=(0, 1))
        grad_coef[sl] = gamma * (s * rq[:, None, sl] * rg[None, :, sl]).sum(dim=(0, 1))
        u = (u * (1 - p)) @ link.t()
    return grad_coef, grad_bias


def _launch_args(mod, qe, ge, rq, rg, links, coef, bias, sizes, gallery_t: bool):
    col_ptr, row_idx, values = _compressed(links, sizes, rows=False)
    if gallery_t:  # the CUDA kernels read the gallery transposed (coalesced)
        ge, rg = ge.t().contiguous(), rg.t().contiguous()
    keep = [qe, ge, rq, rg, coef, bias, col_ptr, row_idx, values]
    return keep, [_ext.buf(t) for t in keep]


def _check_packed(op: str, qe, ge, rq, rg, links, coef, bias, sizes, gamma) -> tuple[int, int]:
    """The packed ops' own checks (metadata only): sizes 1 to 8 levels of >= 1 nodes, every tensor of
    the packed layout (module docstring) with its shape, one float32/float64 dtype, one device,
    contiguous; gamma finite. Returns (Q, G)."""
    if not isinstance(sizes, (list, tuple)) or not 1 <= len(sizes) <= _MAX_LEVELS or not all(
            isinstance(r, int) and not isinstance(r, bool) and 1 <= r < 2 ** 31 for r in sizes):
        raise ValueError(f"{op}: sizes must list 1 to {_MAX_LEVELS} levels of 1 to 2^31 - 1 nodes each, got {sizes!r}")
    V.real(f"{op}: gamma", gamma)
    s = sum(sizes)
    s1 = s - sizes[0]
    nl = sum(sizes[i - 1] * sizes[i] for i in range(1, len(sizes)))
    qe = V.op_tensor(op, "qe", qe, ndim=2, dtypes=_FLOATS, shape=(None, s))
    dt, dev = qe.dtype, qe.device
    ge = V.op_tensor(op, "ge", ge, ndim=2, dtypes=(dt,), device=dev, shape=(None, s))
    q, g = qe.shape[0], ge.shape[0]
    V.op_tensor(op, "rq", rq, ndim=2, dtypes=(dt,), device=dev, shape=(q, s1))
    V.op_tensor(op, "rg", rg, ndim=2, dtypes=(dt,), device=dev, shape=(g, s1))
    V.op_tensor(op, "links", links, ndim=1, dtypes=(dt,), device=dev, shape=(nl,))
    V.op_tensor(op, "coef", coef, ndim=1, dtypes=(dt,), device=dev, shape=(s1,))
    V.op_tensor(op, "bias", bias, ndim=1, dtypes=(dt,), device=dev, shape=(s1,))
    for name, t in (("qe", qe), ("ge", ge), ("rq", rq), ("rg", rg), ("links", links), ("coef", coef),
                    ("bias", bias)):
        V.maybe_finite(f"{op}: {name}", t)
    return q, g


# avsl_workspace_bytes's kernel codes (the op table's; unused without the kernels)
WS_DISTANCE, WS_BACKWARD, WS_TOPK = (_ext.AVSL_WORKSPACE.get(k) for k in ("distance", "backward", "topk"))


def _workspace(mod, kernel: int, q: int, g: int, sizes: list[int], k: int, like: Tensor) -> Tensor:
    n = int(mod.avsl_workspace_bytes(kernel, q, g, list(sizes), k, _ext.dtype_code(like)))
    op = {WS_DISTANCE: "avsl_distance", WS_BACKWARD: "avsl_distance_backward", WS_TOPK: "avsl_topk"}[kernel]
    return _ext.empty(op, "the workspace", (n,), dtype=torch.uint8, device=like.device)


# ---------------------------------------------------------------------------
# GPU paths of the rectified distance and its top-k (see README, "AVSL on a GPU")
# ---------------------------------------------------------------------------

GPU_PATHS = ("simt", "tensorcore", "cublas")
TC_MAX_NODES = 512            # the tensor-core kernel's accumulators cover 512 columns per level
TC_MIN_PAIRS = 1 << 20        # below: the SIMT kernel (launch and split-links overhead, few tiles)
TC_MIN_TOPK_QUERIES = 264     # top-k runs one block per query: 2 per SM of an H100 / H200 (132 SMs)
CUBLAS_MIN_PAIRS = 1 << 20    # and below: the SIMT kernel (one launch, no intermediates)
CUBLAS_MIN_DENSITY = 0.3      # link* density above which dense cuBLAS beats the sparse SIMT kernel (model),
CUBLAS_FUSED_MIN_DENSITY = 0.08  # torch-op cuBLAS path / with the fused kernels (avsl_sop_model: 0.26-0.28 / 0.07)
CUBLAS_CHUNK_BYTES = 1 << 30  # the cuBLAS path's intermediates per chunk
FUSED_CHUNK_QUERIES = 1024    # the fused cuBLAS path's queries per chunk (blocks of its top-k epilogue)


def gpu_path(q: int, g: int, sizes: list[int], dtype: torch.dtype, *, topk: bool = False,
             capability: tuple[int, int] = (9, 0), smem_optin: int = 227 * 1024, tc_smem: int = 0,
             link_density: float = 0.0, fused: bool = True) -> str:
    """Which GPU path computes the AVSL distance (or top-k) of Q x G pairs; the rule, in order:

    1. ``WHYMATCH_AVSL_GPU_PATH=simt|tensorcore|cublas`` forces a path (benchmarks, tests); a forced
       tensor-core path that cannot run (float64, more than 512 nodes, no sm_80, not enough shared
       memory) is a ValueError.
    2. float64: ``simt`` (the only exact-dtype path).
    3. ``tensorcore`` (fused, 3xTF32) when it can run and there is enough work: Q x G >= 2^20 pairs
       and, for top-k (one block per query), Q >= 264.
    4. ``cublas`` (chunked dense hat @ link* through torch.mm, with the fused prologue / blend /
       epilogue kernels when ``fused``, i.e. the module has them) when the tensor-core kernel cannot
       run, Q x G >= 2^20 and link* is dense enough (``link_density``, its fraction of nonzero
       entries): >= 0.08 with the fused kernels, >= 0.3 without. The SIMT kernel's time grows with the
       nonzeros, the cuBLAS path's does not; benchmarks/results/avsl_sop_model.md has them level at a
       density of about 0.07 with the fused kernels (SIMT 211 s at 0.25, the published k = 128 of 512;
       fused cuBLAS path 84 s, SGEMM-bound) and about 0.26-0.28 without (torch-op cuBLAS path 223 s).
    5. ``simt`` otherwise.
    The thresholds come from the performance model. The one GPU run so far (an H200,
    benchmarks/results/gpu/avsl_sop_cuda.md) took 132 s on the tensor-core path at SOP scale, where the
    model predicts 56.7 s, so the model is optimistic and the thresholds are unconfirmed.
    """
    import os

    tc_ok = (dtype == torch.float32 and max(sizes) <= TC_MAX_NODES and capability >= (8, 0)
             and tc_smem <= smem_optin)
    forced = os.environ.get("WHYMATCH_AVSL_GPU_PATH", "").strip()
    if forced:
        if forced not in GPU_PATHS:
            raise ValueError(f"WHYMATCH_AVSL_GPU_PATH must be one of {GPU_PATHS}, got {forced!r}")
        if forced == "tensorcore" and not tc_ok:
            raise ValueError(f"WHYMATCH_AVSL_GPU_PATH=tensorcore needs float32, at most {TC_MAX_NODES} nodes per level, "
                             f"sm_80+ and {tc_smem} bytes of shared memory, got {dtype}, sizes {list(sizes)}, "
                             f"sm_{capability[0]}{capability[1]}, {smem_optin} bytes")
        if forced == "cublas" and dtype != torch.float32:
            return "simt"
        return forced
    if dtype != torch.float32:
        return "simt"
    if tc_ok and q * g >= TC_MIN_PAIRS and (not topk or q >= TC_MIN_TOPK_QUERIES):
        return "tensorcore"
    if q * g >= CUBLAS_MIN_PAIRS and link_density >= (CUBLAS_FUSED_MIN_DENSITY if fused else CUBLAS_MIN_DENSITY):
        return "cublas"
    return "simt"


def _device_path(mod, qe: Tensor, q: int, g: int, sizes: list[int], topk: bool, links: Tensor) -> str:
    """gpu_path for the device of qe (the emulation counts as an sm_90 with its 227 KiB opt-in)."""
    if not hasattr(mod, "avsl_tc_topk"):
        return "simt"
    cap, optin = _ext.cuda_limits(qe)
    tc_smem = int(mod.avsl_tc_smem_bytes(list(sizes)))
    density = 0.0
    if q * g >= CUBLAS_MIN_PAIRS and links.numel() and gpu_path(
            q, g, sizes, qe.dtype, topk=topk, capability=cap, smem_optin=optin, tc_smem=tc_smem) != "tensorcore":
        density = float((links != 0).sum()) / links.numel()  # a sync; the SIMT launch syncs anyway
    return gpu_path(q, g, sizes, qe.dtype, topk=topk, capability=cap, smem_optin=optin, tc_smem=tc_smem,
                    link_density=density, fused=_fused_available(mod))


def _tc_launch(mod, qe, ge, rq, rg, links, coef, bias, sizes, gamma, k=None, exclude_self=False):
    """The tensor-core kernels (csrc/avsl/avsl_tensorcore.h): distances (Q, G) or the top-k pair."""
    op = "avsl_topk" if k is not None else "avsl_distance"
    q, g = qe.shape[0], ge.shape[0]
    ge_t, rg_t = ge.t().contiguous(), rg.t().contiguous()  # the gallery transposed (coalesced)
    args = [_ext.buf(t) for t in (qe, ge_t, rq, rg_t, coef, bias, links)]
    with _ext.device_guard(qe):
        ws = _ext.empty(op, "the workspace", (int(mod.avsl_tc_workspace_bytes(q, g, list(sizes))),),
                        dtype=torch.uint8, device=qe.device)
        if k is None:
            out = _ext.empty(op, "the output", (q, g), dtype=qe.dtype, device=qe.device)
            mod.avsl_tc_distance(*args, _ext.buf(out), q, g, list(sizes), float(gamma), _ext.buf(ws),
                                 _ext.extra_arg(qe))
            return out
        values = _ext.empty(op, "values", (q, k), dtype=qe.dtype, device=qe.device)
        indices = _ext.empty(op, "indices", (q, k), dtype=torch.int64, device=qe.device)
        mod.avsl_tc_topk(*args, _ext.buf(values), _ext.buf(indices), q, g, list(sizes), float(gamma), int(k),
                         bool(exclude_self), _ext.buf(ws), _ext.extra_arg(qe))
        return values, indices


def _query_chunk(g: int, sizes: list[int], budget: int = CUBLAS_CHUNK_BYTES) -> int:
    # per query: about 6 live (G, R_max) float32 tensors (delta, p, hat, A and two temporaries)
    return max(1, budget // max(1, 6 * g * max(sizes) * 4))


def _fused_chunk(q: int, g: int, sizes: list[int], budget: int = CUBLAS_CHUNK_BYTES) -> tuple[int, int]:
    """(queries, gallery items) per chunk of the fused cuBLAS path: its two (pairs, R_max) float32
    buffers within ``budget``, at most FUSED_CHUNK_QUERIES queries (the top-k epilogue runs one block
    per query: 1,024 blocks fill an H100's 132 SMs), the rest of the budget in gallery items."""
    pairs = max(1, budget // (2 * max(sizes) * 4))
    nq = max(1, min(q, FUSED_CHUNK_QUERIES, pairs))
    return nq, max(1, min(g, pairs // nq))


def _fused_cublas(mod, qe, ge, rq, rg, links, coef, bias, sizes, gamma, k=None, exclude_self=False, *,
                  chunk: tuple[int, int] | None = None):
    """The cuBLAS path with fused kernels (csrc/avsl/avsl_fused.h): per chunk of queries x gallery
    items, ``avsl_fused_prologue`` writes hat_0, each level's hat_{l-1} @ link*_{l-1} is one torch.mm
    (cuBLAS SGEMM on CUDA, float32: allow_tf32 is False for matmul by default) into a second buffer,
    ``avsl_fused_blend`` turns it into hat_l in place (levels 0 < l < L-1) and ``avsl_fused_epilogue``
    blends, sums and writes the distances or folds them into each query's running top-k (gallery
    chunks in increasing order). Memory: two (pairs, R_max) float32 buffers per chunk + the output."""
    op = "avsl_topk" if k is not None else "avsl_distance"
    q, g, nlev = qe.shape[0], ge.shape[0], len(sizes)
    dev = qe.device
    if k is None:
        out = _ext.empty(op, "the output", (q, g), dtype=qe.dtype, device=dev)
        values = indices = None
    else:
        out = None
        values = _ext.empty(op, "values", (q, k), dtype=qe.dtype, device=dev)
        indices = _ext.empty(op, "indices", (q, k), dtype=torch.int64, device=dev)
    if q * g == 0:
        return out if k is None else (values, indices)
    nq, ng = chunk or _fused_chunk(q, g, sizes)
    ins = [_ext.buf(t) for t in (qe, ge, rq, rg, coef, bias)]
    rmax = max(sizes)
    bufs = [_ext.empty(op, "the cuBLAS path's chunk buffers", (nq * ng * rmax,), dtype=qe.dtype, device=dev)
            for _ in range(2 if nlev > 1 else 0)]
    mats, pos = [], 0
    for lv in range(1, nlev):
        rp, r = sizes[lv - 1], sizes[lv]
        mats.append(links[pos:pos + rp * r].view(rp, r))
        pos += rp * r
    sz, last = list(sizes), nlev - 1
    tail = ([_ext.buf(out), _ext.no_buf(), _ext.no_buf()] if k is None
            else [_ext.no_buf(), _ext.buf(values), _ext.buf(indices)])
    with _ext.device_guard(qe):
        stream = _ext.extra_arg(qe)
        for a in range(0, q, nq):
            cq = min(nq, q - a)
            for b in range(0, g, ng):  # increasing: the top-k epilogue's running lists rely on it
                cg = min(ng, g - b)
                pairs = cq * cg
                hat = _ext.no_buf()
                if nlev > 1:
                    x = bufs[0][:pairs * sizes[0]]
                    mod.avsl_fused_prologue(*ins, _ext.buf(x), q, g, sz, a, cq, b, cg, stream)
                    for lv in range(1, nlev):
                        y = bufs[lv % 2][:pairs * sizes[lv]]
                        torch.mm(x.view(pairs, sizes[lv - 1]), mats[lv - 1], out=y.view(pairs, sizes[lv]))
                        if lv < last:
                            mod.avsl_fused_blend(*ins, _ext.buf(y), q, g, sz, lv, float(gamma), a, cq, b, cg, stream)
                        x = y
                    hat = _ext.buf(x)
                mod.avsl_fused_epilogue(*ins, hat, *tail, q, g, sz, last, float(gamma), a, cq, b, cg,
                                        int(k or 0), bool(exclude_self), stream)
    return out if k is None else (values, indices)


def _fused_available(mod) -> bool:
    """Whether the cuBLAS path runs the fused kernels: the module has them and
    ``WHYMATCH_AVSL_CUBLAS_FUSED`` is not 0 (benchmarks/gpu_suite.sh measures both forms)."""
    import os

    return hasattr(mod, "avsl_fused_epilogue") and os.environ.get("WHYMATCH_AVSL_CUBLAS_FUSED", "1").strip() != "0"


def _cublas_launch(mod, qe, ge, rq, rg, links, coef, bias, sizes, gamma, k=None, exclude_self=False):
    """The cuBLAS path: fused kernels around torch.mm (see _fused_available), else torch ops."""
    if _fused_available(mod):
        return _fused_cublas(mod, qe, ge, rq, rg, links, coef, bias, sizes, gamma, k, exclude_self)
    if k is None:
        return cublas_distance(qe, ge, rq, rg, links, coef, bias, sizes, gamma)
    return cublas_topk(qe, ge, rq, rg, links, coef, bias, sizes, gamma, k, exclude_self)


def cublas_distance(qe, ge, rq, rg, links, coef, bias, sizes, gamma, *, chunk: int | None = None) -> Tensor:
    """The cuBLAS path on the packed form (module docstring) in torch ops only (the form of a module
    built before the fused kernels, and the spec of :func:`_fused_cublas`): (Q, G) distances,
    computed in query chunks whose hat (chunk x G, R_{l-1}) @ link*_{l-1} is one torch.matmul,
    prologue and epilogue as torch ops. Memory O(chunk x G x R_max), CUBLAS_CHUNK_BYTES by default."""
    q, g = qe.shape[0], ge.shape[0]
    step = chunk or _query_chunk(g, sizes)
    out = qe.new_empty(q, g)
    for a in range(0, q, step):
        b = min(q, a + step)
        out[a:b] = _packed_reference(qe[a:b], ge, rq[a:b], rg, links, coef, bias, sizes, gamma)
    return out


def cublas_topk(qe, ge, rq, rg, links, coef, bias, sizes, gamma, k, exclude_self=False, *,
                chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Each query's k best through :func:`cublas_distance` a query chunk at a time (ties: the lower
    index first, NaN last, as the kernels): memory O(chunk x G x R_max + Q k)."""
    q, g = qe.shape[0], ge.shape[0]
    step = chunk or _query_chunk(g, sizes)
    values, indices = qe.new_empty(q, k), torch.empty(q, k, dtype=torch.int64, device=qe.device)
    for a in range(0, q, step):
        b = min(q, a + step)
        d = _packed_reference(qe[a:b], ge, rq[a:b], rg, links, coef, bias, sizes, gamma)
        # order: ascending, stable (the lower index first); then a second stable sort on the class
        # 0 = a number (inf included), 1 = NaN, 2 = the query itself (exclude_self): NaN last, self never
        cls = torch.isnan(d).to(torch.int8)
        if exclude_self:
            rows = torch.arange(a, b, device=d.device)
            cls[rows - a, rows] = 2
        key = torch.where(cls > 0, torch.full_like(d, float("inf")), d)
        order = torch.sort(key, dim=1, stable=True).indices
        order = order.gather(1, torch.sort(cls.gather(1, order), dim=1, stable=True).indices)
        order = order[:, :k]
        values[a:b] = d.gather(1, order)
        indices[a:b] = order
    return values, indices


def _distance_kernel(mod, qe, ge, rq, rg, links, coef, bias, sizes, gamma, *, gpu: bool):
    """The CPU kernel (gpu False) and the CUDA kernels (gpu True: the path of gpu_path, the gallery
    transposed for the SIMT kernel)."""
    q, g = _check_packed("avsl_distance", qe, ge, rq, rg, links, coef, bias, sizes, gamma)
    _ext.check_size("avsl_distance", "the output", (q, g), qe.dtype, qe.device)
    path = _device_path(mod, qe, q, g, sizes, False, links) if gpu else "cpu"
    if path == "tensorcore":
        return _tc_launch(mod, qe, ge, rq, rg, links, coef, bias, sizes, gamma)
    if path == "cublas":
        return _cublas_launch(mod, qe, ge, rq, rg, links, coef, bias, sizes, gamma)
    out = _ext.empty("avsl_distance", "the output", (q, g), dtype=qe.dtype, device=qe.device)
    keep, ptrs = _launch_args(mod, qe, ge, rq, rg, links, coef, bias, sizes, gpu)
    with _ext.device_guard(qe):  # the workspace size depends on the device's shared-memory limit
        ws = _workspace(mod, WS_DISTANCE, q, g, sizes, 0, qe)
        mod.avsl_distance(*ptrs, _ext.buf(out), q, g, list(sizes), float(gamma), _ext.dtype_code(qe), _ext.buf(ws),
                          _ext.extra_arg(qe))
    return out


def _distance_fallback(qe, ge, rq, rg, links, coef, bias, sizes, gamma):
    q, g = _check_packed("avsl_distance", qe, ge, rq, rg, links, coef, bias, sizes, gamma)
    _ext.check_size("avsl_distance", "the output", (q, g), qe.dtype, qe.device)
    return _packed_reference(qe, ge, rq, rg, links, coef, bias, sizes, gamma).contiguous()


@torch.library.custom_op("whymatch::avsl_distance", mutates_args=())
def _avsl_distance(qe: Tensor, ge: Tensor, rq: Tensor, rg: Tensor, links: Tensor, coef: Tensor, bias: Tensor,
                   sizes: list[int], gamma: float) -> Tensor:
    _ext.no_kernel("avsl_distance", qe.device)
    return _distance_fallback(qe, ge, rq, rg, links, coef, bias, sizes, gamma)


@_avsl_distance.register_fake
def _(qe, ge, rq, rg, links, coef, bias, sizes, gamma):
    q, g = _check_packed("avsl_distance", qe, ge, rq, rg, links, coef, bias, sizes, gamma)
    _ext.check_size("avsl_distance", "the output", (q, g), qe.dtype, qe.device)
    return qe.new_empty(qe.shape[0], ge.shape[0])


_ext.register_kernels(_avsl_distance, "avsl_distance", cpu=functools.partial(_distance_kernel, gpu=False),
                      cuda=functools.partial(_distance_kernel, gpu=True), fallback=_distance_fallback)


def _check_backward(grad, qe, ge, rq, rg, links, coef, bias, sizes, gamma) -> tuple[int, int]:
    op = "avsl_distance_backward"
    q, g = _check_packed(op, qe, ge, rq, rg, links, coef, bias, sizes, gamma)
    V.op_tensor(op, "grad", grad, ndim=2, dtypes=V.FLOAT_DTYPES + (torch.float64,), device=qe.device, shape=(q, g),
                contiguous=False)
    V.maybe_finite(f"{op}: grad", grad)
    return q, g


def _backward_kernel(mod, grad, qe, ge, rq, rg, links, coef, bias, sizes, gamma, *, gpu: bool):
    """The CPU kernel (gpu False) and the CUDA one (gpu True: the gallery transposed)."""
    q, g = _check_backward(grad, qe, ge, rq, rg, links, coef, bias, sizes, gamma)
    grad = grad.to(qe.dtype).contiguous()
    grad_coef, grad_bias = torch.empty_like(coef), torch.empty_like(bias)
    keep, ptrs = _launch_args(mod, qe, ge, rq, rg, links, coef, bias, sizes, gpu)
    row_ptr, col_idx, row_values = _compressed(links, sizes, rows=True)
    with _ext.device_guard(qe):  # the workspace size depends on the device's shared-memory limit
        ws = _workspace(mod, WS_BACKWARD, q, g, sizes, 0, qe)
        mod.avsl_distance_backward(_ext.buf(grad), *ptrs, _ext.buf(row_ptr), _ext.buf(col_idx), _ext.buf(row_values),
                                   _ext.buf(grad_coef), _ext.buf(grad_bias), q, g, list(sizes), float(gamma),
                                   _ext.dtype_code(qe), _ext.buf(ws), _ext.extra_arg(qe))
    return grad_coef, grad_bias


def _backward_fallback(grad, qe, ge, rq, rg, links, coef, bias, sizes, gamma):
    _check_backward(grad, qe, ge, rq, rg, links, coef, bias, sizes, gamma)
    return _packed_reference_backward(grad, qe, ge, rq, rg, links, coef, bias, sizes, gamma)


@torch.library.custom_op("whymatch::avsl_distance_backward", mutates_args=())
def _avsl_distance_backward(grad: Tensor, qe: Tensor, ge: Tensor, rq: Tensor, rg: Tensor, links: Tensor,
                            coef: Tensor, bias: Tensor, sizes: list[int], gamma: float) -> tuple[Tensor, Tensor]:
    """(dL/dcoef, dL/dbias), (S1,) each, of L = sum(grad * d); nodes, reliabilities and links are constants."""
    _ext.no_kernel("avsl_distance_backward", qe.device)
    return _backward_fallback(grad, qe, ge, rq, rg, links, coef, bias, sizes, gamma)


@_avsl_distance_backward.register_fake
def _(grad, qe, ge, rq, rg, links, coef, bias, sizes, gamma):
    q, g = _check_packed("avsl_distance_backward", qe, ge, rq, rg, links, coef, bias, sizes, gamma)
    V.op_tensor("avsl_distance_backward", "grad", grad, ndim=2, dtypes=V.FLOAT_DTYPES + (torch.float64,),
                device=qe.device, shape=(q, g), contiguous=False)
    return torch.empty_like(coef), torch.empty_like(bias)


_ext.register_kernels(_avsl_distance_backward, "avsl_distance_backward",
                      cpu=functools.partial(_backward_kernel, gpu=False),
                      cuda=functools.partial(_backward_kernel, gpu=True), fallback=_backward_fallback)


def _check_topk(qe, ge, rq, rg, links, coef, bias, sizes, gamma, k, exclude_self) -> tuple[int, int]:
    op = "avsl_topk"
    q, g = _check_packed(op, qe, ge, rq, rg, links, coef, bias, sizes, gamma)
    cand = g - (1 if exclude_self else 0)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cand:
        raise ValueError(f"{op}: k must be an int in [1, {cand}] (the gallery candidates per query), got {k!r}")
    if exclude_self and q != g:
        raise ValueError(f"{op}: exclude_self needs the gallery to be the query set (Q == G), got Q={q}, G={g}")
    return q, g


def _topk_kernel(mod, qe, ge, rq, rg, links, coef, bias, sizes, gamma, k, exclude_self, *, gpu: bool):
    """The CPU kernel (gpu False) and the CUDA kernels (gpu True: the path of gpu_path, the gallery
    transposed for the SIMT kernel)."""
    q, g = _check_topk(qe, ge, rq, rg, links, coef, bias, sizes, gamma, k, exclude_self)
    path = _device_path(mod, qe, q, g, sizes, True, links) if gpu else "cpu"
    if path == "tensorcore":
        return _tc_launch(mod, qe, ge, rq, rg, links, coef, bias, sizes, gamma, k=k, exclude_self=exclude_self)
    if path == "cublas":
        return _cublas_launch(mod, qe, ge, rq, rg, links, coef, bias, sizes, gamma, k, exclude_self)
    values = _ext.empty("avsl_topk", "values", (q, k), dtype=qe.dtype, device=qe.device)
    indices = _ext.empty("avsl_topk", "indices", (q, k), dtype=torch.int64, device=qe.device)
    keep, ptrs = _launch_args(mod, qe, ge, rq, rg, links, coef, bias, sizes, gpu)
    with _ext.device_guard(qe):  # the workspace size depends on the device's shared-memory limit
        ws = _workspace(mod, WS_TOPK, q, g, sizes, k, qe)
        mod.avsl_topk(*ptrs, _ext.buf(values), _ext.buf(indices), q, g, list(sizes), float(gamma), int(k),
                      bool(exclude_self), _ext.dtype_code(qe), _ext.buf(ws), _ext.extra_arg(qe))
    return values, indices


def _topk_fallback(qe, ge, rq, rg, links, coef, bias, sizes, gamma, k, exclude_self):
    _check_topk(qe, ge, rq, rg, links, coef, bias, sizes, gamma, k, exclude_self)
    d = _packed_reference(qe, ge, rq, rg, links, coef, bias, sizes, gamma)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return d.gather(1, order).contiguous(), order.contiguous()


@torch.library.custom_op("whymatch::avsl_topk", mutates_args=())
def _avsl_topk(qe: Tensor, ge: Tensor, rq: Tensor, rg: Tensor, links: Tensor, coef: Tensor, bias: Tensor,
               sizes: list[int], gamma: float, k: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
    _ext.no_kernel("avsl_topk", qe.device)
    return _topk_fallback(qe, ge, rq, rg, links, coef, bias, sizes, gamma, k, exclude_self)


@_avsl_topk.register_fake
def _(qe, ge, rq, rg, links, coef, bias, sizes, gamma, k, exclude_self):
    _check_topk(qe, ge, rq, rg, links, coef, bias, sizes, gamma, k, exclude_self)
    return qe.new_empty(qe.shape[0], k), qe.new_empty(qe.shape[0], k, dtype=torch.int64)


_ext.register_kernels(_avsl_topk, "avsl_topk", cpu=functools.partial(_topk_kernel, gpu=False),
                      cuda=functools.partial(_topk_kernel, gpu=True), fallback=_topk_fallback)


def _setup_context(ctx, inputs, output):
    qe, ge, rq, rg, links, coef, bias, sizes, gamma = inputs
    ctx.save_for_backward(qe, ge, rq, rg, links, coef, bias)
    ctx.sizes, ctx.gamma = list(sizes), float(gamma)


def _backward(ctx, grad):
    qe, ge, rq, rg, links, coef, bias = ctx.saved_tensors
    need_coef, need_bias = ctx.needs_input_grad[5], ctx.needs_input_grad[6]
    if not (need_coef or need_bias):
        return (None,) * 9
    gc, gb = torch.ops.whymatch.avsl_distance_backward(grad, qe, ge, rq, rg, links, coef, bias, ctx.sizes, ctx.gamma)
    return None, None, None, None, None, (gc if need_coef else None), (gb if need_bias else None), None, None


torch.library.register_autograd("whymatch::avsl_distance", _backward, setup_context=_setup_context)
_ext.refuse_double_backward("whymatch::avsl_distance_backward", "whymatch::avsl_distance")


def _pack(queries, galleries, rel_q, rel_g, links, coef, bias):
    """The packed, contiguous form of validated arguments (see the module docstring)."""
    wide = any(t.dtype == torch.float64 for t in list(coef[1:]) + list(bias[1:]))
    acc = torch.float64 if wide else torch.float32
    dev = queries[0].device
    sizes = [int(q.shape[1]) for q in queries]
    # everything in the compute dtype: float64 mode is float64 throughout (no float32 rounding)
    qe = torch.cat([F.normalize(q.to(acc), dim=1) for q in queries], dim=1).contiguous()
    ge = torch.cat([F.normalize(g.to(acc), dim=1) for g in galleries], dim=1).contiguous()
    if len(sizes) > 1:
        rq = torch.cat([r.to(acc) for r in rel_q[1:]], dim=1).contiguous()
        rg = torch.cat([r.to(acc) for r in rel_g[1:]], dim=1).contiguous()
        lk = torch.cat([x.to(acc).reshape(-1) for x in links]).contiguous()
        cf = torch.cat([c.to(acc) for c in coef[1:]]).contiguous()
        bs = torch.cat([b.to(acc) for b in bias[1:]]).contiguous()
    else:
        rq = torch.zeros(qe.shape[0], 0, dtype=acc, device=dev)
        rg = torch.zeros(ge.shape[0], 0, dtype=acc, device=dev)
        lk = cf = bs = torch.zeros(0, dtype=acc, device=dev)
    return qe, ge, rq, rg, lk, cf, bs, sizes


def avsl_distance(queries: list[Tensor], galleries: list[Tensor], rel_q: list[Tensor], rel_g: list[Tensor],
                  links: list[Tensor], coef: list[Tensor], bias: list[Tensor], gamma: float = 10.0) -> Tensor:
    """Overall AVSL distance of every (query, gallery) pair, (Q, G); see
    :func:`whymatch.ops.reference.avsl_distance` (AVSL Eq. 9-11).

    A fused kernel: memory O(Q G + inputs), never Q x G x R. float32, or float64 when a coef or
    bias of a level >= 1 is float64 (for gradcheck). Differentiable in coef and bias of levels
    >= 1 only: nodes, reliabilities and links are constants, as in the published code.
    """
    _check_levels(queries, galleries, rel_q, rel_g, links, coef, bias)
    gamma = V.real("gamma", gamma)
    if len(queries) > _MAX_LEVELS:
        return ref.avsl_distance(queries, galleries, rel_q, rel_g, links, coef, bias, gamma)
    qe, ge, rq, rg, lk, cf, bs, sizes = _pack(queries, galleries, rel_q, rel_g, links, coef, bias)
    return torch.ops.whymatch.avsl_distance(qe, ge, rq, rg, lk, cf, bs, sizes, gamma)


def avsl_topk(queries: list[Tensor], galleries: list[Tensor], rel_q: list[Tensor], rel_g: list[Tensor],
              links: list[Tensor], coef: list[Tensor], bias: list[Tensor], gamma: float, k: int, *,
              exclude_self: bool = False) -> tuple[Tensor, Tensor]:
    """Each query's k nearest gallery items by the AVSL distance: ((Q, k) float32, (Q, k) int64).

    Distances ascending, ties broken by the lower gallery index; ``exclude_self`` (Q == G) skips
    item i for query i. A fused kernel keeps a bounded list per query while scanning the gallery:
    memory O(Q k), never Q x G. Not differentiable (the values are detached).
    """
    _check_levels(queries, galleries, rel_q, rel_g, links, coef, bias)
    V.real("gamma", gamma)
    V.positive_int("k", k)
    g = galleries[0].shape[0] - (1 if exclude_self else 0)
    if k > g:
        raise ValueError(f"k must be <= the number of gallery candidates per query ({g}), got {k}")
    if exclude_self and queries[0].shape[0] != galleries[0].shape[0]:
        raise ValueError("exclude_self needs the gallery to be the query set (Q == G), got "
                         f"Q={queries[0].shape[0]}, G={galleries[0].shape[0]}")
    gamma = float(gamma)
    if len(queries) > _MAX_LEVELS:
        return ref.avsl_topk(queries, galleries, rel_q, rel_g, links, coef, bias, gamma, k, exclude_self)
    with torch.no_grad():
        qe, ge, rq, rg, lk, cf, bs, sizes = _pack(queries, galleries, rel_q, rel_g, links, coef, bias)
    return torch.ops.whymatch.avsl_topk(qe, ge, rq, rg, lk, cf.detach(), bs.detach(), sizes, gamma, int(k),
                                        bool(exclude_self))
