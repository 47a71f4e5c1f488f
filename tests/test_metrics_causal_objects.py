"""Saliency against causal object removal (issue 17 item 6): ground truth, the named object, agreement."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from whymatch.data import ShapesWorld
from whymatch.metrics.causal_objects import (
    CausalObjectEffects,
    causal_object_agreement,
    causal_object_chance,
    causal_object_effects,
    pad_object_masks,
    saliency_top_object,
)
from whymatch.similarity import SimilarityModel


class BrightArea(nn.Module):
    """Embedding = the share of bright pixels: with a dot product, removing the brightest-largest object hurts most."""

    def forward(self, x):
        return (x.amax(1) > 0.7).float().mean(dim=(1, 2))[:, None] * 100


def test_causal_effects_find_the_object_the_model_relies_on():
    ds = ShapesWorld("test", 6, seed=3)
    sim = SimilarityModel(BrightArea(), "dot")
    q = [0, 1, 2]
    ref = sim.embed(torch.stack([ds[i][0] for i in q]))
    eff = causal_object_effects(sim, ds, q, ref)
    assert len(eff) == 3
    for row, qi in enumerate(q):
        smp = ds.sample(qi)
        n = len(smp.objects)
        assert int(eff.n_objects[row]) == n
        assert torch.isnan(eff.effects[row, n:]).all()
        # by hand: the model's similarity drop when each object is rendered away
        for k in range(n):
            e = float(sim.embed(ds.render(qi, hide=[k])[None])[0, 0])
            expect = float(eff.base[row]) - e * float(ref[row, 0])
            assert math.isclose(float(eff.effects[row, k]), expect, rel_tol=1e-4, abs_tol=1e-3)
    assert eff.top.shape == (3,) and int(eff.top.min()) >= 0


def test_top_object_mass_and_point():
    masks = torch.zeros(2, 3, 8, 8, dtype=torch.bool)
    masks[:, 0, :4, :4] = True      # big object
    masks[:, 1, 6:, 6:] = True      # small object
    maps = torch.zeros(2, 8, 8)
    maps[0, 0, 0] = 1.0              # pair 0: mass on object 0, the peak there too
    maps[1, 7, 7] = 5.0              # pair 1: the peak on object 1 ...
    maps[1, :4, :4] = 0.5            # ... but more mass (16 x 0.5 = 8 > 5) on object 0
    assert saliency_top_object(maps, masks, "mass").tolist() == [0, 0]
    assert saliency_top_object(maps, masks, "point").tolist() == [0, 1]
    # a peak on the background, or no positive mass anywhere: no object
    bg = torch.zeros(1, 8, 8)
    bg[0, 5, 0] = 1.0
    assert saliency_top_object(bg, masks[:1], "point").tolist() == [-1]
    assert saliency_top_object(-torch.ones(1, 8, 8), masks[:1], "mass").tolist() == [-1]
    # shift='mean' reads an uncentred map (a constant offset) like the centred one
    assert saliency_top_object(maps + 3.0, masks, "mass", shift="mean").tolist() == [0, 0]


def test_agreement_and_chance_by_hand():
    eff = torch.tensor([[0.8, 0.0, float("nan")], [0.1, 0.3, 0.3], [float("nan")] * 3])
    chosen = torch.tensor([0, 2, 0])
    got = causal_object_agreement(chosen, eff)
    assert got[:2].tolist() == [1.0, 1.0] and math.isnan(float(got[2]))  # a tie counts
    assert causal_object_agreement(torch.tensor([1, -1, 0]), eff)[:2].tolist() == [0.0, 0.0]
    masks = torch.zeros(3, 3, 4, 4, dtype=torch.bool)
    masks[:, 0, 0, :] = True
    masks[:, 1, 1, :2] = True
    masks[1:, 2, 3, :] = True
    wrapped = CausalObjectEffects(effects=eff, base=torch.zeros(3), n_objects=torch.tensor([2, 3, 3]))
    chance = causal_object_chance(masks, wrapped, "mass")
    assert chance[:2].tolist() == pytest.approx([1 / 2, 2 / 3])
    point = causal_object_chance(masks, eff, "point")
    assert point[:2].tolist() == pytest.approx([4 / 16, 6 / 16])


def test_pad_object_masks():
    a, b = torch.ones(2, 4, 4, dtype=torch.bool), torch.ones(3, 4, 4, dtype=torch.bool)
    out = pad_object_masks([a, b])
    assert out.shape == (2, 3, 4, 4) and not out[0, 2].any() and out[1].all()
    with pytest.raises(ValueError, match=r"masks\[1\]"):
        pad_object_masks([a, torch.ones(1, 5, 5)])


@pytest.mark.parametrize("call, err, match", [
    (lambda: saliency_top_object(torch.zeros(2, 4, 4), torch.zeros(3, 1, 4, 4, dtype=torch.bool)), ValueError,
     "object_masks"),
    (lambda: saliency_top_object(torch.zeros(1, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.bool), "peak"), ValueError,
     "rule"),
    (lambda: saliency_top_object(torch.full((1, 4, 4), float("nan")), torch.zeros(1, 1, 4, 4, dtype=torch.bool)),
     ValueError, "saliency"),
    (lambda: saliency_top_object(torch.zeros(1, 4, 4), torch.full((1, 1, 4, 4), 0.5)), ValueError, "object_masks"),
    (lambda: causal_object_agreement(torch.tensor([0.5]), torch.zeros(1, 2)), TypeError, "chosen"),
    (lambda: causal_object_agreement(torch.tensor([2]), torch.zeros(1, 2)), ValueError, "chosen"),
    (lambda: causal_object_agreement(torch.tensor([0, 0]), torch.zeros(1, 2)), ValueError, "chosen"),
    (lambda: causal_object_chance(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2)), ValueError, "object_masks"),
    (lambda: causal_object_effects("model", ShapesWorld("test", 4), [0], torch.zeros(1, 1)), TypeError,
     "similarity"),
    (lambda: causal_object_effects(SimilarityModel(BrightArea(), "dot"), object(), [0], torch.zeros(1, 1)),
     TypeError, "dataset"),
    (lambda: causal_object_effects(SimilarityModel(BrightArea(), "dot"), ShapesWorld("test", 4), [0, 1],
                                   torch.zeros(1, 1)), ValueError, "reference_embeddings"),
])
def test_errors_name_the_argument(call, err, match):
    with pytest.raises(err, match=match):
        call()
