"""SANE explainer: Eq. 4 ranking, explanation objects, phi grid search."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from whymatch import SimilarityModel
from whymatch.attributes.explain import SANE, AttributeExplanation, AttributeTerms, phi_grid, rank_scores
from whymatch.attributes.losses import normalize_maps
from whymatch.attributes.model import AttributeModel

A = 4


class _Trunk(nn.Module):
    """Feature map = the image's 3 channels pooled to 4 x 4 plus a constant channel."""

    def forward(self, x):
        f = F.adaptive_avg_pool2d(x, 4)
        return torch.cat([f, torch.ones_like(f[:, :1])], 1)


class _FixedMaps(nn.Module):
    """Saliency 'explainer' that returns a fixed map per reference (no model calls)."""

    def __init__(self, maps):
        super().__init__()
        self.maps = maps
        self.calls = 0

    def attribute(self, query, references, **kw):
        self.calls += 1
        return self.maps[: references.shape[0]].clone()


def _setup(seed=0):
    torch.manual_seed(seed)
    emb = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    sim = SimilarityModel(emb.eval(), "cosine")
    model = AttributeModel(_Trunk(), A, channels=4, attribute_names=[f"a{i}" for i in range(A)]).eval()
    return sim, model


def test_terms_follow_eq4_definitions():
    sim, model = _setup()
    q = torch.rand(3, 3, 16, 16)
    sal = torch.rand(3, 16, 16)
    sane = SANE(sim, model, torch.tensor([0.1, 0.9, float("nan"), 0.3]), saliency=_FixedMaps(sal))
    t = sane.terms(q, sal)
    out = model(q)
    torch.testing.assert_close(t.confidence, out.confidences)
    # reference: area-resample the saliency, normalize both sides, cosine per attribute
    for i in range(3):
        m = normalize_maps(F.adaptive_avg_pool2d(sal[i][None, None], 4)[0, 0], "softmax", 0.05)
        for j in range(A):
            n = normalize_maps(out.maps[i, j])
            assert t.map_match[i, j].item() == pytest.approx(F.cosine_similarity(m, n, dim=0).item(), abs=1e-6)
    torch.testing.assert_close(t.tcav, torch.tensor([0.1, 0.9, 0.0, 0.3]).expand(3, A))
    e = rank_scores(t, (1.0, 2.0, 0.5))
    torch.testing.assert_close(e, t.confidence + 2 * t.map_match + 0.5 * t.tcav)


def test_explain_one_query_against_k_references():
    sim, model = _setup()
    q = torch.rand(3, 16, 16)
    refs = torch.rand(5, 3, 16, 16)
    sal = torch.rand(5, 16, 16)
    fixed = _FixedMaps(sal)
    sane = SANE(sim, model, saliency=fixed, phi=(1, 1, 0))
    ex = sane.explain(q, refs)
    assert isinstance(ex, AttributeExplanation) and len(ex) == 5 and fixed.calls == 1
    assert ex.saliency.shape == (5, 16, 16)
    assert ex.scores.shape == (5, A)
    torch.testing.assert_close(ex.similarity, sim.pairwise(sim.embed(q[None]), sim.embed(refs))[0])
    assert torch.equal(ex.top_attribute, ex.scores.argmax(1))
    # every pair has the same query: the query's most likely attribute is the same for all
    assert len(set(ex.query_attribute.tolist())) == 1
    rows = ex.ranked(2, k=3)
    assert [r["index"] for r in rows] == ex.scores[2].argsort(descending=True)[:3].tolist()
    assert rows[0]["score"] == pytest.approx(rows[0]["confidence"] + rows[0]["map_match"])
    assert ex.top_names()[0] == f"a{int(ex.top_attribute[0])}"
    with pytest.raises(IndexError, match="pair must be in"):
        ex.ranked(5)


def test_explain_pairs_shares_the_saliency_pass_of_a_repeated_query():
    sim, model = _setup()
    q = torch.rand(2, 3, 16, 16)
    queries = torch.stack([q[0], q[1], q[0]])
    refs = torch.rand(3, 3, 16, 16)
    fixed = _FixedMaps(torch.rand(3, 16, 16))
    sane = SANE(sim, model, saliency=fixed)
    ex = sane.explain_pairs(queries, refs)
    assert fixed.calls == 2 and len(ex) == 3
    given = torch.rand(3, 16, 16)
    ex2 = sane.explain_pairs(queries, refs, saliency=given)
    assert fixed.calls == 2 and torch.equal(ex2.saliency, given)


def test_explain_with_rise_runs_end_to_end():
    from whymatch.saliency import RISE

    sim, model = _setup()
    sane = SANE(sim, model, saliency=RISE(sim, n_masks=64, batch_size=32, seed=0))
    ex = sane.explain(torch.rand(3, 16, 16), torch.rand(2, 3, 16, 16))
    assert ex.saliency.shape == (2, 16, 16) and torch.isfinite(ex.scores).all()


def test_map_match_prefers_the_attribute_whose_map_matches():
    """An attribute map that equals the saliency map scores the highest map_match."""
    sim, _ = _setup()

    class _Echo(nn.Module):     # attribute j's map = channel j of the image, pooled
        def forward(self, x):
            return F.adaptive_avg_pool2d(x, 8)

    model = AttributeModel(_Echo(), 3, channels=3, kernel_size=1).eval()
    with torch.no_grad():
        model.conv.weight.copy_(torch.eye(3)[:, :, None, None] * 5)
    q = torch.zeros(1, 3, 16, 16)
    q[0, 0, :8, :8] = 1      # channel 0: top-left blob
    q[0, 1, 8:, 8:] = 1      # channel 1: bottom-right blob
    q[0, 2] = torch.rand(16, 16)
    sal = torch.zeros(1, 16, 16)
    sal[0, 8:, 8:] = 1       # saliency on the bottom-right
    t = SANE(sim, model, saliency=_FixedMaps(sal)).terms(q, sal)
    assert int(t.map_match[0].argmax()) == 1


def test_fit_phi_picks_the_best_grid_point_and_keeps_it():
    p, a = 12, 3
    g = torch.Generator().manual_seed(0)
    terms = AttributeTerms(torch.rand(p, a, generator=g), torch.rand(p, a, generator=g),
                           torch.tensor([0.0, 0.0, 1.0]).expand(p, a))
    truth = terms.map_match.argmax(1)     # the 'right' attribute is the one map_match picks
    sim, model = _setup()
    model3 = AttributeModel(_Trunk(), a, channels=4)
    sane = SANE(sim, model3, saliency=_FixedMaps(torch.rand(1, 8, 8)))
    calls = []

    def evaluate(chosen):
        calls.append(1)
        return float((chosen == truth).float().mean())

    best, table = sane.fit_phi(terms, evaluate)
    assert best[1] > 0 and best[0] == 0 and best[2] == 0
    assert sane.phi == best
    assert max(r["value"] for r in table) == 1.0
    assert len(calls) < len(table)          # identical choices are evaluated once
    assert len(table) == len(phi_grid())


def test_phi_grid_has_one_triple_per_direction():
    g = phi_grid((0.0, 1.0, 2.0))
    dirs = {tuple(round(v / max(t), 6) for v in t) for t in g}
    assert len(dirs) == len(g)
    assert (0.0, 0.0, 0.0) not in g and (1.0, 1.0, 1.0) in g and (2.0, 2.0, 2.0) not in g


@pytest.mark.parametrize("kw, err, match", [
    (dict(phi=(1, 1)), ValueError, "phi must be three or four numbers"),
    (dict(phi=(0, 0, 0)), ValueError, "at least one positive"),
    (dict(phi=(1, -1, 0)), ValueError, "phi2"),
    (dict(tcav=torch.zeros(3)), ValueError, r"tcav must have shape \(4\)"),
    (dict(saliency=object()), TypeError, "saliency must be an explainer"),
    (dict(normalize="max"), ValueError, "normalize"),
    (dict(temperature=0.0), ValueError, "temperature"),
])
def test_sane_errors(kw, err, match):
    sim, model = _setup()
    kw.setdefault("saliency", _FixedMaps(torch.rand(1, 8, 8)))
    with pytest.raises(err, match=match):
        SANE(sim, model, **kw)


def test_sane_input_errors():
    sim, model = _setup()
    sane = SANE(sim, model, saliency=_FixedMaps(torch.rand(3, 16, 16)))
    with pytest.raises(TypeError, match="attribute_model must be"):
        SANE(sim, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="references must hold one image per query"):
        sane.explain_pairs(torch.rand(2, 3, 16, 16), torch.rand(3, 3, 16, 16))
    with pytest.raises(ValueError, match="saliency must hold one map per query"):
        sane.terms(torch.rand(2, 3, 16, 16), torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="terms must hold at least one"):
        sane.fit_phi(AttributeTerms(torch.zeros(0, A), torch.zeros(0, A), torch.zeros(0, A)), lambda c: 0.0)
