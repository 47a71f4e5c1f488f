"""The AVSL GPU paths' Python side on CPU tensors: the cuBLAS path's torch-op form (chunked hat @
link* through torch.matmul, prologue and epilogue as torch ops; its fused kernels are tested under
emulation in test_emulated_avsl_fused.py) against the float64 reference, and the size rule that
chooses between the SIMT kernel, the tensor-core kernel and the cuBLAS path."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from whymatch.ops import avsl as A
from whymatch.ops import reference as ref

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import devices, random_avsl_inputs  # noqa: E402


def _packed(sizes, q, g, gen, link_topk=4):
    x = random_avsl_inputs(sizes, q, g, gen, link_topk)
    return x, A._pack(*x)


def _simt_like_bound(want: torch.Tensor, sizes) -> float:
    # float32 throughout: a few ulps per accumulated term of the largest distance
    return 8 * torch.finfo(torch.float32).eps * want.abs().max().item() * max(sizes) ** 0.5


@pytest.mark.parametrize("sizes,q,g,chunk", [([40, 24, 33], 7, 50, 2), ([17], 3, 9, 1), ([64, 48], 5, 20, None)])
def test_cublas_distance_matches_float64_reference(gen, sizes, q, g, chunk):
    x, (qe, ge, rq, rg, lk, cf, bs, sz) = _packed(sizes, q, g, gen)
    got = A.cublas_distance(qe, ge, rq, rg, lk, cf, bs, sz, 10.0, chunk=chunk)
    want = ref.avsl_distance_float64(*x, 10.0)
    assert got.dtype == torch.float32 and got.shape == (q, g)
    assert (got.double() - want).abs().max().item() <= _simt_like_bound(want, sizes)
    # the chunking changes nothing: one chunk gives the same bits
    whole = A.cublas_distance(qe, ge, rq, rg, lk, cf, bs, sz, 10.0, chunk=q)
    assert torch.equal(got, whole)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_cublas_topk_order_ties_nan_and_self(gen, exclude_self):
    sizes, n = [12, 8], 24
    x, (qe, ge, rq, rg, lk, cf, bs, sz) = _packed(sizes, n, n, gen)
    if exclude_self:
        qe, rq = ge, rg
    ge = ge.clone()
    ge[5] = ge[3]  # a tie: items 3 and 5 are copies
    rg = rg.clone()
    rg[5] = rg[3]
    ge[7] = float("nan")  # a NaN distance for every query: last
    d = A._packed_reference(qe, ge, rq, rg, lk, cf, bs, sz, 10.0)
    k = n - 1 if exclude_self else n
    vals, idx = A.cublas_topk(qe, ge, rq, rg, lk, cf, bs, sz, 10.0, k, exclude_self, chunk=5)
    for i in range(n):
        row = idx[i].tolist()
        assert len(set(row)) == k
        assert row[-1] == 7 or (exclude_self and i == 7)  # NaN last (query 7's own NaN item is excluded)
        if 3 in row and 5 in row:
            assert row.index(3) < row.index(5)  # equal distances: the lower index first
        if exclude_self:
            assert i not in row
        finite = torch.isfinite(vals[i])
        assert bool((vals[i][finite][1:] >= vals[i][finite][:-1]).all())
        assert torch.equal(vals[i][finite], d[i, idx[i]][finite])


def test_gpu_path_rule(monkeypatch):
    monkeypatch.delenv("WHYMATCH_AVSL_GPU_PATH", raising=False)
    f32 = torch.float32
    sop = dict(capability=(9, 0), smem_optin=227 * 1024, tc_smem=132352)
    assert A.gpu_path(60502, 60502, [512] * 3, f32, topk=True, **sop) == "tensorcore"
    assert A.gpu_path(60502, 60502, [512] * 3, torch.float64, topk=True, **sop) == "simt"
    assert A.gpu_path(100, 100, [512] * 3, f32, **sop) == "simt"  # small: one SIMT launch
    assert A.gpu_path(100, 60502, [512] * 3, f32, topk=True, **sop) == "simt"  # too few queries for top-k
    # more nodes than the tensor-core kernel takes: the dense cuBLAS path when link* is dense enough,
    # else the sparse SIMT kernel (its time grows with the nonzeros)
    assert A.gpu_path(60502, 60502, [1024] * 3, f32, link_density=1.0, **sop) == "cublas"
    assert A.gpu_path(60502, 60502, [1024] * 3, f32, link_density=0.125, fused=False, **sop) == "simt"
    # with the fused kernels the cuBLAS path wins from a lower density (its passes over pairs x R: 8, not 54)
    assert A.gpu_path(60502, 60502, [1024] * 3, f32, link_density=0.125, **sop) == "cublas"
    assert A.gpu_path(60502, 60502, [1024] * 3, f32, link_density=0.05, **sop) == "simt"
    assert A.gpu_path(100, 100, [1024] * 3, f32, link_density=1.0, **sop) == "simt"
    # no sm_80, or too little shared memory (an sm_86 has 99 KiB): no tensor-core path
    assert A.gpu_path(60502, 60502, [512] * 3, f32, capability=(7, 5), smem_optin=227 * 1024,
                      tc_smem=132352, link_density=0.5) == "cublas"
    assert A.gpu_path(60502, 60502, [512] * 3, f32, capability=(8, 6), smem_optin=99 * 1024,
                      tc_smem=132352, link_density=0.25, fused=False) == "simt"
    assert A.gpu_path(60502, 60502, [512] * 3, f32, capability=(8, 6), smem_optin=99 * 1024,
                      tc_smem=132352, link_density=0.25) == "cublas"
    monkeypatch.setenv("WHYMATCH_AVSL_GPU_PATH", "cublas")
    assert A.gpu_path(10, 10, [8], f32, **sop) == "cublas"
    monkeypatch.setenv("WHYMATCH_AVSL_GPU_PATH", "tensorcore")
    with pytest.raises(ValueError, match="needs float32"):
        A.gpu_path(10, 10, [1024], f32, **sop)
    monkeypatch.setenv("WHYMATCH_AVSL_GPU_PATH", "fast")
    with pytest.raises(ValueError, match="WHYMATCH_AVSL_GPU_PATH must be one of"):
        A.gpu_path(10, 10, [8], f32, **sop)


def test_cpu_ops_ignore_the_gpu_path(gen, monkeypatch):
    # on CPU tensors (no emulation) the CPU kernels run whatever the variable says
    monkeypatch.setenv("WHYMATCH_AVSL_GPU_PATH", "cublas")
    called = []
    monkeypatch.setattr(A, "cublas_distance", lambda *a, **k: called.append(1))
    x, _ = _packed([8, 4], 3, 5, gen)
    d = A.avsl_distance(*x, 10.0)
    assert not called and d.shape == (3, 5)


@pytest.mark.parametrize("device", [d for d in devices() if d != "cpu"] or
                         [pytest.param("cuda", marks=pytest.mark.skip(reason="cuda not in WHYMATCH_TEST_DEVICES"))])
@pytest.mark.parametrize("path,fused", [("simt", "1"), ("tensorcore", "1"), ("cublas", "1"), ("cublas", "0")])
def test_gpu_paths_on_a_device(gen, monkeypatch, device, path, fused):
    # every GPU path forced on a real device (gpu_suite.sh's tests step), distances and top-k against float64
    monkeypatch.setenv("WHYMATCH_AVSL_GPU_PATH", path)
    monkeypatch.setenv("WHYMATCH_AVSL_CUBLAS_FUSED", fused)
    x = random_avsl_inputs([40, 24, 33], 70, 150, gen)
    want = ref.avsl_distance_float64(*x, 10.0)
    xd = [[t.to(device) for t in part] for part in x]
    got = A.avsl_distance(*xd, 10.0).cpu()
    assert (got.double() - want).abs().max().item() <= _simt_like_bound(want, [40, 24, 33])
    vals, idx = A.avsl_topk(*xd, 10.0, 20)
    assert (vals.cpu().double() - torch.sort(want, dim=1).values[:, :20]).abs().max().item() <= \
        _simt_like_bound(want, [40, 24, 33])
    assert (want.gather(1, idx.cpu()) - vals.cpu().double()).abs().max().item() <= _simt_like_bound(want, [40, 24, 33])
