"""The CUDA kernels (csrc/*/*_cuda.cu), compiled for the host by tests/cuda_emulation/ and run on
CPU tensors through the registered ops (``_ext.emulate_cuda_on_cpu``: the ops build the CUDA
kernels' arguments, workspaces and layouts exactly as for a CUDA tensor), against
``ops/reference.py``. Every case runs under two thread schedules (forward and reverse, some also
random) and the outputs must agree bit for bit: a race between the threads of a block shows as a
schedule-dependent result. Shared memory (static and dynamic) is poisoned with NaN bytes before
every block, so a read before a write shows too.

    python -m pytest -m emulated          # builds the emulated module first (cached by content)
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import pytest
import torch

from whymatch.ops import _ext
from whymatch.ops import avsl as A
from whymatch.ops import mining as M
from whymatch.ops import perturb as P
from whymatch.ops import reference as ref

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_emulation import build as emu_build  # noqa: E402
from helpers import bits, emu_stats, emulated_marks, emulated_module_path  # noqa: E402

pytestmark = emulated_marks()

SCHEDULES = ("forward", "reverse")


@pytest.fixture(scope="session")
def emu_so():
    return emulated_module_path()


@pytest.fixture(scope="session")
def emu(emu_so):
    return emu_build.load(emu_so)






def run(mod, fn, schedules=SCHEDULES, expect_kernels=True):
    """fn() under each schedule through the emulated module; asserts that the outputs (a tensor or a
    tuple of tensors) agree bit for bit and that kernels ran; returns the first schedule's output."""
    outs, single = [], False
    old = os.environ.get("WHYMATCH_EMU_SCHEDULE")
    try:
        for sch in schedules:
            os.environ["WHYMATCH_EMU_SCHEDULE"] = sch
            before = emu_stats(mod)[0]
            with _ext.emulate_cuda_on_cpu(mod):
                out = fn()
            single = isinstance(out, torch.Tensor)
            outs.append((out,) if single else tuple(out))
            outs[-1] = tuple(o for o in outs[-1] if o is not None)
            launched = emu_stats(mod)[0] - before
            if expect_kernels and any(o.numel() for o in outs[-1]):
                assert launched > 0, "no kernel ran in the emulation"
    finally:
        if old is None:
            os.environ.pop("WHYMATCH_EMU_SCHEDULE", None)
        else:
            os.environ["WHYMATCH_EMU_SCHEDULE"] = old
    for sch, o in zip(schedules[1:], outs[1:]):
        for a, b in zip(outs[0], o):
            assert a.shape == b.shape and torch.equal(bits(a), bits(b)), \
                f"schedule {schedules[0]} and {sch} disagree: a race between the threads of a block"
    return outs[0][0] if single else outs[0]


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def close(got, want, dtype, scale=1.0):
    want = want.to(got.dtype) if want.dtype != got.dtype else want
    torch.testing.assert_close(got.double(), want.double(), atol=TOL[dtype] * scale, rtol=TOL[dtype] * scale)


# ------------------------------------------------------------------------------ perturb
def _rise_inputs(n, c, h, w, s, gen):
    grids = (torch.rand(n, s, s, generator=gen) < 0.5).float()
    cell_h, cell_w, _, _ = ref.rise_grid_geometry((h, w), s)
    shifts = torch.stack([torch.randint(0, max(cell_h, 1), (n,), generator=gen),
                          torch.randint(0, max(cell_w, 1), (n,), generator=gen)], 1)
    return grids, shifts, torch.rand(c, h, w, generator=gen), torch.rand(c, h, w, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(5, 3, 23, 19, 4), (2, 1, 7, 40, 7), (0, 3, 8, 8, 2), (3, 3, 0, 5, 2)])
def test_rise_apply(emu, gen, dtype, channels_last, shape):
    grids, shifts, image, base = _rise_inputs(*shape, gen)
    got = run(emu, lambda: P.rise_apply(grids, shifts, image, base, dtype=dtype, channels_last=channels_last))
    want = ref.rise_apply(grids, shifts, image, base, dtype, channels_last)
    assert got.shape == want.shape and got.dtype == dtype
    if channels_last and got.numel():
        assert got.is_contiguous(memory_format=torch.channels_last)
    close(got, want, dtype)


def test_rise_apply_out(emu, gen):
    grids, shifts, image, base = _rise_inputs(4, 3, 17, 13, 3, gen)
    out = torch.full((4, 3, 17, 13), float("nan"), dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    run(emu, lambda: P.rise_apply(grids, shifts, image, base, channels_last=True, out=out))
    close(out, ref.rise_apply(grids, shifts, image, base, torch.bfloat16, True), torch.bfloat16)


@pytest.mark.parametrize("n,k,h,w,s", [(6, 11, 23, 19, 4), (3, 1, 9, 31, 5), (0, 2, 5, 5, 2), (4, 3, 0, 6, 2)])
def test_rise_saliency(emu, gen, n, k, h, w, s):
    grids, shifts, _, _ = _rise_inputs(n, 1, h, w, s, gen)
    scores = torch.randn(n, k, generator=gen)
    got = run(emu, lambda: P.rise_saliency(grids, shifts, scores, (h, w)), expect_kernels=n > 0)
    close(got, ref.rise_saliency(grids, shifts, scores, (h, w)), torch.float32, scale=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,c,h,w", [(2, 3, 11, 7), (1, 1, 1, 300), (0, 3, 4, 4)])
def test_ranked_blend(emu, gen, dtype, b, c, h, w):
    first, second = torch.rand(b, c, h, w, generator=gen).to(dtype), torch.rand(b, c, h, w, generator=gen).to(dtype)
    rank = torch.stack([torch.randperm(h * w, generator=gen) for _ in range(b)]) if b else torch.zeros(0, h * w).long()
    counts = torch.tensor([0, 1, h * w // 2, h * w])
    got = run(emu, lambda: P.ranked_blend(first, second, rank, counts))
    assert torch.equal(got, ref.ranked_blend(first, second, rank, counts))


# ------------------------------------------------------------------------------ mining
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("x_shape,att", [((3, 3, 29, 31), (5, 7)), ((2, 2, 6, 5), (9, 11)), ((0, 3, 4, 4), (2, 2))])
def test_soft_mask_forward_backward(emu, gen, dtype, channels_last, x_shape, att):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(*x_shape, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a = torch.rand(x_shape[0], *att, generator=gen, dtype=acc)
    alpha, beta = torch.tensor(7.0, dtype=acc), torch.tensor(0.4, dtype=acc)
    g = torch.randn(*x_shape, generator=gen).to(dtype)

    def fwd_bwd(fn):
        xs, as_, al, be = (t.clone().requires_grad_(True) for t in (x, a, alpha, beta))
        out = fn(xs, as_, al, be)
        if out.numel() == 0:
            return (out.detach(),)
        out.backward(g)
        return out.detach(), xs.grad, as_.grad, al.grad, be.grad

    got = run(emu, lambda: fwd_bwd(M.soft_mask))
    want = fwd_bwd(ref.soft_mask)
    close(got[0], want[0], dtype, scale=2)
    if len(got) > 1:
        close(got[1], want[1], dtype, scale=2)
        n = x[0].numel() if x.numel() else 1
        for gg, ww in zip(got[2:], want[2:]):  # sums over pixels: error grows with their number
            close(gg, ww.to(gg.dtype), acc if dtype != torch.float64 else dtype, scale=(50 if dtype in (torch.float16, torch.bfloat16) else 1) * n ** 0.5)


# ------------------------------------------------------------------------------ AVSL
def _avsl_inputs(sizes, q, g, gen, dtype=torch.float32, topk=4):
    qs = [torch.randn(q, r, generator=gen) for r in sizes]
    gs = [torch.randn(g, r, generator=gen) for r in sizes]
    rq = [torch.rand(q, r, generator=gen) for r in sizes]
    rg = [torch.rand(g, r, generator=gen) for r in sizes]
    links = [ref.avsl_link_star(torch.randn(a, b, generator=gen), topk) for a, b in zip(sizes[:-1], sizes[1:])]
    coef = [(1 + 0.1 * torch.randn(r, generator=gen)).to(dtype) for r in sizes]
    bias = [(0.1 * torch.randn(r, generator=gen)).to(dtype) for r in sizes]
    return qs, gs, rq, rg, links, coef, bias


AVSL_CASES = [([16, 12, 8], 5, 37), ([40, 24], 1, 70), ([8, 8, 8, 8], 3, 1), ([256, 64], 3, 70)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes,q,g", AVSL_CASES)
def test_avsl_distance_and_backward(emu, gen, dtype, sizes, q, g):
    qs, gs, rq, rg, links, coef, bias = _avsl_inputs(sizes, q, g, gen, dtype)
    grad = torch.randn(q, g, generator=gen, dtype=dtype)

    def fwd_bwd(fn):
        cf = [c.clone().requires_grad_(True) for c in coef]
        bs = [b.clone().requires_grad_(True) for b in bias]
        d = fn(qs, gs, rq, rg, links, cf, bs, 10.0)
        d.backward(grad)
        return (d.detach(), *[c.grad if c.grad is not None else torch.zeros_like(c) for c in cf[1:]],
                *[b.grad if b.grad is not None else torch.zeros_like(b) for b in bs[1:]])

    got = run(emu, lambda: fwd_bwd(A.avsl_distance))
    want = fwd_bwd(ref.avsl_distance)
    close(got[0], want[0], dtype, scale=5 * sum(sizes) ** 0.5)
    for gg, ww in zip(got[1:], want[1:]):
        close(gg, ww, dtype, scale=20 * (q * g) ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes,q,g,k,exclude_self", [([16, 12, 8], 5, 37, 6, False), ([12, 8], 9, 9, 3, True),
                                                      ([24, 16], 1, 2000, 9, False), ([8, 4], 2, 5, 5, False)])
def test_avsl_topk(emu, gen, dtype, sizes, q, g, k, exclude_self):
    # (Q = 1, G = 2000): 63 tiles of 32 gallery items, each its own segment: a merge of 63 lists
    if exclude_self:
        q = g
    qs, gs, rq, rg, links, coef, bias = _avsl_inputs(sizes, q, g, gen, dtype)
    if exclude_self:
        qs, rq = gs, rg
    vals, idx = run(emu, lambda: A.avsl_topk(qs, gs, rq, rg, links, coef, bias, 10.0, k, exclude_self=exclude_self),
                    schedules=("forward", "reverse", "random:7"))
    d = ref.avsl_distance(qs, gs, rq, rg, links, coef, bias, 10.0)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    # the k smallest of the reference's distances, and the indices the kernel returns point at them
    want = torch.sort(d, dim=1, stable=True).values[:, :k]
    close(vals, want, dtype, scale=5 * sum(sizes) ** 0.5)
    close(d.gather(1, idx), vals, dtype, scale=5 * sum(sizes) ** 0.5)
    assert (idx >= 0).all() and all(len(set(r.tolist())) == k for r in idx)
    if exclude_self:
        assert not (idx == torch.arange(q)[:, None]).any()


# Where the hats of a tile live: WHYMATCH_AVSL_CUDA_SMEM is read once per process, so each setting
# gets its own instance of the emulated module (a copy of the file).
@pytest.mark.parametrize("smem,where", [("2048", "global"), ("200000", "shared above 48 KiB (opt-in)")])
def test_avsl_hats_placement(emu_so, tmp_path, gen, smem, where, monkeypatch):
    mod = emu_build.load(emu_so, copy_to=tmp_path / f"smem{smem}")
    monkeypatch.setenv("WHYMATCH_AVSL_CUDA_SMEM", smem)
    sizes, q, g = [256, 64], 3, 70
    qs, gs, rq, rg, links, coef, bias = _avsl_inputs(sizes, q, g, gen)
    ws_fwd = None
    with _ext.emulate_cuda_on_cpu(mod):
        ws_fwd = int(mod.avsl_workspace_bytes(0, q, g, sizes, 0, 0))
    ctypes.CDLL(mod.__emulation_path__).wm_emu_reset_stats()
    d = run(mod, lambda: A.avsl_distance(qs, gs, rq, rg, links, coef, bias, 10.0))
    vals, idx = run(mod, lambda: A.avsl_topk(qs, gs, rq, rg, links, coef, bias, 10.0, 7))
    max_dyn = emu_stats(mod)[2]
    if where == "global":
        assert ws_fwd > 0 and max_dyn <= 2048  # hats in the workspace
    else:
        assert ws_fwd == 0 and max_dyn > 48 * 1024  # the launch needed the opt-in
    want = ref.avsl_distance(qs, gs, rq, rg, links, coef, bias, 10.0)
    close(d, want, torch.float32, scale=100)
    close(vals, torch.sort(want, dim=1).values[:, :7], torch.float32, scale=100)


def test_avsl_default_hats_in_shared_memory(emu, gen):
    sizes, q, g = [64, 32], 2, 40
    with _ext.emulate_cuda_on_cpu(emu):
        assert int(emu.avsl_workspace_bytes(0, q, g, sizes, 0, 0)) == 0  # no global hats
    ctypes.CDLL(emu.__emulation_path__).wm_emu_reset_stats()
    qs, gs, rq, rg, links, coef, bias = _avsl_inputs(sizes, q, g, gen)
    d = run(emu, lambda: A.avsl_distance(qs, gs, rq, rg, links, coef, bias, 10.0))
    assert 0 < emu_stats(emu)[2] <= 48 * 1024
    close(d, ref.avsl_distance(qs, gs, rq, rg, links, coef, bias, 10.0), torch.float32, scale=50)


# ------------------------------------------------------------------------------ AVSL CAM
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,r1,hw1,r2,hw2", [(3, 70, (9, 9), 33, (4, 5)), (1, 5, (3, 3), 64, (3, 3)),
                                             (2, 130, (7, 6), 1, (2, 2))])
@pytest.mark.parametrize("published", [False, True])
def test_cam_statistics_and_edges(emu, gen, dtype, b, r1, hw1, r2, hw2, published):
    low, high = torch.rand(b, r1, *hw1, generator=gen, dtype=dtype), torch.rand(b, r2, *hw2, generator=gen, dtype=dtype)
    edges0 = torch.rand(r1, r2, generator=gen)

    def go():
        corr, rl, rh = torch.ops.whymatch.avsl_cam_correlation(low, high, True, published)
        e = edges0.clone()
        A.cam_statistics(low.float(), high.float(), edges=e, momentum=0.3, published=published)
        rel = torch.ops.whymatch.avsl_cam_reliability(low, published)
        return corr, rl, rh, e, rel

    corr, rl, rh, e, rel = run(emu, go)
    tol = torch.float32  # the reference computes in float32
    close(corr, ref.avsl_cam_correlation(low, high), tol, scale=50)
    close(rl, ref.avsl_cam_reliability(low, published), tol, scale=50)
    close(rh, ref.avsl_cam_reliability(high, published), tol, scale=50)
    close(rel, ref.avsl_cam_reliability(low, published), tol, scale=50)
    close(e, 0.3 * edges0 + 0.7 * ref.avsl_cam_correlation(low.float(), high.float()), torch.float32, scale=50)
