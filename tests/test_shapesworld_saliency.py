"""On ShapesWorld, with the shipped model, saliency lands on the key object far above chance."""

from __future__ import annotations

import pytest
import torch

from whymatch.data import ShapesWorld
from whymatch.metrics import chance_level, mass_on_mask, pointing_game
from whymatch.models import load_default_model
from whymatch.saliency import RISE, EmbeddingGradCAM, SimilarityAttention, SlidingWindow


@pytest.fixture(scope="module")
def explained():
    sim = load_default_model()
    ds = ShapesWorld("test", n_samples=300, seed=5)
    pairs = ds.pairs(12, 1, seed=1)
    out = {"rise": [], "sliding": [], "attention": [], "gradcam": [], "masks": []}
    rise = RISE(sim, n_masks=500, batch_size=250, seed=0)
    sw = SlidingWindow(sim, window=16, stride=8)
    sa = SimilarityAttention(sim, "layer4")
    gc = EmbeddingGradCAM(sim, "layer4")
    for qi, refs in zip(pairs.query.tolist(), pairs.references):
        smp = ds.sample(qi)
        ref = ds[int(refs[0])][0]
        out["rise"].append(rise.attribute(smp.image, ref)[0])
        out["sliding"].append(sw.attribute(smp.image, ref)[0])
        out["attention"].append(sa.attribute(smp.image, ref)[0])
        out["gradcam"].append(gc.attribute(smp.image, ref)[0])
        out["masks"].append(smp.key_mask)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("method", ["rise", "sliding", "attention"])
def test_saliency_mass_and_peak_on_the_key_object(explained, method):
    masks = explained["masks"]
    chance = float(chance_level(masks).mean())
    mass = float(mass_on_mask(explained[method], masks).mean())
    hits = float(pointing_game(explained[method], masks, tolerance=3).float().mean())
    # RISE maps are smooth (one grid cell is 12 px here), so their mass spreads past
    # the object; the peak is the sharp test.
    assert mass > 1.5 * chance, (mass, chance)
    assert hits >= max(0.5, 5 * chance), (hits, chance)


def test_embedding_grad_cam_is_reported_not_required(explained):
    """The similarity's own Grad-CAM is a baseline: only finite, non-negative and not all zero is required."""
    m = explained["gradcam"]
    assert torch.isfinite(m).all() and float(m.min()) >= 0 and float(m.flatten(1).amax(1).min()) > 0
