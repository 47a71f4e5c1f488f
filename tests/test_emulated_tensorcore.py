"""The AVSL tensor-core kernels (csrc/avsl/avsl_tensorcore_cuda.cu: WMMA tf32, 3xTF32 split) under the
host emulation (tests/cuda_emulation/emu_wmma.h), against the float64 reference.

The accuracy bound is measured, not assumed: on the same inputs, the float32 SIMT kernel (also
emulated) gives an error e_simt against ``reference.avsl_distance_float64``; the tensor-core
kernel must stay within 2 e_simt (STYLE.md: twice the error of the plain float32 computation),
floored at 4 float32 ulps of the largest distance for inputs where the SIMT kernel happens to be
exact. Every case also runs two thread schedules, compared bit for bit.

    python -m pytest -m emulated -k tensorcore
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from whymatch.ops import avsl as A
from whymatch.ops import reference as ref

sys.path.insert(0, str(Path(__file__).parent))
from cuda_emulation.avsl_paths import bound as _bound, run_path as _run  # noqa: E402
from helpers import emulated_marks, random_avsl_inputs  # noqa: E402

pytestmark = emulated_marks()


@pytest.fixture
def tc_calls(monkeypatch):
    """Counts the launches of the tensor-core path (so that a test knows the path it forced ran)."""
    calls = []
    real = A._tc_launch

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(A, "_tc_launch", counting)
    return calls


# ragged node counts (not multiples of 16), 1-3 levels, a gallery that ends inside a 64-pair tile,
# a link* that keeps every entry (its k >= R_low: dense columns), and a level of 400 > 384 nodes (every
# warp has 4 column tiles: the branch-free K loop tc_gemm<4> that runs at R = 512)
CASES = [([40, 24, 33], 3, 70, 4), ([17], 2, 65, 4), ([20, 48, 16], 1, 129, 4), ([24, 12], 2, 64, 64),
         ([24, 400], 5, 18, 8)]


@pytest.mark.parametrize("sizes,q,g,link_topk", CASES)
def test_tensorcore_distance_within_simt_bound(emu, gen, tc_calls, sizes, q, g, link_topk):
    x = random_avsl_inputs(sizes, q, g, gen, link_topk)
    want = ref.avsl_distance_float64(*x, 10.0)
    got = _run(emu, "tensorcore", lambda: A.avsl_distance(*x, 10.0))
    assert len(tc_calls) == 2  # both schedules ran the tensor-core kernel
    simt = _run(emu, "simt", lambda: A.avsl_distance(*x, 10.0), schedules=("forward",))
    e_tc = (got.double() - want).abs().max().item()
    e_simt = (simt.double() - want).abs().max().item()
    assert got.dtype == torch.float32 and got.shape == (q, g)
    assert e_tc <= _bound(e_simt, want), f"tensor core error {e_tc:.3g}, SIMT {e_simt:.3g}"


@pytest.mark.parametrize("sizes,q,g,k,exclude_self", [([24, 40], 3, 150, 50, False), ([16, 20, 9], 40, 40, 5, True),
                                                      ([12, 8], 1, 66, 66, False)])
def test_tensorcore_topk(emu, gen, tc_calls, sizes, q, g, k, exclude_self):
    # k = 50 >= R = 40 nodes; k = G (every gallery item, Q = 1); exclude_self over a 40-item set
    x = list(random_avsl_inputs(sizes, q, g, gen))
    if exclude_self:
        x[0], x[2] = x[1], x[3]
    vals, idx = _run(emu, "tensorcore", lambda: A.avsl_topk(*x, 10.0, k, exclude_self=exclude_self))
    assert len(tc_calls) == 2
    d = ref.avsl_distance_float64(*x, 10.0)
    simt = _run(emu, "simt", lambda: A.avsl_distance(*x, 10.0), schedules=("forward",))
    bound = _bound((simt.double() - d).abs().max().item(), d)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    want = torch.sort(d, dim=1, stable=True).values[:, :k]
    assert (vals.double() - want).abs().max().item() <= bound
    assert (d.gather(1, idx) - vals.double()).abs().max().item() <= bound  # the indices point at their values
    assert all(len(set(r.tolist())) == k for r in idx) and bool((idx >= 0).all() and (idx < g).all())
    assert bool((vals[:, 1:] >= vals[:, :-1]).all())
    if exclude_self:
        assert not bool((idx == torch.arange(q)[:, None]).any())


def test_tensorcore_topk_ties_lower_index_first(emu, gen):
    # gallery items repeated: equal distances, bit for bit (the same row computation); the lower index wins
    sizes = [20, 12]
    qs, gs, rq, rg, links, coef, bias = random_avsl_inputs(sizes, 2, 30, gen)
    rep = torch.arange(30) % 10  # items j and j + 10, j + 20 are copies
    gs, rg = [t[rep] for t in gs], [t[rep] for t in rg]
    vals, idx = _run(emu, "tensorcore", lambda: A.avsl_topk(qs, gs, rq, rg, links, coef, bias, 10.0, 7))
    for v, i in zip(vals, idx):
        for a in range(6):
            if v[a] == v[a + 1]:
                assert i[a] < i[a + 1]
    # each copy group appears in index order: the first copies before the later ones
    assert bool((idx[:, 0] < 10).all())


def test_tensorcore_zero_sizes(emu, gen):
    sizes = [16, 8]
    x = random_avsl_inputs(sizes, 0, 5, gen)
    d = _run(emu, "tensorcore", lambda: A.avsl_distance(*x, 10.0))
    assert d.shape == (0, 5)
    v, i = _run(emu, "tensorcore", lambda: A.avsl_topk(*x, 10.0, 3))
    assert v.shape == (0, 3) and i.shape == (0, 3)
    y = random_avsl_inputs(sizes, 4, 0, gen)
    assert _run(emu, "tensorcore", lambda: A.avsl_distance(*y, 10.0)).shape == (4, 0)


def test_tensorcore_refuses_what_it_cannot_run(emu, gen):
    x = random_avsl_inputs([8, 4], 2, 3, gen)
    x64 = (*x[:5], [c.double() for c in x[5]], [b.double() for b in x[6]])
    with pytest.raises(ValueError, match="WHYMATCH_AVSL_GPU_PATH=tensorcore needs float32"):
        _run(emu, "tensorcore", lambda: A.avsl_distance(*x64, 10.0), schedules=("forward",))
    big = random_avsl_inputs([520], 1, 2, gen)
    with pytest.raises(ValueError, match="at most 512 nodes"):
        _run(emu, "tensorcore", lambda: A.avsl_distance(*big, 10.0), schedules=("forward",))


@pytest.mark.parametrize("topk", [False, True])
def test_tensorcore_one_block_walks_every_tile(emu, gen, monkeypatch, topk):
    # the grid capped at one block (an emulation hook): the barriers between one block's tiles matter
    monkeypatch.setenv("WHYMATCH_EMU_TC_MAX_BLOCKS", "1")
    x = random_avsl_inputs([20, 36], 9, 40, gen)
    d = ref.avsl_distance_float64(*x, 10.0)
    simt = _run(emu, "simt", lambda: A.avsl_distance(*x, 10.0), schedules=("forward",))
    bound = _bound((simt.double() - d).abs().max().item(), d)
    if topk:
        vals, idx = _run(emu, "tensorcore", lambda: A.avsl_topk(*x, 10.0, 6))
        assert (vals.double() - torch.sort(d, dim=1).values[:, :6]).abs().max().item() <= bound
        assert (d.gather(1, idx) - vals.double()).abs().max().item() <= bound
    else:
        got = _run(emu, "tensorcore", lambda: A.avsl_distance(*x, 10.0))
        assert (got.double() - d).abs().max().item() <= bound
