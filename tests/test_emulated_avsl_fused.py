"""The fused kernels of the AVSL cuBLAS path (csrc/avsl/avsl_fused_cuda.cu: prologue, in-place blend,
epilogue with the distance block or the running top-k) under the host emulation, with torch.mm
standing in for cuBLAS, against the float64 reference.

Bound as for the tensor-core kernel: twice the emulated float32 SIMT kernel's error on the same
inputs, floored at 4 ulps of the largest distance. Every case runs the forward and reverse thread
schedules, compared bit for bit. Chunks smaller than the problem (``chunk``) make the running top-k
span several gallery chunks and the top-k epilogue walk several 64-pair tiles per block (its two
barriers).

    python -m pytest -m emulated -k fused
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from whymatch.ops import avsl as A
from whymatch.ops import reference as ref

sys.path.insert(0, str(Path(__file__).parent))
from cuda_emulation.avsl_paths import bound, run_path  # noqa: E402
from helpers import emulated_marks, random_avsl_inputs  # noqa: E402

pytestmark = emulated_marks()


@pytest.fixture
def fused(monkeypatch):
    """Counts the fused path's calls and sets the chunk (queries, gallery items) of the next calls."""
    state = {"calls": 0, "chunk": None}
    real = A._fused_cublas

    def wrapped(*a, **kw):
        state["calls"] += 1
        return real(*a, **kw, chunk=state["chunk"])

    monkeypatch.setattr(A, "_fused_cublas", wrapped)
    return state


def _simt_bound(emu, x, want):
    simt = run_path(emu, "simt", lambda: A.avsl_distance(*x, 10.0), schedules=("forward",))
    return bound((simt.double() - want).abs().max().item(), want)


# ragged node counts, 1-3 levels (3: the in-place blend between two GEMMs), a gallery that is not a
# multiple of the top-k epilogue's 64-pair tiles, a dense link* (k >= R_low), chunks of 2 x 17 pairs
CASES = [([40, 24, 33], 3, 70, 4, None), ([17], 2, 65, 4, None), ([20, 48, 16], 1, 129, 4, (1, 50)),
         ([24, 12], 2, 64, 64, None), ([9, 30, 21], 5, 37, 3, (2, 17))]


@pytest.mark.parametrize("sizes,q,g,link_topk,chunk", CASES)
def test_fused_distance_within_simt_bound(emu, gen, fused, sizes, q, g, link_topk, chunk):
    x = random_avsl_inputs(sizes, q, g, gen, link_topk)
    want = ref.avsl_distance_float64(*x, 10.0)
    fused["chunk"] = chunk
    got = run_path(emu, "cublas", lambda: A.avsl_distance(*x, 10.0))
    assert fused["calls"] == 2  # both schedules ran the fused kernels
    assert got.dtype == torch.float32 and got.shape == (q, g)
    err = (got.double() - want).abs().max().item()
    assert err <= _simt_bound(emu, x, want), f"fused cuBLAS path error {err:.3g}"


@pytest.mark.parametrize("sizes,q,g,k,exclude_self,chunk", [
    ([24, 40], 3, 150, 50, False, None),       # k = 50 >= R = 40; 150 items: three 64-pair tiles per block
    ([16, 20, 9], 40, 40, 5, True, (7, 13)),   # exclude_self across gallery chunks (the running lists' counts)
    ([12, 8], 1, 66, 66, False, (1, 20)),      # k = G: every item, the list filled over four chunks
    ([10], 70, 70, 3, True, (4, 70))])          # one level (no GEMM), the self item inside a 64-pair tile
def test_fused_topk(emu, gen, fused, sizes, q, g, k, exclude_self, chunk):
    x = list(random_avsl_inputs(sizes, q, g, gen))
    if exclude_self:
        x[0], x[2] = x[1], x[3]
    fused["chunk"] = chunk
    vals, idx = run_path(emu, "cublas", lambda: A.avsl_topk(*x, 10.0, k, exclude_self=exclude_self))
    assert fused["calls"] == 2
    d = ref.avsl_distance_float64(*x, 10.0)
    tol = _simt_bound(emu, x, d)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    want = torch.sort(d, dim=1, stable=True).values[:, :k]
    assert vals.shape == (q, k) and idx.dtype == torch.int64
    assert (vals.double() - want).abs().max().item() <= tol
    assert (d.gather(1, idx) - vals.double()).abs().max().item() <= tol  # the indices point at their values
    assert all(len(set(r.tolist())) == k for r in idx) and bool((idx >= 0).all() and (idx < g).all())
    assert bool((vals[:, 1:] >= vals[:, :-1]).all())
    if exclude_self:
        assert not bool((idx == torch.arange(q)[:, None]).any())


@pytest.mark.parametrize("sizes", [[20], [20, 12]])
def test_fused_topk_ties_lower_index_first(emu, gen, fused, sizes):
    # gallery items repeated (j, j + 10, j + 20 copies): one level gives equal distances bit for bit (no
    # GEMM); with two, the copies' GEMM rows are equal inputs. Equal values: the lower index first.
    qs, gs, rq, rg, links, coef, bias = random_avsl_inputs(sizes, 3, 30, gen)
    rep = torch.arange(30) % 10
    gs, rg = [t[rep] for t in gs], [t[rep] for t in rg]
    fused["chunk"] = (2, 13)  # copies in different gallery chunks and tiles
    vals, idx = run_path(emu, "cublas", lambda: A.avsl_topk(qs, gs, rq, rg, links, coef, bias, 10.0, 9))
    ties = 0
    for v, i in zip(vals, idx):
        for a in range(8):
            if v[a] == v[a + 1]:
                ties += 1
                assert i[a] < i[a + 1]
    if len(sizes) == 1:
        assert ties >= 3 * 6  # the 3 best groups of 3 copies: 2 ties each
        assert bool((idx[:, 0] < 10).all())


def test_fused_zero_sizes(emu, gen, fused):
    x = random_avsl_inputs([16, 8], 0, 5, gen)
    assert run_path(emu, "cublas", lambda: A.avsl_distance(*x, 10.0)).shape == (0, 5)
    v, i = run_path(emu, "cublas", lambda: A.avsl_topk(*x, 10.0, 3))
    assert v.shape == (0, 3) and i.shape == (0, 3)
    y = random_avsl_inputs([16, 8], 4, 0, gen)
    assert run_path(emu, "cublas", lambda: A.avsl_distance(*y, 10.0)).shape == (4, 0)


def test_fused_entries_check_chunks_and_buffers(emu, gen):
    # the compiled entries refuse what the kernels would read out of bounds
    x = random_avsl_inputs([8, 4], 3, 5, gen)
    qe, ge, rq, rg, lk, cf, bs, sz = A._pack(*x)
    b = [(t.data_ptr(), t.numel() * 4) for t in (qe, ge, rq, rg, cf, bs)]
    hat = torch.empty(3 * 5 * 8)
    out = torch.empty(3, 5)
    with pytest.raises(ValueError, match="query chunk"):
        emu.avsl_fused_prologue(*b, (hat.data_ptr(), hat.numel() * 4), 3, 5, sz, 2, 2, 0, 5, 0)
    with pytest.raises(ValueError, match="hat must hold"):
        emu.avsl_fused_prologue(*b, (hat.data_ptr(), 16), 3, 5, sz, 0, 3, 0, 5, 0)
    with pytest.raises(ValueError, match="level must be the last"):
        emu.avsl_fused_epilogue(*b, (hat.data_ptr(), hat.numel() * 4), (out.data_ptr(), 60), (0, 0), (0, 0), 3, 5,
                                sz, 0, 10.0, 0, 3, 0, 5, 0, False, 0)
    with pytest.raises(ValueError, match="k must be in"):
        emu.avsl_fused_epilogue(*b, (hat.data_ptr(), hat.numel() * 4), (0, 0), (out.data_ptr(), 60), (0, 0), 3, 5,
                                sz, 1, 10.0, 0, 3, 0, 5, 6, False, 0)


def test_unfused_variant_on_request(emu, gen, fused, monkeypatch):
    # WHYMATCH_AVSL_CUBLAS_FUSED=0: the torch-op form of the path (gpu_suite.sh measures both); same function
    x = random_avsl_inputs([12, 20], 3, 30, gen)
    monkeypatch.setenv("WHYMATCH_AVSL_CUBLAS_FUSED", "0")
    plain = run_path(emu, "cublas", lambda: A.avsl_distance(*x, 10.0), schedules=("forward",))
    assert fused["calls"] == 0
    monkeypatch.delenv("WHYMATCH_AVSL_CUBLAS_FUSED")
    got = run_path(emu, "cublas", lambda: A.avsl_distance(*x, 10.0), schedules=("forward",))
    assert fused["calls"] == 1
    want = ref.avsl_distance_float64(*x, 10.0)
    tol = _simt_bound(emu, x, want)
    assert (plain.double() - want).abs().max().item() <= tol and (got.double() - want).abs().max().item() <= tol
