"""The review findings of issue 14 (item 4), each with a test that fails on the kernels before the fix.

The runtime tests run the CUDA sources under host emulation (tests/cuda_emulation/, see
tests/test_emulated_kernels.py); the include check reads the sources. Findings and their tests:

* avsl_distance_cuda.cu cleared an unrelated pending CUDA error (its cudaGetLastError in the
  shared-memory limit, and every launch check took an earlier error for its own and cleared it):
  ``test_pending_error_is_reported_and_left_pending`` (every entry now checks for a pending error
  first and leaves it for its owner; WM_CUDA_CHECK takes back only the error it throws for).
  The per-device cache of the opt-in limit has no runtime test: the emulation has one device.
* the AVSL top-k merge walked k x nseg dependent reads in one thread per query; now one block per
  query: ``test_topk_merge_many_segments`` (Q = 1 over hundreds of segments, against the reference,
  bit for bit across schedules; the emulation does not time, so it checks the new merge's result).
* cam_correlation_cuda.cu wrote the workspace when R1 * R2 = 0:
  ``test_cam_correlation_empty_product_leaves_workspace``.
* std::min without <algorithm>: ``test_std_algorithms_have_their_include``.
"""
from __future__ import annotations

import ctypes
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from whymatch.ops import _ext
from whymatch.ops import avsl as A
from whymatch.ops import perturb as P
from whymatch.ops import reference as ref

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_emulation import build as emu_build  # noqa: E402
from helpers import emulated_marks, emulated_module_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = emulated_marks()


@pytest.fixture(scope="module")
def emu():
    return emu_build.load(emulated_module_path())


def _lib(mod):
    return ctypes.CDLL(mod.__emulation_path__)


def _under(mod, schedule, fn):
    old = os.environ.get("WHYMATCH_EMU_SCHEDULE")
    os.environ["WHYMATCH_EMU_SCHEDULE"] = schedule
    try:
        with _ext.emulate_cuda_on_cpu(mod):
            return fn()
    finally:
        if old is None:
            os.environ.pop("WHYMATCH_EMU_SCHEDULE", None)
        else:
            os.environ["WHYMATCH_EMU_SCHEDULE"] = old


# ------------------------------------------------------------------------------ pending errors
def test_pending_error_is_reported_and_left_pending(emu):
    lib = _lib(emu)
    gen = torch.Generator().manual_seed(0)
    grids = (torch.rand(2, 3, 3, generator=gen) > 0.5).float()
    shifts = torch.zeros(2, 2, dtype=torch.int64)
    image, base = torch.rand(3, 8, 8, generator=gen), torch.zeros(3, 8, 8)
    invalid_value = 1  # cudaErrorInvalidValue: another library's failed call, not yet taken
    assert lib.wm_emu_peek_last_error() == 0
    lib.wm_emu_set_last_error(invalid_value)
    try:
        with pytest.raises(RuntimeError, match="already pending"):
            _under(emu, "forward", lambda: P.rise_apply(grids, shifts, image, base))
        assert lib.wm_emu_peek_last_error() == invalid_value, "the op cleared an error that was not its own"
    finally:
        lib.wm_emu_set_last_error(0)
    # with nothing pending, the same call runs, and leaves nothing pending
    out = _under(emu, "forward", lambda: P.rise_apply(grids, shifts, image, base))
    assert lib.wm_emu_peek_last_error() == 0
    torch.testing.assert_close(out, ref.rise_apply(grids, shifts, image, base, torch.float32, False), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ top-k merge
def test_topk_merge_many_segments(emu):
    # Q = 1: the gallery is split into min(2048, tiles) segments of 32 items; G = 32 * 2048 + 5 gives
    # 2048 sorted lists (the review's case), 16 per thread of the merge block
    gen = torch.Generator().manual_seed(1)
    sizes, q, g, k = [4, 4], 1, 32 * 2048 + 5, 40
    qs = [torch.randn(q, r, generator=gen) for r in sizes]
    gs = [torch.randn(g, r, generator=gen) for r in sizes]
    rq = [torch.rand(q, r, generator=gen) for r in sizes]
    rg = [torch.rand(g, r, generator=gen) for r in sizes]
    links = [ref.avsl_link_star(torch.randn(a, b, generator=gen), 2) for a, b in zip(sizes[:-1], sizes[1:])]
    coef = [1 + 0.1 * torch.randn(r, generator=gen) for r in sizes]
    bias = [0.1 * torch.randn(r, generator=gen) for r in sizes]
    # ties on purpose: equal gallery items at far-apart indices (different segments) must come out
    # in index order
    for t in gs + rg:
        t[g - 1] = t[3]
        t[g // 2] = t[3]
    call = lambda: A.avsl_topk(qs, gs, rq, rg, links, coef, bias, 10.0, k)  # noqa: E731
    outs = [_under(emu, s, call) for s in ("forward", "reverse")]
    for v, i in outs[1:]:
        assert torch.equal(v.view(torch.int32), outs[0][0].view(torch.int32)) and torch.equal(i, outs[0][1])
    vals, idx = outs[0]
    d = ref.avsl_distance(qs, gs, rq, rg, links, coef, bias, 10.0)
    torch.testing.assert_close(d.gather(1, idx), vals, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vals, torch.sort(d, dim=1, stable=True).values[:, :k], rtol=1e-5, atol=1e-5)
    assert (vals[:, 1:] >= vals[:, :-1]).all()
    assert len(set(idx[0].tolist())) == k and (idx >= 0).all()
    tied = [j for j in idx[0].tolist() if j in (3, g // 2, g - 1)]
    assert tied == sorted(tied)


# ------------------------------------------------------------------------------ CAM, R1 * R2 = 0
@pytest.mark.parametrize("empty", ["low", "high"])
def test_cam_correlation_empty_product_leaves_workspace(emu, empty):
    """R1 * R2 = 0: no correlation to compute, so the workspace must stay untouched (a direct C++
    caller may pass none); the reliability of the non-empty level is still computed."""
    gen = torch.Generator().manual_seed(2)
    b, (r1, r2) = 3, ((0, 6) if empty == "low" else (5, 0))
    h1 = w1 = 6
    h2 = w2 = 3
    low, high = torch.rand(b, r1, h1, w1, generator=gen), torch.rand(b, r2, h2, w2, generator=gen)
    rel_low, rel_high = torch.full((b, r1), -1.0), torch.full((b, r2), -1.0)
    nbytes = int(emu.avsl_cam_workspace_bytes(b, r1, r2, h2, w2, _ext.dtype_code(low)))
    assert nbytes > 0  # the bindings ask for one, sized for the non-empty level
    ws = torch.full((nbytes,), 0xA5, dtype=torch.uint8)
    null = (0, 0)
    emu.avsl_cam_correlation(_ext.buf(low), _ext.buf(high), null, null, _ext.buf(rel_low), _ext.buf(rel_high),
                             _ext.buf(ws), b, r1, h1, w1, r2, h2, w2, 0.5, True, False, _ext.dtype_code(low), 0)
    assert (ws == 0xA5).all(), "the kernel wrote the workspace although there is no product"
    if r1:
        torch.testing.assert_close(rel_low, ref.avsl_cam_reliability(low, False), rtol=1e-5, atol=1e-6)
    if r2:
        torch.testing.assert_close(rel_high, ref.avsl_cam_reliability(high, False), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ includes
def test_std_algorithms_have_their_include():
    """A CUDA source that calls std::min / std::max includes <algorithm> itself (nvcc's headers
    happen to pull it in today; another toolkit or the host emulation's g++ need not)."""
    use = re.compile(r"\bstd::(min|max|sort|fill|copy)\b")
    missing = []
    for f in sorted((ROOT / "csrc").rglob("*_cuda.cu")) + [ROOT / "csrc" / "common" / "cuda_utils.cuh"]:
        text = f.read_text()
        code = "\n".join(line.split("//", 1)[0] for line in text.splitlines())
        if use.search(code) and "#include <algorithm>" not in text:
            missing.append(str(f.relative_to(ROOT)))
    assert not missing, f"uses std algorithms without #include <algorithm>: {missing}"


# ------------------------------------------------------------------------------ performance changes
# (issue 14 item 5) checked for their result: the AVSL forward's last-level sum (per-slot partial
# sums, shuffles over the slots of a warp, the warps in a fixed order) for every pair-group size P,
# which R_max and the dtype pick (P * R_max hats in at most 48 KiB of shared memory).
@pytest.mark.parametrize("sizes,dtype,p", [([1000, 600], torch.float32, 4), ([1500, 700], torch.float32, 2),
                                           ([1500, 300], torch.float64, 1), ([64, 40], torch.float64, 32)])
def test_avsl_forward_last_level_sum_every_pair_group(emu, sizes, dtype, p):
    gen = torch.Generator().manual_seed(3)
    q, g = 2, 37
    qs = [torch.randn(q, r, generator=gen, dtype=dtype) for r in sizes]
    gs = [torch.randn(g, r, generator=gen, dtype=dtype) for r in sizes]
    rq = [torch.rand(q, r, generator=gen, dtype=dtype) for r in sizes]
    rg = [torch.rand(g, r, generator=gen, dtype=dtype) for r in sizes]
    links = [ref.avsl_link_star(torch.randn(a, b, generator=gen, dtype=dtype), 3) for a, b in zip(sizes[:-1], sizes[1:])]
    coef = [1 + 0.1 * torch.randn(r, generator=gen, dtype=dtype) for r in sizes]
    bias = [0.1 * torch.randn(r, generator=gen, dtype=dtype) for r in sizes]
    call = lambda: A.avsl_distance(qs, gs, rq, rg, links, coef, bias, 10.0)  # noqa: E731
    outs = [_under(emu, s, call) for s in ("forward", "reverse")]
    assert torch.equal(outs[0], outs[1]), "schedules disagree: a race in the last level's sum"
    want = ref.avsl_distance(qs, gs, rq, rg, links, coef, bias, 10.0)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(outs[0], want, rtol=tol, atol=tol * sum(sizes))
    # the case is the pair-group size it names: shared-memory hats, no workspace, P pairs per tile
    with _ext.emulate_cuda_on_cpu(emu):
        assert int(emu.avsl_workspace_bytes(0, q, g, sizes, 0, _ext.dtype_code(qs[0]))) == 0
    lim = 48 * 1024 - 32 * 8 - 8 * 32 * 8
    es = 8 if dtype == torch.float64 else 4
    fits = lambda pp: (2 * max(sizes) * pp * es + 255) // 256 * 256 <= lim  # noqa: E731
    assert fits(p) and (p == 32 or not fits(2 * p))


# rise_saliency with the masks split over the 8 warps of a block (n = g, g + 8, ...) and the
# partial sums added in warp order: N not a multiple of 8 and larger than 8, K over two reference
# tiles (the second ragged), pixels not a multiple of the block's 32.
@pytest.mark.parametrize("n,k,h,w,s", [(37, 11, 23, 19, 4), (9, 8, 5, 7, 2)])
def test_rise_saliency_masks_split_over_warps(emu, n, k, h, w, s):
    gen = torch.Generator().manual_seed(4)
    grids = torch.rand(n, s, s, generator=gen)
    cell_h, cell_w = -(-h // s), -(-w // s)
    shifts = torch.stack([torch.randint(0, cell_h, (n,), generator=gen),
                          torch.randint(0, cell_w, (n,), generator=gen)], 1)
    scores = torch.randn(n, k, generator=gen)
    call = lambda: P.rise_saliency(grids, shifts, scores, (h, w))  # noqa: E731
    outs = [_under(emu, sch, call) for sch in ("forward", "reverse", "random:5")]
    for o in outs[1:]:
        assert torch.equal(o, outs[0]), "schedules disagree: a race in the warps' partial sums"
    torch.testing.assert_close(outs[0], ref.rise_saliency(grids, shifts, scores, (h, w)), rtol=1e-5, atol=1e-5)
