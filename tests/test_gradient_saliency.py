"""SimilarityAttention and EmbeddingGradCAM: formulas against direct computations, semantics, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import whymatch
from whymatch.saliency import EmbeddingGradCAM, SimilarityAttention
from whymatch.saliency.attention import similarity_weights


def colour_model():
    """Embedding = global average of the image's colour channels, after an identity 1x1 conv (the target)."""
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(3, 3, 1, bias=False))
    with torch.no_grad():
        net.conv.weight.copy_(torch.eye(3)[:, :, None, None])
    net.add_module("gap", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    return whymatch.SimilarityModel(net.eval())


def red_square_pair():
    """A query that is black but for a red square [8:20, 8:20] and a blue one [22:30, 22:30]; a red reference."""
    q = torch.zeros(3, 32, 32)
    q[0, 8:20, 8:20] = 1.0
    q[2, 22:30, 22:30] = 1.0
    r = torch.zeros(3, 32, 32)
    r[0] = 1.0
    return q, r


def small_cnn(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential()
    net.add_module("c1", nn.Conv2d(3, 8, 3, padding=1))
    net.add_module("r1", nn.ReLU())
    net.add_module("c2", nn.Conv2d(8, 8, 3, padding=1, stride=2))
    net.add_module("r2", nn.ReLU())
    net.add_module("gap", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(8, 6))
    return whymatch.SimilarityModel(net.eval())


def rand(seed, *shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def direct_cam(sim, layer, x, score_fn):
    """Grad-CAM of score_fn(normalized embeddings of x) for each image of x, one image at a time."""
    maps = []
    for i in range(x.shape[0]):
        store = {}
        h = layer.register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
        xi = x[i:i + 1].clone().requires_grad_(True)
        f = sim(xi)
        h.remove()
        s = score_fn(f, i)
        (g,) = torch.autograd.grad(s, store["a"])
        cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * store["a"]).sum(1, keepdim=True))
        maps.append(F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(maps).detach()


def test_weight_formulas_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    fa, fp, fn, fn2 = (F.normalize(torch.randn(5, 7, generator=g), dim=1) for _ in range(4))
    torch.testing.assert_close(similarity_weights("siamese", [fa, fp], True), 1 - (fa - fp).abs())
    torch.testing.assert_close(similarity_weights("siamese", [fa, fn], False), (fa - fn).abs())
    pos = torch.tensor([True, False, True, False, False])
    mixed = similarity_weights("siamese", [fa, fp], pos)
    torch.testing.assert_close(mixed[0], 1 - (fa[0] - fp[0]).abs())
    torch.testing.assert_close(mixed[1], (fa[1] - fp[1]).abs())
    trip = similarity_weights("triplet", [fa, fp, fn])
    for b in range(5):
        for d in range(7):
            expected = (1 - abs(float(fa[b, d] - fp[b, d]))) * abs(float(fa[b, d] - fn[b, d]))
            assert abs(float(trip[b, d]) - expected) < 1e-6
    quad = similarity_weights("quadruplet", [fa, fp, fn, fn2])
    torch.testing.assert_close(quad, trip * (fn - fn2).abs())
    with pytest.raises(ValueError, match="takes 3 embeddings"):
        similarity_weights("triplet", [fa, fp])
    with pytest.raises(ValueError, match="mode"):
        similarity_weights("pairs", [fa, fp])


@pytest.mark.parametrize("mode", ["siamese", "triplet", "quadruplet"])
def test_attention_maps_equal_per_image_grad_cam_of_w_dot_f(mode):
    sim = small_cnn()
    t = {"siamese": 2, "triplet": 3, "quadruplet": 4}[mode]
    imgs = [rand(10 + m, 3, 3, 16, 16) for m in range(t)]
    pos = torch.tensor([True, False, True])
    sa = SimilarityAttention(sim, "c2", mode=mode, batch_size=2)  # 2 batches: exercises the split
    maps = sa.attribute_tuples(*imgs, positive=pos if mode == "siamese" else True)
    assert len(maps) == t and all(m.shape == (3, 16, 16) for m in maps)
    with torch.no_grad():
        fs = [F.normalize(sim(x), dim=1) for x in imgs]
    w = similarity_weights(mode, fs, pos if mode == "siamese" else True)
    layer = sim.embedder.c2
    for m in range(t):
        expected = direct_cam(sim, layer, imgs[m], lambda f, i: (w[i] * F.normalize(f, dim=1)[0]).sum())
        torch.testing.assert_close(maps[m], expected, rtol=1e-4, atol=1e-6)


class BoxGate(nn.Module):
    """Zeroes a feature map outside one box: the model never sees the rest of the image."""

    def __init__(self, box=(8, 20, 8, 20)):
        super().__init__()
        self.box = box

    def forward(self, a):
        y0, y1, x0, x1 = self.box
        gate = torch.zeros_like(a)
        gate[:, :, y0:y1, x0:x1] = 1
        return a * gate


def gated_model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(3, 6, 3, padding=1))
    net.add_module("gate", BoxGate())
    net.add_module("act", nn.Tanh())
    net.add_module("gap", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(6, 8))
    return whymatch.SimilarityModel(net.eval())


@pytest.mark.parametrize("mode", ["siamese", "triplet"])
def test_attention_stays_where_the_model_looks(mode):
    sim = gated_model()
    q = rand(0, 3, 32, 32)
    refs = torch.stack([rand(1, 3, 32, 32), rand(2, 3, 32, 32)])
    kw = {"negatives": rand(3, 3, 32, 32)} if mode == "triplet" else {}
    maps = SimilarityAttention(sim, "act", mode=mode).attribute(q, refs, return_all=True, **kw)
    for m in maps:
        assert float(m[:, 8:20, 8:20].sum()) > 0
        assert float(m[:, 21:, :].abs().max()) == 0.0 and float(m[:, :, 21:].abs().max()) == 0.0


def test_attention_k_references_equal_one_at_a_time_and_return_all():
    sim = small_cnn()
    q = rand(0, 3, 16, 16)
    refs = rand(1, 4, 3, 16, 16)
    negs = rand(2, 4, 3, 16, 16)
    sa = SimilarityAttention(sim, "c2", mode="triplet")
    together = sa.attribute(q, refs, negatives=negs)
    for k in range(4):
        torch.testing.assert_close(together[k:k + 1], sa.attribute(q, refs[k], negatives=negs[k]))
    a, p, n = sa.attribute(q, refs, negatives=negs, return_all=True)
    torch.testing.assert_close(a, together)
    assert p.shape == n.shape == (4, 16, 16)


def test_attention_images_of_different_sizes():
    sim = small_cnn()
    q = rand(0, 3, 16, 16)
    r = rand(1, 2, 3, 24, 20)
    sa = SimilarityAttention(sim, "c2")
    mq, mr = sa.attribute(q, r, return_all=True)
    assert mq.shape == (2, 16, 16) and mr.shape == (2, 24, 20)
    torch.testing.assert_close(mq[1:], sa.attribute(q, r[1]))


def test_auto_target_layer_hooks_released_and_no_parameter_grads():
    sim = small_cnn()
    with SimilarityAttention(sim) as sa:
        sa.attribute(rand(0, 3, 16, 16), rand(1, 3, 16, 16))
    assert sa.target_layer_names == ["r2"]  # the last feature map with more than one position
    gc = EmbeddingGradCAM(sim)
    gc.attribute(rand(0, 3, 16, 16), rand(1, 3, 16, 16))
    assert gc.target_layer_names == ["r2"]
    for m in sim.modules():
        assert not m._forward_hooks and not m._backward_hooks
    assert all(p.grad is None for p in sim.parameters())


def test_create_graph_gives_differentiable_maps():
    sim = small_cnn()
    imgs = [rand(i, 2, 3, 16, 16) for i in range(3)]
    maps = SimilarityAttention(sim, "c2", mode="triplet").attribute_tuples(*imgs, create_graph=True)
    assert maps[0].requires_grad
    maps[0].sum().backward()
    assert sim.embedder.c1.weight.grad is not None and float(sim.embedder.c1.weight.grad.abs().sum()) > 0


def test_embedding_grad_cam_is_the_grad_cam_of_the_similarity():
    sim = small_cnn()
    q = rand(0, 3, 16, 16)
    refs = rand(1, 3, 3, 16, 16)
    gc = EmbeddingGradCAM(sim, "c2", batch_size=2)
    maps, rmaps = gc.attribute(q, refs, return_reference_maps=True)
    with torch.no_grad():
        fr = sim(refs)
        fq = sim(q[None])
    layer = sim.embedder.c2
    expected = direct_cam(sim, layer, q[None].expand(3, -1, -1, -1),
                          lambda f, i: F.cosine_similarity(f, fr[i:i + 1])[0])
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6)
    expected_r = direct_cam(sim, layer, refs, lambda f, i: F.cosine_similarity(f, fq)[0])
    torch.testing.assert_close(rmaps, expected_r, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gc.attribute(q, reference_embeddings=fr), maps)


def test_embedding_grad_cam_lies_on_the_part_that_matches():
    sim = colour_model()
    q, r = red_square_pair()
    maps = EmbeddingGradCAM(sim, "conv").attribute(q, r)
    assert float(maps[0, 10:18, 10:18].min()) > 0
    assert float(maps[0, 24:28, 24:28].abs().max()) == 0.0


def test_multiple_target_layers_average_the_max_scaled_maps():
    sim = small_cnn()
    q, r = rand(0, 3, 16, 16), rand(1, 3, 16, 16)
    both = SimilarityAttention(sim, ["c1", "embedder.c2"]).attribute(q, r)
    one = [SimilarityAttention(sim, name).attribute(q, r) for name in ("c1", "c2")]
    expected = (one[0] / one[0].amax() + one[1] / one[1].amax()) / 2
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-6)


class NoGradEmbedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        with torch.no_grad():
            return self.conv(x).mean(dim=(2, 3))


def test_bad_input_errors():
    sim = small_cnn()
    q, r = rand(0, 3, 16, 16), rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="target_layers: the embedder has no module named 'layer9'"):
        SimilarityAttention(sim, "layer9")
    with pytest.raises(ValueError, match="target_layers: module Conv2d is not a submodule"):
        EmbeddingGradCAM(sim, nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="mode must be one of"):
        SimilarityAttention(sim, "c2", mode="pairs")
    with pytest.raises(ValueError, match="needs gradients"):
        SimilarityAttention(whymatch.SimilarityModel(NoGradEmbedder()), "conv").attribute(q, r)
    with pytest.raises(ValueError, match="needs gradients"):
        EmbeddingGradCAM(whymatch.SimilarityModel(NoGradEmbedder()), "conv").attribute(q, r)
    with pytest.raises(ValueError, match="output a feature map"):
        SimilarityAttention(sim, "fc").attribute(q, r)
    trip = SimilarityAttention(sim, "c2", mode="triplet")
    with pytest.raises(ValueError, match="needs negatives"):
        trip.attribute(q, r)
    with pytest.raises(ValueError, match="negatives is only used"):
        SimilarityAttention(sim, "c2").attribute(q, r, negatives=r)
    with pytest.raises(ValueError, match="takes 3 image batches"):
        trip.attribute_tuples(q[None], r[None])
    with pytest.raises(ValueError, match="same number of images"):
        trip.attribute_tuples(q[None], r[None], torch.stack([r, r]))
    with pytest.raises(ValueError, match="positive must have shape"):
        SimilarityAttention(sim, "c2").attribute_tuples(q[None], r[None], positive=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="x2 must have 3 channels"):
        SimilarityAttention(sim, "c2").attribute_tuples(q[None], torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="queries and references must pair up"):
        EmbeddingGradCAM(sim, "c2").attribute_pairs(q[None], torch.stack([r, r]))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        EmbeddingGradCAM(sim, "c2", batch_size=0)
