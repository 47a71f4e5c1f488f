"""Causal attribute ground truth and the per-object supervision of SANE's attribute model (issue 17)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from whymatch.attributes import AttributeLoss, build_attribute_model
from whymatch.attributes.losses import localization_loss
from whymatch.attributes.model import AttributeOutput
from whymatch.attributes.train import AttributeImages, AttributeTrainer, SANEConfig, train_sane
from whymatch.data import ShapesWorld
from whymatch.data.shapesworld import ATTRIBUTE_NAMES, COLOUR_RGB
from whymatch.metrics.attributes import (
    CausalAttributeEffects,
    causal_attribute_deletion,
    causal_attribute_effects,
    causal_top1,
)
from whymatch.similarity import SimilarityModel


class RedArea(nn.Module):
    """Embedding = percentage of pure-red pixels: with a dot product, the more red the better the match."""

    def forward(self, x):
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        red = ((r > 0.6) & (g < 0.3) & (b < 0.3)).float().mean(dim=(1, 2))
        return torch.stack([100 * red], dim=1)


def _red_queries(ds, n=3):
    out = []
    for i in range(len(ds)):
        if any(o.colour == "red" and o.pattern != "checker" for o in ds.sample(i).objects):
            out.append(i)
        if len(out) == n:
            return out
    raise AssertionError("no sample with a red object")


def test_causal_effects_find_what_the_model_relies_on():
    ds = ShapesWorld("test", 60, 64, seed=1)
    sim = SimilarityModel(RedArea(), "dot")
    q = _red_queries(ds)
    ref = torch.ones(3, 1)                          # s = the query's red area: a drop = red pixels lost
    eff = causal_attribute_effects(sim, ds, torch.tensor(q), ref)
    assert isinstance(eff, CausalAttributeEffects) and eff.effects.shape == (3, len(ATTRIBUTE_NAMES))
    red = ATTRIBUTE_NAMES.index("colour:red")
    assert eff.top.tolist() == [red] * 3
    assert torch.allclose(eff.base, sim.embed(ds.images(q))[:, 0])
    assert causal_top1(eff.top, eff).tolist() == [1.0] * 3
    for row, i in enumerate(q):
        present = ds.attributes(i, "all")
        defined = ~torch.isnan(eff.effects[row])
        assert not (defined & ~present).any()              # only attributes the query has
        for kind in ("shape", "colour", "pattern"):        # these always have alternatives
            cols = [j for j, n in enumerate(ATTRIBUTE_NAMES) if n.startswith(kind)]
            assert (defined[cols] == present[cols]).all()
        assert eff.object_effects[row].shape == (len(ds.sample(i).objects), 4)
    assert eff.n_renders >= 3 * 12
    # an attribute the model ignores has no effect: non-red objects' colour changes to non-red colours
    blue = ATTRIBUTE_NAMES.index("colour:blue")
    for row in range(3):
        if not math.isnan(float(eff.effects[row, blue])):
            assert float(eff.effects[row, blue]) < float(eff.effects[row, red])


def test_causal_metrics_by_hand():
    nan = float("nan")
    eff = torch.tensor([[0.5, 0.2, nan], [nan, nan, nan], [0.1, 0.1, 0.05]])
    chosen = torch.tensor([0, 1, 1])
    assert causal_attribute_deletion(chosen, eff).tolist() == pytest.approx([0.5, 0.0, 0.1])
    top = causal_top1(chosen, eff)
    assert top[0] == 1 and math.isnan(float(top[1])) and top[2] == 1      # a tie counts
    assert causal_top1(torch.tensor([2, 0, 2]), eff)[[0, 2]].tolist() == [0.0, 0.0]   # NaN attribute is a miss
    assert causal_attribute_deletion(torch.tensor([2, 0, 2]), eff).tolist() == pytest.approx([0.0, 0.0, 0.05])
    obj = CausalAttributeEffects(eff, torch.zeros(3), [], 0)
    assert obj.top.tolist() == [0, -1, 0]


@pytest.mark.parametrize("bad, err", [(torch.tensor([0, 3, 0]), ValueError), (torch.tensor([0.0, 1.0, 0.0]), TypeError),
                                      (torch.tensor([0, 1]), ValueError)])
def test_causal_metrics_errors(bad, err):
    eff = torch.zeros(3, 3)
    with pytest.raises(err, match="chosen"):
        causal_top1(bad, eff)


def test_causal_effects_errors():
    sim = SimilarityModel(RedArea(), "neg_l2")
    ds = ShapesWorld("test", 8, 64)
    with pytest.raises(TypeError, match="dataset must have"):
        causal_attribute_effects(sim, [1, 2], torch.tensor([0]), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="reference_embeddings must have one row per query"):
        causal_attribute_effects(sim, ds, torch.tensor([0, 1]), torch.zeros(1, 1))


def test_localization_loss_prefers_maps_on_the_objects():
    ds = ShapesWorld("train", 4, 64, seed=2)
    masks = torch.stack([ds.attribute_masks(i, "all", 8) for i in range(4)])       # (4, A, 8, 8)
    labels = torch.stack([ds.attributes(i, "all") for i in range(4)])
    on = 8.0 * masks                                                                # peaks on the footprints
    off = 8.0 * masks.flip(-1).flip(-2) * (1 - masks)
    assert localization_loss(on, labels, masks) < localization_loss(off, labels, masks)
    assert torch.equal(masks.amax(dim=(2, 3)) > 0, labels)      # every present attribute has a footprint
    maps = torch.zeros(4, len(ATTRIBUTE_NAMES), 8, 8, requires_grad=True)
    out = AttributeOutput(maps, maps.mean(dim=(2, 3)), torch.softmax(maps.mean(dim=(2, 3)), 1))
    parts = AttributeLoss(0.0, mu=2.0)(out, labels, attribute_masks=masks)
    expected = (parts["huber"] + 2.0 * parts["localization"]).detach()
    assert float(parts["total"].detach()) == pytest.approx(float(expected))
    parts["total"].backward()
    g = maps.grad
    inside = masks > 0.5
    assert (g[inside] < 0).float().mean() > 0.9                  # descent raises the maps on the objects


def test_trainer_with_attribute_masks(tmp_path):
    ds = ShapesWorld("train", 16, 64, seed=3)
    imgs = ds.images(dtype=torch.uint8)
    attrs = torch.stack([ds.attributes(i, "all") for i in range(16)])
    masks = torch.stack([ds.attribute_masks(i, "all", 8) for i in range(16)])
    data = AttributeImages(imgs, attrs, ATTRIBUTE_NAMES, ds.labels, masks)
    assert len(data[0]) == 4 and data[0][3].shape == (len(ATTRIBUTE_NAMES), 8, 8)
    torch.manual_seed(0)
    model = build_attribute_model("shapes", len(ATTRIBUTE_NAMES), attribute_names=ATTRIBUTE_NAMES)
    tr = AttributeTrainer(model, AttributeLoss(0.0, mu=1.0), data, out_dir=tmp_path, val_set=data, epochs=1,
                          batch_size=8, show_progress=False, flip=True)
    hist = tr.fit()
    assert hist[0]["localization"] > 0 and math.isfinite(hist[0]["map"])
    with pytest.raises(ValueError, match="attribute_masks must have shape"):
        AttributeImages(imgs, attrs, ATTRIBUTE_NAMES, None, masks[:, :3])


def test_sane_config_needs_per_object_labels(tmp_path):
    with pytest.raises(ValueError, match="need per-object labels"):
        train_sane(SANEConfig(data=f"awa2:{tmp_path}", labels="key", out=str(tmp_path / "o")))


def test_attribute_masks_match_objects():
    ds = ShapesWorld("test", 3, 64, seed=4)
    for i in range(3):
        smp = ds.sample(i)
        full = ds.attribute_masks(i, "all")
        key = ds.attribute_masks(i, "key")
        for k, o in enumerate(smp.objects):
            j = ATTRIBUTE_NAMES.index(f"colour:{o.colour}")
            assert bool(full[j][smp.object_masks[k]].min() == 1)
        assert torch.equal(key.amax(dim=(1, 2)) > 0, ds.attributes(i, "key"))
        assert COLOUR_RGB  # vocabulary imported for the names above
