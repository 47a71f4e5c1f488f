"""Counterfactual ShapesWorld: one object's attribute changed, everything else kept (issue 17)."""

from __future__ import annotations

import pytest
import torch

from whymatch.data import ShapesWorld
from whymatch.data.shapesworld import ATTRIBUTE_NAMES, class_id

KINDS = ("shape", "colour", "pattern", "size")


@pytest.fixture(scope="module")
def ds():
    return ShapesWorld("test", 24, 96, seed=3)


def _changes(ds, i):
    smp = ds.sample(i)
    for k in range(len(smp.objects)):
        for kind in KINDS:
            for v in ds.alternatives(i, k, kind):
                yield smp, k, kind, v


def _box(mask_shape, bbox):
    m = torch.zeros(mask_shape, dtype=torch.bool)
    y0, x0, y1, x1 = bbox
    m[y0:y1, x0:x1] = True
    return m


@pytest.mark.parametrize("i", [0, 1, 5])
def test_counterfactual_changes_only_the_object(ds, i):
    n_checked = 0
    for smp, k, kind, v in _changes(ds, i):
        cf = ds.counterfactual(i, k, kind, v)
        h, w = smp.image.shape[-2:]
        footprint = _box((h, w), smp.objects[k].bbox) | _box((h, w), cf.objects[k].bbox)
        diff = (cf.image - smp.image).abs().amax(0) > 0
        assert not diff[~footprint].any(), (k, kind, v)       # same noise and scene elsewhere
        assert diff[footprint].any(), (k, kind, v)            # the change is visible
        # the changed object's own pixels differ (its mask before or after)
        assert diff[smp.object_masks[k] | cf.object_masks[k]].float().mean() > 0.2, (k, kind, v)
        # other objects: identical attributes, geometry and masks
        for j, (a, b) in enumerate(zip(smp.objects, cf.objects)):
            if j != k:
                assert a == b
                assert torch.equal(smp.object_masks[j], cf.object_masks[j])
        assert smp.objects[k].centre == cf.objects[k].centre
        assert smp.objects[k].rotation == cf.objects[k].rotation
        n_checked += 1
    assert n_checked >= 20


def test_counterfactual_labels_consistent(ds):
    for i in range(6):
        rows = ds.object_attributes(i)
        assert torch.equal(rows[0], ds.attributes(i, "key"))
        assert torch.equal(rows.any(0), ds.attributes(i, "all"))
        assert torch.equal(rows.sum(1), torch.full((rows.shape[0],), 4))
        for smp, k, kind, v in _changes(ds, i):
            cf = ds.counterfactual(i, k, kind, v)
            old = smp.object_labels[k]
            new = cf.object_labels[k]
            changed = (old ^ new).nonzero().flatten().tolist()
            assert sorted(ATTRIBUTE_NAMES[j] for j in changed) == sorted([f"{kind}:{getattr(smp.objects[k], kind)}",
                                                                          f"{kind}:{v}"])
            others = [j for j in range(rows.shape[0]) if j != k]
            assert torch.equal(cf.object_labels[others], rows[others])
            key = cf.objects[0]
            assert cf.label == class_id(key.shape, key.colour, key.pattern)
            if k != 0:
                assert cf.label == smp.label


def test_counterfactual_colour_keeps_jitter(ds):
    smp = ds.sample(2)
    colours = ds.alternatives(2, 0, "colour")
    back = ds.counterfactual(2, 0, "colour", smp.objects[0].colour)     # a no-op change
    assert torch.equal(back.image, smp.image)
    cf = ds.counterfactual(2, 0, "colour", colours[0])
    assert cf.objects[0].rgb != smp.objects[0].rgb


def test_counterfactual_size_fits_and_refuses(ds):
    seen_infeasible = False
    for i in range(len(ds)):
        smp = ds.sample(i)
        for k, o in enumerate(smp.objects):
            alts = set(ds.alternatives(i, k, "size"))
            for v in {"small", "medium", "large"} - {o.size}:
                if v in alts:
                    cf = ds.counterfactual(i, k, "size", v)
                    r = cf.objects[k].radius
                    assert (r > o.radius) == (["small", "medium", "large"].index(v)
                                              > ["small", "medium", "large"].index(o.size))
                else:
                    seen_infeasible = True
                    with pytest.raises(ValueError, match="does not fit"):
                        ds.counterfactual(i, k, "size", v)
    assert seen_infeasible


def test_counterfactual_errors(ds):
    with pytest.raises(ValueError, match="obj must be"):
        ds.counterfactual(0, 9, "shape", "star")
    with pytest.raises(ValueError, match="kind"):
        ds.counterfactual(0, 0, "texture", "star")
    with pytest.raises(ValueError, match="shape"):
        ds.counterfactual(0, 0, "shape", "hexagon")
    with pytest.raises(TypeError, match="obj must be an int"):
        ds.counterfactual(0, "0", "shape", "star")


def test_original_rendering_unchanged(ds):
    # the counterfactual machinery draws nothing new: the sample and __getitem__ still agree
    for i in range(3):
        assert torch.equal(ds[i][0], ds.sample(i).image)
        ds.counterfactual(i, 0, "shape", ds.alternatives(i, 0, "shape")[0])
        assert torch.equal(ds[i][0], ds.sample(i).image)
