"""Similarity-mining loss (whymatch.mining): L_sm formulas, the differentiable attention, pml losses and miners."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from torch import nn

from whymatch import SimilarityModel
from whymatch.mining import MODES, SimilarityMiningLoss, mine_tuples, similarity_mining_loss
from whymatch.models import ShapesCNN
from whymatch.saliency import SimilarityAttention


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def _tiny(seed=0, dim=8):
    torch.manual_seed(seed)
    return SimilarityModel(ShapesCNN(dim, (4, 8, 8, 8)))


def _batch(seed=0, p=4, k=2, size=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(p * k, 3, size, size, generator=g)
    y = torch.arange(p).repeat_interleave(k)
    return x, y


# ------------------------------------------------------------------ L_sm formulas on hand-made embeddings
def test_triplet_formula():
    fa = _unit([1.0, 0.0], [0.0, 1.0])
    fp = _unit([0.0, 1.0], [0.0, 1.0])
    fn = _unit([-1.0, 0.0], [1.0, 0.0])
    # tuple 0: d(a*,p) = sqrt(2), d(a*,n) = 2; tuple 1: d = 0 and sqrt(2)
    expected = ((math.sqrt(2) - 2) ** 2) ** 0.5 / 2 + math.sqrt(2) / 2
    got = similarity_mining_loss("triplet", fa, [fp, fn])
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_siamese_formula_uses_the_margin():
    f1 = _unit([1.0, 0.0], [1.0, 0.0])
    f2 = _unit([0.0, 1.0], [1.0, 0.0])   # distances sqrt(2) and 0
    for m in (0.5, 1.0):
        expected = (abs(math.sqrt(2) - m) + abs(0.0 - m)) / 2
        assert similarity_mining_loss("siamese", f1, [f2], margin=m).item() == pytest.approx(expected, abs=1e-5)


def test_quadruplet_formula():
    fa = _unit([1.0, 0.0, 0.0])
    fp = _unit([0.0, 1.0, 0.0])      # d(a*,p) = sqrt(2)
    fn1 = _unit([-1.0, 0.0, 0.0])    # d(a*,n1) = 2
    fn2 = _unit([-1.0, 0.0, 0.0])    # d(n1,n2) = 0
    expected = abs(math.sqrt(2) - 2) + abs(math.sqrt(2) - 0)
    got = similarity_mining_loss("quadruplet", fa, [fp, fn1, fn2])
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_formula_normalizes_embeddings_and_handles_empty():
    fa, fp, fn = _unit([1.0, 0.0]), _unit([0.0, 1.0]), _unit([-1.0, 0.0])
    a = similarity_mining_loss("triplet", fa * 7, [fp * 3, fn * 0.1])
    b = similarity_mining_loss("triplet", fa, [fp, fn])
    assert a.item() == pytest.approx(b.item(), abs=1e-5)
    z = similarity_mining_loss("triplet", torch.zeros(0, 4), [torch.zeros(0, 4)] * 2)
    assert z.item() == 0.0


def test_formula_bad_arguments():
    f = torch.randn(3, 4)
    with pytest.raises(ValueError, match="mode"):
        similarity_mining_loss("pairs", f, [f])
    with pytest.raises(ValueError, match="takes 2 member embeddings"):
        similarity_mining_loss("triplet", f, [f])
    with pytest.raises(ValueError, match=r"members\[1\]"):
        similarity_mining_loss("triplet", f, [f, torch.randn(2, 4)])


# ------------------------------------------------------------------ tuples
def test_batch_hard_tuples():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5], [-1.0, 0.0], [-0.9, -0.2]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    a, p, n = mine_tuples("triplet", emb, labels)
    assert a.tolist() == list(range(6))
    assert p.tolist() == [1, 0, 3, 2, 5, 4]        # one positive per class pair
    assert n[0].item() == 3                         # nearest other-class image to [1, 0]
    q = mine_tuples("quadruplet", emb, labels)
    la, ln1, ln2 = labels[q[0]], labels[q[2]], labels[q[3]]
    assert bool((la != ln1).all() and (la != ln2).all() and (ln1 != ln2).all())
    s = mine_tuples("siamese", emb, labels)
    assert len(s) == 2 and bool((labels[s[0]] == labels[s[1]]).all())


def test_miner_tuples_one_per_anchor():
    emb = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4).repeat_interleave(2)
    trip = miners.TripletMarginMiner(margin=10.0, type_of_triplets="all")(emb, labels)
    a, p, n = mine_tuples("triplet", emb, labels, trip)
    assert len(set(a.tolist())) == len(a) == 8
    assert bool((labels[a] == labels[p]).all() and (labels[a] != labels[n]).all())
    pairs = miners.MultiSimilarityMiner(epsilon=10.0)(emb, labels)
    a, p = mine_tuples("siamese", emb, labels, pairs)
    assert len(a) > 0 and bool((labels[a] == labels[p]).all())
    with pytest.raises(ValueError, match="indices_tuple"):
        mine_tuples("triplet", emb, labels, (a, p))


# ------------------------------------------------------------------ the loss on a model
@pytest.mark.parametrize("mode", MODES)
def test_total_is_metric_plus_gamma_times_mining(mode):
    model = _tiny()
    x, y = _batch(p=4, k=2)
    out = SimilarityMiningLoss(mode, gamma=0.7)(model, x, y)
    assert out.n_tuples > 0 and out.mining.item() > 0
    assert out.total.item() == pytest.approx(out.metric.item() + 0.7 * out.mining.item(), rel=1e-6)
    parts = out.parts()
    assert set(parts) == {"loss", "metric_loss", "mining_loss", "n_tuples"}
    off = SimilarityMiningLoss(mode, gamma=0.0)(model, x, y)
    assert off.mining.item() == 0.0 and off.n_tuples == 0
    assert off.total.item() == pytest.approx(out.metric.item(), rel=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_attention_equals_similarity_attention_in_eval_mode(mode):
    model = _tiny(1).eval()
    x, y = _batch(1, p=4, k=2)
    loss = SimilarityMiningLoss(mode, target_layers="layer4")
    from whymatch.saliency import _cam

    layers = loss._layers_for(model, x)
    with _cam.ActivationCapture(layers) as cap:
        emb = model(x)
    tuples = mine_tuples(mode, emb, y)
    mine = loss.attention(emb, cap.single(), tuples)                      # (N, h, w) in [0, 1]
    assert mine.shape[1:] == (4, 4) and float(mine.detach().amax()) <= 1 + 1e-6
    sa = SimilarityAttention(model, "layer4", mode=mode).attribute_tuples(*(x[t] for t in tuples))[0]
    up = F.interpolate(mine[:, None], size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    norm = lambda m: m / m.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]  # noqa: E731
    torch.testing.assert_close(norm(up), norm(sa), rtol=1e-4, atol=1e-5)


def test_gradient_flows_through_the_attention():
    # fc.weight touches the map only through d score / d activations: a live create_graph path.
    model = _tiny(2)
    x, y = _batch(2, p=4, k=2)
    loss = SimilarityMiningLoss("triplet", target_layers="layer4")
    from whymatch.saliency import _cam

    with _cam.ActivationCapture(loss._layers_for(model, x)) as cap:
        emb = model(x)
    maps = loss.attention(emb, cap.single(), mine_tuples("triplet", emb, y))
    g = torch.autograd.grad(maps.sum(), model.embedder.fc.weight)[0]
    assert float(g.abs().sum()) > 0
    # and in the full loss: L_sm's gradient changes when the attention is detached
    grads = {}
    for detach in (False, True):
        model.zero_grad()
        out = SimilarityMiningLoss("triplet", target_layers="layer4", detach_attention=detach)(model, x, y)
        out.mining.backward()
        grads[detach] = model.embedder.layer1[0].weight.grad.clone()
    assert float(grads[False].abs().sum()) > 0
    assert not torch.allclose(grads[False], grads[True])


def test_erased_pass_leaves_batchnorm_statistics_alone():
    model_a, model_b = _tiny(3), _tiny(3)
    x, y = _batch(3)
    SimilarityMiningLoss("triplet")(model_a, x, y)
    model_b(x)  # one plain training forward
    for (n, a), (_, b) in zip(model_a.named_buffers(), model_b.named_buffers()):
        torch.testing.assert_close(a, b, msg=n)


@pytest.mark.parametrize("metric", ["contrastive", "triplet", "margin", "proxyanchor"])
def test_works_with_pml_losses(metric):
    model = _tiny(4)
    x, y = _batch(4, p=4, k=2)
    ml = {"contrastive": lambda: losses.ContrastiveLoss(),
          "triplet": lambda: losses.TripletMarginLoss(margin=0.1),
          "margin": lambda: losses.MarginLoss(),
          "proxyanchor": lambda: losses.ProxyAnchorLoss(num_classes=4, embedding_size=8)}[metric]()
    loss = SimilarityMiningLoss("triplet", metric_loss=ml)
    out = loss(model, x, y)
    assert torch.isfinite(out.total)
    out.total.backward()
    assert model.embedder.fc.weight.grad is not None
    if metric == "proxyanchor":
        params = list(loss.parameters())
        assert len(params) == 1 and params[0] is ml.proxies
        assert params[0].grad is not None and float(params[0].grad.abs().sum()) > 0


def test_miner_plugs_in():
    model = _tiny(5)
    x, y = _batch(5, p=4, k=2)
    seen = {}

    class Spy(miners.TripletMarginMiner):
        def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
            out = super().forward(embeddings, labels, ref_emb, ref_labels)
            seen["n"] = len(out[0])
            return out

    loss = SimilarityMiningLoss("triplet", miner=Spy(margin=10.0, type_of_triplets="all"))
    out = loss(model, x, y)
    assert seen["n"] > 0 and out.n_tuples == 8
    empty = SimilarityMiningLoss("triplet", miner=miners.TripletMarginMiner(margin=0.0, type_of_triplets="easy"))
    out = empty(model, x, torch.zeros(8, dtype=torch.long) * 0 + torch.arange(8) % 2)
    assert torch.isfinite(out.total)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode"):
        SimilarityMiningLoss("pairs")
    with pytest.raises(ValueError, match="gamma"):
        SimilarityMiningLoss(gamma=-1)
    with pytest.raises(ValueError, match="normalize"):
        SimilarityMiningLoss(normalize="softmax")
    with pytest.raises(TypeError, match="metric_loss"):
        SimilarityMiningLoss(metric_loss=3)
    with pytest.raises(TypeError, match="miner"):
        SimilarityMiningLoss(miner="hard")
    with pytest.raises(ValueError, match="alpha"):
        SimilarityMiningLoss(alpha=float("nan"))
    model = _tiny()
    x, y = _batch()
    loss = SimilarityMiningLoss()
    with pytest.raises(ValueError, match="labels must hold one label per image"):
        loss(model, x, y[:3])
    with pytest.raises(ValueError, match="labels must be integers"):
        loss(model, x, y.float())
    with pytest.raises(ValueError, match="target_layers"):
        SimilarityMiningLoss(target_layers="nope")(model, x, y)
    frozen = _tiny()
    for p_ in frozen.parameters():
        p_.requires_grad_(False)
    with pytest.raises(ValueError, match="needs gradients"):
        SimilarityMiningLoss()(frozen, x, y)


def test_bare_module_and_multiple_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))
    x, y = _batch(6, p=3, k=2, size=16)
    out = SimilarityMiningLoss("triplet", target_layers=["1", "3"])(net, x, y)
    out.total.backward()
    assert net[0].weight.grad is not None and torch.isfinite(out.total)


def test_learnable_threshold_gets_gradients():
    model = _tiny()
    x, y = _batch(p=4, k=2)
    loss = SimilarityMiningLoss("triplet", alpha=8.0, beta=0.4, learn_threshold=True)
    names = {n for n, _ in loss.named_parameters()}
    assert {"alpha", "beta"} <= names
    loss(model, x, y).total.backward()
    assert loss.alpha.grad is not None and loss.beta.grad is not None
    assert float(loss.alpha.grad.abs()) > 0 and float(loss.beta.grad.abs()) > 0
    fixed = SimilarityMiningLoss("triplet", alpha=8.0, beta=0.4)
    assert not any(n in ("alpha", "beta") for n, _ in fixed.named_parameters())
    torch.manual_seed(0)
    a = fixed(model, x, y).total
    torch.manual_seed(0)
    b = SimilarityMiningLoss("triplet", alpha=8.0, beta=0.4, learn_threshold=True)(model, x, y).total
    torch.testing.assert_close(a, b)  # the same value before any update
