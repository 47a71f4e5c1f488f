"""TCAV over embeddings (whymatch.attributes.tcav): CAV recovery, sensitivities, scores, significance,
triplets, state, and a cross-check against captum's TCAV on the same activations."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from helpers import devices
from whymatch.attributes.tcav import TCAV, TCAVSignificance, _betainc, _welch_two_sided
from whymatch.similarity import SimilarityModel, pairwise_similarity

KINDS = ("dot", "cosine", "neg_l2")
# torch's forward-mode AD (ours, and captum's import) loads decompositions through torch.jit.script.
JIT_DEPRECATION = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


pytestmark = pytest.mark.usefixtures("single_thread")


def make_data(n=400, d=16, a=4, noise=0.5, seed=0, dtype=torch.float32):
    """Embeddings = 2 * sum of the present attributes' directions (orthonormal, rotated) + noise."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    dirs = q[:, :a].T.contiguous()
    attrs = torch.rand(n, a, generator=g) < 0.5
    emb = 2 * attrs.double() @ dirs + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return emb.to(dtype), attrs, dirs.to(dtype)


def hard_triplets(dirs, p=200, noise=0.2, seed=1, noise_dims=None):
    """Violated triplets: anchor has every attribute, the positive shares only attribute 0, the
    negative shares all the others, so d(a, p) > d(a, n) for dot, cosine and neg_l2."""
    g = torch.Generator().manual_seed(seed)
    d = dirs.shape[1]

    def eps():
        e = noise * torch.randn(p, d, generator=g, dtype=dirs.dtype)
        if noise_dims is not None:
            e = e * noise_dims
        return e

    a = 2 * dirs.sum(0) + eps()
    pos = 2 * dirs[0] + eps()
    neg = 2 * dirs[1:].sum(0) + eps()
    return a, pos, neg


def rowwise_loss(kind, a, p, n, margin, hinge):
    """Reference triplet loss, per row, from whymatch.pairwise_similarity's definitions (float64-safe)."""
    def s(x, y):
        if kind == "cosine":
            return F.cosine_similarity(x, y, dim=1, eps=1e-30)
        if kind == "dot":
            return (x * y).sum(1)
        return -(x - y).norm(dim=1)
    raw = -s(a, p) + s(a, n)
    return torch.clamp(raw + margin, min=0) if hinge else raw


def with_cavs(cavs, **kw):
    """A TCAV holding the given CAVs (through load_state_dict)."""
    a = cavs.shape[0]
    state = {"cavs": cavs, "accuracy": torch.ones(a), "valid": torch.ones(a, dtype=torch.bool),
             "attribute_names": [f"c{j}" for j in range(a)]}
    return TCAV(**kw).load_state_dict(state)


# --------------------------------------------------------------------------------------- fit
def test_cavs_recover_attribute_directions():
    emb, attrs, dirs = make_data()
    t = TCAV(similarity="dot", attribute_names=["a", "b", "c", "d"]).fit(emb, attrs)
    assert t.cavs.shape == (4, 16) and t.cavs.dtype == torch.float32
    torch.testing.assert_close(t.cavs.norm(dim=1), torch.ones(4))
    cos = (t.cavs * dirs).sum(1)
    assert (cos > 0.9).all(), cos  # pointing towards "has the attribute"
    assert (t.accuracy > 0.9).all(), t.accuracy
    assert t.valid.all() and t.attribute_names == ["a", "b", "c", "d"]
    # A concept the similarity uses, scored with the learned CAVs on violated triplets.
    a, p, n = hard_triplets(dirs)
    s = t.scores(a, p, n)
    assert s[0] > 0.95 and (s[1:] < 0.05).all(), s


def test_fit_balance_off_and_no_holdout():
    emb, attrs, dirs = make_data(n=200)
    t = TCAV(balance=False, n_steps=50).fit(emb, attrs, holdout=0.0)
    assert ((t.cavs * dirs).sum(1) > 0.9).all()
    assert (t.accuracy > 0.9).all()  # measured on the training data
    t.fit(emb, attrs[:, :2])  # refitting with another attribute count renames the defaults
    assert t.cavs.shape == (2, 16) and t.attribute_names == ["attribute_0", "attribute_1"]


# ------------------------------------------------------------------------ scores and hinge
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hinge", [True, False])
def test_scores_concept_nuisance_orthogonal(kind, hinge):
    # Axis-aligned: attributes on coordinates 0-3, noise only on 4-6, coordinate 7 exactly 0 everywhere.
    d = 8
    dirs = torch.eye(d)[:4]
    mask = torch.tensor([1.0] * 7 + [0.0])
    a, p, n = hard_triplets(dirs, noise_dims=mask)
    cavs = torch.eye(d)[[0, 1, 5, 7]]  # used (a~p), used (a~n), nuisance, orthogonal to everything
    t = with_cavs(cavs, similarity=kind, hinge=hinge)
    s = t.scores(a, p, n)
    # Every hard triplet is violated, so the hinge changes nothing here.
    assert s[0] > 0.95 and s[1] < 0.05 and 0.35 < s[2] < 0.65, s
    assert s[3] == 0  # zero derivative is not positive
    # Swapped roles: every triplet is satisfied by far more than the margin.
    sens = t.sensitivities(a, n, p)
    s = t.scores(a, n, p)
    if hinge:
        assert (sens == 0).all() and (s == 0).all()  # inactive hinge: gradient 0, never positive
    else:
        assert s[0] < 0.05 and s[1] > 0.95 and 0.35 < s[2] < 0.65 and s[3] == 0, s


@pytest.mark.parametrize("kind", KINDS)
def test_hinge_score_is_fraction_of_active_and_positive(kind):
    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(300, 6, generator=g) for _ in range(3))
    cavs = F.normalize(torch.randn(5, 6, generator=g), dim=1)
    on = with_cavs(cavs, similarity=kind, hinge=True)
    off = with_cavs(cavs, similarity=kind, hinge=False)
    eps = torch.finfo(torch.float32).eps
    active = rowwise_loss(kind, a, p, n, eps, hinge=False) + eps > 0
    assert 0.2 < active.float().mean() < 0.8
    s_off = off.sensitivities(a, p, n)
    torch.testing.assert_close(on.sensitivities(a, p, n), s_off * active[:, None])
    torch.testing.assert_close(on.scores(a, p, n), ((s_off > 0) & active[:, None]).float().mean(0))


def test_margin():
    # dot: d(a,p) - d(a,n) = -(1) + 0.5 = -0.5: satisfied, inactive for the default margin, active for 1.
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0]])
    n = torch.tensor([[0.5, 1.0]])
    cavs = torch.tensor([[1.0, 0.0]])
    assert with_cavs(cavs, similarity="dot").sensitivities(a, p, n).item() == 0
    assert with_cavs(cavs, similarity="dot", margin=1.0).sensitivities(a, p, n).item() == pytest.approx(0.5)


# ------------------------------------------------------------------------------ sensitivities
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hinge", [True, False])
def test_sensitivities_finite_differences(kind, hinge):
    g = torch.Generator().manual_seed(4)
    a, p, n = (torch.randn(64, 5, generator=g, dtype=torch.float64) for _ in range(3))
    emb = torch.randn(80, 5, generator=g, dtype=torch.float64)
    attrs = torch.rand(80, 3, generator=g) < 0.5
    t = TCAV(similarity=kind, hinge=hinge, n_steps=20).fit(emb, attrs)
    sens = t.sensitivities(a, p, n)
    assert sens.dtype == torch.float64 and sens.shape == (64, 3)
    eps = torch.finfo(torch.float64).eps
    raw = rowwise_loss(kind, a, p, n, eps, hinge=False)
    far = (raw + eps).abs() > 1e-3  # away from the hinge's kink
    h = 1e-6
    cavs = t.cavs.double()
    for j in range(3):
        fd = -(rowwise_loss(kind, a + h * cavs[j], p, n, eps, hinge)
               - rowwise_loss(kind, a - h * cavs[j], p, n, eps, hinge)) / (2 * h)
        torch.testing.assert_close(sens[far, j], fd[far], rtol=1e-6, atol=1e-7)


@JIT_DEPRECATION
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sensitivities_match_per_attribute_loop(kind, dtype):
    g = torch.Generator().manual_seed(5)
    a, p, n = (torch.randn(50, 7, generator=g, dtype=dtype) for _ in range(3))
    cavs = F.normalize(torch.randn(4, 7, generator=g), dim=1)
    t = with_cavs(cavs, similarity=kind, hinge=False)
    sens = t.sensitivities(a, p, n)
    ref = []
    for j in range(4):  # forward-mode reference, one attribute at a time
        v = cavs[j].to(dtype).expand_as(a)
        with fwAD.dual_level():
            out = -rowwise_loss(kind, fwAD.make_dual(a, v), p, n, 0.0, hinge=False)
            ref.append(fwAD.unpack_dual(out).tangent)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sens, torch.stack(ref, 1), **tol)


def test_callable_and_similarity_model_match_named_kind():
    g = torch.Generator().manual_seed(6)
    a, p, n = (torch.randn(300, 8, generator=g) for _ in range(3))  # > one 256-row block
    cavs = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    ref = with_cavs(cavs, similarity="cosine", hinge=False).sensitivities(a, p, n)
    fn = with_cavs(cavs, similarity=lambda x, y: pairwise_similarity(x, y, "cosine"), hinge=False)
    sm = with_cavs(cavs, similarity=SimilarityModel(nn.Flatten(), "cosine"), hinge=False)
    torch.testing.assert_close(fn.sensitivities(a, p, n), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sm.sensitivities(a, p, n), ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- device and dtype
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_device_and_dtype(device, dtype):
    emb, attrs, dirs = make_data(n=200, dtype=dtype)
    emb, attrs = emb.to(device), attrs.to(device)
    t = TCAV(similarity="dot").fit(emb, attrs)
    assert t.cavs.device.type == device and t.cavs.dtype == torch.float32
    assert t.accuracy.device.type == device and t.valid.device.type == device
    assert ((t.cavs.cpu() * dirs.float()).sum(1) > 0.9).all()
    a, p, n = (x.to(device) for x in hard_triplets(dirs.float()))
    sens = t.sensitivities(a.to(dtype), p.to(dtype), n.to(dtype))
    assert sens.device.type == device
    assert sens.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    s = t.scores(a, p, n)
    assert s.dtype == torch.float32 and s.device.type == device and s[0] > 0.95
    # Training elsewhere returns the results on the caller's device, with the same CAVs.
    t_cpu = TCAV(similarity="dot", device="cpu").fit(emb, attrs)
    assert t_cpu.cavs.device.type == device
    torch.testing.assert_close(t_cpu.cavs, t.cavs, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------- invalid
def test_invalid_attributes_get_zero_cav_and_nan():
    emb, attrs, dirs = make_data(n=200, a=2)
    attrs = torch.cat([attrs, torch.ones(200, 1, dtype=torch.bool), torch.zeros(200, 1, dtype=torch.bool)], 1)
    t = TCAV(similarity="dot").fit(emb, attrs.int())  # 0/1 integers are accepted too
    assert t.valid.tolist() == [True, True, False, False]
    assert (t.cavs[2:] == 0).all() and t.accuracy[2:].isnan().all() and not t.accuracy[:2].isnan().any()
    a, p, n = hard_triplets(torch.cat([dirs, torch.zeros(2, 16)]))
    assert (t.sensitivities(a, p, n)[:, 2:] == 0).all()
    s = t.scores(a, p, n)
    assert s[2:].isnan().all() and not s[:2].isnan().any()
    sig = t.significance(emb, attrs, a, p, n, n_random=3)
    # One positive: valid (it stays in training), but nothing to hold out, so no accuracy.
    one = torch.zeros(200, 1, dtype=torch.bool)
    one[5] = True
    t1 = TCAV().fit(emb, one)
    assert t1.valid.item() and t1.accuracy.isnan().item() and t1.cavs.norm().item() == pytest.approx(1.0)
    assert sig.p_values[2:].isnan().all() and not sig.significant[2:].any()
    assert sig.scores[2:].isnan().all()


# --------------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    emb, attrs, dirs = make_data(n=50)
    t = TCAV()
    cases = [
        (lambda: TCAV(similarity="euclid"), ValueError, "similarity"),
        (lambda: TCAV(similarity=3), TypeError, "similarity"),
        (lambda: TCAV(margin=-1.0), ValueError, "margin"),
        (lambda: TCAV(l2=float("nan")), ValueError, "l2"),
        (lambda: TCAV(n_steps=0), ValueError, "n_steps"),
        (lambda: TCAV(hinge=1), TypeError, "hinge"),
        (lambda: TCAV(seed=1.5), TypeError, "seed"),
        (lambda: TCAV(device="gpu0"), ValueError, "device"),
        (lambda: TCAV(attribute_names="abc"), TypeError, "attribute_names"),
        (lambda: TCAV(attribute_names=["x"]).fit(emb, attrs), ValueError, "attribute_names"),
        (lambda: t.fit(emb[0], attrs), ValueError, "embeddings"),
        (lambda: t.fit(emb.int(), attrs), ValueError, "embeddings"),
        (lambda: t.fit(emb.clone().fill_(float("nan")), attrs), ValueError, "embeddings"),
        (lambda: t.fit(emb, attrs[:10]), ValueError, "attributes"),
        (lambda: t.fit(emb, attrs.float() * 2), ValueError, "attributes"),
        (lambda: t.fit(emb, attrs, holdout=1.0), ValueError, "holdout"),
        (lambda: t.sensitivities(emb, emb, emb), RuntimeError, "fit"),
    ]
    for fn, exc, name in cases:
        with pytest.raises(exc, match=name):
            fn()
    t.fit(emb, attrs)
    a, p, n = hard_triplets(dirs, p=10)
    for fn, name in [
        (lambda: t.sensitivities(a[:, :5], p[:, :5], n[:, :5]), "anchors"),
        (lambda: t.sensitivities(a, p[:5], n), "positives"),
        (lambda: t.sensitivities(a, p, n[:, None]), "negatives"),
        (lambda: t.scores(a, p, n.clone().fill_(float("inf"))), "negatives"),
        (lambda: t.significance(emb, attrs, a, p, n, n_random=1), "n_random"),
        (lambda: t.significance(emb, attrs, a, p, n, alpha=1.0), "alpha"),
        (lambda: TCAV.triplets(emb, attrs[:, 0].float()), "labels"),
        (lambda: TCAV.triplets(emb, attrs[:10, 0].long()), "labels"),
        (lambda: TCAV.triplets(emb, torch.zeros(50, dtype=torch.long)), "labels"),
        (lambda: TCAV.triplets(emb, n=0), "n"),
        (lambda: t.load_state_dict({"cavs": torch.zeros(2, 3)}), "missing"),
    ]:
        with pytest.raises((ValueError, TypeError), match=name):
            fn()


# ---------------------------------------------------------------------------- determinism
def test_deterministic_and_global_rng_untouched():
    emb, attrs, dirs = make_data(n=200)
    a, p, n = hard_triplets(dirs, p=50)
    state = torch.get_rng_state()
    t1 = TCAV(seed=7).fit(emb, attrs)
    t2 = TCAV(seed=7).fit(emb, attrs)
    s1 = t1.significance(emb, attrs, a, p, n, n_random=3)
    s2 = t2.significance(emb, attrs, a, p, n, n_random=3)
    tr1 = TCAV.triplets(emb, attrs[:, 0].long(), n=30, seed=2)
    tr2 = TCAV.triplets(emb, attrs[:, 0].long(), n=30, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(t1.cavs, t2.cavs) and torch.equal(t1.accuracy, t2.accuracy)
    assert torch.equal(s1.concept_scores, s2.concept_scores) and torch.equal(s1.random_scores, s2.random_scores)
    assert all(torch.equal(x, y) for x, y in zip(tr1, tr2))
    t3 = TCAV(seed=8).fit(emb, attrs)  # another holdout split
    assert not torch.equal(t1.cavs, t3.cavs)


# ---------------------------------------------------------------------------- significance
def test_significance_separates_real_from_random_concept():
    emb, attrs, dirs = make_data(n=300)
    g = torch.Generator().manual_seed(11)
    attrs = torch.cat([attrs, torch.rand(300, 1, generator=g) < 0.4], 1)  # column 4: not in the embeddings
    # Natural triplets (nearest same-label positive, random other-label negative) whose anchors have
    # attribute 0.  They are almost all satisfied, so the un-hinged loss is used (hinged: scores ~0).
    ai, pi, ni = TCAV.triplets(emb, attrs[:, 0].long())
    keep = attrs[ai, 0]
    a, p, n = emb[ai[keep]], emb[pi[keep]], emb[ni[keep]]
    t = TCAV(similarity="dot", hinge=False)
    sig = t.significance(emb, attrs, a, p, n, n_random=8)
    assert isinstance(sig, TCAVSignificance)
    assert sig.concept_scores.shape == sig.random_scores.shape == (8, 5)
    assert sig.scores.shape == sig.p_values.shape == sig.significant.shape == (5,)
    assert t.cavs is None  # significance does not fit the instance
    assert sig.scores[0] > 0.95 and sig.p_values[0] < 1e-3 and sig.significant[0], sig
    assert sig.p_values[4] > 0.05 and not sig.significant[4], sig
    scipy_stats = pytest.importorskip("scipy.stats")
    for j in range(5):
        with warnings.catch_warnings():  # column 0: the concept re-fits all score 1.0 (no spread)
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = scipy_stats.ttest_ind(sig.concept_scores[:, j].double().numpy(),
                                        sig.random_scores[:, j].double().numpy(), equal_var=False).pvalue
        assert sig.p_values[j].item() == pytest.approx(ref, rel=1e-4, abs=1e-12)


def test_t_distribution_against_scipy():
    special = pytest.importorskip("scipy.special")
    a = torch.tensor([0.5, 1.0, 2.5, 4.0, 30.0, 200.0, 0.5, 7.0], dtype=torch.float64)
    b = torch.tensor([0.5, 0.5, 0.5, 3.0, 0.5, 0.5, 9.0, 7.0], dtype=torch.float64)
    for x in (0.0, 1e-6, 0.05, 0.3, 0.5, 0.77, 0.99, 1.0):
        xs = torch.full_like(a, x)
        ref = torch.tensor(special.betainc(a.numpy(), b.numpy(), xs.numpy()))
        torch.testing.assert_close(_betainc(a, b, xs), ref, rtol=1e-9, atol=1e-12)
    same = torch.ones(4, 2)
    assert _welch_two_sided(same, same).tolist() == [1.0, 1.0]
    assert _welch_two_sided(same, 2 * same).tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------- triplets
def test_triplets_with_labels():
    g = torch.Generator().manual_seed(12)
    emb = torch.randn(60, 4, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    labels[0] = 9  # a singleton label: never an anchor, but can be a negative
    a, p, n = TCAV.triplets(emb, labels)
    assert a.dtype == p.dtype == n.dtype == torch.int64
    assert a.tolist() == list(range(1, 60))
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
    dist = torch.cdist(emb, emb)
    dist[torch.arange(60), torch.arange(60)] = float("inf")
    dist[labels[:, None] != labels[None, :]] = float("inf")
    assert torch.equal(p, dist.argmin(1)[a])
    a2, p2, n2 = TCAV.triplets(emb, labels, n=500, seed=3)
    assert a2.shape == (500,) and set(a2.tolist()) == set(range(1, 60))
    assert (labels[a2] != labels[n2]).all() and len(set(n2.tolist())) > 40


def test_triplets_without_labels():
    g = torch.Generator().manual_seed(13)
    emb = torch.randn(30, 4, generator=g)
    a, p, n = TCAV.triplets(emb, similarity="cosine", n=200, seed=1)
    sim = pairwise_similarity(emb, emb, "cosine")
    sim.fill_diagonal_(-float("inf"))
    assert torch.equal(p, sim.argmax(1)[a])
    assert (n != a).all() and (n != p).all() and len(set(n.tolist())) == 30


# ---------------------------------------------------------------------------------- state
def test_state_dict_round_trip():
    emb, attrs, dirs = make_data(n=200)
    t = TCAV(similarity="neg_l2", hinge=False, attribute_names=list("wxyz")).fit(emb, attrs)
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    a, p, n = hard_triplets(dirs, p=50)
    t2 = TCAV(similarity="neg_l2", hinge=False).load_state_dict(state)
    t3 = TCAV.from_state_dict(state)
    for u in (t2, t3):
        assert torch.equal(u.cavs, t.cavs) and torch.equal(u.valid, t.valid) and u.attribute_names == list("wxyz")
        assert torch.equal(u.accuracy.nan_to_num(-1), t.accuracy.nan_to_num(-1))
        assert torch.equal(u.sensitivities(a, p, n), t.sensitivities(a, p, n))
    assert t3.hinge is False and t3.similarity == "neg_l2"
    custom = TCAV(similarity=lambda x, y: x @ y.T).fit(emb, attrs).state_dict()
    with pytest.raises(ValueError, match="similarity"):
        TCAV.from_state_dict(custom)


# ---------------------------------------------------------------------------- captum check
class TripletHead(nn.Module):
    """Input (B, 3D) = [anchor | positive | negative]; layer `embedding` outputs the anchor's
    embedding; the output is minus the hinged triplet loss, so captum's layer gradients are TCAV's."""

    def __init__(self, d: int, kind: str, margin: float) -> None:
        super().__init__()
        self.d, self.kind, self.margin = d, kind, margin
        self.embedding = nn.Identity()

    def forward(self, x):
        d = self.d
        a = self.embedding(x[:, :d])
        return -rowwise_loss(self.kind, a, x[:, d:2 * d], x[:, 2 * d:], self.margin, hinge=True)


def _concept_loader(emb):
    from torch.utils.data import DataLoader

    padded = torch.cat([emb, torch.zeros(emb.shape[0], 2 * emb.shape[1])], 1)
    return DataLoader(padded, batch_size=64)


@JIT_DEPRECATION
@pytest.mark.parametrize("kind", ["dot", "cosine"])
def test_captum_sign_count_matches_scores(kind, tmp_path):
    concept = pytest.importorskip("captum.concept")

    class FixedCAV(concept.Classifier):
        """Hands captum whymatch's CAV for whichever concept it is asked about (random concept: id A)."""

        def __init__(self, cavs):
            self.cavs, self.random_id = cavs, cavs.shape[0]

        def train_and_eval(self, dataloader, **kwargs):
            ids = sorted({int(v) for _, y in dataloader for v in y})
            j = ids[0]
            self._classes = [j, self.random_id]
            self._weights = torch.stack([self.cavs[j], -self.cavs[j]])
            return {"accs": torch.tensor(1.0)}

        def weights(self):
            return self._weights

        def classes(self):
            return self._classes

    emb, attrs, dirs = make_data(n=200, a=3)
    t = TCAV(similarity=kind).fit(emb, attrs)
    # Half violated (hard) triplets, half satisfied ones (hinge inactive: zero gradient in both).
    a, p, n = hard_triplets(dirs, p=60)
    g = torch.Generator().manual_seed(21)
    a = torch.cat([a, emb[:60]])
    p, n = torch.cat([p, emb[60:120]]), torch.cat([n, emb[120:180] + 0.3 * torch.randn(60, 16, generator=g)])
    ours = t.scores(a, p, n)

    model = TripletHead(16, kind, torch.finfo(torch.float32).eps)
    concepts = [concept.Concept(j, f"attr{j}", _concept_loader(emb[attrs[:, j]])) for j in range(3)]
    rnd = concept.Concept(3, "random", _concept_loader(emb[:50]))
    tc = concept.TCAV(model, ["embedding"], model_id=f"whymatch_{kind}", classifier=FixedCAV(t.cavs),
                      save_path=str(tmp_path) + "/")
    out = tc.interpret(torch.cat([a, p, n], 1), [[c, rnd] for c in concepts])
    theirs = torch.stack([out[f"{j}-3"]["embedding"]["sign_count"][0] for j in range(3)]).float()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    assert 0 < ours.min() and ours.max() < 1  # a non-trivial comparison


@JIT_DEPRECATION
def test_captum_default_classifier_direction_agrees(tmp_path):
    concept = pytest.importorskip("captum.concept")
    pytest.importorskip("sklearn")
    emb, attrs, dirs = make_data(n=400, a=2)
    t = TCAV().fit(emb, attrs)
    model = TripletHead(16, "dot", 0.0)
    pos = concept.Concept(0, "with", _concept_loader(emb[attrs[:, 0]]))
    neg = concept.Concept(1, "without", _concept_loader(emb[~attrs[:, 0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tc = concept.TCAV(model, ["embedding"], model_id="whymatch_default", save_path=str(tmp_path) + "/")
        cav = tc.compute_cavs([[pos, neg]])["0-1"]["embedding"]
    w = torch.as_tensor(cav.stats["weights"]).float()
    row = list(cav.stats["classes"]).index(0)
    theirs = F.normalize(w[row], dim=0)
    assert torch.dot(theirs, t.cavs[0]) > 0.9
    assert torch.dot(theirs, dirs[0]) > 0.9
