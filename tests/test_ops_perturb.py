"""The perturbation kernels against ops/reference.py: random inputs, odd and zero sizes, dtypes, devices."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import whymatch.ops as ops
from whymatch.ops import _ext
from whymatch.ops import reference as ref

from helpers import TOL, devices

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand_masks(n, s, size, gen, device, p=0.5, binary=True):
    grids = torch.rand(n, s, s, generator=gen)
    if binary:
        grids = (grids < p).float()
    ch, cw = math.ceil(size[0] / s), math.ceil(size[1] / s)
    shifts = torch.stack([torch.randint(0, ch, (n,), generator=gen), torch.randint(0, cw, (n,), generator=gen)], 1)
    return grids.to(device), shifts.to(device)


SHAPES = [  # (n, c, h, w, s)
    (7, 3, 32, 32, 8), (5, 3, 30, 29, 8), (4, 1, 17, 23, 5), (3, 2, 9, 9, 1), (6, 3, 5, 7, 8),
    (0, 3, 16, 16, 4), (3, 0, 16, 16, 4), (2, 3, 1, 1, 3), (9, 4, 13, 40, 7),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_rise_apply_matches_reference(device, dtype, channels_last, shape, gen):
    n, c, h, w, s = shape
    grids, shifts = rand_masks(n, s, (h, w), gen, device, binary=(n % 2 == 1))
    image = torch.rand(c, h, w, generator=gen).to(device)
    base = torch.rand(c, h, w, generator=gen).to(device)
    out = ops.rise_apply(grids, shifts, image, base, dtype=dtype, channels_last=channels_last)
    want = ref.rise_apply(grids, shifts, image, base, dtype, channels_last)
    assert out.shape == (n, c, h, w) and out.dtype == dtype and out.device.type == device
    if channels_last and n and c and h * w > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_rise_apply_into_out_buffer(device, dtype, channels_last, gen):
    grids, shifts = rand_masks(6, 5, (19, 22), gen, device)
    image = torch.rand(3, 19, 22, generator=gen).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    buf = torch.full((8, 3, 19, 22), float("nan"), dtype=dtype, device=device).contiguous(memory_format=fmt)
    out = ops.rise_apply(grids, shifts, image, 0.5, channels_last=channels_last, out=buf[:6])
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(out.float(), ops.rise_apply(grids, shifts, image, 0.5, dtype=dtype).float(),
                               **TOL[dtype])
    assert torch.isnan(buf[6:].float()).all()  # nothing written past the slice


def test_rise_apply_out_bad_buffers(gen):
    g, s, i = _ok_args(gen)
    with pytest.raises(ValueError, match=r"out must have shape \(3, 3, 10, 10\), got \(2, 3, 10, 10\)"):
        ops.rise_apply(g, s, i, out=torch.empty(2, 3, 10, 10))
    with pytest.raises(ValueError, match="out must be channels_last"):
        ops.rise_apply(g, s, i, channels_last=True, out=torch.empty(3, 3, 10, 10))
    with pytest.raises(ValueError, match="dtype must match out.dtype"):
        ops.rise_apply(g, s, i, dtype=torch.float16, out=torch.empty(3, 3, 10, 10))
    with pytest.raises(ValueError, match="out must have dtype"):
        ops.rise_apply(g, s, i, out=torch.empty(3, 3, 10, 10, dtype=torch.float64))


@pytest.mark.parametrize("device", devices())
def test_rise_apply_extreme_shifts_and_noncontiguous_inputs(device, gen):
    n, s, h, w = 4, 6, 25, 31
    ch, cw = math.ceil(h / s), math.ceil(w / s)
    grids = torch.rand(n, s, s, generator=gen).to(device).transpose(1, 2)  # non-contiguous, non-binary
    shifts = torch.tensor([[0, 0], [ch - 1, cw - 1], [0, cw - 1], [ch - 1, 0]], device=device)
    image = torch.rand(w, h, 3, generator=gen).to(device).permute(2, 1, 0)  # (3, h, w), non-contiguous
    out = ops.rise_apply(grids, shifts, image, 0.3)
    want = ref.rise_apply(grids.contiguous(), shifts, image.contiguous(), torch.full((3, h, w), 0.3, device=device),
                          torch.float32, False)
    torch.testing.assert_close(out, want, **TOL[torch.float32])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(50, 3, 32, 32, 8), (13, 1, 30, 29, 5), (9, 17, 7, 11, 3), (0, 2, 8, 8, 4),
                                   (5, 0, 8, 8, 4), (4, 2, 0, 5, 2), (1, 9, 3, 3, 8)])
def test_rise_saliency_matches_reference(device, shape, gen):
    n, k, h, w, s = shape
    grids, shifts = rand_masks(n, s, (max(h, 1), w), gen, device)
    scores = torch.randn(k, n, generator=gen).to(device).T  # non-contiguous
    out = ops.rise_saliency(grids, shifts, scores, (h, w))
    want = ref.rise_saliency(grids, shifts, scores, (h, w))
    assert out.shape == (k, h, w) and out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4 * max(1, n) ** 0.5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("score_dtype", DTYPES)
def test_rise_saliency_accepts_low_precision_scores(device, score_dtype, gen):
    grids, shifts = rand_masks(20, 4, (12, 12), gen, device)
    scores = torch.randn(20, 3, generator=gen).to(device, score_dtype)
    torch.testing.assert_close(ops.rise_saliency(grids, shifts, scores, (12, 12)),
                               ref.rise_saliency(grids, shifts, scores.float(), (12, 12)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 4), (1, 1, 7, 3, 1), (3, 2, 4, 4, 0), (0, 3, 4, 4, 3),
                                   (2, 0, 4, 4, 2), (4, 3, 9, 13, 11)])
def test_ranked_blend_matches_reference(device, dtype, shape, gen):
    b, c, h, w, t = shape
    first = torch.rand(b, c, h, w, generator=gen).to(device, dtype)
    second = torch.rand(b, c, h, w, generator=gen).to(device, dtype)
    rank = torch.stack([torch.randperm(h * w, generator=gen) for _ in range(b)]) if b else torch.zeros(0, h * w).long()
    counts = torch.randint(0, h * w + 1, (t,), generator=gen)
    rank, counts = rank.to(device), counts.to(device)
    out = ops.ranked_blend(first, second, rank, counts)
    want = ref.ranked_blend(first, second, rank, counts)
    assert out.shape == (b, t, c, h, w) and out.dtype == dtype
    assert torch.equal(out, want)  # a pure selection: exact


def test_ranked_blend_endpoints(gen):
    first, second = torch.rand(2, 3, 4, 5, generator=gen), torch.rand(2, 3, 4, 5, generator=gen)
    rank = torch.stack([torch.randperm(20, generator=gen) for _ in range(2)])
    out = ops.ranked_blend(first, second, rank, torch.tensor([0, 20]))
    assert torch.equal(out[:, 0], second) and torch.equal(out[:, 1], first)


def test_reference_masks_equal_skimage_resize_with_edge_mode(gen):
    sk = pytest.importorskip("skimage.transform")
    n, s, h, w = 3, 7, 40, 33
    grids, shifts = rand_masks(n, s, (h, w), gen, "cpu")
    _, _, up_h, up_w = ref.rise_grid_geometry((h, w), s)
    masks = ref.rise_masks(grids, shifts, (h, w))
    for i in range(n):
        up = sk.resize(grids[i].double().numpy(), (up_h, up_w), order=1, mode="edge", anti_aliasing=False)
        dy, dx = shifts[i].tolist()
        torch.testing.assert_close(masks[i].double(), torch.from_numpy(up[dy:dy + h, dx:dx + w]), rtol=0, atol=1e-5)


def test_opcheck_every_op(gen):
    grids, shifts = rand_masks(5, 4, (11, 13), gen, "cpu")
    image, base = torch.rand(3, 11, 13, generator=gen), torch.rand(3, 11, 13, generator=gen)
    for dt, cl in [(torch.float32, False), (torch.float16, True), (torch.bfloat16, False)]:
        torch.library.opcheck(torch.ops.whymatch.rise_apply.default, (grids, shifts, image, base, dt, cl))
    torch.library.opcheck(torch.ops.whymatch.rise_apply_out.default,
                          (grids, shifts, image, base, torch.empty(5, 3, 11, 13, dtype=torch.bfloat16)))
    torch.library.opcheck(torch.ops.whymatch.rise_saliency.default, (grids, shifts, torch.randn(5, 2), 11, 13))
    first, second = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    rank = torch.stack([torch.randperm(16) for _ in range(2)])
    torch.library.opcheck(torch.ops.whymatch.ranked_blend.default, (first, second, rank, torch.tensor([0, 5, 16])))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, gen):
    grids, shifts = rand_masks(6, 4, (12, 10), gen, "cpu")
    image = torch.rand(3, 12, 10, generator=gen)
    base = torch.zeros(3, 12, 10)

    def pipeline(grids, shifts, image, base):
        batch = torch.ops.whymatch.rise_apply(grids, shifts, image, base, torch.float32, False)
        scores = batch.mean(dim=(1, 2, 3))[:, None]
        sal = torch.ops.whymatch.rise_saliency(grids, shifts, scores, 12, 10)
        rank = torch.argsort(torch.argsort(-sal.reshape(1, -1), dim=1), dim=1)
        return sal, torch.ops.whymatch.ranked_blend(image[None], base[None], rank, torch.tensor([0, 60, 120]))

    eager = pipeline(grids, shifts, image, base)
    compiled = torch.compile(pipeline, fullgraph=True, backend=backend)(grids, shifts, image, base)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_fallback_to_reference_warns_once(monkeypatch, gen):
    monkeypatch.setattr(_ext, "_cache", {"_C": None, "_C_cuda": None})
    monkeypatch.setattr(_ext, "_warned", set())
    grids, shifts = rand_masks(4, 3, (9, 9), gen, "cpu")
    image = torch.rand(3, 9, 9, generator=gen)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = ops.rise_apply(grids, shifts, image, 0.0)
        ops.rise_saliency(grids, shifts, torch.randn(4, 2), (9, 9))
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "reference implementation" in msgs[0]
    torch.testing.assert_close(a, ref.rise_apply(grids, shifts, image, torch.zeros(3, 9, 9), torch.float32, False))


def test_stale_build_is_refused(monkeypatch):
    class Old:
        __version__ = "0.0.0-old"

    monkeypatch.setattr(_ext, "_cache", {})
    monkeypatch.setattr(_ext.importlib, "import_module", lambda name: Old())
    with pytest.raises(RuntimeError, match="stale.*pip install --force-reinstall"):
        _ext.cpu_module()


def _ok_args(gen):
    grids, shifts = rand_masks(3, 4, (10, 10), gen, "cpu")
    return grids, shifts, torch.rand(3, 10, 10, generator=gen)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda g, s, i: (g[0], s, i), ValueError, "grids must be a 3-D tensor, got 2-D"),
    (lambda g, s, i: (g[:, :, :3], s, i), ValueError, r"grids must have shape \(N, s, s\)"),
    (lambda g, s, i: (g.double(), s, i), ValueError, "grids must have dtype"),
    (lambda g, s, i: (g, s[:2], i), ValueError, r"shifts must have shape \(3, 2\), got \(2, 2\)"),
    (lambda g, s, i: (g, s.float(), i), ValueError, "shifts must have dtype int64, int32"),
    (lambda g, s, i: (g, s + 3, i), ValueError, r"shifts\[\d\] must lie in \[0, 3\) x \[0, 3\)"),
    (lambda g, s, i: (g, -s - 1, i), ValueError, r"shifts\[0\] must lie in"),
    (lambda g, s, i: (g, s, i[0]), ValueError, "image must be a 3-D tensor"),
    (lambda g, s, i: ("grids", s, i), TypeError, "grids must be a torch.Tensor, got str"),
])
def test_rise_apply_bad_input_names_the_argument(mutate, exc, match, gen):
    args = mutate(*_ok_args(gen))
    with pytest.raises(exc, match=match):
        ops.rise_apply(*args)


@pytest.mark.parametrize("via_env", [False, True])
def test_nan_data_propagates_unless_check_finite(via_env, gen, monkeypatch):
    """The ops' NaN rule: float data is not scanned by default (NaN propagates as in any torch op);
    set_check_finite(True) or WHYMATCH_CHECK_FINITE=1 turns on the named scans."""
    g, s, i = _ok_args(gen)
    nan_grids, inf_image = g.masked_fill(g >= 0, float("nan")), i.masked_fill(i > 0.5, float("inf"))
    assert ops.rise_apply(nan_grids, s, i).isnan().all()
    assert ops.rise_saliency(g, s, torch.full((3, 1), float("nan")), (10, 10)).isnan().all()
    if via_env:
        monkeypatch.setenv("WHYMATCH_CHECK_FINITE", "1")
    else:
        ops.set_check_finite(True)
    try:
        with pytest.raises(ValueError, match="grids must be finite"):
            ops.rise_apply(nan_grids, s, i)
        with pytest.raises(ValueError, match="image must be finite"):
            ops.rise_apply(g, s, inf_image)
        with pytest.raises(ValueError, match="scores must be finite"):
            ops.rise_saliency(g, s, torch.full((3, 1), float("nan")), (10, 10))
        with pytest.raises(ValueError, match="ranked_blend: first must be finite"):
            torch.ops.whymatch.ranked_blend(torch.full((1, 1, 2, 2), float("nan")), torch.zeros(1, 1, 2, 2),
                                            torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    finally:
        ops.set_check_finite(None)


def test_rise_apply_bad_baseline_and_dtype(gen):
    g, s, i = _ok_args(gen)
    with pytest.raises(ValueError, match=r"baseline must broadcast to the image shape \(3, 10, 10\)"):
        ops.rise_apply(g, s, i, torch.zeros(2, 10, 10))
    with pytest.raises(ValueError, match="baseline must be finite"):
        ops.rise_apply(g, s, i, float("nan"))
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16"):
        ops.rise_apply(g, s, i, dtype=torch.float64)
    with pytest.raises(ValueError, match="grids must be on"):
        ops.rise_apply(g.to("meta"), s.to("meta"), i)


def test_rise_saliency_bad_input(gen):
    g, s, _ = _ok_args(gen)
    with pytest.raises(ValueError, match=r"scores must have shape \(3, \*\), got \(4, 2\)"):
        ops.rise_saliency(g, s, torch.randn(4, 2), (10, 10))
    with pytest.raises(ValueError, match="scores must be a 2-D tensor"):
        ops.rise_saliency(g, s, torch.randn(3), (10, 10))
    with pytest.raises(ValueError, match="size must be a pair of non-negative ints"):
        ops.rise_saliency(g, s, torch.randn(3, 1), (10, -1))
    with pytest.raises(ValueError, match="size must be a pair"):
        ops.rise_saliency(g, s, torch.randn(3, 1), 10)


def test_ranked_blend_bad_input(gen):
    f = torch.rand(2, 3, 4, 4)
    r = torch.stack([torch.randperm(16) for _ in range(2)])
    c = torch.tensor([0, 8])
    with pytest.raises(ValueError, match=r"second must have shape \(2, 3, 4, 4\)"):
        ops.ranked_blend(f, f[:1], r, c)
    with pytest.raises(ValueError, match="second must have dtype float32"):
        ops.ranked_blend(f, f.half(), r, c)
    with pytest.raises(ValueError, match=r"rank must have shape \(2, 16\)"):
        ops.ranked_blend(f, f, r[:, :5], c)
    with pytest.raises(ValueError, match="counts must be a 1-D tensor"):
        ops.ranked_blend(f, f, r, c[None])
    with pytest.raises(ValueError, match="first must be a 4-D tensor"):
        ops.ranked_blend(f[0], f, r, c)
