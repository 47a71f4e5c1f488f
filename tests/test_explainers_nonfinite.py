"""A model that returns NaN/Inf, or NaN/Inf input images: every explainer raises a ValueError that says so and
for which input, instead of returning NaN maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import whymatch
from whymatch import jobs
from whymatch.saliency import LIME, RISE, EmbeddingGradCAM, Mask, SimilarityAttention, SlidingWindow

pytestmark = pytest.mark.usefixtures("single_thread")


class Poisoned(nn.Module):
    """A small CNN whose embedding becomes ``value`` for images with a pixel below ``below``
    (below=None: for every image)."""

    def __init__(self, value=float("nan"), below=None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.value, self.below = value, below

    def forward(self, x):
        e = torch.relu(self.conv(x)).mean(dim=(2, 3)) + 0.1
        bad = torch.ones(x.shape[0], dtype=torch.bool) if self.below is None else \
            (x.flatten(1) < self.below).any(dim=1)
        return torch.where(bad[:, None], torch.full_like(e, self.value), e)


def bright(seed, *shape):
    """Images in [0.25, 0.75]: no pixel is ever at the 0 baseline."""
    return 0.25 + 0.5 * torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


MAKERS = {
    "rise": lambda sim: RISE(sim, n_masks=16, grid=4, batch_size=8, seed=0),
    "sliding": lambda sim: SlidingWindow(sim, window=4, stride=4, batch_size=8),
    "lime": lambda sim: LIME(sim, 16, segments="grid", n_segments=4, batch_size=8, seed=0),
    "mask": lambda sim: Mask(sim, n_iter=3, mask_size=4, blur_size=3, perturbation="constant", seed=0),
    "attention": lambda sim: SimilarityAttention(sim, "conv"),
    "gradcam": lambda sim: EmbeddingGradCAM(sim, "conv"),
}


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "Inf"), (-float("inf"), "Inf")])
@pytest.mark.parametrize("method", list(MAKERS))
def test_model_returning_non_finite_embeddings_is_named(method, value, word):
    sim = whymatch.SimilarityModel(Poisoned(value))
    ex = MAKERS[method](sim)
    q, r = bright(0, 3, 8, 8), bright(1, 2, 3, 8, 8)
    pattern = rf"similarity model produced non-finite embeddings \({word}\) for the"
    with pytest.raises(ValueError, match=pattern):
        ex.check(q, r)
    with pytest.raises(ValueError, match=pattern):
        ex.attribute(q, r)


@pytest.mark.parametrize("method, what", [("rise", "the perturbed queries"), ("sliding", "the occluded queries"),
                                          ("lime", "the perturbed queries")])
def test_model_non_finite_only_on_perturbed_images_is_named(method, what):
    """The clean query and references pass; the perturbed batch (pixels at the 0 baseline) gives NaN."""
    sim = whymatch.SimilarityModel(Poisoned(float("nan"), below=0.1))
    ex = MAKERS[method](sim)
    q, r = bright(0, 3, 8, 8), bright(1, 2, 3, 8, 8)
    ex.check(q, r)  # the unperturbed images are fine
    with pytest.raises(ValueError, match=f"non-finite embeddings \\(NaN\\) for {what}"):
        ex.attribute(q, r)


def test_mask_non_finite_during_optimization_is_named():
    sim = whymatch.SimilarityModel(Poisoned(float("nan")))
    emb = torch.rand(2, 4)
    with pytest.raises(ValueError, match=r"non-finite embeddings \(NaN\) for the masked queries at step 0"):
        MAKERS["mask"](sim).attribute(bright(0, 3, 8, 8), reference_embeddings=emb)


@pytest.mark.parametrize("method", [m for m in MAKERS if m != "attention"])  # attention uses w . f, not sim()
def test_similarity_function_returning_nan_is_named(method):
    net = Poisoned(1.0, below=-1.0)  # finite embeddings
    sim = whymatch.SimilarityModel(net, lambda a, b: (a @ b.T) * float("nan"))
    ex = MAKERS[method](sim)
    q, r = bright(0, 3, 8, 8), bright(1, 2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"non-finite similarity scores \(NaN\)"):
        ex.attribute(q, r)


class NanGradient(nn.Module):
    """Finite embeddings whose gradient w.r.t. the input is NaN (sqrt at 0)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        f = self.conv(x)
        return (torch.sqrt(f - f) + f).mean(dim=(2, 3))


@pytest.mark.parametrize("method", ["attention", "gradcam", "mask"])
def test_non_finite_gradients_are_named(method):
    sim = whymatch.SimilarityModel(NanGradient())
    q, r = bright(0, 3, 8, 8), bright(1, 2, 3, 8, 8)
    with pytest.raises(ValueError, match="non-finite"):
        MAKERS[method](sim).attribute(q, r)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", list(MAKERS))
def test_non_finite_input_images_are_named(method, bad):
    sim = whymatch.SimilarityModel(Poisoned(1.0, below=-1.0))
    ex = MAKERS[method](sim)
    q, r = bright(0, 3, 8, 8), bright(1, 2, 3, 8, 8)
    qb, rb = q.clone(), r.clone()
    qb[1, 2, 3] = bad
    rb[1, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"query must be finite, got 1 NaN or infinite"):
        ex.attribute(qb, r)
    with pytest.raises(ValueError, match=r"references must be finite, got 1 NaN or infinite"):
        ex.attribute(q, rb)
    with pytest.raises(ValueError, match=r"query must be finite"):
        ex.check(qb, r)


def test_explain_sets_stops_at_the_check_for_a_nan_model():
    sim = whymatch.SimilarityModel(Poisoned(float("nan")))
    sets = [("q0", bright(0, 3, 8, 8), bright(1, 2, 3, 8, 8), None)]
    with pytest.raises(ValueError, match=r"rise on q0: the similarity model produced non-finite embeddings"):
        jobs.explain_sets(sim, sets, ["rise", "gradcam"], jobs.JobSettings(n_masks=8))
