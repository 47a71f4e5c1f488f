"""One benchmark case per compiled op: the fused whymatch op and its plain-PyTorch baseline on the
same inputs, at a realistic CPU size. Shared by contention_cpu.py and the pytest-benchmark files
(benchmarks/test_*.py), so both time the same thing.

A case is built by ``make(name, scale)``; ``scale`` < 1 shrinks the batch-like dimension for a quick
run. ``Case.fused()`` and ``Case.torch()`` each do one call; ``Case.check()`` runs both once and
raises AssertionError when they disagree beyond ``tol`` (relative L2 error).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from whymatch import ops
from whymatch.ops import reference as ref

NAMES = ("rise_apply", "rise_saliency", "ranked_blend", "soft_mask", "soft_mask_backward", "avsl_distance",
         "avsl_topk", "cam_statistics")


@dataclass
class Case:
    name: str
    size: str
    fused: Callable[[], object]
    torch: Callable[[], object]
    compare: Callable[[object, object], float]
    tol: float = 1e-4
    extra: dict[str, Callable[[], object]] = field(default_factory=dict)  # other variants worth timing

    def check(self) -> float:
        err = self.compare(self.fused(), self.torch())
        if not (err <= self.tol):
            raise AssertionError(f"{self.name}: fused and torch disagree, relative error {err:.3g} > {self.tol:g}")
        return err


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    den = torch.linalg.vector_norm(b64).item()
    num = torch.linalg.vector_norm(a64 - b64).item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _n(base: int, scale: float) -> int:
    return max(1, int(round(base * scale)))


def rise_inputs(n: int, size: int = 224, s: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    grids = (torch.rand(n, s, s, generator=gen) < 0.5).float()
    cell, _, _, _ = ref.rise_grid_geometry((size, size), s)
    shifts = torch.randint(0, cell, (n, 2), generator=gen)
    image = torch.rand(3, size, size, generator=gen)
    return grids, shifts, image


def _rise_apply(scale: float) -> Case:
    n, size = _n(1000, scale), 224
    grids, shifts, image = rise_inputs(n, size)
    masks = ref.rise_masks(grids, shifts, (size, size))[:, None]  # precomputed (N, 1, H, W): the baseline's input
    out_f = torch.empty(n, 3, size, size)
    out_t = torch.empty(n, 3, size, size)
    return Case("rise_apply", f"N={n} masks, 3x{size}x{size}, s=7, output buffer reused",
                fused=lambda: ops.rise_apply(grids, shifts, image, 0.0, out=out_f),
                torch=lambda: torch.mul(masks, image, out=out_t),
                compare=rel_err, tol=1e-5)


def _rise_saliency(scale: float) -> Case:
    n, size, k = _n(4000, scale), 224, 3
    grids, shifts, _ = rise_inputs(n, size)
    scores = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    masks = ref.rise_masks(grids, shifts, (size, size)).view(n, -1)  # precomputed (N, H*W)
    return Case("rise_saliency", f"N={n} masks, K={k} references, {size}x{size}, s=7",
                fused=lambda: ops.rise_saliency(grids, shifts, scores, (size, size)),
                torch=lambda: (scores.t() @ masks).view(k, size, size),
                compare=rel_err, tol=1e-4,
                extra={"kernel_per_mask": lambda: torch.ops.whymatch.rise_saliency(grids, shifts, scores, size, size)})


def _ranked_blend(scale: float) -> Case:
    b, t, size = 4, _n(50, scale), 224
    gen = torch.Generator().manual_seed(2)
    first, second = torch.rand(b, 3, size, size, generator=gen), torch.rand(b, 3, size, size, generator=gen)
    rank = torch.stack([torch.randperm(size * size, generator=gen) for _ in range(b)])
    counts = torch.linspace(0, size * size, t).long()

    def baseline():
        keep = (rank[:, None, :] < counts[None, :, None]).view(b, t, 1, size, size)
        return torch.where(keep, first[:, None], second[:, None])

    return Case("ranked_blend", f"B={b} pairs, T={t} steps, 3x{size}x{size}",
                fused=lambda: ops.ranked_blend(first, second, rank, counts), torch=baseline, compare=rel_err, tol=0.0)


def _soft_mask_inputs(scale: float):
    b, size, m = _n(64, scale), 224, 7
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(b, 3, size, size, generator=gen)
    att = torch.rand(b, m, m, generator=gen)
    return b, size, m, x, att


def _soft_mask_torch(x, att, alpha, beta):
    up = F.interpolate(att[:, None], size=tuple(x.shape[2:]), mode="bilinear", align_corners=False)
    return x * (1 - torch.sigmoid(alpha * (up - beta)))


def _soft_mask(scale: float) -> Case:
    b, size, m, x, att = _soft_mask_inputs(scale)
    alpha, beta = torch.tensor(20.0), torch.tensor(0.5)
    return Case("soft_mask", f"B={b}, 3x{size}x{size} images, {m}x{m} maps, forward",
                fused=lambda: ops.soft_mask(x, att, alpha, beta), torch=lambda: _soft_mask_torch(x, att, alpha, beta),
                compare=rel_err, tol=1e-5)


def _soft_mask_backward(scale: float) -> Case:
    b, size, m, x, att = _soft_mask_inputs(scale)
    att = att.requires_grad_(True)
    alpha, beta = torch.tensor(20.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    g = torch.randn_like(x)

    def run(fn):
        def step():
            out = fn(x, att, alpha, beta)
            return torch.autograd.grad(out, (att, alpha, beta), g)
        return step

    def compare(a, b_):
        return max(rel_err(u, v) for u, v in zip(a, b_))

    return Case("soft_mask_backward", f"B={b}, 3x{size}x{size} images, {m}x{m} maps, forward + backward "
                "(gradients of the maps, alpha, beta)",
                fused=run(ops.soft_mask), torch=run(_soft_mask_torch), compare=compare, tol=1e-4)


def avsl_inputs(n: int, levels: int = 3, nodes: int = 512, link_k: int = 128, seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    emb = [torch.randn(n, nodes, generator=gen) for _ in range(levels)]
    rel = [torch.rand(n, nodes, generator=gen) for _ in range(levels)]
    links = [ref.avsl_link_star(torch.randn(nodes, nodes, generator=gen), link_k) for _ in range(levels - 1)]
    coef = [1 + 0.1 * torch.randn(nodes, generator=gen) for _ in range(levels)]
    bias = [0.1 * torch.randn(nodes, generator=gen) for _ in range(levels)]
    return emb, emb, rel, rel, links, coef, bias


def sliced_distance(queries, galleries, rel_q, rel_g, links, coef, bias, gamma, slice_size=20):
    """The published AVSL evaluation: query slices, (slice, G, R) node tensors per level, dense hat @ link*."""
    q, g = queries[0].shape[0], galleries[0].shape[0]
    a = [F.normalize(x, dim=1) for x in queries]
    b = [F.normalize(x, dim=1) for x in galleries]
    out = torch.empty(q, g)
    for s in range(0, q, slice_size):
        hat = None
        for lv in range(len(queries)):
            delta = (a[lv][s:s + slice_size, None, :] - b[lv][None, :, :]) ** 2
            if hat is None:
                hat = delta
                continue
            p = torch.sigmoid(gamma * (rel_q[lv][s:s + slice_size, None, :] * rel_g[lv][None] * coef[lv] + bias[lv]))
            hat = delta * p + torch.matmul(hat, links[lv - 1]) * (1 - p)
        out[s:s + slice_size] = hat.sum(dim=-1)
    return out


def _avsl_distance(scale: float) -> Case:
    n = _n(500, scale)
    args = avsl_inputs(n)
    return Case("avsl_distance", f"Q=G={n}, 3 levels of 512 nodes, link* k=128",
                fused=lambda: ops.avsl_distance(*args, gamma=10.0),
                torch=lambda: sliced_distance(*args, 10.0), compare=rel_err, tol=1e-4)


def _avsl_topk(scale: float) -> Case:
    n = max(3, _n(500, scale))
    k = min(10, n - 1)
    args = avsl_inputs(n)

    def compare(a, b_):  # the distances of the k nearest (indices may differ on ties)
        return rel_err(a[0], b_[0])

    def baseline():
        d = sliced_distance(*args, 10.0)
        d.fill_diagonal_(math.inf)
        return torch.topk(d, k, dim=1, largest=False)

    return Case("avsl_topk", f"Q=G={n}, 3 levels of 512 nodes, link* k=128, top-{k}, query excluded",
                fused=lambda: ops.avsl_topk(*args, 10.0, k, exclude_self=True), torch=baseline, compare=compare,
                tol=1e-4)


def _cam_reliability_torch(cam):
    x = cam - cam.amin(dim=-1, keepdim=True)  # the published code's FIXME: last axis only
    return F.normalize(x.flatten(2), p=1, dim=-1).std(dim=-1)


def _cam_statistics(scale: float) -> Case:
    b, nodes, low, high = _n(64, scale), 512, 14, 7
    gen = torch.Generator().manual_seed(5)
    c1 = torch.relu(torch.randn(b, nodes, low, low, generator=gen))
    c2 = torch.relu(torch.randn(b, nodes, high, high, generator=gen))
    e0 = torch.rand(nodes, nodes, generator=gen)
    ef, et = e0.clone(), e0.clone()

    def baseline():
        r1, r2 = _cam_reliability_torch(c1), _cam_reliability_torch(c2)
        lo = F.normalize(F.adaptive_avg_pool2d(c1, (high, high)).flatten(2), dim=-1)
        hi = F.normalize(c2.flatten(2), dim=-1)
        corr = torch.einsum("bmj,bnj->mn", lo, hi) / b
        et.mul_(0.5).add_(corr, alpha=0.5)
        return corr, r1, r2

    def compare(a, b_):
        return max(rel_err(u, v) for u, v in zip(a, b_))

    return Case("cam_statistics", f"B={b}, {nodes} nodes, {low}x{low} -> {high}x{high}: correlation, edge update, "
                "both levels' reliability (published)",
                fused=lambda: ops.cam_statistics(c1, c2, edges=ef, momentum=0.5, published=True),
                torch=baseline, compare=compare, tol=1e-4)


_MAKERS = {"rise_apply": _rise_apply, "rise_saliency": _rise_saliency, "ranked_blend": _ranked_blend,
           "soft_mask": _soft_mask, "soft_mask_backward": _soft_mask_backward, "avsl_distance": _avsl_distance,
           "avsl_topk": _avsl_topk, "cam_statistics": _cam_statistics}


def make(name: str, scale: float = 1.0) -> Case:
    if name not in _MAKERS:
        raise ValueError(f"name must be one of {', '.join(NAMES)}, got {name!r}")
    if not (scale > 0):
        raise ValueError(f"scale must be > 0, got {scale}")
    return _MAKERS[name](scale)
