"""benchmarks/attribute_causal.py: the bounds section (oracle key object rows, near-ties) on hand-built cases."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import attribute_causal as B  # noqa: E402
from whymatch.data.shapesworld import ATTRIBUTE_NAMES  # noqa: E402

NAN = float("nan")
KINDS = B.attribute_kinds()
I = {n: j for j, n in enumerate(ATTRIBUTE_NAMES)}


def _case():
    """Three pairs: the key object's four attributes (one per kind) and their drops; pair 0's largest drop is a
    distractor's shape, pair 1's key size and pair 2's key pattern cannot be changed (NaN)."""
    keys = [("shape:circle", "colour:red", "pattern:solid", "size:small"),
            ("shape:square", "colour:yellow", "pattern:stripes", "size:medium"),
            ("shape:triangle", "colour:green", "pattern:dots", "size:large")]
    drops = [{"shape:circle": 0.2, "colour:red": 0.3, "pattern:solid": 0.5, "size:small": 0.4, "shape:star": 1.0},
             {"shape:square": 0.1, "colour:yellow": 0.2, "pattern:stripes": 0.8, "size:medium": NAN},
             {"shape:triangle": 0.7, "colour:green": 0.1, "pattern:dots": NAN, "size:large": 0.3}]
    effects = torch.full((3, len(ATTRIBUTE_NAMES)), NAN)
    allowed = torch.zeros(3, len(ATTRIBUTE_NAMES), dtype=torch.bool)
    for p, (k, d) in enumerate(zip(keys, drops)):
        for name in k:
            allowed[p, I[name]] = True
        for name, v in d.items():
            effects[p, I[name]] = v
    return effects, allowed


def test_fixed_order_takes_the_first_kind_that_can_change():
    effects, allowed = _case()
    # pattern first: pair 2's pattern cannot change, so the next kind in the order (shape) is named
    got = B.fixed_order_choice(effects, allowed, (2, 0, 1, 3), KINDS)
    assert got.tolist() == [I["pattern:solid"], I["pattern:stripes"], I["shape:triangle"]]
    got = B.fixed_order_choice(effects, allowed, (3, 1, 0, 2), KINDS)
    assert got.tolist() == [I["size:small"], I["colour:yellow"], I["size:large"]]
    with pytest.raises(ValueError, match="permutation"):
        B.fixed_order_choice(effects, allowed, (0, 0, 1, 2), KINDS)


def test_best_fixed_order_is_the_one_that_names_the_causal_top_most_often():
    effects, allowed = _case()
    order, value = B.best_fixed_order(effects, allowed, KINDS)
    # pattern > shape names pairs 1 and 2's causal top; pair 0's top is a distractor's, out of any key-object rule
    assert tuple(order[:2]) == (2, 0)
    chosen = B.fixed_order_choice(effects, allowed, order, KINDS)
    assert B.causal_top1(chosen, effects).tolist() == [0.0, 1.0, 1.0]
    assert value == pytest.approx(2 / 3 + 0.01 * float(B.causal_attribute_deletion(chosen, effects).mean()))


def test_restricted_choice_stays_among_the_allowed_attributes():
    effects, allowed = _case()
    # the oracle among the key object's attributes: pair 0's global top (a distractor's shape) is not allowed
    assert B.restricted_choice(effects, allowed).tolist() == [I["pattern:solid"], I["pattern:stripes"],
                                                             I["shape:triangle"]]
    scores = torch.full((1, len(ATTRIBUTE_NAMES)), NAN)
    scores[0, 0] = 5.0
    allowed = torch.zeros_like(scores, dtype=torch.bool)
    allowed[0, [3, 7]] = True
    assert B.restricted_choice(scores, allowed).item() in (3, 7)      # every allowed score NaN: still allowed
    with pytest.raises(ValueError, match="at least one True"):
        B.restricted_choice(scores, torch.zeros_like(allowed))
    with pytest.raises(TypeError, match="bool"):
        B.restricted_choice(scores, allowed.float())


def test_near_tie_and_top1_within():
    effects = torch.full((4, 5), NAN)
    effects[0, :2] = torch.tensor([1.0, 0.95])      # runner-up within 10%: a near-tie
    effects[1, :3] = torch.tensor([0.2, 0.8, 0.5])   # 0.5 vs 0.8: not
    effects[2, 4] = 0.6                              # one defined effect: undefined
    effects[3, :2] = torch.tensor([-0.3, -0.5])      # negative drops: within 10% of |top| is -0.33
    tie = B.near_tie(effects, 0.1)
    assert tie[:2].tolist() == [1.0, 0.0] and math.isnan(tie[2]) and tie[3] == 0.0
    chosen = torch.tensor([1, 2, 4, 1])
    within = B.causal_top1_within(chosen, effects, 0.1)
    assert within.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert B.causal_top1(chosen, effects).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert B.causal_top1_within(chosen, effects, 0.5)[1] == 1.0     # 0.5 >= 0.8 - 0.4


def test_self_drop_targets_average_each_kind_of_the_key_object_only():
    # two images, D = 2; image 0's key object changes shape twice and colour once, a distractor's size once;
    # image 1 has no key-object render of any kind but pattern
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    changed = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    bank = {"embeddings": e, "changed": changed,
            "source": torch.tensor([0, 0, 0, 0, 1]),
            "attribute": torch.tensor([I["shape:square"], I["shape:star"], I["colour:red"], I["size:large"],
                                       I["pattern:dots"]]),
            "key": torch.tensor([True, True, True, False, True])}
    y, defined = B.self_drop_targets(bank, 4, KINDS)
    shape, colour, pattern, size = (B.KINDS.index(k) for k in ("shape", "colour", "pattern", "size"))
    assert y[0, shape] == pytest.approx((1.0 + 0.0) / 2)      # drops 1 - cos: 1 and 0
    assert y[0, colour] == pytest.approx(2.0)
    assert not defined[0, size] and y[0, size] == 0           # a distractor's render is not the key object's
    assert defined[1, pattern] and y[1, pattern] == pytest.approx(1.0)
    assert defined.sum() == 3


def test_reliance_ridge_recovers_a_linear_rule_and_ignores_undefined_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    w_true = torch.randn(5, 4, generator=g)
    y = x @ w_true + 0.5
    defined = torch.ones(200, 4, dtype=torch.bool)
    defined[:50, 2] = False
    y[:50, 2] = 1e6                                           # garbage where undefined: must not be fitted
    w = B.fit_reliance_ridge(x, y, defined, 1e-6)
    assert torch.allclose(B.predict_reliance(x[50:], w), (x @ w_true + 0.5)[50:], atol=1e-3)
    # a large weight shrinks the slopes, not the intercept
    w_big = B.fit_reliance_ridge(x, x @ w_true * 0 + 0.5, defined.clone().fill_(True), 1e6)
    assert torch.allclose(w_big[-1], torch.full((4,), 0.5), atol=1e-3)
    with pytest.raises(ValueError, match="lam"):
        B.fit_reliance_ridge(x, y, defined, -1.0)
