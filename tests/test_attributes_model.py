"""SANE attribute model, its loss (Eqs. 1-3 against loop references) and the bulk saliency cache."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import count_calls
from whymatch import SimilarityModel
from whymatch.attributes.cache import MANIFEST, SaliencyCache
from whymatch.attributes.losses import AttributeLoss, normalize_maps
from whymatch.attributes.model import (AttributeModel, AttributeOutput, attribute_model_state,
                                       build_attribute_model, load_attribute_model, load_default_attribute_model)
from whymatch.models import ShapesCNN
from whymatch.saliency import RISE


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------ model
class _Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def test_model_shapes_and_gradients():
    torch.manual_seed(0)
    m = AttributeModel(_Trunk(), 4, preprocess=lambda x: x * 2 - 1)
    assert m.channels == 6 and m.attribute_names == ("attr_0", "attr_1", "attr_2", "attr_3")
    assert m.conv.bias is None and m.conv.kernel_size == (3, 3) and m.device == torch.device("cpu")
    x = torch.rand(2, 3, 16, 16)
    out = m(x)
    assert isinstance(out, AttributeOutput)
    assert out.maps.shape == (2, 4, 8, 8) and out.logits.shape == (2, 4) and out.confidences.shape == (2, 4)
    torch.testing.assert_close(out.logits, out.maps.mean(dim=(2, 3)))
    torch.testing.assert_close(out.confidences, torch.softmax(out.logits, 1))
    # preprocess is applied first
    torch.testing.assert_close(out.maps, m.conv(m.trunk(x * 2 - 1)))
    out.confidences[:, 0].sum().backward()
    assert m.conv.weight.grad is not None and m.trunk.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone, side", [("shapes", 12), ("resnet18", 3)])
def test_build_attribute_model(backbone, side):
    m = build_attribute_model(backbone, 5, attribute_names=list("abcde"))
    out = m(torch.rand(2, 3, 96, 96))
    assert out.maps.shape == (2, 5, side, side) and m.attribute_names == tuple("abcde")
    assert m.config == {"backbone": backbone, "n_attributes": 5, "kernel_size": 3}


def test_model_save_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    m = build_attribute_model("shapes", 3, attribute_names=["x", "y", "z"]).eval()
    torch.save(attribute_model_state(m, epoch=2, map=0.5), tmp_path / "m.pt")
    back = load_attribute_model(tmp_path / "m.pt")
    assert back.attribute_names == ("x", "y", "z") and not back.training
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(back(x).maps, m(x).maps)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_attribute_model(tmp_path / "nope.pt")


def test_default_attribute_model_or_a_clear_error():
    try:
        m = load_default_attribute_model()
    except FileNotFoundError as exc:
        assert "shapesworld_attributes.pt" in str(exc) and "train_shapesworld_attributes.py" in str(exc)
        return
    from whymatch.data.shapesworld import ATTRIBUTE_NAMES

    assert m.attribute_names == ATTRIBUTE_NAMES and m(torch.rand(1, 3, 96, 96)).maps.shape == (1, 18, 12, 12)


def test_model_bad_arguments():
    with pytest.raises(TypeError, match="trunk must be a torch.nn.Module"):
        AttributeModel(lambda x: x, 3)
    with pytest.raises(ValueError, match="n_attributes must be >= 1"):
        AttributeModel(_Trunk(), 0)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        AttributeModel(_Trunk(), 3, kernel_size=2)
    with pytest.raises(ValueError, match="attribute_names must hold n_attributes=3 names, got 2"):
        AttributeModel(_Trunk(), 3, attribute_names=["a", "b"])
    with pytest.raises(ValueError, match="channels could not be inferred"):
        AttributeModel(nn.Linear(3, 3), 3)
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_attribute_model("vgg", 3)
    m = AttributeModel(_Trunk(), 3)
    with pytest.raises(ValueError, match="images must be a 4-D tensor"):
        m(torch.rand(3, 8, 8))


# ------------------------------------------------------------------ loss
def _out(maps: torch.Tensor) -> AttributeOutput:
    logits = maps.mean(dim=(2, 3))
    return AttributeOutput(maps, logits, torch.softmax(logits, 1))


def _norm_ref(m: torch.Tensor, kind: str, t: float = 1.0) -> torch.Tensor:
    """One map (h, w) -> distribution (h*w,), written out plainly."""
    v = m.flatten().double()
    if kind == "softmax":
        e = torch.exp(v / t - (v / t).max())
        return e / e.sum()
    v = v - v.min()
    return v / v.sum() if v.sum() > 1e-12 else torch.full_like(v, 1 / v.numel())


def _matching_ref(maps, labels, sal, valid, kind, distance="squared", t=1.0) -> float:
    """Eq. 2 as a loop: every valid map against its image's closest ground-truth attribute map."""
    b, a, h, w = maps.shape
    terms = []
    for i in range(b):
        gt = [j for j in range(a) if labels[i, j]]
        if not gt:
            continue
        for k in range(sal.shape[1]):
            if not valid[i, k]:
                continue
            s = _norm_ref(F.adaptive_avg_pool2d(sal[i, k][None].double(), (h, w))[0], kind, t)
            ds = []
            for j in gt:
                d = ((s - _norm_ref(maps[i, j], kind)) ** 2).sum()
                ds.append(float(d if distance == "squared" else d.sqrt()))
            terms.append(min(ds))
    return sum(terms) / len(terms) if terms else 0.0


def _huber_ref(conf, labels, beta=1.0) -> float:
    vals = []
    for i in range(conf.shape[0]):
        n = int(labels[i].sum())
        if n == 0:
            continue
        for j in range(conf.shape[1]):
            x = abs(float(conf[i, j]) - float(labels[i, j]) / n)
            vals.append(0.5 * x * x / beta if x < beta else x - 0.5 * beta)
    return sum(vals) / len(vals)


@pytest.mark.parametrize("kind", ["softmax", "l1"])
@pytest.mark.parametrize("distance", ["squared", "l2"])
def test_matching_term_matches_the_loop_reference(kind, distance, gen):
    b, a, h, w, k = 4, 5, 3, 4, 3
    maps = torch.randn(b, a, h, w, generator=gen) * 2
    labels = torch.rand(b, a, generator=gen) < 0.4
    labels[0] = False                      # no ground truth: left out of both terms
    labels[1, :] = False
    labels[1, 2] = True                    # one ground truth
    sal = torch.rand(b, k, 9, 8, generator=gen)
    valid = torch.rand(b, k, generator=gen) < 0.7
    valid[2, 0] = True
    loss = AttributeLoss(lam=0.3, normalize=kind, distance=distance, temperature=0.5)
    res = loss(_out(maps), labels, sal, valid)
    ref = _matching_ref(maps, labels, sal, valid, kind, distance, t=0.5)
    assert float(res["matching"]) == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert float(res["huber"]) == pytest.approx(_huber_ref(_out(maps).confidences, labels), rel=1e-5)
    assert float(res["total"]) == pytest.approx(float(res["huber"]) + 0.3 * ref, rel=1e-5)


def test_huber_uses_one_over_a_gt():
    # confidences that equal labels / A_gt exactly give zero loss; rows without positives are ignored
    labels = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    logits = torch.log(torch.tensor([[0.5, 0.5, 1e-30, 1e-30], [1e-30, 1e-30, 1e-30, 1.0], [0.1, 0.2, 0.3, 0.4]]))
    maps = logits[:, :, None, None].expand(3, 4, 2, 2).clone()
    res = AttributeLoss()(_out(maps), labels)
    assert float(res["huber"]) == pytest.approx(0.0, abs=1e-12)
    assert float(res["matching"]) == 0.0
    # 0/1 integer labels are accepted and equal bool ones
    res2 = AttributeLoss()(_out(maps), labels.long())
    assert float(res2["total"]) == float(res["total"])


def test_l1_and_softmax_normalization():
    m = torch.tensor([[[0.0, 1.0], [2.0, 5.0]]])
    torch.testing.assert_close(normalize_maps(m, "l1"), torch.tensor([[0.0, 0.125, 0.25, 0.625]]))
    torch.testing.assert_close(normalize_maps(m, "softmax"), torch.softmax(m.flatten(1), 1))
    torch.testing.assert_close(normalize_maps(torch.full((1, 2, 2), 3.0), "l1"), torch.full((1, 4), 0.25))
    # 'l1' does not depend on the scale or offset of the saliency maps; 'softmax' does
    gen = torch.Generator().manual_seed(0)
    maps, sal = torch.randn(2, 3, 4, 4, generator=gen), torch.rand(2, 2, 4, 4, generator=gen)
    labels = torch.ones(2, 3, dtype=torch.bool)
    l1 = AttributeLoss(normalize="l1")
    assert float(l1(_out(maps), labels, sal)["matching"]) == pytest.approx(
        float(l1(_out(maps), labels, 10 * sal + 3)["matching"]), rel=1e-5)
    sm = AttributeLoss()
    assert float(sm(_out(maps), labels, sal)["matching"]) != pytest.approx(
        float(sm(_out(maps), labels, 10 * sal)["matching"]), rel=1e-3)


def test_matching_pulls_the_closest_attribute_map_to_the_saliency(gen):
    """A gradient step on the matching term makes the closest GT attribute's map peak where the saliency does."""
    maps = (torch.randn(1, 3, 4, 4, generator=gen) * 0.1).requires_grad_()
    labels = torch.tensor([[True, True, False]])
    sal = torch.zeros(1, 1, 8, 8)
    sal[0, 0, :2, 6:] = 1.0                       # top-right cell of the 4 x 4 map
    loss = AttributeLoss(lam=1.0, temperature=0.05)
    opt = torch.optim.SGD([maps], lr=50.0)
    for _ in range(50):
        opt.zero_grad()
        loss(_out(maps), labels, sal)["matching"].backward()
        opt.step()
    assert maps.grad[0, 2].abs().sum() == 0      # not a ground-truth attribute
    peaks = [int(maps[0, j].detach().flatten().argmax()) for j in (0, 1)]
    assert 3 in peaks                             # cell (0, 3)


def test_loss_bad_arguments(gen):
    maps = torch.randn(2, 3, 2, 2, generator=gen)
    out = _out(maps)
    labels = torch.ones(2, 3, dtype=torch.bool)
    loss = AttributeLoss()
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 3\)"):
        loss(out, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels must be bool or hold only 0 and 1"):
        loss(out, torch.full((2, 3), 2))
    with pytest.raises(ValueError, match="saliency must be a 4-D tensor"):
        loss(out, labels, torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match=r"saliency must have shape \(2, K, Hs, Ws\)"):
        loss(out, labels, torch.rand(3, 1, 4, 4))
    with pytest.raises(ValueError, match=r"saliency_valid must have shape \(2, 1\)"):
        loss(out, labels, torch.rand(2, 1, 4, 4), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="saliency_valid must have dtype bool"):
        loss(out, labels, torch.rand(2, 1, 4, 4), torch.ones(2, 1))
    with pytest.raises(ValueError, match="saliency must be finite"):
        loss(out, labels, torch.full((2, 1, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="saliency_valid was given without saliency"):
        loss(out, labels, None, torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="out must be an AttributeOutput"):
        loss(maps, labels)
    with pytest.raises(ValueError, match="normalize must be one of"):
        AttributeLoss(normalize="l2")
    with pytest.raises(ValueError, match="lam must be in"):
        AttributeLoss(lam=-1)
    with pytest.raises(ValueError, match="temperature must be in"):
        AttributeLoss(temperature=0)


# ------------------------------------------------------------------ cache
SIZE = 32


def _sim():
    torch.manual_seed(0)
    return SimilarityModel(ShapesCNN(8, (4, 8, 8, 8))).eval()


def _images(n=6):
    gen = torch.Generator().manual_seed(3)
    imgs = torch.rand(n, 3, SIZE, SIZE, generator=gen)
    labels = torch.tensor([0, 0, 0, 1, 1, 2][:n])
    return list(zip(imgs, labels.tolist())), imgs, labels


def _count_rise(monkeypatch) -> list:
    return count_calls(monkeypatch, RISE, "attribute")


def test_cache_build_open_and_content(tmp_path, monkeypatch):
    sim = _sim()
    items, imgs, labels = _images()
    calls = _count_rise(monkeypatch)
    c = SaliencyCache.build(sim, items, tmp_path / "c", k=3, labels=labels, size=8, n_masks=20, batch_size=20)
    assert len(calls) == 6 - 1          # image 5 is alone in its class: no reference, no RISE call
    assert isinstance(c.maps, np.memmap) and c.maps.dtype == np.float16 and c.maps.shape == (6, 3, 8, 8)
    refs = c.references
    assert refs.dtype == torch.int64 and refs.shape == (6, 3)
    # same-label neighbours only, by descending similarity, -1 padding
    assert refs[0].tolist()[:2] and set(refs[0, :2].tolist()) == {1, 2} and refs[0, 2] == -1
    assert refs[3].tolist() == [4, -1, -1] and refs[5].tolist() == [-1, -1, -1]
    emb = sim.embed(imgs)
    s01, s02 = [float(F.cosine_similarity(emb[0], emb[j], dim=0)) for j in (1, 2)]
    assert refs[0, 0] == (1 if s01 >= s02 else 2)
    maps, valid = c[0]
    assert maps.dtype == torch.float32 and maps.shape == (3, 8, 8) and valid.tolist() == [True, True, False]
    assert float(maps[2].abs().sum()) == 0.0
    # the stored map is RISE's map of image 0 against its references, pooled to 8 x 8
    # with the cache's own RISE settings (its grid default is the cache's, not RISE's library default)
    grid = inspect.signature(SaliencyCache.build).parameters["grid"].default
    rise = RISE(sim, n_masks=20, grid=grid, batch_size=20)
    from whymatch.attributes.cache import _seed_for

    want = rise.attribute(imgs[0], imgs[refs[0, :2]], seed=_seed_for(0, 0))
    torch.testing.assert_close(maps[:2], F.adaptive_avg_pool2d(want[None], 8)[0].half().float())
    # open() gives the same; batch() keeps the order asked for
    again = SaliencyCache.open(tmp_path / "c")
    assert np.array_equal(np.asarray(again.maps), np.asarray(c.maps))
    bm, bv = again.batch([3, 0])
    assert torch.equal(bm[1], maps) and bv[0].tolist() == [True, False, False]
    man = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert man["fingerprint"]["k"] == 3 and man["fingerprint"]["rise"]["n_masks"] == 20
    # without labels: neighbours among all images, so every image has K references
    c2 = SaliencyCache.build(sim, imgs, tmp_path / "c2", k=2, n_masks=20, batch_size=20)
    assert bool((c2.references >= 0).all()) and c2.maps.shape == (6, 2, SIZE, SIZE)
    assert all(i not in c2.references[i].tolist() for i in range(6))


def test_cache_is_reused_and_rebuilt_when_the_fingerprint_changes(tmp_path, monkeypatch):
    sim = _sim()
    items, _, labels = _images()
    kw = dict(k=2, labels=labels, size=8, n_masks=10, batch_size=10)
    SaliencyCache.build(sim, items, tmp_path / "c", **kw)
    calls = _count_rise(monkeypatch)
    SaliencyCache.build(sim, items, tmp_path / "c", **kw)
    assert calls == []                                    # reused: no RISE call
    SaliencyCache.build(sim, items, tmp_path / "c", **{**kw, "n_masks": 12})
    assert len(calls) == 5                                # RISE settings changed
    calls.clear()
    with torch.no_grad():
        sim.embedder.fc.weight.add_(0.01)
    c = SaliencyCache.build(sim, items, tmp_path / "c", **{**kw, "n_masks": 12})
    assert len(calls) == 5                                # weights changed
    assert c.fingerprint["rise"]["n_masks"] == 12
    calls.clear()
    SaliencyCache.build(sim, items, tmp_path / "c", **{**kw, "n_masks": 12, "labels": torch.zeros(6, dtype=torch.long)})
    assert len(calls) == 6                                # labels changed


def test_interrupted_build_keeps_the_previous_cache_and_is_rebuilt(tmp_path, monkeypatch):
    sim = _sim()
    items, _, labels = _images()
    kw = dict(k=2, labels=labels, size=8, n_masks=10, batch_size=10)
    before = SaliencyCache.build(sim, items, tmp_path / "c", **kw)
    old_maps = np.array(before.maps)
    orig = RISE.attribute
    calls = []

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(RISE, "attribute", failing)
    with pytest.raises(KeyboardInterrupt):
        SaliencyCache.build(sim, items, tmp_path / "c", **{**kw, "n_masks": 11})
    # the previous cache is intact (the unfinished one is not published) and still reused as it is
    kept = SaliencyCache.open(tmp_path / "c")
    assert kept.fingerprint["rise"]["n_masks"] == 10 and np.array_equal(np.asarray(kept.maps), old_maps)
    monkeypatch.setattr(RISE, "attribute", orig)
    counted = _count_rise(monkeypatch)
    c = SaliencyCache.build(sim, items, tmp_path / "c", **{**kw, "n_masks": 11})
    assert len(counted) == 5 and (tmp_path / "c" / MANIFEST).is_file() and len(c) == 6
    assert c.fingerprint["rise"]["n_masks"] == 11
    # only the files of the published cache remain
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if not p.name.startswith(".")) == sorted(
        [MANIFEST, *c.manifest["files"].values()])


def test_cache_pickles_by_path(tmp_path):
    import pickle

    items, _, labels = _images()
    c = SaliencyCache.build(_sim(), items, tmp_path / "c", k=1, labels=labels, size=4, n_masks=5, batch_size=5)
    _ = c.maps
    blob = pickle.dumps(c)
    assert len(blob) < 4000
    back = pickle.loads(blob)
    assert torch.equal(back[1][0], c[1][0])


def test_cache_bad_arguments(tmp_path):
    sim = _sim()
    items, imgs, labels = _images()
    with pytest.raises(TypeError, match="sim must be a whymatch.SimilarityModel"):
        SaliencyCache.build(sim.embedder, items, tmp_path / "c")
    with pytest.raises(ValueError, match=r"labels must have one entry per image \(6\), got 5"):
        SaliencyCache.build(sim, items, tmp_path / "c", labels=labels[:5])
    with pytest.raises(ValueError, match="labels must be integers"):
        SaliencyCache.build(sim, items, tmp_path / "c", labels=labels.float())
    with pytest.raises(ValueError, match="k must be >= 1"):
        SaliencyCache.build(sim, items, tmp_path / "c", k=0)
    with pytest.raises(ValueError, match="n_masks must be >= 1"):
        SaliencyCache.build(sim, items, tmp_path / "c", n_masks=0)
    with pytest.raises(ValueError, match="images must be square"):
        SaliencyCache.build(sim, [torch.rand(3, 8, 6)], tmp_path / "c")
    with pytest.raises(ValueError, match="images items must be an image"):
        SaliencyCache.build(sim, [torch.rand(8, 6)], tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no finished saliency cache"):
        SaliencyCache.open(tmp_path / "none")


def _dot(a, b):
    return a @ b.T


def test_fingerprint_names_a_callable_similarity_without_its_address():
    torch.manual_seed(0)
    sim = SimilarityModel(ShapesCNN(8, (4, 8, 8, 8)), _dot)
    items, _, _ = _images()
    fp = SaliencyCache.fingerprint_of(sim, items, k=1, labels=None, size=4, n_masks=5, grid=8, p=0.5, seed=0)
    assert fp["similarity"].endswith("test_attributes_model._dot") and "0x" not in fp["similarity"]
    assert fp == SaliencyCache.fingerprint_of(sim, items, k=1, labels=None, size=4, n_masks=5, grid=8, p=0.5, seed=0)
