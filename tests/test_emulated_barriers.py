"""The barriers of the AVSL CUDA kernels (csrc/avsl/avsl_distance_cuda.cu), under host emulation
(tests/cuda_emulation/; see tests/test_emulated_kernels.py for how the tests reach the kernels).

Each barrier the kernel keeps is removed in turn by ``tools/cuda_mutants.py``; these tests make
that removal fail where the kernels' own tests cannot reach it, and they exercise the loops whose
barriers the kernel dropped as redundant (each proved in a comment where it was):

* the top-k merge kernel with several queries per block (``WHYMATCH_EMU_MAX_MERGE_BLOCKS``, a test
  hook that only the emulated build honours, lowers its grid) and an odd k, so that a query's last
  output and the next query's first share a buffer of the block-wide argmin;
* the backward and forward with more tiles than blocks (a block walks several tiles: the buffers
  are reused tile after tile), a ragged last tile and four levels;
* the top-k partial pass with several tiles per segment, hats in shared and in global memory.

Every case runs under the schedules forward, reverse and random:SEED, which must agree bit for bit,
and is checked against ``ops/reference.py``.
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
from whymatch.ops import reference as ref

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_emulation import build as emu_build  # noqa: E402
from helpers import bits, emu_stats, emulated_marks, emulated_module_path  # noqa: E402

pytestmark = emulated_marks()

SCHEDULES = ("forward", "reverse", "random:11")


@pytest.fixture(scope="module")
def emu_so():
    return emulated_module_path()


@pytest.fixture(scope="module")
def emu(emu_so):
    return emu_build.load(emu_so)






def _under_all(mod, fn, schedules=SCHEDULES):
    """fn() under each schedule; the outputs (tuples of tensors) must agree bit for bit."""
    old = os.environ.get("WHYMATCH_EMU_SCHEDULE")
    outs = []
    try:
        for sch in schedules:
            os.environ["WHYMATCH_EMU_SCHEDULE"] = sch
            with _ext.emulate_cuda_on_cpu(mod):
                outs.append(tuple(fn()))
    finally:
        if old is None:
            os.environ.pop("WHYMATCH_EMU_SCHEDULE", None)
        else:
            os.environ["WHYMATCH_EMU_SCHEDULE"] = old
    for sch, o in zip(schedules[1:], outs[1:]):
        for a, b in zip(outs[0], o):
            assert torch.equal(bits(a), bits(b)), f"schedules {schedules[0]} and {sch} disagree: a race in a block"
    return outs[0]


def _inputs(sizes, q, g, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    qs = [torch.randn(q, r, generator=gen, dtype=dtype) for r in sizes]
    gs = [torch.randn(g, r, generator=gen, dtype=dtype) for r in sizes]
    rq = [torch.rand(q, r, generator=gen, dtype=dtype) for r in sizes]
    rg = [torch.rand(g, r, generator=gen, dtype=dtype) for r in sizes]
    links = [ref.avsl_link_star(torch.randn(a, b, generator=gen, dtype=dtype), 2) for a, b in zip(sizes[:-1], sizes[1:])]
    coef = [1 + 0.1 * torch.randn(r, generator=gen, dtype=dtype) for r in sizes]
    bias = [0.1 * torch.randn(r, generator=gen, dtype=dtype) for r in sizes]
    return qs, gs, rq, rg, links, coef, bias


def _check_topk(args, vals, idx, k):
    d = ref.avsl_distance(*args, 10.0)
    torch.testing.assert_close(vals, torch.sort(d, dim=1, stable=True).values[:, :k], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(d.gather(1, idx), vals, rtol=2e-5, atol=2e-5)
    assert all(len(set(r.tolist())) == k for r in idx)


# ------------------------------------------------------------------------------ top-k merge
def test_topk_merge_block_loops_over_queries(emu, monkeypatch):
    # 3 queries on one merge block (WHYMATCH_EMU_MAX_MERGE_BLOCKS=1): with k odd a query's last
    # output uses buffer 0 of the block-wide argmin, as does the next query's first. Each query has
    # 97 segments (tiles of 32), so every warp of the 128-thread merge block owns segments: without
    # the barrier between queries, a warp that runs ahead writes the next query's winner into
    # buffer 0 before thread 0 has read the last winner of this one.
    monkeypatch.setenv("WHYMATCH_EMU_MAX_MERGE_BLOCKS", "1")
    q, g, k = 3, 97 * 32 - 7, 5
    args = _inputs([4, 4], q, g, seed=21)
    ctypes.CDLL(emu.__emulation_path__).wm_emu_reset_stats()
    vals, idx = _under_all(emu, lambda: A.avsl_topk(*args, 10.0, k))
    launches, blocks, _ = emu_stats(emu)
    # per schedule: the partial pass (3 queries x 97 segments), then the merge on one block
    assert launches == 2 * len(SCHEDULES) and blocks == (q * 97 + 1) * len(SCHEDULES), (launches, blocks)
    _check_topk(args, vals, idx, k)


@pytest.mark.parametrize("hook", ["WHYMATCH_EMU_MAX_MERGE_BLOCKS", "WHYMATCH_EMU_MAX_FORWARD_BLOCKS",
                                  "WHYMATCH_EMU_MAX_BACKWARD_BLOCKS", "WHYMATCH_EMU_TOPK_TARGET_BLOCKS"])
def test_grid_cap_hooks_are_checked(emu, monkeypatch, hook):
    monkeypatch.setenv(hook, "0")
    args = _inputs([8, 4], 2, 40, seed=1)
    call = (lambda: [A.avsl_distance(*args, 10.0).sum().backward()]) if "BACKWARD" in hook else \
        (lambda: A.avsl_topk(*args, 10.0, 3))
    if "BACKWARD" in hook:
        args[5][1].requires_grad_(True)
    with pytest.raises(ValueError, match=f"{hook} must be a positive number of blocks, got '0'"):
        _under_all(emu, call, schedules=("forward",))


def test_grid_cap_hooks_are_emulation_only():
    # the hooks are compiled only where the emulation's prelude defines WHYMATCH_CUDA_EMULATION
    root = Path(__file__).resolve().parents[1]
    src = (root / "csrc/avsl/avsl_distance_cuda.cu").read_text()
    hook = src.index("std::getenv(hook)")
    assert src.rfind("#ifdef WHYMATCH_CUDA_EMULATION", 0, hook) > src.rfind("#endif", 0, hook)
    assert "WHYMATCH_CUDA_EMULATION" not in (root / "CMakeLists.txt").read_text()


# ------------------------------------------------------------------------------ tiles per block
def test_blocks_walk_several_tiles(emu, monkeypatch):
    # Grids lowered by the hooks: the forward on 3 blocks (P = 32: 2 tiles per query, the second
    # ragged, 4 tiles in all) and the backward on 3 blocks (tiles of 8: 6 per query, the last
    # ragged, 12 in all): each block walks several tiles, reusing its buffers (and A_l, p_l), and 4
    # levels walk the backward's gather between levels three times.
    monkeypatch.setenv("WHYMATCH_EMU_MAX_FORWARD_BLOCKS", "3")
    monkeypatch.setenv("WHYMATCH_EMU_MAX_BACKWARD_BLOCKS", "3")
    sizes, q, g = [10, 8, 6, 5], 2, 45
    qs, gs, rq, rg, links, coef, bias = _inputs(sizes, q, g, seed=5)
    grad = torch.randn(q, g, generator=torch.Generator().manual_seed(6))

    def fwd_bwd(fn):
        cf = [c.clone().requires_grad_(True) for c in coef]
        bs = [b.clone().requires_grad_(True) for b in bias]
        d = fn(qs, gs, rq, rg, links, cf, bs, 10.0)
        d.backward(grad)
        return (d.detach(), *[c.grad for c in cf[1:]], *[b.grad for b in bs[1:]])

    ctypes.CDLL(emu.__emulation_path__).wm_emu_reset_stats()
    got = _under_all(emu, lambda: fwd_bwd(A.avsl_distance))
    launches, blocks, _ = emu_stats(emu)
    # per schedule: forward 3 blocks, backward 3 blocks, its reduction 1 block
    assert launches == 3 * len(SCHEDULES) and blocks == 7 * len(SCHEDULES), (launches, blocks)
    want = fwd_bwd(ref.avsl_distance)
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=1e-4)
    for gg, ww in zip(got[1:], want[1:]):
        torch.testing.assert_close(gg, ww, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("smem,where", [("49152", "shared"), ("2048", "global")])
def test_topk_partial_walks_several_tiles(emu_so, tmp_path, monkeypatch, smem, where):
    # WHYMATCH_EMU_TOPK_TARGET_BLOCKS=2 gives each of the 3 queries one segment of all its 4 tiles
    # (the last ragged), and WHYMATCH_EMU_MAX_FORWARD_BLOCKS=2 puts queries 0 and 2 on block 0:
    # the partial pass's loops over the tiles of a segment and over the segments of a block. The
    # hats live where WHYMATCH_AVSL_CUDA_SMEM puts them (read once per process: a copy of the
    # module per setting).
    mod = emu_build.load(emu_so, copy_to=tmp_path / f"smem{smem}")
    monkeypatch.setenv("WHYMATCH_AVSL_CUDA_SMEM", smem)
    monkeypatch.setenv("WHYMATCH_EMU_TOPK_TARGET_BLOCKS", "2")
    monkeypatch.setenv("WHYMATCH_EMU_MAX_FORWARD_BLOCKS", "2")
    sizes, k = [6, 4, 3], 3
    p = 32 if where == "shared" else 8
    q, g = 3, 4 * p - 3
    args = _inputs(sizes, q, g, seed=9)
    with _ext.emulate_cuda_on_cpu(mod):
        ws = int(mod.avsl_workspace_bytes(0, q, g, sizes, 0, 0))
    assert (ws > 0) == (where == "global")
    ctypes.CDLL(mod.__emulation_path__).wm_emu_reset_stats()
    vals, idx = _under_all(mod, lambda: A.avsl_topk(*args, 10.0, k))
    launches, blocks, _ = emu_stats(mod)
    assert launches == 2 * len(SCHEDULES) and blocks == (2 + 3) * len(SCHEDULES), (launches, blocks)
    _check_topk(args, vals, idx, k)
