"""Per-pair concept sensitivity (PairSensitivity) and SANE's fourth term."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from whymatch import SimilarityModel
from whymatch.attributes.explain import SANE, phi_grid, rank_scores
from whymatch.attributes.model import AttributeModel
from whymatch.attributes.tcav import TCAV, PairSensitivity


def test_gradient_mode_is_the_limit_of_the_finite_mode():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    cavs = F.normalize(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=1)
    for sim in ("cosine", "dot", "neg_l2"):
        grad = PairSensitivity.from_cavs(cavs, step=1.0, similarity=sim, mode="gradient").sensitivities(q, r)
        assert grad.dtype == torch.float64 and grad.shape == (6, 3)
        eps = 1e-6
        fin = PairSensitivity.from_cavs(cavs, step=eps, similarity=sim).sensitivities(q, r) / eps
        torch.testing.assert_close(fin, grad, rtol=1e-4, atol=1e-6)
        # and the finite form is exactly s(q, r) - s(q - step v, r)
        big = PairSensitivity.from_cavs(cavs, step=0.7, similarity=sim).sensitivities(q, r)
        tc = TCAV(similarity=sim)
        for j in range(3):
            want = tc._rowwise(q, r) - tc._rowwise(q - 0.7 * cavs[j], r)
            torch.testing.assert_close(big[:, j], want)


def _toy_world(n, weights, seed):
    """Embeddings f(x) = sum_j z_j w_j u_j (u orthonormal): attribute j counts w_j for the similarity.

    Counterfactual of attribute j: z_j -> 0 (removed). Returns z, f, counterfactual rows."""
    g = torch.Generator().manual_seed(seed)
    a = weights.shape[0]
    z = (torch.rand(n, a, generator=g) < 0.5).double()
    z[z.sum(1) == 0, 0] = 1
    u = torch.eye(a, dtype=torch.float64)
    f = (z * weights) @ u + 0.01 * torch.randn(n, a, generator=g, dtype=torch.float64)
    src, att, changed = [], [], []
    for i in range(n):
        for j in z[i].nonzero().flatten().tolist():
            src.append(i)
            att.append(j)
            changed.append(f[i] - weights[j] * u[j])
    return z, f, torch.stack(changed), torch.tensor(src), torch.tensor(att)


@pytest.mark.parametrize("k", [None, 5])
def test_planted_reliance_is_recovered(k):
    weights = torch.tensor([0.5, 3.0, 1.0, 2.0, 0.2], dtype=torch.float64)   # the model relies on 1, then 3
    z, f, ch, src, att = _toy_world(200, weights, 0)
    sens = PairSensitivity.from_counterfactuals(f, ch, src, att, 5, k=k, similarity="cosine")
    # pairs: a query and a reference with the same attributes (a positive pair), new draws
    zq, fq, *_ = _toy_world(60, weights, 1)
    fr = (zq * weights) + 0.01 * torch.randn(60, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    s = sens.sensitivities(fq, fr)
    gated = torch.where(zq > 0, s, torch.full_like(s, -1e9))
    # causal truth: the drop when attribute j alone is removed from the query
    truth = torch.full_like(s, -1e9)
    for j in range(5):
        moved = fq - (zq[:, j] * weights[j])[:, None] * torch.eye(5, dtype=torch.float64)[j]
        drop = F.cosine_similarity(fq, fr) - F.cosine_similarity(moved, fr)
        truth[:, j] = torch.where(zq[:, j] > 0, drop, truth[:, j])
    agree = (gated.argmax(1) == truth.argmax(1)).double().mean()
    assert agree >= 0.95
    # a planted-irrelevant attribute (weight 0.2) is never the top one when a heavier one is present
    heavy = zq[:, [1, 3]].sum(1) > 0
    assert not (gated.argmax(1)[heavy] == 4).any()


def test_local_directions_use_the_nearest_training_images():
    # two clusters whose change of attribute 0 goes in opposite directions
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [-0.9, -0.1]])
    delta = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, -1.0], [0.0, -1.0]])
    src, att = torch.arange(4), torch.zeros(4, dtype=torch.long)
    local = PairSensitivity.from_counterfactuals(x, x + delta, src, att, 2, k=2)
    d = local.directions_for(torch.tensor([[1.0, 0.05], [-1.0, -0.05]]))
    torch.testing.assert_close(d[:, 0], torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    torch.testing.assert_close(d[:, 1], torch.zeros(2, 2))          # never measured: no direction
    glob = PairSensitivity.from_counterfactuals(x, x + delta, src, att, 2)
    torch.testing.assert_close(glob.directions_for(x[:1])[0, 0], torch.zeros(2))


def test_pair_sensitivity_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="mode"):
        PairSensitivity(mode="exact")
    with pytest.raises(ValueError, match="step"):
        PairSensitivity.from_cavs(torch.eye(4), step=0.0)
    with pytest.raises(ValueError, match="source must hold indices in"):
        PairSensitivity.from_counterfactuals(x, x, torch.tensor([0, 1, 3]), torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="attribute must have one entry"):
        PairSensitivity.from_counterfactuals(x, x, torch.arange(3), torch.zeros(2, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="source must hold integer"):
        PairSensitivity.from_counterfactuals(x, x, torch.zeros(3), torch.zeros(3, dtype=torch.long), 2)
    s = PairSensitivity.from_cavs(torch.eye(4))
    with pytest.raises(ValueError, match="references must have the queries' shape"):
        s.sensitivities(x, x[:2])
    with pytest.raises(RuntimeError, match="no directions"):
        PairSensitivity().sensitivities(x, x)


class _NoSaliency:
    def attribute(self, query, references, **kw):
        raise AssertionError("terms() must not run the saliency explainer")


class _Trunk(nn.Module):
    def forward(self, x):
        f = F.adaptive_avg_pool2d(x, 4)
        return torch.cat([f, torch.ones_like(f[:, :1])], 1)


def test_sane_fourth_term_is_gated_sensitivity():
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    sim = SimilarityModel(emb.eval(), "cosine")
    model = AttributeModel(_Trunk(), 4, channels=4, attribute_names=[f"a{i}" for i in range(4)]).eval()
    q, r, sal = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16), torch.rand(3, 16, 16)
    sens = PairSensitivity.from_cavs(F.normalize(torch.randn(4, 4), dim=1), step=0.5, similarity=sim)
    sane = SANE(sim, model, saliency=_NoSaliency(), sensitivity=sens)
    with pytest.raises(ValueError, match="references must be given"):
        sane.terms(q, sal)
    t = sane.terms(q, sal, r)
    raw = sens.sensitivities(sim.embed(q), sim.embed(r))
    conf = model(q).confidences
    torch.testing.assert_close(t.sensitivity, conf / conf.amax(1, keepdim=True) * raw)
    e = rank_scores(t, (1.0, 0.0, 0.0, 2.0))
    torch.testing.assert_close(e, t.confidence + 2 * t.sensitivity)
    # three weights: Eq. 4 unchanged, the sensitivity is ignored
    torch.testing.assert_close(rank_scores(t, (1.0, 1.0, 1.0)), t.confidence + t.map_match + t.tcav)
    pair = SANE(sim, model, saliency=sane.saliency, sensitivity=sens, gate="pair").terms(q, sal, r)
    cr = model(r).confidences
    g = torch.minimum(conf / conf.amax(1, keepdim=True), cr / cr.amax(1, keepdim=True))
    torch.testing.assert_close(pair.sensitivity, g * raw)
    # fit_phi searches four weights when there is a sensitivity term
    phi, table = sane.fit_phi(t, lambda c: float((c == t.sensitivity.argmax(1)).float().mean()))
    assert len(phi) == 4 and len(table) == len(phi_grid(n=4))
    assert torch.equal(rank_scores(t, phi).argmax(1), t.sensitivity.argmax(1))
