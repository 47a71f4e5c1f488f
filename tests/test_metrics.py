"""Insertion/deletion and the pointing game on cases where the answer is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import whymatch
from whymatch.metrics import (chance_level, curve_auc, insertion_deletion, make_substrate, mass_on_mask,
                              normalize_curves, pointing_game, saliency_rank)


class Region(nn.Module):
    """Embedding = the 2x2-pooled pixels of rows/cols [4, 12) plus a constant."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.cat([nn.functional.adaptive_avg_pool2d(x[:, :, 4:12, 4:12], 2).flatten(1),
                          torch.full((x.shape[0], 1), 0.05)], 1) + self.p


def setup(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sim = whymatch.SimilarityModel(Region())
    q = torch.rand(b, 3, 16, 16, generator=g) + 0.2
    good = torch.zeros(b, 16, 16)
    good[:, 4:12, 4:12] = 1 + torch.rand(b, 8, 8, generator=g)
    bad = 1 - good.clamp(max=1) + 0.01 * torch.rand(b, 16, 16, generator=g)
    return sim, q, good, bad


def test_saliency_on_the_seen_region_beats_the_reverse():
    sim, q, good, bad = setup()
    rg = insertion_deletion(sim, q, q, good, substrate=0.0, n_steps=32)
    rb = insertion_deletion(sim, q, q, bad, substrate=0.0, n_steps=32)
    assert (rg.deletion.auc < rb.deletion.auc - 0.2).all()
    assert (rg.insertion.auc > rb.insertion.auc + 0.2).all()
    assert rg.fractions[0] == 0 and rg.fractions[-1] == 1 and rg.fractions.numel() == 33


def test_curves_endpoints_are_the_unperturbed_and_fully_perturbed_similarity():
    sim, q, good, _ = setup(b=2)
    r = insertion_deletion(sim, q, q, good, substrate=0.3, n_steps=10, normalize=None)
    e = sim.embed(q)
    full = sim.pairwise(e, e).diag()
    sub = sim.pairwise(sim.embed(torch.full_like(q, 0.3)), e).diag()
    torch.testing.assert_close(r.deletion.curves[:, 0], full)
    torch.testing.assert_close(r.deletion.curves[:, -1], sub)
    torch.testing.assert_close(r.insertion.curves[:, 0], sub)
    torch.testing.assert_close(r.insertion.curves[:, -1], full)


def test_chunking_does_not_change_the_result():
    sim, q, good, _ = setup(b=3)
    a = insertion_deletion(sim, q, q, good, n_steps=20, batch_size=1000)
    b = insertion_deletion(sim, q, q, good, n_steps=20, batch_size=7)  # splits a pair's curve
    c = insertion_deletion(sim, q, q, good, n_steps=20, batch_size=42)  # two pairs per batch
    for x in (b, c):
        torch.testing.assert_close(x.insertion.curves, a.insertion.curves)
        torch.testing.assert_close(x.deletion.curves, a.deletion.curves)


def test_flat_curve_gives_half_not_nan():
    curves = torch.tensor([[0.7, 0.7, 0.7], [0.0, 0.5, 1.0]])
    n = normalize_curves(curves)
    assert torch.isfinite(n).all()
    torch.testing.assert_close(curve_auc(n), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(curve_auc(torch.tensor([[1.0, 0.0]])), torch.tensor([0.5]))
    torch.testing.assert_close(curve_auc(torch.tensor([[1.0, 1.0, 0.0]])), torch.tensor([0.75]))


def test_saliency_rank_is_a_stable_descending_permutation():
    s = torch.tensor([[[0.1, 0.9], [0.9, 0.3]]])
    assert saliency_rank(s).tolist() == [[3, 0, 1, 2]]


def test_substrates():
    x = torch.rand(2, 3, 20, 20)
    assert torch.equal(make_substrate(x, "zeros"), torch.zeros_like(x))
    blur = make_substrate(x, "blur")
    assert blur.shape == x.shape and blur.std() < x.std()
    torch.testing.assert_close(make_substrate(torch.full((1, 3, 20, 20), 0.4), "blur"), torch.full((1, 3, 20, 20), 0.4))
    col = make_substrate(x, (0.1, 0.2, 0.3))
    assert col[1, 2, 5, 5] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="substrate must be one of"):
        make_substrate(x, "noise")
    with pytest.raises(ValueError, match="substrate must be 'blur', 'zeros', 'mean', a number, 3 per-channel"):
        make_substrate(x, (0.1, 0.2))


def test_pointing_game_mass_and_chance():
    sal = torch.zeros(2, 8, 8)
    sal[0, 2, 2] = 1.0
    sal[1, 7, 7] = 1.0
    sal[1, 0, 0] = -5.0
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 1:4, 1:4] = True
    assert pointing_game(sal, masks).tolist() == [True, False]
    masks2 = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks2[:, 5, 5] = True
    assert pointing_game(sal, masks2, tolerance=2).tolist() == [False, True]
    torch.testing.assert_close(mass_on_mask(sal, masks, shift="none"), torch.tensor([1.0, 0.0]))
    assert mass_on_mask(torch.zeros(1, 8, 8), masks[:1]).item() == 0.0  # no mass: 0, not NaN
    # a constant offset does not change the energy-based score (shift='min') nor the mean-centred one
    for shift in ("min", "mean"):
        torch.testing.assert_close(mass_on_mask(sal[:1] + 10, masks[:1], shift=shift),
                                   mass_on_mask(sal[:1], masks[:1], shift=shift))
    # the default reads zero as "no effect" (centred maps): an offset map is mostly mass outside the mask
    assert mass_on_mask(sal[:1] + 10, masks[:1]).item() < 0.2
    with pytest.raises(ValueError, match="shift must be one of"):
        mass_on_mask(sal, masks, shift="max")
    torch.testing.assert_close(chance_level(masks), torch.full((2,), 9 / 64))


def test_bad_input_names_the_argument():
    sim, q, good, _ = setup(b=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        insertion_deletion(sim, q, q, good, mode="both-ways")
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        insertion_deletion(sim, q, q, good, n_steps=0)
    with pytest.raises(ValueError, match=r"saliency must have shape \(2, 16, 16\)"):
        insertion_deletion(sim, q, q, good[:, :8])
    with pytest.raises(ValueError, match="references must hold one image per query"):
        insertion_deletion(sim, q, q[:1], good)
    with pytest.raises(ValueError, match="saliency must be finite"):
        insertion_deletion(sim, q, q, good * float("nan"))
    with pytest.raises(ValueError, match="normalize must be"):
        insertion_deletion(sim, q, q, good, normalize="z")
    with pytest.raises(ValueError, match=r"masks must have shape \(2, 16, 16\)"):
        pointing_game(good, torch.ones(2, 4, 4, dtype=torch.bool))


def test_ground_truth_scores_refuse_nan_maps_and_soft_masks():
    """NaN would win every argmax and vanish from the mass; a soft mask would be rounded: named errors instead."""
    maps = torch.rand(2, 8, 8)
    hard = torch.zeros(2, 8, 8, dtype=torch.bool)
    hard[:, 2:4, 2:4] = True
    nan_maps = maps.clone()
    nan_maps[0, 0, 0] = float("nan")
    for fn in (pointing_game, mass_on_mask):
        with pytest.raises(ValueError, match="saliency must be finite"):
            fn(nan_maps, hard)
        with pytest.raises(ValueError, match="masks must be bool"):
            fn(maps, hard.float() * 0.7)
        assert torch.equal(fn(maps, hard.float()), fn(maps, hard))  # 0/1 masks of any dtype are accepted
    with pytest.raises(ValueError, match="masks must be bool"):
        chance_level(torch.full((2, 8, 8), 0.5))
