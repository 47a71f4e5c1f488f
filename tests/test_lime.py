"""LIME: exact recovery on linear toy models, the solvers, segmentation, normalization, determinism, bad input."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

import whymatch
from whymatch.saliency.lime import LIME, LimeResult, kernel_weights, make_segments, weighted_lasso, weighted_ridge


class BoxEmbedder(nn.Module):
    """Looks only at pixels [y0:y1, x0:x1]: embedding = that box's 4x4-pooled pixels."""

    def __init__(self, box=(8, 20, 8, 20)):
        super().__init__()
        self.box = box
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        y0, y1, x0, x1 = self.box
        region = x[:, :, y0:y1, x0:x1].float()
        return nn.functional.adaptive_avg_pool2d(region, 4).flatten(1) + 0.01 + self.dummy


class RegionSums(nn.Module):
    """Embedding r = sum of all channels' pixels in region r: with a 'dot' similarity the score is linear in z."""

    def __init__(self, labels):
        super().__init__()
        ids = torch.unique(labels)
        self.register_buffer("onehot", (labels[None] == ids[:, None, None]).float())

    def forward(self, x):
        return torch.einsum("bchw,rhw->br", x.float(), self.onehot)


class Recorder(nn.Module):
    """Mean of the image as a 1-D embedding, keeping a copy of every batch it sees."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x.float().mean(dim=(2, 3)) + self.dummy


def toy_sim():
    return whymatch.SimilarityModel(BoxEmbedder())


def images(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g)


def region_labels(h=24, w=20):
    """Five irregular regions with non-consecutive labels (renumbered 0..4 in increasing order)."""
    lab = torch.full((h, w), 9, dtype=torch.int64)
    lab[:10, :8] = 3
    lab[:10, 8:] = 7
    lab[10:, :5] = 12
    lab[16:, 5:14] = 5
    return lab


def blocks(seed=0, h=32, w=32):
    """Four flat colour quadrants plus a little noise: something superpixel methods can cut."""
    img = torch.zeros(3, h, w)
    img[:, : h // 2, : w // 2] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    img[:, : h // 2, w // 2:] = torch.tensor([0.1, 0.8, 0.2])[:, None, None]
    img[:, h // 2:, : w // 2] = torch.tensor([0.1, 0.2, 0.9])[:, None, None]
    img[:, h // 2:, w // 2:] = torch.tensor([0.9, 0.9, 0.1])[:, None, None]
    return (img + 0.02 * images(seed, 3, h, w)).clamp(0, 1)


# ------------------------------------------------------------- exact recovery
@pytest.mark.parametrize("solver, alpha", [("ridge", 1e-10), ("ridge", 0.0), ("lasso", 1e-10)])
@pytest.mark.parametrize("baseline", [0.0, 0.3])
def test_linear_model_weights_are_recovered(solver, alpha, baseline):
    lab = region_labels()
    sim = whymatch.SimilarityModel(RegionSums(lab), "dot")
    q = images(0, 3, 24, 20)
    v = torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.0], [0.0, 1.0, 0.0, -1.0, 2.0]])  # (K=2, R=5)
    # region sums of the query and of the baseline, in renumbered order (3, 5, 7, 9, 12)
    order = torch.tensor([3, 5, 7, 9, 12])
    onehot = (lab[None] == order[:, None, None]).float()
    qsum = torch.einsum("chw,rhw->r", q, onehot)
    bsum = baseline * 3 * onehot.sum(dim=(1, 2))
    expected = v * (qsum - bsum)                           # (K, R)
    expected_b = (v * bsum).sum(dim=1)
    lime = LIME(sim, 300, segments=lab, solver=solver, alpha=alpha, baseline=baseline, batch_size=64, seed=1)
    d = lime.attribute(q, reference_embeddings=v, return_details=True)
    assert isinstance(d, LimeResult)
    assert torch.equal(d.segments, torch.searchsorted(order, lab))
    torch.testing.assert_close(d.coefficients, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d.intercepts, expected_b, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(d.maps, expected[:, d.segments], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d.score_r2, torch.ones(2), rtol=0, atol=1e-6)
    maps = lime.attribute(q, reference_embeddings=v)
    assert maps.shape == (2, 24, 20) and maps.dtype == torch.float32
    torch.testing.assert_close(maps, d.maps)


def test_box_model_puts_weight_on_the_box_segments():
    sim = toy_sim()
    q = images(0, 3, 32, 32)
    refs = torch.stack([q, images(1, 3, 32, 32)])
    d = LIME(sim, 600, segments="grid", n_segments=16, seed=2).attribute(q, refs, return_details=True)
    seg = d.segments
    assert int(seg.max()) + 1 == 16
    in_box = torch.zeros(32, 32, dtype=torch.bool)
    in_box[8:20, 8:20] = True
    touches = torch.zeros(16, dtype=torch.bool)
    touches[seg[in_box].unique()] = True
    c = d.coefficients[0]
    assert touches[c.argmax()]  # for the self-reference, showing the box raises the similarity most
    assert c.max() > 0
    assert c[~touches].abs().max() < 0.1 * c.max()
    assert torch.isfinite(d.maps).all()


def test_k_references_equal_one_at_a_time_and_embeddings():
    sim = toy_sim()
    q = images(0, 3, 32, 32)
    refs = images(1, 4, 3, 32, 32)
    for solver in ("lasso", "ridge"):
        lime = LIME(sim, 200, segments="grid", n_segments=9, solver=solver, batch_size=64, seed=4)
        together = lime.attribute(q, refs)
        for k in range(4):
            torch.testing.assert_close(together[k:k + 1], lime.attribute(q, refs[k]), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(together, lime.attribute(q, reference_embeddings=sim.embed(refs)),
                                   rtol=1e-5, atol=1e-7)


def test_determinism_batch_size_and_global_rng():
    sim = toy_sim()
    q, r = images(0, 3, 32, 32), images(1, 3, 32, 32)
    torch.manual_seed(123)
    np.random.seed(5)
    state, np_state = torch.get_rng_state(), np.random.get_state()
    a = LIME(sim, 150, segments="grid", n_segments=12, batch_size=40, seed=7).attribute(q, r, return_details=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), np_state))
    b = LIME(sim, 150, segments="grid", n_segments=12, batch_size=150, seed=7).attribute(q, r, return_details=True)
    c = LIME(sim, 150, segments="grid", n_segments=12, batch_size=40, seed=8).attribute(q, r)
    d = LIME(sim, 150, segments="grid", n_segments=12, batch_size=40, seed=0).attribute(q, r, seed=7)
    assert torch.equal(a.samples, b.samples)
    torch.testing.assert_close(a.maps, b.maps, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.maps, d)
    assert not torch.allclose(a.maps, c)


# ---------------------------------------------------------------- sampling
def test_samples_weights_and_first_sample():
    sim = toy_sim()
    q = images(0, 3, 32, 32)
    d = LIME(sim, 400, segments="grid", n_segments=20, seed=3).attribute(q, q, return_details=True)
    s = int(d.segments.max()) + 1
    assert d.samples.shape == (400, s) and d.samples.dtype == torch.bool
    assert d.samples[0].all()
    frac = d.samples[1:].float().mean().item()
    assert 0.45 < frac < 0.55
    z = d.samples.double()
    cos = (z @ torch.ones(s, dtype=torch.float64)) / (z.norm(dim=1).clamp_min(1e-300) * s ** 0.5)
    expected = torch.sqrt(torch.exp(-((1 - cos) ** 2) / 0.25 ** 2))
    torch.testing.assert_close(d.sample_weights.double(), expected, rtol=1e-6, atol=1e-7)
    assert d.sample_weights[0] == 1.0
    # an all-zeros sample is at cosine distance 1
    torch.testing.assert_close(kernel_weights(torch.zeros(1, 4, dtype=torch.bool), 0.25),
                               torch.tensor([np.exp(-8.0)], dtype=torch.float64))
    # the first score is the unperturbed similarity
    torch.testing.assert_close(d.scores[0], sim.pairwise(sim.embed(q[None]), sim.embed(q[None]))[0])


# ------------------------------------------------------------------ solvers
def _cd_lasso(x, y, w, alpha, sweeps=3000):
    """Plain cyclic coordinate descent in numpy, one target: an independent reference."""
    wn = w / w.sum()
    xm, ym = wn @ x, wn @ y
    xc, yc = x - xm, y - ym
    g = xc.T @ (wn[:, None] * xc)
    c = xc.T @ (wn * yc)
    b = np.zeros(x.shape[1])
    for _ in range(sweeps):
        for j in range(len(b)):
            rho = c[j] - g[j] @ b + g[j, j] * b[j]
            b[j] = np.sign(rho) * max(abs(rho) - alpha, 0.0) / g[j, j] if g[j, j] > 0 else 0.0
    return b, ym - xm @ b


def test_weighted_lasso_matches_coordinate_descent_and_kkt():
    g = torch.Generator().manual_seed(0)
    n, s, k = 120, 8, 3
    x = (torch.rand(n, s, generator=g) < 0.5).double()
    beta = torch.randn(s, k, generator=g, dtype=torch.float64) * (torch.rand(s, 1, generator=g) < 0.6)
    y = x @ beta + 0.3 * torch.randn(n, k, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    alpha = torch.tensor([0.01, 0.05, 0.2], dtype=torch.float64)
    coef, b, alphas = weighted_lasso(x, y, w, alpha)
    torch.testing.assert_close(alphas, alpha)
    for j in range(k):
        ref_c, ref_b = _cd_lasso(x.numpy(), y[:, j].numpy(), w.numpy(), float(alpha[j]))
        np.testing.assert_allclose(coef[j].numpy(), ref_c, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(float(b[j]), ref_b, rtol=1e-6, atol=1e-8)
    # KKT: the weighted-mean residual correlation is -alpha*sign(c) on the support and within [-alpha, alpha] off it
    wn = w / w.sum()
    res = y - x @ coef.T - b
    grad = -(x - wn @ x).T @ (wn[:, None] * res)  # (S, K)
    nz = coef.T != 0
    assert nz.any() and (~nz).any()
    torch.testing.assert_close(grad[nz], (-alpha * torch.sign(coef.T))[nz], rtol=1e-6, atol=1e-9)
    assert bool((grad.abs() <= alpha + 1e-9)[~nz].all())
    # the default penalty is 1% of alpha_max; alpha_max itself zeroes everything
    _, _, amax_1pct = weighted_lasso(x, y, w)
    zero, b0, _ = weighted_lasso(x, y, w, amax_1pct * 100)
    assert bool((zero == 0).all())
    torch.testing.assert_close(b0, wn @ y)


def test_weighted_ridge_solves_the_normal_equations():
    g = torch.Generator().manual_seed(1)
    n, s = 90, 6
    x = (torch.rand(n, s, generator=g) < 0.5).double()
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64)
    coef, b = weighted_ridge(x, y, w, 1.0)
    # augmented least squares on [1, x] with an unpenalized intercept
    a = torch.cat([torch.ones(n, 1, dtype=torch.float64), x], dim=1) * w.sqrt()[:, None]
    a = torch.cat([a, torch.cat([torch.zeros(s, 1, dtype=torch.float64), torch.eye(s, dtype=torch.float64)], 1)])
    rhs = torch.cat([y * w.sqrt()[:, None], torch.zeros(s, 2, dtype=torch.float64)])
    sol = torch.linalg.lstsq(a, rhs).solution
    torch.testing.assert_close(b, sol[0])
    torch.testing.assert_close(coef, sol[1:].T)


def test_solvers_match_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    sim = toy_sim()
    q = images(0, 3, 32, 32)
    refs = torch.stack([q, images(1, 3, 32, 32)])
    for solver, alpha in (("lasso", 1e-3), ("ridge", 1.0)):
        d = LIME(sim, 300, segments="grid", n_segments=9, solver=solver, alpha=alpha, seed=0).attribute(
            q, refs, return_details=True)
        x = d.samples.double().numpy()
        pi = d.sample_weights.double().numpy()
        for k in range(2):
            y = d.scores[:, k].double().numpy()
            if solver == "lasso":
                # scikit-learn: (1/(2n)) sum sw_i r_i^2 + alpha |w|_1, sample weights rescaled to sum to n
                m = linear_model.Lasso(alpha=alpha, tol=1e-12, max_iter=100000).fit(x, y, sample_weight=pi)
            else:
                m = linear_model.Ridge(alpha=alpha).fit(x, y, sample_weight=pi)
            np.testing.assert_allclose(d.coefficients[k].numpy(), m.coef_, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(float(d.intercepts[k]), m.intercept_, rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------- segmentation
def _consecutive(seg):
    return torch.equal(seg.unique(), torch.arange(int(seg.max()) + 1))


@pytest.mark.parametrize("method", ["slic", "quickshift"])
def test_scikit_image_segments(method):
    pytest.importorskip("skimage")
    sim = toy_sim()
    q = blocks()
    d = LIME(sim, 60, segments=method, n_segments=8, seed=0).attribute(q, q, return_details=True)
    seg = d.segments
    assert seg.shape == (32, 32) and seg.dtype == torch.int64
    assert _consecutive(seg) and int(seg.max()) + 1 >= 2
    # the quadrants have different colours: no superpixel straddles two of them
    quads = [seg[:16, :16], seg[:16, 16:], seg[16:, :16], seg[16:, 16:]]
    for i, quadrant in enumerate(quads):
        others = torch.cat([quads[j].flatten() for j in range(4) if j != i])
        assert not bool(torch.isin(quadrant.unique(), others).any())
    assert d.samples[0].all()
    assert torch.equal(d.maps, d.coefficients[:, seg])


def test_grid_and_callable_segments_and_per_call_override():
    sim = toy_sim()
    q = images(0, 3, 30, 40)
    lime = LIME(sim, 50, segments="grid", n_segments=12, seed=0)
    d = lime.attribute(q, q, return_details=True)
    assert _consecutive(d.segments) and int(d.segments.max()) + 1 == 12
    assert d.samples[0].all()
    seen = []

    def stripes(img):
        seen.append(img)
        return (np.arange(img.shape[1])[None, :] // 10 * 5 + np.zeros((img.shape[0], 1), dtype=np.int64))

    d = lime.attribute(q, q, segments=stripes, return_details=True)
    assert torch.equal(d.segments, torch.arange(40).expand(30, 40) // 10)
    assert seen[0].shape == (30, 40, 3) and seen[0].dtype == np.float64
    np.testing.assert_allclose(seen[0], q.permute(1, 2, 0).double().numpy())
    # a constructor callable works too, and so does a single segment
    d = LIME(sim, 20, segments=lambda img: np.zeros(img.shape[:2], dtype=np.uint16), seed=0).attribute(
        q, q, return_details=True)
    assert bool((d.segments == 0).all()) and d.coefficients.shape == (1, 1)
    assert make_segments(np.zeros((5, 7, 3)), "grid", 100).max() == 34  # no more cells than pixels


def test_missing_scikit_image_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.segmentation", None)
    q = images(0, 3, 16, 16)
    with pytest.raises(ImportError, match=r"pip install scikit-image.*segments='grid'"):
        LIME(toy_sim(), 10, segments="slic").attribute(q, q)
    LIME(toy_sim(), 10, segments="grid").attribute(q, q)  # grid needs no scikit-image


# ------------------------------------------------------------- normalization
def test_normalization_hides_pixels_with_the_converted_baseline_and_segments_natural_images():
    rec = Recorder()
    sim = whymatch.SimilarityModel(rec, "dot")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    m = torch.tensor(mean)[:, None, None]
    s = torch.tensor(std)[:, None, None]
    q = (images(0, 3, 16, 20) - m) / s
    seen = []

    def grid4(img):
        seen.append(img)
        return np.repeat(np.repeat(np.arange(4).reshape(2, 2), 8, 0), 10, 1)

    lime = LIME(sim, 30, segments=grid4, baseline=0.1, input_mean=mean, input_std=std, batch_size=7, seed=0)
    d = lime.attribute(q, reference_embeddings=torch.ones(1, 3), return_details=True)
    np.testing.assert_allclose(seen[0], (q * s + m).clamp(0, 1).permute(1, 2, 0).double().numpy(), rtol=1e-6)
    x = torch.cat(rec.seen)
    assert x.shape == (30, 3, 16, 20) and max(b.shape[0] for b in rec.seen) == 7
    keep = d.samples[:, d.segments][:, None]               # (n, 1, H, W)
    hidden = ((0.1 - m) / s).expand_as(q)
    torch.testing.assert_close(x, torch.where(keep, q, hidden))
    assert (~keep).any()

    # a tensor baseline is natural too; 'mean' is the query's per-channel mean, already in model space
    rec.seen.clear()
    LIME(sim, 5, segments=grid4, baseline=torch.tensor([0.0, 0.5, 1.0])[:, None, None], input_mean=mean,
         input_std=std, seed=0).attribute(q, reference_embeddings=torch.ones(1, 3))
    hidden = (torch.tensor([0.0, 0.5, 1.0])[:, None, None] - m) / s
    x = torch.cat(rec.seen)
    assert any(torch.allclose(x[n, :, 0, 0], hidden[:, 0, 0]) for n in range(1, 5))
    rec.seen.clear()
    LIME(sim, 5, segments=grid4, baseline="mean", input_mean=mean, input_std=std, seed=0).attribute(
        q, reference_embeddings=torch.ones(1, 3))
    x = torch.cat(rec.seen)
    assert any(torch.allclose(x[n, :, 0, 0], q.mean(dim=(1, 2))) for n in range(1, 5))


def test_no_normalization_by_default_and_scalar_statistics():
    rec = Recorder()
    sim = whymatch.SimilarityModel(rec, "dot")
    q = images(0, 3, 8, 8)
    seg = torch.arange(4).repeat_interleave(16).reshape(8, 8)
    d = LIME(sim, 10, segments=seg, baseline=0.25, seed=0).attribute(
        q, reference_embeddings=torch.ones(1, 3), return_details=True)
    x = torch.cat(rec.seen)
    torch.testing.assert_close(x, torch.where(d.samples[:, seg][:, None], q, torch.full_like(q, 0.25)))
    rec.seen.clear()
    d = LIME(sim, 10, segments=seg, baseline=0.25, input_mean=0.5, input_std=0.5, seed=0).attribute(
        q, reference_embeddings=torch.ones(1, 3), return_details=True)
    x = torch.cat(rec.seen)
    torch.testing.assert_close(x, torch.where(d.samples[:, seg][:, None], q, torch.full_like(q, -0.5)))


def test_channels_last_model_and_progress_bar(capsys):
    sim = whymatch.SimilarityModel(BoxEmbedder(), channels_last=True)
    q = images(0, 3, 32, 32)
    a = LIME(sim, 40, segments="grid", n_segments=9, batch_size=16, show_progress=True).attribute(q, q)
    assert "LIME" in capsys.readouterr().err
    b = LIME(toy_sim(), 40, segments="grid", n_segments=9, batch_size=16).attribute(q, q)
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"n_samples": 0}, ValueError, "n_samples must be >= 1, got 0"),
        ({"n_samples": 2.5}, TypeError, "n_samples must be an int"),
        ({"n_segments": 0}, ValueError, "n_segments must be >= 1"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"segments": "felzenszwalb"}, ValueError, "segments must be one of 'quickshift', 'slic', 'grid'"),
        ({"segments": 5}, TypeError, "segments must be one of .* got int"),
        ({"segments": torch.zeros(2, 4, 4, dtype=torch.long)}, ValueError, "segments must be a 2-D tensor"),
        ({"segments": torch.zeros(4, 4)}, ValueError, "segments must have dtype .*got float32"),
        ({"input_mean": (0.1, 0.2)}, ValueError, r"input_mean must have 1 or 3 values .*got 2"),
        ({"input_std": 0.0}, ValueError, r"input_std must be in \(0, inf\], got 0"),
        ({"input_std": (1.0, -1.0, 1.0)}, ValueError, r"input_std\[1\] must be in \(0"),
        ({"input_mean": "imagenet"}, TypeError, "input_mean must be None, a number or a per-channel sequence"),
        ({"input_mean": float("nan")}, ValueError, "input_mean must be finite"),
        ({"kernel_width": 0.0}, ValueError, r"kernel_width must be in \(0, inf\], got 0"),
        ({"alpha": -1.0}, ValueError, r"alpha must be in \[0, inf\], got -1"),
        ({"solver": "ols"}, ValueError, "solver must be one of 'lasso', 'ridge', got 'ols'"),
        ({"baseline": "median"}, ValueError, "baseline must be one of 'mean', got 'median'"),
        ({"baseline": float("inf")}, ValueError, "baseline must be finite"),
        ({"seed": "a"}, TypeError, "seed must be an int or None"),
    ],
)
def test_rejects_bad_configuration(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LIME(toy_sim(), **kwargs)


def test_rejects_bad_inputs():
    sim = toy_sim()
    q = images(0, 3, 16, 16)
    lime = LIME(sim, 10, segments="grid", n_segments=4)
    with pytest.raises(TypeError, match="sim must be a whymatch.SimilarityModel"):
        LIME(nn.Identity())
    with pytest.raises(ValueError, match="query must be a 3-D tensor"):
        lime.attribute(q[0], q)
    with pytest.raises(ValueError, match="query must be one image"):
        lime.attribute(torch.stack([q, q]), q)
    with pytest.raises(ValueError, match="query must have 3 channels, got 1"):
        lime.attribute(q[:1], q)
    with pytest.raises(ValueError, match="references must be given"):
        lime.attribute(q)
    with pytest.raises(ValueError, match="segments must have the query's shape \\(16, 16\\), got \\(8, 8\\)"):
        lime.attribute(q, q, segments=torch.zeros(8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="segments must be one of"):
        lime.attribute(q, q, segments="watershed")
    with pytest.raises(ValueError, match="segments callable must return labels of shape \\(16, 16\\), got \\(3,\\)"):
        lime.attribute(q, q, segments=lambda img: np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="segments callable must return integer labels, got dtype float64"):
        lime.attribute(q, q, segments=lambda img: img[..., 0])
    with pytest.raises(ValueError, match="baseline must broadcast"):
        LIME(sim, 10, segments="grid", baseline=torch.zeros(2, 1, 1)).attribute(q, q)
    gray = whymatch.SimilarityModel(BoxEmbedder(), in_channels=None)
    with pytest.raises(ValueError, match="input_std must have 1 value, got 3"):
        LIME(gray, 10, segments="grid", input_std=(1.0, 1.0, 1.0)).attribute(q[:1], q[:1])
