"""The fused soft-mask kernels against ops/reference.py: values and gradients, dtypes, layouts, sizes, devices."""

from __future__ import annotations

import warnings

import pytest
import torch

import whymatch.ops as ops
from whymatch.ops import _ext
from whymatch.ops import reference as ref

from helpers import devices

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

SHAPES = [  # (b, c, H, W), (h, w)
    ((3, 3, 17, 23), (5, 4)),      # odd sizes, upsampling
    ((2, 3, 8, 8), (8, 8)),        # identity size
    ((2, 1, 5, 7), (11, 13)),      # downsampling
    ((1, 3, 1, 1), (1, 1)),
    ((2, 2, 9, 9), (1, 1)),        # one attention value per image
    ((2, 3, 56, 48), (7, 7)),      # the usual CAM ratio
    ((1, 5, 3, 40), (2, 9)),
]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(shape, att, dtype, device, gen, channels_last=False):
    x = torch.randn(*shape, generator=gen).to(dtype)
    m = torch.rand(shape[0], *att, generator=gen, dtype=torch.float64).to(_acc(dtype))
    x, m = x.to(device), m.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, m


def _run(fn, x, m, alpha, beta, g):
    x = x.detach().clone().requires_grad_(True)
    m = m.detach().clone().requires_grad_(True)
    a = torch.tensor(alpha, dtype=m.dtype, device=m.device, requires_grad=True)
    b = torch.tensor(beta, dtype=m.dtype, device=m.device, requires_grad=True)
    y = fn(x, m, a, b)
    y.backward(g)
    return y, x.grad, m.grad, a.grad, b.grad


def _close(actual, expected, dtype, what):
    """Outputs in ``dtype``: at most one rounding apart. Gradient sums: relative to their scale."""
    scale = max(1.0, float(expected.detach().double().abs().max())) if expected.numel() else 1.0
    if what == "elementwise":
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)
    else:
        tol = 1e-11 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_soft_mask_matches_reference(device, dtype, channels_last, shape, gen):
    (b, c, hh, ww), att = shape
    x, m = _inputs((b, c, hh, ww), att, dtype, device, gen, channels_last)
    g = torch.randn(b, c, hh, ww, generator=gen).to(dtype).to(device)
    got = _run(ops.soft_mask, x, m, 6.0, 0.45, g)
    want = _run(ref.soft_mask, x, m, 6.0, 0.45, g)
    assert got[0].dtype == dtype and got[0].shape == x.shape and got[0].device == x.device
    if channels_last and c > 1 and hh * ww > 1:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    _close(got[0], want[0], dtype, "elementwise")
    _close(got[1], want[1], dtype, "elementwise")
    for a, e in zip(got[2:], want[2:]):
        _close(a, e, dtype, "sum")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("alpha", [300.0, -300.0, 0.0])
def test_soft_mask_saturated_and_flat_sigmoid(device, alpha, gen):
    # alpha = +-300 drives the kernels' own exp past its clamp (|alpha (u - beta)| up to 165 > 80) on
    # both sides, 0 gives keep = 1/2; W = 37 leaves a tail after the 16-lane chunks. The tolerance
    # allows for alpha times the rounding of the interpolated map u (the kernel and the reference
    # interpolate in a different order), not for the exp.
    x, m = _inputs((2, 3, 9, 37), (3, 5), torch.float32, device, gen)
    got, want = ops.soft_mask(x, m, alpha, 0.45), ref.soft_mask(x, m, alpha, 0.45)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    x64, m64 = x.double(), m.double()
    torch.testing.assert_close(ops.soft_mask(x64, m64, 3.0, 0.45), ref.soft_mask(x64, m64, 3.0, 0.45),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", devices())
def test_soft_mask_large_image_small_map(device, gen):
    # 224 px images and 7 x 7 maps: windows of 64 output rows per attention row.
    x, m = _inputs((3, 3, 224, 224), (7, 7), torch.float32, device, gen)
    g = torch.randn(3, 3, 224, 224, generator=gen).to(device)
    got, want = _run(ops.soft_mask, x, m, 10.0, 0.5, g), _run(ref.soft_mask, x, m, 10.0, 0.5, g)
    for a, e, what in zip(got, want, ["elementwise", "elementwise", "sum", "sum", "sum"]):
        _close(a, e, torch.float32, what)


@pytest.mark.parametrize("device", devices())
def test_soft_mask_non_contiguous_and_4d_attention(device, gen):
    x = torch.randn(3, 4, 10, 12, generator=gen).to(device)[:, ::2]  # a channel slice
    m = torch.rand(3, 1, 6, 5, generator=gen).to(device)
    out = ops.soft_mask(x, m, 5.0, 0.3)
    torch.testing.assert_close(out, ref.soft_mask(x, m[:, 0], 5.0, 0.3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape,att", [((0, 3, 8, 8), (4, 4)), ((2, 0, 8, 8), (4, 4)), ((2, 3, 0, 5), (4, 4)),
                                       ((0, 3, 8, 8), (0, 0))])
def test_soft_mask_zero_sizes(device, shape, att):
    x = torch.randn(*shape, device=device, requires_grad=True)
    m = torch.rand(shape[0], *att, device=device, requires_grad=True)
    a = torch.tensor(4.0, device=device, requires_grad=True)
    y = ops.soft_mask(x, m, a, 0.5)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and m.grad.shape == m.shape
    assert not m.grad.any() and float(a.grad) == 0.0


@pytest.mark.parametrize("device", devices())
def test_soft_mask_gradcheck_float64(device, gen):
    x = torch.randn(2, 2, 7, 6, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    m = torch.rand(2, 3, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    a = torch.tensor(3.0, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.tensor(0.4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(ops.soft_mask, (x, m, a, b))
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.autograd.gradcheck(ops.soft_mask, (xc, m, a, b))


def test_soft_mask_only_requested_gradients(gen):
    x = torch.randn(2, 3, 8, 8, generator=gen, requires_grad=True)
    m = torch.rand(2, 4, 4, generator=gen)
    ops.soft_mask(x, m, 5.0, 0.5).sum().backward()
    torch.testing.assert_close(x.grad, ref.soft_mask(torch.ones_like(x), m, 5.0, 0.5))
    m.requires_grad_(True)
    x2 = torch.randn(2, 3, 8, 8, generator=gen)
    ops.soft_mask(x2, m, 5.0, 0.5).sum().backward()
    assert m.grad is not None and m.grad.abs().sum() > 0


def test_soft_mask_opcheck(gen):
    for dt, cl in [(torch.float32, False), (torch.float16, True), (torch.bfloat16, False), (torch.float64, True)]:
        x, m = _inputs((2, 3, 9, 11), (4, 3), dt, "cpu", gen, cl)
        acc = _acc(dt)
        a, b = torch.tensor(4.0, dtype=acc), torch.tensor(0.5, dtype=acc)
        torch.library.opcheck(torch.ops.whymatch.soft_mask.default, (x, m, a, b))
        torch.library.opcheck(torch.ops.whymatch.soft_mask.default,
                              (x.requires_grad_(True), m.requires_grad_(True), a.requires_grad_(True), b))
        g = torch.randn(2, 3, 9, 11, generator=gen).to(dt)
        for need_x, need_att in [(True, True), (True, False), (False, True)]:
            torch.library.opcheck(torch.ops.whymatch.soft_mask_backward.default,
                                  (g, x.detach(), m.detach(), a.detach(), b, need_x, need_att))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_soft_mask_torch_compile(backend, gen):
    x = torch.randn(2, 3, 12, 10, generator=gen)
    m = torch.rand(2, 3, 3, generator=gen)

    def loss(x, m, alpha):
        return (ops.soft_mask(x, m * 2, alpha, 0.5) ** 2).mean()

    def grads(fn):
        xs, ms = x.clone().requires_grad_(True), m.clone().requires_grad_(True)
        a = torch.tensor(5.0, requires_grad=True)
        v = fn(xs, ms, a)
        v.backward()
        return v, xs.grad, ms.grad, a.grad

    eager = grads(loss)
    compiled = grads(torch.compile(loss, fullgraph=True, backend=backend))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_soft_mask_double_backward_is_refused(gen):
    x = torch.randn(1, 2, 6, 6, generator=gen, requires_grad=True)
    m = torch.rand(1, 3, 3, generator=gen, requires_grad=True)
    (gx,) = torch.autograd.grad(ops.soft_mask(x, m, 4.0, 0.5).sum(), [m], create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        gx.sum().backward()


def test_soft_mask_fallback_to_reference(monkeypatch, gen):
    monkeypatch.setattr(_ext, "_cache", {"_C": None, "_C_cuda": None})
    monkeypatch.setattr(_ext, "_warned", set())
    x, m = _inputs((2, 3, 9, 7), (3, 3), torch.float32, "cpu", gen)
    g = torch.randn(2, 3, 9, 7, generator=gen)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = _run(ops.soft_mask, x, m, 5.0, 0.5, g)
    assert sum(issubclass(w.category, RuntimeWarning) for w in rec) == 1
    want = _run(ref.soft_mask, x, m, 5.0, 0.5, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("args,match", [
    (lambda: (torch.rand(2, 3, 8), torch.rand(2, 4, 4), 1.0, 0.5), r"x must be a 4-D tensor"),
    (lambda: (torch.rand(2, 3, 8, 8).int(), torch.rand(2, 4, 4), 1.0, 0.5), r"x must have dtype"),
    (lambda: (torch.rand(2, 3, 8, 8), torch.rand(3, 4, 4), 1.0, 0.5), r"one map per image: expected batch 2, got 3"),
    (lambda: (torch.rand(2, 3, 8, 8), torch.rand(2, 2, 4, 4), 1.0, 0.5), r"attention must have shape \(B, h, w\)"),
    (lambda: (torch.rand(2, 3, 8, 8), torch.rand(2, 0, 4), 1.0, 0.5), r"at least 1 x 1, got \(0, 4\)"),
    (lambda: (torch.rand(2, 3, 8, 8), torch.rand(2, 4, 4), float("nan"), 0.5), r"alpha must be finite"),
    (lambda: (torch.rand(2, 3, 8, 8), torch.rand(2, 4, 4), torch.ones(2), 0.5), r"alpha must be a number or a one"),
    (lambda: (torch.rand(2, 3, 8, 8), torch.rand(2, 4, 4), 1.0, "x"), r"beta must be a number, got str"),
])
def test_soft_mask_errors_name_the_argument(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.soft_mask(*args())


def test_nonfinite_attention_propagates_unless_check_finite():
    x, att = torch.rand(2, 3, 8, 8), torch.full((2, 4, 4), float("inf"))
    # no scan by default: inf propagates through the arithmetic exactly as in the reference
    torch.testing.assert_close(ops.soft_mask(x, att, 1.0, 0.5), ref.soft_mask(x, att, 1.0, 0.5), equal_nan=True)
    ops.set_check_finite(True)
    try:
        with pytest.raises(ValueError, match=r"attention must be finite"):
            ops.soft_mask(x, att, 1.0, 0.5)
    finally:
        ops.set_check_finite(None)


def test_module_without_the_op_falls_back(monkeypatch, gen):
    class OldBuild:  # a compiled module from before soft_mask existed
        __version__ = _ext.__version__

    monkeypatch.setattr(_ext, "_cache", {"_C": OldBuild(), "_C_cuda": None})
    monkeypatch.setattr(_ext, "_warned", set())
    x, m = _inputs((2, 3, 6, 5), (2, 2), torch.float32, "cpu", gen)
    with pytest.warns(RuntimeWarning, match="predates this op"):
        out = ops.soft_mask(x, m, 5.0, 0.5)
    torch.testing.assert_close(out, ref.soft_mask(x, m, 5.0, 0.5))
