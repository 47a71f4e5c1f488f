"""The fused AVSL CAM kernels (correlation, edge update, reliability) against ops/reference.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import whymatch.ops as ops
from whymatch.ops import _ext
from whymatch.ops import avsl as A
from whymatch.ops import reference as ref

from helpers import devices

SIZES = [  # (H_low, W_low) -> (H_high, W_high)
    ((7, 7), (3, 3)), ((14, 14), (7, 7)), ((5, 5), (5, 5)), ((9, 4), (4, 4)), ((9, 9), (4, 4)), ((1, 1), (1, 1)),
    ((28, 28), (14, 14)), ((6, 11), (3, 2)),
]
NODES = [(1, 5), (5, 33), (33, 1), (33, 33), (17, 40)]
TOL = dict(rtol=2e-5, atol=2e-6)


def _cams(b, r1, r2, low, high, device, gen, dtype=torch.float32):
    # CAMs after a ReLU are non-negative; signed values exercise the minimum shift too.
    c1 = torch.randn(b, r1, *low, generator=gen, dtype=torch.float64).to(dtype).to(device)
    c2 = torch.rand(b, r2, *high, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return c1, c2


def _ref64(cam_low, cam_high):
    """The reference definition evaluated in float64 (ops/reference.py computes in float32)."""
    low, high = cam_low.double(), cam_high.double()
    if low.shape[2:] != high.shape[2:]:
        low = F.adaptive_avg_pool2d(low, tuple(high.shape[2:]))
    low = F.normalize(low.flatten(2), dim=-1)
    high = F.normalize(high.flatten(2), dim=-1)
    return torch.einsum("bmj,bnj->mn", low, high) / low.shape[0]


def _rel64(cam, published):
    x = cam.double()
    x = x - (x.amin(dim=-1, keepdim=True) if published else x.flatten(2).amin(dim=-1)[..., None, None])
    return F.normalize(x.flatten(2), p=1, dim=-1).std(dim=-1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("nodes", NODES)
@pytest.mark.parametrize("sizes", SIZES)
def test_correlation_matches_reference(device, b, nodes, sizes, gen):
    c1, c2 = _cams(b, *nodes, *sizes, device, gen)
    got = ops.cam_correlation(c1, c2)
    want = ref.avsl_cam_correlation(c1, c2)
    assert got.dtype == torch.float32 and got.shape == (nodes[0], nodes[1]) and got.device == c1.device
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("sizes", [((7, 7), (3, 3)), ((9, 4), (4, 4)), ((5, 5), (5, 5))])
def test_float64_op_is_exact(device, sizes, gen):
    c1, c2 = _cams(3, 5, 33, *sizes, device, gen, torch.float64)
    corr, r1, r2 = torch.ops.whymatch.avsl_cam_correlation(c1, c2, True, False)
    assert corr.dtype == torch.float64
    torch.testing.assert_close(corr, _ref64(c1, c2), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(r1, _rel64(c1, False), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r2, _rel64(c2, False), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.ops.whymatch.avsl_cam_reliability(c1, True), _rel64(c1, True), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("nodes", [(5, 33), (33, 1)])
def test_edges_update_first_then_momentum(device, nodes, gen):
    edges = torch.full(nodes, 7.0, device=device)
    want = edges.clone()
    for step, m in enumerate([0.5, 0.9, 0.0, 1.0]):
        c1, c2 = _cams(3, *nodes, (9, 9), (4, 4), device, gen)
        corr = ops.cam_correlation(c1, c2, edges=edges, momentum=m, first=step == 0)
        rc = ref.avsl_cam_correlation(c1, c2)
        want = rc.clone() if step == 0 else want * m + rc * (1 - m)
        torch.testing.assert_close(corr, rc, **TOL)
        torch.testing.assert_close(edges, want, **TOL)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("published", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 7, 7), (1, 33, 14, 14), (2, 1, 1, 2), (3, 5, 9, 4), (2, 3, 3, 1)])
def test_reliability_matches_reference(device, published, shape, gen):
    cam = torch.randn(*shape, generator=gen).to(device)
    got = ops.cam_reliability(cam, published=published)
    assert got.dtype == torch.float32 and got.shape == shape[:2]
    torch.testing.assert_close(got, ref.avsl_cam_reliability(cam, published=published), rtol=1e-4, atol=1e-6)
    # constant maps: zero after the shift, std 0 (as the reference)
    flat = torch.ones(2, 3, 4, 4, device=device)
    torch.testing.assert_close(ops.cam_reliability(flat, published=published),
                               ref.avsl_cam_reliability(flat, published=published))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("published", [False, True])
def test_statistics_fuses_both_reliabilities(device, published, gen):
    c1, c2 = _cams(3, 5, 33, (9, 9), (4, 4), device, gen)
    edges = torch.zeros(5, 33, device=device)
    corr, r1, r2 = A.cam_statistics(c1, c2, edges=edges, first=True, published=published)
    torch.testing.assert_close(corr, ref.avsl_cam_correlation(c1, c2), **TOL)
    torch.testing.assert_close(edges, corr)
    torch.testing.assert_close(r1, ref.avsl_cam_reliability(c1, published=published), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(r2, ref.avsl_cam_reliability(c2, published=published), rtol=1e-4, atol=1e-6)
    corr2, e1, e2 = A.cam_statistics(c1, c2, reliability=False)
    torch.testing.assert_close(corr2, corr)
    assert e1.numel() == 0 and e2.numel() == 0


def test_half_and_non_contiguous_inputs(gen):
    c1, c2 = _cams(3, 6, 5, (14, 14), (7, 7), "cpu", gen)
    torch.testing.assert_close(ops.cam_correlation(c1.half(), c2.bfloat16()),
                               ref.avsl_cam_correlation(c1.half(), c2.bfloat16()), **TOL)
    c1n, c2n = c1[:, ::2], c2.transpose(2, 3)
    torch.testing.assert_close(ops.cam_correlation(c1n, c2n), ref.avsl_cam_correlation(c1n, c2n), **TOL)
    torch.testing.assert_close(ops.cam_reliability(c2n), ref.avsl_cam_reliability(c2n), rtol=1e-4, atol=1e-6)


def test_no_gradient_flows(gen):
    c1, c2 = _cams(2, 3, 4, (6, 6), (3, 3), "cpu", gen)
    c1.requires_grad_(True)
    assert not ops.cam_correlation(c1, c2).requires_grad
    assert not ops.cam_reliability(c1).requires_grad


def test_zero_sizes():
    assert ops.cam_reliability(torch.rand(0, 4, 3, 3)).shape == (0, 4)
    assert ops.cam_reliability(torch.rand(2, 0, 3, 3)).shape == (2, 0)
    with pytest.raises(ValueError, match=r"cam_low must not be empty, got shape \(0, 3, 4, 4\)"):
        ops.cam_correlation(torch.rand(0, 3, 4, 4), torch.rand(0, 2, 2, 2))
    with pytest.raises(ValueError, match=r"avsl_cam_correlation: cam_low must have a non-empty batch"):
        torch.ops.whymatch.avsl_cam_correlation(torch.rand(0, 3, 4, 4), torch.rand(0, 2, 2, 2), False, False)


def test_opcheck(gen):
    for dt in (torch.float32, torch.float64):
        c1, c2 = _cams(3, 5, 7, (9, 4), (4, 4), "cpu", gen, dt)
        for rel, pub in [(True, False), (False, False), (True, True)]:
            torch.library.opcheck(torch.ops.whymatch.avsl_cam_correlation.default, (c1, c2, rel, pub))
            for first in (True, False):
                edges = torch.rand(5, 7, generator=gen, dtype=dt)
                torch.library.opcheck(torch.ops.whymatch.avsl_edge_update_.default,
                                      (edges, c1, c2, 0.7, first, rel, pub))
        for pub in (False, True):
            torch.library.opcheck(torch.ops.whymatch.avsl_cam_reliability.default, (c1, pub))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, gen):
    c1, c2 = _cams(3, 5, 7, (9, 9), (4, 4), "cpu", gen)

    def step(c1, c2, edges):
        corr = ops.cam_correlation(c1 * 2, c2, edges=edges, momentum=0.25)
        return corr + 1, ops.cam_reliability(c2, published=True)

    e_eager = torch.rand(5, 7, generator=gen)
    e_comp = e_eager.clone()
    want = step(c1, c2, e_eager)
    got = torch.compile(step, fullgraph=True, backend=backend)(c1, c2, e_comp)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(e_comp, e_eager)


def test_fallback_to_reference(monkeypatch, gen):
    monkeypatch.setattr(_ext, "_cache", {"_C": None, "_C_cuda": None})
    monkeypatch.setattr(_ext, "_warned", set())
    c1, c2 = _cams(3, 5, 7, (9, 9), (4, 4), "cpu", gen)
    edges = torch.rand(5, 7, generator=gen)
    want_edges = 0.3 * edges + 0.7 * ref.avsl_cam_correlation(c1, c2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        corr, r1, r2 = A.cam_statistics(c1, c2, edges=edges, momentum=0.3)
        rel = ops.cam_reliability(c1)
    assert sum(issubclass(w.category, RuntimeWarning) for w in rec) == 1
    torch.testing.assert_close(corr, ref.avsl_cam_correlation(c1, c2))
    torch.testing.assert_close(edges, want_edges)
    torch.testing.assert_close(r2, ref.avsl_cam_reliability(c2))
    torch.testing.assert_close(rel, ref.avsl_cam_reliability(c1))


def test_module_without_the_op_falls_back(monkeypatch, gen):
    class OldBuild:  # a compiled module from before the CAM ops existed
        __version__ = _ext.__version__

    monkeypatch.setattr(_ext, "_cache", {"_C": OldBuild(), "_C_cuda": None})
    monkeypatch.setattr(_ext, "_warned", set())
    c1, c2 = _cams(2, 3, 4, (6, 6), (3, 3), "cpu", gen)
    with pytest.warns(RuntimeWarning, match="predates this op"):
        out = ops.cam_correlation(c1, c2)
    torch.testing.assert_close(out, ref.avsl_cam_correlation(c1, c2))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.cam_correlation(torch.rand(2, 3, 4), torch.rand(2, 3, 2, 2)), r"cam_low must be a 4-D tensor"),
    (lambda: ops.cam_correlation(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 2, 2).int()), r"cam_high must have dtype"),
    (lambda: ops.cam_correlation(torch.rand(2, 3, 4, 4), torch.rand(3, 3, 2, 2)),
     r"cam_high must have cam_low's batch size 2, got 3"),
    (lambda: ops.cam_correlation(torch.rand(2, 3, 4, 4), torch.rand(2, 5, 2, 2), edges=torch.zeros(3, 4)),
     r"edges"),
    (lambda: ops.cam_correlation(torch.rand(2, 3, 4, 4), torch.rand(2, 5, 2, 2), edges=torch.zeros(3, 5).double()),
     r"edges must have dtype float32"),
    (lambda: ops.cam_correlation(torch.rand(2, 3, 4, 4), torch.rand(2, 5, 2, 2), edges=torch.zeros(5, 3).t()),
     r"edges must be contiguous"),
    (lambda: ops.cam_correlation(torch.rand(2, 3, 4, 4), torch.rand(2, 5, 2, 2), momentum=1.5), r"momentum"),
    (lambda: ops.cam_reliability(torch.rand(2, 3, 1, 1)), r"cam must have at least 2 positions"),
    (lambda: ops.cam_reliability(torch.rand(2, 3, 4)), r"cam must be a 4-D tensor"),
    (lambda: A.cam_statistics(torch.rand(2, 3, 1, 1), torch.rand(2, 3, 1, 1)), r"at least 2 positions"),
])
def test_errors_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_old_reference_name_is_a_deprecated_alias(gen):
    cam = torch.rand(2, 3, 4, 5, generator=gen)
    with pytest.warns(DeprecationWarning, match="avsl_cam_reliability"):
        old = ref.avsl_reliability(cam, True)
    assert torch.equal(old, ref.avsl_cam_reliability(cam, True))
