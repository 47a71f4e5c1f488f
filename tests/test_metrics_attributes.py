"""Attribute metrics: average precision / mAP and SANE's attribute insertion and deletion."""

import pytest
import torch

from whymatch.metrics.attributes import (
    attribute_insertion_deletion,
    average_precision,
    mean_average_precision,
    rowwise_similarity,
)


# ------------------------------------------------------------------ mAP
def test_average_precision_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 6, generator=g)
    labels = torch.rand(64, 6, generator=g) > 0.7
    ap = average_precision(scores, labels)
    for j in range(6):
        assert ap[j].item() == pytest.approx(sk.average_precision_score(labels[:, j].numpy(), scores[:, j].numpy()))
    m, per = mean_average_precision(scores, labels.int())
    assert m == pytest.approx(float(ap.mean()))
    assert torch.equal(per, ap)


def test_average_precision_perfect_and_missing_positive():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.3]])
    labels = torch.tensor([[1, 0], [1, 0], [0, 0]])
    ap = average_precision(scores, labels)
    assert ap[0].item() == 1.0
    assert torch.isnan(ap[1])
    m, _ = mean_average_precision(scores, labels)
    assert m == 1.0                               # the attribute without a positive is left out
    assert torch.isnan(torch.tensor(mean_average_precision(scores, torch.zeros(3, 2))[0]))
    assert average_precision(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.bool)).isnan().all()


@pytest.mark.parametrize("kw, match", [
    (dict(scores=torch.zeros(3), labels=torch.zeros(3)), "scores must be a 2-D"),
    (dict(scores=torch.zeros(3, 2), labels=torch.zeros(3, 3)), "labels must have the shape of scores"),
    (dict(scores=torch.zeros(3, 2, dtype=torch.long), labels=torch.zeros(3, 2)), "scores must be a floating"),
    (dict(scores=torch.zeros(3, 2), labels=torch.full((3, 2), 2)), "labels must be bool or 0/1"),
    (dict(scores=torch.tensor([[float("nan")]]), labels=torch.ones(1, 1)), "scores"),
])
def test_average_precision_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        average_precision(**kw)


# ------------------------------------------------------------------ insertion / deletion
def _world(n=60, a=4, d=6, seed=0, used=(0,)):
    """Embeddings that depend only on the attributes in ``used`` (plus tiny noise)."""
    g = torch.Generator().manual_seed(seed)
    attrs = torch.rand(n, a, generator=g) > 0.5
    dirs = torch.randn(a, d, generator=g)
    emb = torch.ones(n, d) * 0.5 + 0.01 * torch.randn(n, d, generator=g)
    for j in used:
        emb = emb + attrs[:, j:j + 1].float() * dirs[j]
    return attrs, emb


def test_deletion_rewards_the_attribute_the_model_uses():
    attrs, emb = _world(used=(0,))
    # pairs whose query and reference both have attribute 0
    idx = torch.nonzero(attrs[:, 0]).flatten()
    q, r = idx[: len(idx) // 2], idx[len(idx) // 2: 2 * (len(idx) // 2)]
    res_used = attribute_insertion_deletion(emb[q], emb[r], torch.zeros_like(q), attrs[q], emb, attrs,
                                            query_index=q, reference_index=r)
    res_unused = attribute_insertion_deletion(emb[q], emb[r], torch.ones_like(q), attrs[q], emb, attrs,
                                              query_index=q, reference_index=r)
    assert res_used.mean_deletion > 0.2
    assert abs(res_unused.mean_deletion) < 0.05
    assert res_used.mean_insertion > 0.2
    assert abs(res_unused.mean_insertion) < 0.05
    for r in (res_used, res_unused):
        assert (r.deletion.abs() <= 1 + 1e-6).all() and (r.insertion.abs() <= 1 + 1e-6).all()


def test_counterfactuals_lack_or_have_the_attribute_and_agree_elsewhere():
    attrs, emb = _world(n=50, a=5, used=(0, 1))
    q = torch.arange(10)
    r = torch.arange(10, 20)
    chosen = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    res = attribute_insertion_deletion(emb[q], emb[r], chosen, attrs[q], emb, attrs, query_index=q,
                                       reference_index=r)
    for i in range(10):
        m, p, a = int(res.deletion_index[i]), int(res.insertion_index[i]), int(chosen[i])
        assert not attrs[m, a] and attrs[p, a]
        assert m not in (int(q[i]), int(r[i])) and p not in (int(q[i]), int(r[i]), m)
        # brute force: no allowed image lacking a agrees with the query on more other attributes
        others = [j for j in range(5) if j != a]
        agree = (attrs[:, others] == attrs[q[i], others]).sum(1)
        ok = ~attrs[:, a]
        ok[[int(q[i]), int(r[i])]] = False
        assert agree[m] == agree[ok].max()
        if not attrs[q[i], a]:
            assert res.deletion[i] == 0


def test_types_restrict_the_candidates():
    attrs, emb = _world(n=40, a=3)
    types = torch.arange(40) % 2
    q, r = torch.arange(6), torch.arange(6, 12)
    res = attribute_insertion_deletion(emb[q], emb[r], torch.zeros_like(q), attrs[q], emb, attrs,
                                       query_index=q, query_types=types[q], database_types=types)
    ok = res.deletion_index >= 0
    assert torch.equal(types[res.deletion_index[ok]], types[q[ok]])
    ok = res.insertion_index >= 0
    assert torch.equal(types[res.insertion_index[ok]], types[q[ok]])


def test_no_candidate_gives_nan_left_out_of_the_mean():
    attrs = torch.tensor([[1, 0], [1, 1], [0, 1]], dtype=torch.bool)
    emb = torch.randn(3, 4)
    # nobody but the query lacks... attribute 0 is lacked only by row 2, which is the reference
    res = attribute_insertion_deletion(emb[:1], emb[2:3], torch.tensor([0]), attrs[:1], emb, attrs,
                                       query_index=torch.tensor([0]), reference_index=torch.tensor([2]))
    assert res.deletion_index.item() == -1 and torch.isnan(res.deletion).all()
    assert torch.isnan(torch.tensor(res.mean_deletion))


def test_similarity_kinds_and_model_agree():
    from whymatch import SimilarityModel

    a, b = torch.randn(7, 5), torch.randn(7, 5)
    sim = SimilarityModel(torch.nn.Identity(), "cosine", in_channels=None)
    torch.testing.assert_close(rowwise_similarity("cosine", a, b), rowwise_similarity(sim, a, b, chunk=3))
    torch.testing.assert_close(rowwise_similarity("neg_l2", a, b), -torch.cdist(a, b).diagonal())
    torch.testing.assert_close(rowwise_similarity(lambda x, y: x @ y.T, a, b), (a * b).sum(1))


def test_similarity_range_is_checked():
    attrs, emb = _world()
    q, r = torch.arange(4), torch.arange(4, 8)
    with pytest.raises(ValueError, match="similarity_range must bound every similarity"):
        attribute_insertion_deletion(emb[q], emb[r], torch.zeros_like(q), attrs[q], emb, attrs, similarity="dot")
    with pytest.raises(ValueError, match="similarity_range must be"):
        attribute_insertion_deletion(emb[q], emb[r], torch.zeros_like(q), attrs[q], emb, attrs,
                                     similarity_range=(1.0, 1.0))


@pytest.mark.parametrize("change, match", [
    (dict(chosen=torch.tensor([0, 9])), "chosen must hold int attribute indices in"),
    (dict(chosen=torch.tensor([0.0, 1.0])), "chosen must hold int attribute indices"),
    (dict(query_attributes=torch.full((2, 4), 0.5)), "query_attributes must be bool"),
    (dict(query_attributes=torch.zeros(2, 3, dtype=torch.bool)), r"query_attributes must have shape \(2, 4\)"),
    (dict(reference_embeddings=torch.zeros(3, 6)), "reference_embeddings must have shape"),
    (dict(query_index=torch.tensor([0, 99])), "query_index must hold database rows"),
    (dict(query_types=torch.zeros(2, dtype=torch.long)), "must be given together"),
])
def test_insertion_deletion_errors(change, match):
    attrs, emb = _world(a=4)
    kw = dict(query_embeddings=emb[:2], reference_embeddings=emb[2:4], chosen=torch.tensor([0, 1]),
              query_attributes=attrs[:2], database_embeddings=emb, database_attributes=attrs)
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        attribute_insertion_deletion(**kw)


def test_scores_follow_the_formulas_on_a_worked_example():
    import torch.nn.functional as F

    # rows: query, reference, c (lacks a), d (has a); a single attribute plus one shared other attribute
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 1.0]])
    attrs = torch.tensor([[1, 1], [1, 1], [0, 1], [1, 1]], dtype=torch.bool)
    res = attribute_insertion_deletion(emb[:1], emb[1:2], torch.tensor([0]), attrs[:1], emb, attrs,
                                       query_index=torch.tensor([0]), reference_index=torch.tensor([1]))
    cos = lambda i, j: float(F.cosine_similarity(emb[i], emb[j], dim=0))  # noqa: E731
    s, s_minus, s_plus = cos(0, 1), cos(2, 1), cos(3, 1)
    assert int(res.deletion_index) == 2 and int(res.insertion_index) == 3
    assert res.deletion.item() == pytest.approx((s - s_minus) / (s + 1), abs=1e-6)
    assert res.insertion.item() == pytest.approx((s_plus - s_minus) / (1 - s_minus), abs=1e-6)
    # swap the roles: removing the attribute now RAISES the similarity -> minus the fraction of the rise
    emb2 = emb.clone()
    emb2[2] = torch.tensor([1.0, 0.12])
    res2 = attribute_insertion_deletion(emb2[:1], emb2[1:2], torch.tensor([0]), attrs[:1], emb2, attrs,
                                        query_index=torch.tensor([0]), reference_index=torch.tensor([1]))
    s_minus2 = float(F.cosine_similarity(emb2[2], emb2[1], dim=0))
    assert s_minus2 > s
    want = (s - s_minus2) / max(1 - s, 0.1)   # the room above s is under the 5% floor (0.1)
    assert res2.deletion.item() == pytest.approx(want, abs=1e-6)
    assert -1 <= res2.deletion.item() < 0
