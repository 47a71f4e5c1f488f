"""SimilarityModel: similarity kinds, batching, conditional similarity, input checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import whymatch
from whymatch.similarity import pairwise_similarity


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


@pytest.mark.parametrize("kind", ["cosine", "dot", "neg_l2"])
def test_pairwise_kinds_match_direct_formulas(kind):
    a, b = torch.randn(4, 6), torch.randn(3, 6)
    out = pairwise_similarity(a, b, kind)
    for i in range(4):
        for j in range(3):
            if kind == "cosine":
                want = torch.nn.functional.cosine_similarity(a[i], b[j], dim=0)
            elif kind == "dot":
                want = a[i] @ b[j]
            else:
                want = -(a[i] - b[j]).norm()
            assert out[i, j].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)


def test_embed_batches_equal_one_pass_and_no_grad():
    sim = whymatch.SimilarityModel(net()).eval()
    x = torch.rand(7, 3, 12, 12)
    full = sim.embed(x)
    torch.testing.assert_close(sim.embed(x, batch_size=3), full)
    assert full.shape == (7, 5) and not full.requires_grad
    assert sim(x).requires_grad  # forward keeps autograd for gradient methods


def test_preprocess_and_callable_similarity():
    calls = []
    sim = whymatch.SimilarityModel(net(), lambda a, b: a @ b.T * 2, preprocess=lambda x: calls.append(1) or x * 2)
    x = torch.rand(2, 3, 8, 8)
    e = sim.embed(x)
    assert calls
    torch.testing.assert_close(sim.pairwise(e, e), e @ e.T * 2)


def test_conditional_similarity_receives_the_condition():
    proj = {"top-shoe": torch.eye(5)[:3], "top-bag": torch.eye(5)[2:]}
    sim = whymatch.SimilarityModel(net(), conditional_similarity=lambda a, b, c: (a @ proj[c].T) @ (b @ proj[c].T).T)
    e = torch.randn(2, 5)
    torch.testing.assert_close(sim.pairwise(e, e, "top-shoe"), e[:, :3] @ e[:, :3].T)
    with pytest.raises(ValueError, match="condition must be given"):
        sim.pairwise(e, e)
    with pytest.raises(ValueError, match="no conditional_similarity"):
        whymatch.SimilarityModel(net()).pairwise(e, e, "top-shoe")


def test_similarity_of_pairs_and_channels_last():
    sim = whymatch.SimilarityModel(net(), channels_last=True, autocast=torch.bfloat16).eval()
    x1, x2 = torch.rand(3, 3, 10, 10), torch.rand(3, 3, 10, 10)
    s = sim.similarity(x1, x2)
    assert s.shape == (3,)
    e1, e2 = sim.embed(x1), sim.embed(x2)
    torch.testing.assert_close(s, torch.nn.functional.cosine_similarity(e1, e2))
    assert sim.input_dtype(torch.device("cpu")) == torch.float32  # autocast applies on CUDA only


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="embedder must be a torch.nn.Module"):
        whymatch.SimilarityModel(lambda x: x)
    with pytest.raises(ValueError, match="similarity must be 'cosine'"):
        whymatch.SimilarityModel(net(), "euclid")
    with pytest.raises(ValueError, match="autocast must be None"):
        whymatch.SimilarityModel(net(), autocast=torch.float64)
    sim = whymatch.SimilarityModel(net(), lambda a, b: a.sum(1))
    e = torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"must return shape \(2, 2\), got \(2,\)"):
        sim.pairwise(e, e)
    sim = whymatch.SimilarityModel(net())
    with pytest.raises(ValueError, match="x1 and x2 must hold the same number"):
        sim.similarity(torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match="images must have 3 channels, got 4"):
        sim.embed(torch.rand(2, 4, 8, 8))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        sim.embed(torch.rand(2, 3, 8, 8), batch_size=0)
    with pytest.raises(ValueError, match="embedder must return"):
        whymatch.SimilarityModel(nn.Conv2d(3, 2, 1)).embed(torch.rand(1, 3, 4, 4))


class _Returns(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.fn(x * self.w)


def test_bad_embedder_outputs_are_named():
    x = torch.rand(3, 3, 4, 4)
    with pytest.raises(TypeError, match="embedder must return a \\(B, D\\) tensor of embeddings, got tuple"):
        whymatch.SimilarityModel(_Returns(lambda x: (x.mean((2, 3)),))).embed(x)
    with pytest.raises(ValueError, match="one embedding per image: 3 images gave 1 embeddings"):
        whymatch.SimilarityModel(_Returns(lambda x: x.mean((0, 2, 3))[None])).embed(x)
    with pytest.raises(ValueError, match="real-valued embeddings, got dtype torch.complex64"):
        whymatch.SimilarityModel(_Returns(lambda x: x.mean((2, 3)).to(torch.complex64))).embed(x)
    sim = whymatch.SimilarityModel(_Returns(lambda x: x.mean((2, 3))))
    with pytest.raises(ValueError, match=r"one dimension D to compare, got shapes \(3, 3\) and \(2, 5\)"):
        sim.pairwise(sim.embed(x), torch.rand(2, 5))
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[1, 2, 3, 0] = bad
        with pytest.raises(ValueError, match=r"images must be finite, got 1 NaN or infinite value\(s\)"):
            sim.embed(y)
