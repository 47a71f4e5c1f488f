"""The fused AVSL rectified-distance kernels against ops/reference.py: distances, coef/bias gradients,
top-k retrieval; levels, odd and zero sizes, ties, devices, registration, fallback, errors."""

from __future__ import annotations

import warnings

import pytest
import torch

import whymatch.ops as ops
from whymatch.ops import _ext
from whymatch.ops import reference as ref

from helpers import devices

LEVELS = [[5], [7, 5], [5, 33, 7], [33, 7, 5]]
PAIRS = [(1, 1), (3, 17), (17, 3), (17, 17)]


def _inputs(q, g, sizes, gen, device="cpu", k=3, dtype=torch.float32, link_k=None):
    """Random AVSL inputs: embeddings, reliabilities in [0, 1), link* from random edges, coef ~ 1, bias ~ 0."""
    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)

    qs = [r(q, n) for n in sizes]
    gs = [r(g, n) for n in sizes]
    rq = [torch.rand(q, n, generator=gen, dtype=torch.float64).to(dtype) for n in sizes]
    rg = [torch.rand(g, n, generator=gen, dtype=torch.float64).to(dtype) for n in sizes]
    links = [ref.avsl_link_star(r(sizes[lv - 1], sizes[lv]), link_k or k).to(dtype) for lv in range(1, len(sizes))]
    coef = [1 + 0.5 * r(n) for n in sizes]
    bias = [0.1 * r(n) for n in sizes]
    out = (qs, gs, rq, rg, links, coef, bias)
    return tuple([t.to(device) for t in part] for part in out)


def _grads(fn, args, gamma, grad):
    qs, gs, rq, rg, links, coef, bias = args
    coef = [c.detach().clone().requires_grad_(True) for c in coef]
    bias = [b.detach().clone().requires_grad_(True) for b in bias]
    d = fn(qs, gs, rq, rg, links, coef, bias, gamma)
    if d.requires_grad:  # one level: the distance does not depend on coef or bias
        d.backward(grad)
    return d.detach(), [c.grad for c in coef], [b.grad for b in bias]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("sizes", LEVELS)
@pytest.mark.parametrize("q,g", PAIRS)
def test_distance_and_gradients_match_reference(device, sizes, q, g, gen):
    args = _inputs(q, g, sizes, gen, device)
    grad = torch.randn(q, g, generator=gen).to(device)
    d, gc, gb = _grads(ops.avsl_distance, args, 10.0, grad)
    rd, rgc, rgb = _grads(ref.avsl_distance, args, 10.0, grad)
    assert d.shape == (q, g) and d.dtype == torch.float32 and d.device.type == device
    torch.testing.assert_close(d, rd, rtol=1e-5, atol=1e-5)
    for lv in range(len(sizes)):
        if lv == 0:  # unused by the distance, as in the reference: no gradient
            assert gc[0] is None and gb[0] is None and rgc[0] is None
            continue
        for a, e in ((gc[lv], rgc[lv]), (gb[lv], rgb[lv])):
            scale = max(1.0, float(e.abs().max()))
            torch.testing.assert_close(a, e, rtol=2e-4, atol=2e-5 * scale)


@pytest.mark.parametrize("device", devices())
def test_realistic_sizes_float32(device, gen):
    # three levels of 64 nodes, k = 16 per column: the published configuration, scaled down
    args = _inputs(9, 40, [64, 64, 64], gen, device, k=16)
    for a in args[5]:
        a.fill_(1.0)
    for b in args[6]:
        b.zero_()
    torch.testing.assert_close(ops.avsl_distance(*args, 10.0), ref.avsl_distance(*args, 10.0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_k_larger_than_nodes_and_ties(device, gen):
    # k >= R_low keeps every entry; tied edges keep more than k per column; dense and tied links both work
    sizes = [5, 7, 6]
    args = list(_inputs(4, 9, sizes, gen, device, link_k=50))
    tied = torch.ones(7, 6, device=device)
    tied[0] = 2.0
    args[4] = [args[4][0], ref.avsl_link_star(tied, 2)]  # 6 tied entries per column beyond the top one
    assert int((args[4][1] > 0).sum(0).min()) == 7
    torch.testing.assert_close(ops.avsl_distance(*args, 10.0), ref.avsl_distance(*args, 10.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("q,g", [(0, 5), (4, 0), (0, 0)])
def test_zero_queries_or_gallery(device, q, g, gen):
    args = _inputs(q, g, [5, 7], gen, device)
    grad = torch.ones(q, g, device=device)
    d, gc, gb = _grads(ops.avsl_distance, args, 10.0, grad)
    assert d.shape == (q, g)
    assert gc[1].shape == (7,) and not gc[1].any() and not gb[1].any()
    if q == 0 and g > 0:
        v, i = ops.avsl_topk(*args, 10.0, 2)
        assert v.shape == (0, 2) and i.shape == (0, 2) and i.dtype == torch.int64


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("sizes", LEVELS)
@pytest.mark.parametrize("q,g,k", [(1, 1, 1), (3, 17, 5), (17, 3, 3), (17, 33, 17), (2, 40, 40)])
def test_topk_matches_reference(device, sizes, q, g, k, gen):
    args = _inputs(q, g, sizes, gen, device)
    v, i = ops.avsl_topk(*args, 10.0, k)
    rv, ri = ref.avsl_topk(*args, 10.0, k)
    assert v.shape == (q, k) and i.dtype == torch.int64
    assert torch.equal(i, ri)
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_topk_exclude_self_and_ties(device, gen):
    args = _inputs(17, 17, [5, 7], gen, device)
    v, i = ops.avsl_topk(*args, 10.0, 16, exclude_self=True)
    rv, ri = ref.avsl_topk(*args, 10.0, 16, exclude_self=True)
    assert torch.equal(i, ri) and not (i == torch.arange(17, device=device)[:, None]).any()
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)
    # duplicated gallery items tie exactly: the lower index comes first
    qs, gs, rq, rg, links, coef, bias = args
    dup = [torch.cat([x[:4], x[:4]]) for x in gs]
    rdup = [torch.cat([x[:4], x[:4]]) for x in rg]
    v, i = ops.avsl_topk(qs, dup, rq, rdup, links, coef, bias, 10.0, 8)
    assert torch.equal(v[:, 0::2], v[:, 1::2])
    assert torch.equal(i, ref.avsl_topk(qs, dup, rq, rdup, links, coef, bias, 10.0, 8)[1])
    assert bool((i[:, 0::2] < i[:, 1::2]).all())


@pytest.mark.parametrize("device", devices())
def test_gradcheck_float64(device, gen):
    qs, gs, rq, rg, links, coef, bias = _inputs(3, 5, [5, 7, 6], gen, device, dtype=torch.float64)
    params = [t.detach().clone().requires_grad_(True) for t in coef[1:] + bias[1:]]

    def fn(c1, c2, b1, b2):
        return ops.avsl_distance(qs, gs, rq, rg, links, [coef[0], c1, c2], [bias[0], b1, b2], 3.0)

    assert fn(*params).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, tuple(params))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.0, 1e-3, 3.0, 1e3, -1e3])
def test_reliability_sigmoid_across_its_range(device, dtype, gamma, gen):
    # The kernels compute sigmoid with their own vectorized exp: |gamma| = 1e3 drives z far into both
    # tails (saturation, the clamp), gamma = 0 gives p = 1/2 exactly; float64 must stay float64-accurate.
    args = _inputs(5, 23, [9, 17, 11], gen, device, k=4, dtype=dtype)
    got, want = ops.avsl_distance(*args, gamma), ref.avsl_distance(*args, gamma)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("device", devices())
def test_nan_reliability_gives_nan_distance_for_its_pairs_only(device, gen):
    qs, gs, rq, rg, links, coef, bias = _inputs(3, 20, [6, 8, 5], gen, device)
    rg = [r.clone() for r in rg]
    rg[2][7, 1] = float("nan")  # top level, one gallery item
    d = ops.avsl_distance(qs, gs, rq, rg, links, coef, bias, 10.0)
    want = ref.avsl_distance(qs, gs, rq, rg, links, coef, bias, 10.0)
    assert bool(d[:, 7].isnan().all()) and bool(want[:, 7].isnan().all())
    keep = torch.arange(20, device=device) != 7
    torch.testing.assert_close(d[:, keep], want[:, keep], rtol=1e-5, atol=1e-5)


def _packed(args, gamma=10.0):
    from whymatch.ops import avsl as A

    qe, ge, rq, rg, lk, cf, bs, sizes = A._pack(*args)
    return qe, ge, rq, rg, lk, cf, bs, sizes, gamma


def test_opcheck_every_op(gen):
    for sizes in ([5], [5, 7], [7, 33, 5]):
        for dtype in (torch.float32, torch.float64):
            args = _inputs(3, 6, sizes, gen, dtype=dtype)
            packed = _packed(args)
            torch.library.opcheck(torch.ops.whymatch.avsl_distance.default, packed)
            if len(sizes) > 1:
                grad_args = list(packed)
                grad_args[5] = grad_args[5].clone().requires_grad_(True)
                grad_args[6] = grad_args[6].clone().requires_grad_(True)
                torch.library.opcheck(torch.ops.whymatch.avsl_distance.default, tuple(grad_args))
            g = torch.randn(3, 6, generator=gen).to(packed[0].dtype)
            torch.library.opcheck(torch.ops.whymatch.avsl_distance_backward.default, (g,) + packed)
            torch.library.opcheck(torch.ops.whymatch.avsl_topk.default, packed + (4, False))
            sq = _packed(_inputs(6, 6, sizes, gen, dtype=dtype))
            torch.library.opcheck(torch.ops.whymatch.avsl_topk.default, sq + (5, True))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_distance_torch_compile(backend, gen):
    qs, gs, rq, rg, links, coef, bias = _inputs(4, 9, [5, 7, 6], gen)

    def loss(c1, b1):
        d = ops.avsl_distance(qs, gs, rq, rg, links, [coef[0], c1, coef[2]], [bias[0], b1, bias[2]], 10.0)
        return (d ** 2).mean()

    def grads(fn):
        c1, b1 = coef[1].clone().requires_grad_(True), bias[1].clone().requires_grad_(True)
        v = fn(c1, b1)
        v.backward()
        return v, c1.grad, b1.grad

    eager = grads(loss)
    compiled = grads(torch.compile(loss, fullgraph=True, backend=backend))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_double_backward_is_refused(gen):
    qs, gs, rq, rg, links, coef, bias = _inputs(2, 3, [5, 7], gen)
    c1 = coef[1].clone().requires_grad_(True)
    d = ops.avsl_distance(qs, gs, rq, rg, links, [coef[0], c1], bias, 10.0)
    (gc,) = torch.autograd.grad(d.sum(), [c1], create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        gc.sum().backward()


def test_backward_does_not_depend_on_thread_count(gen):
    args = _inputs(20, 37, [9, 11, 7], gen)
    grad = torch.randn(20, 37, generator=gen)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(ops.avsl_distance, args, 10.0, grad)
        torch.set_num_threads(2)
        two = _grads(ops.avsl_distance, args, 10.0, grad)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one[1][1:] + one[2][1:], two[1][1:] + two[2][1:]):
        assert torch.equal(a, b)


def test_fallback_to_reference(monkeypatch, gen):
    monkeypatch.setattr(_ext, "_cache", {"_C": None, "_C_cuda": None})
    monkeypatch.setattr(_ext, "_warned", set())
    args = _inputs(4, 9, [5, 7, 6], gen)
    grad = torch.randn(4, 9, generator=gen)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = _grads(ops.avsl_distance, args, 10.0, grad)
        v, i = ops.avsl_topk(*args, 10.0, 3)
    assert sum(issubclass(w.category, RuntimeWarning) for w in rec) == 1
    want = _grads(ref.avsl_distance, args, 10.0, grad)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for a, e in zip(got[1][1:] + got[2][1:], want[1][1:] + want[2][1:]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
    rv, ri = ref.avsl_topk(*args, 10.0, 3)
    assert torch.equal(i, ri)


def test_module_without_the_op_falls_back(monkeypatch, gen):
    class OldBuild:  # a compiled module from before the AVSL ops existed
        __version__ = _ext.__version__

    monkeypatch.setattr(_ext, "_cache", {"_C": OldBuild(), "_C_cuda": None})
    monkeypatch.setattr(_ext, "_warned", set())
    args = _inputs(3, 4, [5, 7], gen)
    with pytest.warns(RuntimeWarning, match="predates this op"):
        d = ops.avsl_distance(*args, 10.0)
    torch.testing.assert_close(d, ref.avsl_distance(*args, 10.0), rtol=1e-5, atol=1e-6)


def _good(gen):
    return _inputs(3, 4, [5, 7], gen)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a[0].__setitem__(1, torch.rand(2, 7)), r"queries\[1\] must have shape \(3, 7\)"),
    (lambda a: a[1].__setitem__(0, torch.rand(5)), r"galleries\[0\] must be a 2-D tensor"),
    (lambda a: a[2].pop(), r"rel_q must be a list of 2 tensors"),
    (lambda a: a[3].__setitem__(1, torch.rand(4, 8)), r"rel_g\[1\] must have shape \(4, 7\)"),
    (lambda a: a[4].__setitem__(0, torch.rand(7, 5)), r"links\[0\] must have shape \(5, 7\)"),
    (lambda a: a[5].__setitem__(1, torch.rand(6)), r"coef\[1\] must have shape \(7\), got \(6,\)"),
    (lambda a: a[6].__setitem__(1, torch.rand(7, 1)), r"bias\[1\] must be a 1-D tensor"),
])
def test_errors_name_the_argument(mutate, match, gen):
    args = [list(x) for x in _good(gen)]
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.avsl_distance(*args, 10.0)


def test_topk_errors_name_the_argument(gen):
    args = _good(gen)
    with pytest.raises(ValueError, match=r"k must be <= the number of gallery candidates per query \(4\), got 5"):
        ops.avsl_topk(*args, 10.0, 5)
    with pytest.raises(ValueError, match=r"exclude_self needs the gallery to be the query set"):
        ops.avsl_topk(*args, 10.0, 2, exclude_self=True)
    with pytest.raises(TypeError, match=r"k must be an int"):
        ops.avsl_topk(*args, 10.0, 2.0)
    with pytest.raises(ValueError, match=r"gamma must be finite"):
        ops.avsl_distance(*args, float("nan"))


def test_kernel_checks_become_value_errors():
    mod = _ext.cpu_module()
    z = (0, 0)
    with pytest.raises(ValueError, match=r"sizes must list 1 to 8 levels"):
        mod.avsl_distance(z, z, z, z, z, z, z, z, z, z, 1, 1, [], 10.0, 0, z, 1)
    with pytest.raises(ValueError, match=r"dtype must be float32 or float64"):
        mod.avsl_distance(z, z, z, z, z, z, z, z, z, z, 1, 1, [3], 10.0, 1, z, 1)
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\] \(the gallery candidates\), got 3"):
        mod.avsl_topk(z, z, z, z, z, z, z, z, z, z, z, 1, 2, [3], 10.0, 3, False, 0, z, 1)
    with pytest.raises(ValueError, match=r"qe must not be null"):  # a buffer the sizes say is there
        mod.avsl_distance(z, z, z, z, z, z, z, z, z, z, 1, 1, [3], 10.0, 0, z, 1)


_SMEM_SCRIPT = r"""
import sys
import torch
import whymatch.ops as ops
from whymatch.ops import reference as ref
g = torch.Generator().manual_seed(0)
R = [512, 512, 512]  # the published sizes: 48 KiB of hats fits 8 pairs per tile by default
Q, G = 5, 77
qs = [torch.randn(Q, r, generator=g).cuda() for r in R]
gs = [torch.randn(G, r, generator=g).cuda() for r in R]
rq = [torch.rand(Q, r, generator=g).cuda() for r in R]
rg = [torch.rand(G, r, generator=g).cuda() for r in R]
links = [ref.avsl_link_star(torch.randn(512, 512, generator=g), 128).cuda() for _ in range(2)]
coef = [(1 + 0.1 * torch.randn(r, generator=g)).cuda() for r in R]
bias = [(0.1 * torch.randn(r, generator=g)).cuda() for r in R]
args = (qs, gs, rq, rg, links, coef, bias, 10.0)
torch.testing.assert_close(ops.avsl_distance(*args), ref.avsl_distance(*args), rtol=1e-5, atol=1e-5)
v, i = ops.avsl_topk(*args, 7)
rv, ri = ref.avsl_topk(*args, 7)
torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)
assert torch.equal(i, ri)
print("ok")
"""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("smem", ["", "131072", "1"])
def test_cuda_shared_memory_limit_knob(smem):
    # WHYMATCH_AVSL_CUDA_SMEM: default 48 KiB (8 pairs per tile at R = 512), 128 KiB (opt-in, 32 pairs),
    # 1 byte (hats in global memory); read once per process, so each runs in its own
    import os
    import subprocess
    import sys

    env = {**os.environ, "WHYMATCH_AVSL_CUDA_SMEM": smem}
    p = subprocess.run([sys.executable, "-c", _SMEM_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_cuda_shared_memory_limit_knob_rejects_a_bad_value():
    import os
    import subprocess
    import sys

    script = _SMEM_SCRIPT.replace('print("ok")', "")
    env = {**os.environ, "WHYMATCH_AVSL_CUDA_SMEM": "48k"}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode != 0 and "WHYMATCH_AVSL_CUDA_SMEM must be a positive number of bytes, got '48k'" in p.stderr
