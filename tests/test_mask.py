"""Mask (meaningful perturbation): semantics on a toy model, batched == per pair, substrates, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import whymatch
from whymatch.saliency import Mask
from whymatch.saliency.mask import gaussian_blur, median_blur


class BoxEmbedder(nn.Module):
    """Looks only at pixels [8:20, 8:20]: embedding = that box's 4x4-pooled pixels."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(x[:, :, 8:20, 8:20], 4).flatten(1) * self.scale - 0.5


def toy_sim():
    return whymatch.SimilarityModel(BoxEmbedder())


def rand(seed, *shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


FAST = dict(n_iter=60, lr=0.1, perturbation="constant", baseline=0.5, noise_std=0.0)


def test_saliency_lies_where_the_model_looks_and_similarity_drops():
    sim = toy_sim()
    q = rand(0, 3, 32, 32)
    # A light TV weight: with SANE's 0.2 (beta 3) deleting the whole image costs less than the
    # edges of a box, so on this toy the optimum spreads past the box (checked below).
    mk = Mask(sim, preset="sane", mask_size=8, tv_coeff=0.01, **FAST)
    sal = mk.attribute(q, q)
    assert sal.shape == (1, 32, 32) and sal.dtype == torch.float32
    assert float(sal.min()) >= 0 and float(sal.max()) <= 1
    inside, far = float(sal[0, 10:18, 10:18].mean()), float(sal[0, 26:, 26:].mean())
    assert inside > 0.3 and far < 0.05, (inside, far)
    assert mk.last_history[-1] < mk.last_history[0] - 0.2
    sane = Mask(sim, preset="sane", mask_size=8, **FAST)
    spread = sane.attribute(q, q)
    assert float(spread[0, 10:18, 10:18].mean()) > 0.9 and sane.last_history[-1] < sane.last_history[0] - 0.5


def test_batched_pairs_equal_one_pair_at_a_time_with_noise():
    sim = toy_sim()
    qs, rs = rand(0, 4, 3, 32, 32), rand(1, 4, 3, 32, 32)
    mk = Mask(sim, mask_size=6, n_iter=30, noise_std=0.05, perturbation="blur", blur_size=5, blur_sigma=2.0,
              seed=3, batch_size=4)
    together = mk.attribute_pairs(qs, rs)
    # pair i of a call draws its noise from generator (seed, i): a call of one pair with the same
    # index reproduces it when the batch is split (batch_size 1 keeps the indices).
    split = Mask(sim, mask_size=6, n_iter=30, noise_std=0.05, perturbation="blur", blur_size=5, blur_sigma=2.0,
                 seed=3, batch_size=1).attribute_pairs(qs, rs)
    torch.testing.assert_close(together, split, rtol=1e-4, atol=1e-5)
    first = mk.attribute_pairs(qs[:1], rs[:1])
    torch.testing.assert_close(together[:1], first, rtol=1e-4, atol=1e-5)


def test_attribute_k_references_is_attribute_pairs_and_embeddings():
    sim = toy_sim()
    q, refs = rand(0, 3, 32, 32), rand(1, 3, 3, 32, 32)
    mk = Mask(sim, mask_size=6, n_iter=20, noise_std=0.0)
    a = mk.attribute(q, refs)
    torch.testing.assert_close(a, mk.attribute_pairs(q[None].expand(3, -1, -1, -1), refs))
    torch.testing.assert_close(a, mk.attribute(q, reference_embeddings=sim.embed(refs)), rtol=1e-5, atol=1e-6)


def test_both_images_mode_learns_both_masks():
    sim = toy_sim()
    q, r = rand(0, 2, 3, 32, 32), rand(1, 2, 3, 40, 36)
    both = Mask(sim, mask_size=6, n_iter=30, noise_std=0.0, fixed_reference=False)
    mq, mr = both.attribute_pairs(q, r, return_reference_maps=True)
    assert mq.shape == (2, 32, 32) and mr.shape == (2, 40, 36)
    fixed = Mask(sim, mask_size=6, n_iter=30, noise_std=0.0).attribute_pairs(q, r)
    assert not torch.allclose(mq, fixed)
    assert float(mr[:, 10:18, 10:18].mean()) > float(mr[:, 28:, 28:].mean())
    with pytest.raises(ValueError, match="reference_embeddings"):
        both.attribute(q[0], reference_embeddings=sim.embed(r))


def test_substrates():
    x = rand(0, 2, 3, 9, 11)
    med = median_blur(x, 3)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    for b, c, i, j in [(0, 0, 0, 0), (1, 2, 4, 5), (0, 1, 8, 10), (1, 0, 3, 0)]:
        window = padded[b, c, i:i + 3, j:j + 3].flatten()
        assert float(med[b, c, i, j]) == float(window.sort().values[4])
    const = torch.full((1, 3, 12, 12), 0.3)
    torch.testing.assert_close(gaussian_blur(const, 5, 2.0), const)
    sim = toy_sim()
    gens = [torch.Generator().manual_seed(0)]
    mk = Mask(sim, perturbation="constant", baseline=0.25)
    torch.testing.assert_close(mk.perturbed(x[:1], gens), torch.full_like(x[:1], 0.25))
    noisy = Mask(sim, perturbation="noise").perturbed(x[:1], gens)
    assert 0.8 < float((noisy - x[:1]).std()) < 1.2


def test_no_parameter_grads_determinism_and_global_rng():
    sim = toy_sim()
    q, r = rand(0, 3, 32, 32), rand(1, 3, 32, 32)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    mk = Mask(sim, mask_size=5, n_iter=15, seed=1)
    a = mk.attribute(q, r)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in sim.parameters())
    torch.testing.assert_close(a, mk.attribute(q, r))
    assert not torch.allclose(a, mk.attribute(q, r, seed=2))


class NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        with torch.no_grad():
            return self.lin(x.mean(dim=(2, 3)))


def test_bad_input_errors():
    sim = toy_sim()
    q, r = rand(0, 3, 32, 32), rand(1, 3, 32, 32)
    for kw, match in [({"mask_size": 0}, "mask_size must be >= 1"), ({"n_iter": 0}, "n_iter must be >= 1"),
                      ({"lr": 0.0}, "lr must be in"), ({"l1_coeff": -1.0}, "l1_coeff must be in"),
                      ({"tv_beta": 0.0}, "tv_beta must be in"), ({"blur_size": 4}, "blur_size must be odd"),
                      ({"perturbation": "zeros"}, "perturbation must be one of"),
                      ({"noise_std": -0.1}, "noise_std must be in"), ({"seed": 1.5}, "seed must be an int")]:
        with pytest.raises((ValueError, TypeError), match=match):
            Mask(sim, **kw)
    with pytest.raises(ValueError, match="queries and references must pair up"):
        Mask(sim, n_iter=2).attribute_pairs(torch.stack([q, q]), r[None])
    with pytest.raises(ValueError, match="return_reference_maps needs fixed_reference=False"):
        Mask(sim, n_iter=2).attribute_pairs(q[None], r[None], return_reference_maps=True)
    with pytest.raises(ValueError, match="Mask needs gradients"):
        Mask(whymatch.SimilarityModel(NoGrad()), n_iter=2).attribute(q, r)
    with pytest.raises(ValueError, match="query must have 3 channels"):
        Mask(sim, n_iter=2).attribute(torch.rand(1, 32, 32), r)
