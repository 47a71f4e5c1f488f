"""The real-photo pairs of benchmarks/realphoto_table.py: offline, disjoint splits, a ground truth per pair."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("skimage")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import realphoto_pairs as P  # noqa: E402


def test_splits_share_no_object_and_no_background():
    assert not set(P.OBJECTS["val"]) & set(P.OBJECTS["test"])
    assert not {p for p, _ in P.OBJECTS["val"].values()} & {p for p, _ in P.OBJECTS["test"].values()} - {"astronaut"}
    assert not set(P.BACKGROUNDS["val"]) & set(P.BACKGROUNDS["test"])


@pytest.mark.parametrize("split", P.SPLITS)
def test_pairs_share_exactly_one_object_whose_box_is_the_ground_truth(split, tmp_path):
    pairs = P.make_pairs(split, 3, 64, seed=1)
    for p in pairs:
        assert p.query.shape == p.reference.shape == (3, 64, 64)
        assert 0 <= float(p.query.min()) and float(p.query.max()) <= 1
        assert p.query_mask.dtype == torch.bool and 0 < int(p.query_mask.sum()) < 64 * 64 // 2
        assert p.shared not in p.query_distractors + p.reference_distractors
        assert not set(p.query_distractors) & set(p.reference_distractors)
        assert set(p.query_distractors) <= set(P.OBJECTS[split])
    # deterministic from the seed, and the cache gives back the same pairs
    again = P.make_pairs(split, 3, 64, seed=1, cache=str(tmp_path))
    cached = P.make_pairs(split, 3, 64, seed=1, cache=str(tmp_path))
    for a, b, c in zip(pairs, again, cached):
        assert torch.equal(a.query, b.query) and torch.equal(a.query, c.query)
        assert torch.equal(a.query_mask, c.query_mask) and a.shared == c.shared
