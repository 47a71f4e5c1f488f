"""Explainer semantics on toy models whose answer is known, determinism, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import whymatch
from whymatch.saliency import RISE, SlidingWindow
from whymatch.saliency.sliding_window import window_boxes


class BoxEmbedder(nn.Module):
    """Looks only at pixels [y0:y1, x0:x1]: embedding = that box's 4x4-pooled pixels."""

    def __init__(self, box=(8, 20, 8, 20)):
        super().__init__()
        self.box = box
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x):
        y0, y1, x0, x1 = self.box
        region = x[:, :, y0:y1, x0:x1].float()
        return nn.functional.adaptive_avg_pool2d(region, 4).flatten(1) + 0.01 + self.dummy


def toy_sim():
    return whymatch.SimilarityModel(BoxEmbedder())


def images(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g)


def inside_outside(sal, box=(8, 20, 8, 20), far=(26, 32, 26, 32)):
    y0, y1, x0, x1 = box
    fy0, fy1, fx0, fx1 = far
    return sal[..., y0:y1, x0:x1].mean().item(), sal[..., fy0:fy1, fx0:fx1].mean().item()


@pytest.mark.parametrize("normalize", ["centered", "rise", "sane"])
def test_rise_puts_saliency_on_the_region_the_model_sees(normalize):
    sim = toy_sim()
    q = images(0, 3, 32, 32)
    refs = torch.stack([q, images(1, 3, 32, 32)])  # the query itself and a random image
    sal = RISE(sim, n_masks=1000, grid=4, p=0.5, batch_size=250, normalize=normalize, seed=3).attribute(q, refs)
    assert sal.shape == (2, 32, 32) and sal.dtype == torch.float32
    assert torch.isfinite(sal).all()
    inside, outside = inside_outside(sal[0])
    # For the self-reference, keeping the box raises the similarity; far pixels are uninformative.
    assert inside > outside + 0.02 * abs(outside)


def test_sliding_window_is_zero_where_the_model_does_not_look():
    sim = toy_sim()
    q = images(0, 3, 32, 32)
    sal = SlidingWindow(sim, window=4, stride=2, padding=0).attribute(q, q)
    assert sal.shape == (1, 32, 32)
    inside, outside = inside_outside(sal[0])
    assert abs(outside) < 1e-6  # exact but for the rounding of the window sums
    assert inside > 1e-3


def test_rise_k_references_equal_one_at_a_time_and_embeddings():
    sim = toy_sim()
    q = images(0, 3, 32, 32)
    refs = images(1, 5, 3, 32, 32)
    rise = RISE(sim, n_masks=300, grid=5, batch_size=64, seed=11)
    together = rise.attribute(q, refs)
    for k in range(5):
        torch.testing.assert_close(together[k:k + 1], rise.attribute(q, refs[k]), rtol=1e-5, atol=1e-6)
    emb = sim.embed(refs)
    torch.testing.assert_close(together, rise.attribute(q, reference_embeddings=emb), rtol=1e-5, atol=1e-6)


def test_rise_matches_the_materialized_masks_definition():
    sim = toy_sim()
    q = images(0, 3, 30, 27)
    refs = images(1, 2, 3, 30, 27)
    n, s, p = 200, 6, 0.3
    rise = RISE(sim, n_masks=n, grid=s, p=p, batch_size=50, seed=5, baseline=0.25, normalize="rise")
    sal = rise.attribute(q, refs)
    grids, shifts = rise.generate_masks((30, 27), n, whymatch.saliency._common.generator(5), q.device)
    masks = whymatch.ops.reference.rise_masks(grids, shifts, (30, 27))
    perturbed = masks[:, None] * q + (1 - masks[:, None]) * 0.25
    scores = sim.pairwise(sim.embed(perturbed), sim.embed(refs))
    expected = torch.einsum("nk,nhw->khw", scores, masks) / (n * p)
    torch.testing.assert_close(sal, expected, rtol=1e-4, atol=1e-5)
    # the default: mean score of the masks that keep a pixel minus the mean score of all masks
    centred = RISE(sim, n_masks=n, grid=s, p=p, batch_size=50, seed=5, baseline=0.25).attribute(q, refs)
    kept_mean = torch.einsum("nk,nhw->khw", scores, masks) / masks.sum(0)
    torch.testing.assert_close(centred, kept_mean - scores.mean(0)[:, None, None], rtol=1e-4, atol=1e-5)


def test_rise_both_images_mode_is_the_mean_of_perturbed_reference_maps():
    sim = toy_sim()
    q = images(0, 3, 32, 32)
    r = images(1, 3, 32, 32)
    rise = RISE(sim, n_masks=120, grid=4, batch_size=40, seed=2, fixed_reference=False, n_reference_masks=4)
    sal = rise.attribute(q, r)
    gen = whymatch.saliency._common.generator(2)
    grids, shifts = rise.generate_masks((32, 32), 120, gen, q.device)
    rg, rs = rise.generate_masks((32, 32), 4, gen, q.device)
    r_pert = whymatch.ops.rise_apply(rg, rs, r, 0.0)
    fixed = RISE(sim, n_masks=120, grid=4, batch_size=40, seed=2)
    maps = torch.stack([fixed.attribute(q, r_pert[m]) for m in range(4)])
    torch.testing.assert_close(sal, maps.mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="reference_embeddings"):
        rise.attribute(q, reference_embeddings=sim.embed(r[None]))


def test_sliding_window_both_images_mode_runs_and_differs():
    sim = toy_sim()
    q, r = images(0, 3, 32, 32), images(1, 3, 32, 32)
    fixed = SlidingWindow(sim, window=8, stride=4).attribute(q, r)
    both = SlidingWindow(sim, window=8, stride=4, fixed_reference=False).attribute(q, r)
    assert both.shape == fixed.shape == (1, 32, 32)
    assert not torch.allclose(both, fixed)


def test_window_boxes_follow_sane_layout():
    boxes = window_boxes((112, 112), (32, 32), (4, 4), (8, 8))
    assert boxes.shape == (625, 4)
    assert int(boxes[:, :2].min()) == 0 and int(boxes[:, 2:].max()) == 112
    assert bool(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all())


def test_determinism_and_global_rng_untouched():
    sim = toy_sim()
    q, r = images(0, 3, 32, 32), images(1, 3, 32, 32)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = RISE(sim, n_masks=100, batch_size=30, seed=7).attribute(q, r)
    assert torch.equal(torch.get_rng_state(), state)
    b = RISE(sim, n_masks=100, batch_size=70, seed=7).attribute(q, r)
    c = RISE(sim, n_masks=100, batch_size=30, seed=8).attribute(q, r)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # batch size does not change the answer
    assert not torch.allclose(a, c)
    d = RISE(sim, n_masks=100, batch_size=30, seed=0).attribute(q, r, seed=7)
    torch.testing.assert_close(a, d)


def test_progress_bar(capsys):
    sim = toy_sim()
    q = images(0, 3, 16, 16)
    RISE(sim, n_masks=20, batch_size=10, show_progress=True).attribute(q, q)
    assert "RISE" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_masks": 0}, "n_masks must be >= 1"),
        ({"p": 0.0}, r"p must be in \(0, 1\)"),
        ({"p": 1.5}, r"p must be in \(0, 1\)"),
        ({"p": float("nan")}, "p must be finite"),
        ({"grid": 0}, "grid must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"normalize": "max"}, "normalize must be one of"),
    ],
)
def test_rise_rejects_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RISE(toy_sim(), **kwargs)


def test_rise_rejects_bad_inputs():
    sim = toy_sim()
    rise = RISE(sim, n_masks=10)
    q = images(0, 3, 16, 16)
    with pytest.raises(TypeError, match="sim must be a whymatch.SimilarityModel"):
        RISE(nn.Identity())
    with pytest.raises(ValueError, match="query must have 3 channels, got 1"):
        rise.attribute(q[:1], q)
    with pytest.raises(ValueError, match="references must have 3 channels"):
        rise.attribute(q, q[None, :2])
    with pytest.raises(ValueError, match="query must be a 3-D tensor"):
        rise.attribute(q[0], q)
    with pytest.raises(ValueError, match="query must be one image"):
        rise.attribute(torch.stack([q, q]), q)
    with pytest.raises(ValueError, match="references must not be empty"):
        rise.attribute(q, q[None][:0])
    bad = q.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="query must be finite"):
        rise.attribute(bad, q)
    with pytest.raises(ValueError, match="query must have dtype"):
        rise.attribute(q.double(), q)
    with pytest.raises(ValueError, match="references must be given"):
        rise.attribute(q)
    with pytest.raises(ValueError, match="baseline must broadcast"):
        RISE(sim, n_masks=10, baseline=torch.zeros(2, 1, 1)).attribute(q, q)
    with pytest.raises(ValueError, match="query must be on the model's device"):
        rise.attribute(q.to("meta"), q)


def test_sliding_window_rejects_bad_inputs():
    sim = toy_sim()
    q = images(0, 3, 16, 16)
    with pytest.raises(ValueError, match="window must fit in the image"):
        SlidingWindow(sim, window=20).attribute(q, q)
    with pytest.raises(ValueError, match=r"window\[0\] must be >= 1"):
        SlidingWindow(sim, window=0)
    with pytest.raises(ValueError, match="stride must be an int or a pair"):
        SlidingWindow(sim, stride=(1, 2, 3))
    with pytest.raises(ValueError, match="references must have 3 channels"):
        SlidingWindow(sim, window=4).attribute(q, q[:2])


def test_rise_with_an_embedder_that_returns_a_view_of_its_input():
    class Flatten(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return x.flatten(1)  # aliases the reused input buffer

    sim = whymatch.SimilarityModel(Flatten())
    q, r = images(0, 3, 12, 12), images(1, 3, 12, 12)
    a = RISE(sim, n_masks=40, batch_size=8, seed=1).attribute(q, r)
    b = RISE(sim, n_masks=40, batch_size=40, seed=1).attribute(q, r)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
