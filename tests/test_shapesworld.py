"""ShapesWorld: determinism, the zero-shot split, ground truth and argument checks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from whymatch.data import (
    ATTRIBUTE_NAMES,
    COLOURS,
    KEY_SIZES,
    N_CLASSES,
    PATTERNS,
    SHAPES,
    SIZES,
    TEST_CLASSES,
    TRAIN_CLASSES,
    ShapesSample,
    ShapesWorld,
    class_attributes,
    class_id,
    split_classes,
)
from whymatch.data.shapesworld import _RADIUS_96


@pytest.fixture(scope="module")
def samples() -> list[ShapesSample]:
    ds = ShapesWorld("train", 400, seed=3)
    return [ds.sample(i) for i in range(len(ds))]


# ------------------------------------------------------------------ determinism
def test_same_seed_same_pixels_in_any_order():
    a = ShapesWorld("train", 50, seed=7)
    b = ShapesWorld("train", 50, seed=7)
    later = [b[i][0] for i in (9, 3, 0)]  # b renders in another order
    for img_b, i in zip(later, (9, 3, 0)):
        img_a, label_a = a[i]
        assert torch.equal(img_a, img_b)
        assert label_a == b[i][1]
    assert torch.equal(a.sample(4).key_mask, b.sample(4).key_mask)


def test_sample_does_not_depend_on_dataset_length():
    assert torch.equal(ShapesWorld("test", 10, seed=1)[7][0], ShapesWorld("test", 500, seed=1)[7][0])


def test_different_seed_or_split_different_pixels():
    a = ShapesWorld("train", 5, seed=0)[2][0]
    assert not torch.equal(a, ShapesWorld("train", 5, seed=1)[2][0])
    assert not torch.equal(a, ShapesWorld("test", 5, seed=0)[2][0])


def test_images_batch_matches_items():
    ds = ShapesWorld("test", 6, seed=2)
    batch = ds.images()
    assert batch.shape == (6, 3, 96, 96) and batch.dtype == torch.float32
    assert torch.equal(batch[4], ds[4][0])
    u8 = ds.images([1, 4], dtype=torch.uint8)
    assert u8.dtype == torch.uint8 and u8.shape == (2, 3, 96, 96)
    assert (u8[1].float() / 255 - ds[4][0]).abs().max() <= 0.5 / 255 + 1e-6


# ------------------------------------------------------------------ split
def test_train_and_test_classes_are_disjoint_and_cover_all():
    assert len(TRAIN_CLASSES) == len(TEST_CLASSES) == N_CLASSES // 2
    assert not set(TRAIN_CLASSES) & set(TEST_CLASSES)
    assert set(TRAIN_CLASSES) | set(TEST_CLASSES) == set(range(N_CLASSES))
    assert split_classes("train") == TRAIN_CLASSES and split_classes("test") == TEST_CLASSES
    # every attribute value is seen in training and appears again in test
    for pos, vocab in enumerate((SHAPES, COLOURS, PATTERNS)):
        for split in (TRAIN_CLASSES, TEST_CLASSES):
            assert {class_attributes(c)[pos] for c in split} == set(vocab)


def test_labels_are_in_split_and_balanced():
    for split, classes in (("train", TRAIN_CLASSES), ("test", TEST_CLASSES)):
        ds = ShapesWorld(split, 240)
        labels = ds.labels
        assert labels.dtype == torch.int64 and labels.shape == (240,)
        assert set(labels.tolist()) == set(classes)
        assert torch.bincount(labels, minlength=N_CLASSES)[list(classes)].tolist() == [4] * 60


def test_class_id_round_trip():
    for s, c, p in itertools.product(SHAPES, COLOURS, PATTERNS):
        assert class_attributes(class_id(s, c, p)) == (s, c, p)
    assert sorted(class_id(*a) for a in itertools.product(SHAPES, COLOURS, PATTERNS)) == list(range(N_CLASSES))


# ------------------------------------------------------------------ ground truth
def test_sample_shapes_and_dtypes(samples):
    s = samples[0]
    assert s.image.shape == (3, 96, 96) and s.image.dtype == torch.float32
    assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0
    assert s.key_mask.shape == (96, 96) and s.key_mask.dtype == torch.bool
    assert s.object_masks.shape == (len(s.objects), 96, 96) and s.object_masks.dtype == torch.bool
    img, label = ShapesWorld("train", 400, seed=3)[0]
    assert torch.equal(img, s.image) and isinstance(label, int) and label == s.label
    small = ShapesWorld("test", 3, image_size=64)[1][0]
    assert small.shape == (3, 64, 64)


def test_key_mask_nonempty_inside_and_label_consistent(samples):
    for s in samples:
        key = s.key_object
        assert key.is_key and s.key_index == 0 and sum(o.is_key for o in s.objects) == 1
        assert class_id(key.shape, key.colour, key.pattern) == s.label
        assert torch.equal(s.key_mask, s.object_masks[0])
        n = int(s.key_mask.sum())
        assert n > 100 and n == key.area
        y0, x0, y1, x1 = key.bbox
        assert 0 <= y0 < y1 <= 96 and 0 <= x0 < x1 <= 96
        outside = s.key_mask.clone()
        outside[y0:y1, x0:x1] = False
        assert not outside.any()
        assert 2 <= len(s.objects) <= 4


def test_key_pixels_have_the_key_colour(samples):
    for s in samples[:60]:
        key = s.key_object
        m = s.key_mask
        inner = m.clone()  # eroded by one pixel: no edge pixels blended with the background
        inner[1:] &= m[:-1]
        inner[:-1] &= m[1:]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        pix = s.image[:, inner]                     # (3, n)
        lum = pix.sum(0)
        bright = pix[:, lum >= lum.quantile(0.75)]  # the pattern's dark part and blended edges excluded
        mean = bright.mean(1)
        assert torch.allclose(mean, torch.tensor(key.rgb), atol=0.08), (key, mean)


def test_object_masks_disjoint(samples):
    for s in samples[:100]:
        assert int(s.object_masks.sum(0).max()) <= 1


def test_distractors_small_and_key_largest(samples):
    """The rule: the key object is medium/large, every distractor small (radius ranges do not overlap)."""
    key_min = min(_RADIUS_96[z][0] for z in KEY_SIZES)
    for s in samples:
        assert s.key_object.size in KEY_SIZES
        for d in s.distractors:
            assert d.size == "small" and not d.is_key
            assert d.radius < key_min <= s.key_object.radius
            assert d.area < s.key_object.area


def test_distractor_attributes_independent_of_class(samples):
    """Distractor attribute frequencies do not depend on the key object's attributes."""
    counts = {kind: np.zeros((len(v), len(v))) for kind, v in (("shape", SHAPES), ("colour", COLOURS),
                                                                 ("pattern", PATTERNS))}
    vocab = {"shape": SHAPES, "colour": COLOURS, "pattern": PATTERNS}
    for s in samples:
        for d in s.distractors:
            for kind in counts:
                counts[kind][vocab[kind].index(getattr(s.key_object, kind)),
                             vocab[kind].index(getattr(d, kind))] += 1
    for kind, c in counts.items():
        # rate at which a distractor copies the key's value, against chance 1 / |vocab|
        same = np.trace(c) / c.sum()
        assert abs(same - 1 / len(vocab[kind])) < 0.06, (kind, same)
        # every value occurs as a distractor attribute
        assert (c.sum(0) > 0).all()


def test_render_hide_removes_only_that_object():
    ds = ShapesWorld("test", 10, seed=5)
    s = ds.sample(3)
    full = ds.render(3)
    assert torch.equal(full, s.image)
    no_key = ds.render(3, hide=[0])
    changed = (no_key != full).any(0)
    y0, x0, y1, x1 = s.key_object.bbox
    assert changed.any()
    assert not changed[:y0].any() and not changed[y1:].any()
    assert not changed[:, :x0].any() and not changed[:, x1:].any()
    assert changed[s.key_mask].float().mean() > 0.9


def test_attributes_vector():
    ds = ShapesWorld("train", 5)
    s = ds.sample(2)
    key = ds.attributes(2)
    assert key.dtype == torch.bool and key.shape == (len(ATTRIBUTE_NAMES),)
    names = {ATTRIBUTE_NAMES[i] for i in torch.nonzero(key).flatten().tolist()}
    o = s.key_object
    assert names == {f"shape:{o.shape}", f"colour:{o.colour}", f"pattern:{o.pattern}", f"size:{o.size}"}
    allv = ds.attributes(2, which="all")
    assert (allv | key).equal(allv) and allv[ATTRIBUTE_NAMES.index("size:small")]
    assert len(ATTRIBUTE_NAMES) == len(SHAPES) + len(COLOURS) + len(PATTERNS) + len(SIZES)


# ------------------------------------------------------------------ pairs
def test_pairs_same_class_references_and_negatives():
    ds = ShapesWorld("test", 300)
    p = ds.pairs(40, k_refs=3, n_negatives=2, seed=1)
    labels = ds.labels
    assert len(p) == 40 and p.query.shape == (40,) and p.references.shape == (40, 3) and p.negatives.shape == (40, 2)
    assert p.query.dtype == p.references.dtype == p.negatives.dtype == torch.int64
    assert len(set(p.query.tolist())) == 40
    assert (labels[p.references] == labels[p.query][:, None]).all()
    assert (p.references != p.query[:, None]).all()
    assert (labels[p.negatives] != labels[p.query][:, None]).all()
    for row in p.references.tolist():
        assert len(set(row)) == 3
    again = ds.pairs(40, k_refs=3, n_negatives=2, seed=1)
    assert torch.equal(p.query, again.query) and torch.equal(p.references, again.references)
    assert not torch.equal(p.query, ds.pairs(40, k_refs=3, seed=2).query)
    assert ds.pairs(5).negatives.shape == (5, 0)


def test_hard_negatives_share_most_attributes():
    ds = ShapesWorld("test", 240)
    p = ds.pairs(20, n_negatives=3, hard_negatives=True, seed=0)
    labels = ds.labels.tolist()
    for q, negs in zip(p.query.tolist(), p.negatives.tolist()):
        qa = class_attributes(labels[q])
        best = max(sum(a == b for a, b in zip(qa, class_attributes(c))) for c in TEST_CLASSES if c != labels[q])
        for n in negs:
            assert labels[n] != labels[q]
            assert sum(a == b for a, b in zip(qa, class_attributes(labels[n]))) == best


def test_indices_of_class():
    ds = ShapesWorld("train", 180)
    c = TRAIN_CLASSES[5]
    idx = ds.indices_of_class(c)
    assert idx.tolist() == [5, 65, 125]
    with pytest.raises(ValueError, match="label"):
        ds.indices_of_class(TEST_CLASSES[0])


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, exc, name", [
    ({"split": "val"}, ValueError, "split"),
    ({"n_samples": 0}, ValueError, "n_samples"),
    ({"n_samples": 2.5}, TypeError, "n_samples"),
    ({"image_size": 16}, ValueError, "image_size"),
    ({"seed": "a"}, TypeError, "seed"),
    ({"seed": -1}, ValueError, "seed"),
    ({"n_objects": (0, 3)}, ValueError, "n_objects"),
    ({"n_objects": (3, 2)}, ValueError, "n_objects"),
    ({"n_objects": 3}, TypeError, "n_objects"),
    ({"classes": [TEST_CLASSES[0]]}, ValueError, "classes"),
    ({"classes": []}, ValueError, "classes"),
])
def test_constructor_errors_name_the_argument(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        ShapesWorld(**kwargs)


def test_method_errors_name_the_argument():
    ds = ShapesWorld("test", 120)
    with pytest.raises(IndexError, match="index"):
        ds[120]
    with pytest.raises(TypeError, match="index"):
        ds.sample(1.0)
    with pytest.raises(ValueError, match="k_refs"):
        ds.pairs(3, k_refs=2)  # two images per class: one reference at most
    with pytest.raises(ValueError, match="n_negatives"):
        ds.pairs(3, n_negatives=-1)
    with pytest.raises(ValueError, match="dtype"):
        ds.images([0], dtype=torch.float64)
    with pytest.raises(ValueError, match="hide"):
        ds.render(0, hide=[7])
    with pytest.raises(ValueError, match="which"):
        ds.attributes(0, which="some")
    with pytest.raises(ValueError, match="shape"):
        class_id("hexagon", "red", "solid")
    with pytest.raises(ValueError, match="label"):
        class_attributes(N_CLASSES)
    assert ds[-1][1] == ds[119][1]
