"""AVSL: fidelity to the published computation, gradients, explain, errors.

``_Published`` below is an independent, literal re-derivation of what the published code
(zbr17/AVSL, models/avsl_embedder.py and collectors/avsl_collector.py) computes, written
from shared/REFERENCES.md and a reading of that code: max_unpool2d for the CAM linearization,
the row-wise minimum of the certainty, the top-k mask with its 1e-8 tie band, the buffer
update that copies first and then averages, and the detached nodes of the rectification.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from whymatch.avsl import AVSL, AVSLEncoding, AVSLLoss, linearized_input, proxy_anchor_distance

DIM, TOPK = 16, 5


class _Trunk(nn.Module):
    """Three levels of different sizes (8x8, 4x4, 4x4) and a head that must never run."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.low = nn.Sequential(nn.Conv2d(6, 10, 3, stride=2, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(10, 12, 3, stride=2, padding=1), nn.ReLU())
        self.high = nn.Sequential(nn.Conv2d(12, 14, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(14, 3)

    def forward(self, x):
        x = self.high(self.mid(self.low(self.stem(x))))
        if getattr(self, "forbid_head", True):
            raise AssertionError("the head ran")  # AVSL(stop_early=True) stops after the last level
        return self.head(x.mean(dim=(2, 3)))


def _model(reliability="published", seed=0, **kw):
    torch.manual_seed(seed)
    return AVSL(_Trunk(), ("low", "mid", "high"), dim=DIM, topk=TOPK, reliability=reliability, stop_early=True, **kw)


class _Published:
    """The published embedder + collector on given feature maps and conv weights (literal)."""

    def __init__(self, convs, m=0.5, topk=TOPK, gamma=10.0):
        self.convs, self.m, self.topk, self.gamma = convs, m, topk, gamma
        self.links = None
        self.coef = [torch.ones(DIM) for _ in convs]
        self.bias = [torch.zeros(DIM) for _ in convs]

    def embed(self, feats):
        return [c(F.adaptive_avg_pool2d(f, 1) + F.adaptive_max_pool2d(f, 1)).view(f.size(0), -1)
                for c, f in zip(self.convs, feats)]

    def cams(self, feats):
        out = []
        for c, f in zip(self.convs, feats):
            h, w = f.shape[2:]
            val, idx = F.adaptive_max_pool2d(f.detach(), 1, return_indices=True)
            out.append(c(f.detach() + F.max_unpool2d(val, idx, kernel_size=(h, w)) * h * w))
        return out

    @staticmethod
    def certainty(cams):
        res = []
        for c in cams:
            c = c - c.min(dim=-1, keepdim=True)[0]
            res.append(F.normalize(c.flatten(2), dim=-1, p=1).std(dim=-1))
        return res

    @staticmethod
    def link(low, high):
        if low.shape[2:] != high.shape[2:]:
            low = F.adaptive_avg_pool2d(low, high.shape[2:])
        low = F.normalize(low.flatten(2), p=2, dim=-1)
        high = F.normalize(high.flatten(2), p=2, dim=-1)
        return torch.einsum("imj,inj->mn", low, high) / low.size(0)

    def update(self, cams):
        new = [self.link(cams[i], cams[i + 1]) for i in range(len(cams) - 1)]
        if self.links is None:
            self.links = [n.clone() for n in new]
        else:
            self.links = [self.m * o + (1 - self.m) * n for o, n in zip(self.links, new)]

    def all_mat(self, e1, e2, c1, c2):
        hat, per_level = None, []
        for i in range(len(e1)):
            a, b = F.normalize(e1[i], dim=-1, p=2), F.normalize(e2[i], dim=-1, p=2)
            diff = torch.abs(a.unsqueeze(1) - b.unsqueeze(0)).pow(2)
            per_level.append(diff.sum(-1))
            if hat is None:
                hat = diff.detach()
                continue
            link = torch.relu(self.links[i - 1])
            kth = torch.topk(link, k=self.topk, dim=0)[0]
            mask = link >= torch.min(kth, dim=0, keepdim=True)[0] - 1e-8
            star = link * mask
            star = star / (star.sum(dim=0, keepdim=True) + 1e-8)
            prob = torch.sigmoid(self.gamma * (c1[i].unsqueeze(1) * c2[i].unsqueeze(0) * self.coef[i] + self.bias[i]))
            hat = diff.detach() * prob + torch.matmul(hat, star) * (1 - prob)
        return hat.sum(-1), per_level, diff


def _pub_proxy_anchor(mat, rows, cols, alpha, pm, nm, same):
    pos = rows.unsqueeze(1) == cols.unsqueeze(0)
    neg = ~pos
    if same:
        pos.fill_diagonal_(False)

    def lse(x, keep):
        x = x.masked_fill(~keep, torch.finfo(x.dtype).min)
        x = torch.cat([x, torch.zeros(1, x.size(1))], dim=0)
        out = torch.logsumexp(x, dim=0, keepdim=True)
        return out.masked_fill(~torch.any(keep, dim=0, keepdim=True), 0).squeeze()

    p, n = lse(alpha * (mat - pm), pos), lse(-alpha * (mat - nm), neg)
    has = torch.where(pos.sum(0) != 0)[0]
    return (p[has].mean() if len(has) else (mat * 0).sum()) + n.mean()


# ------------------------------------------------------------------ fidelity
def test_forward_matches_the_published_computation():
    m = _model("published")
    pub = _Published(list(m.convs), m=m.momentum, topk=TOPK)
    x1, x2, xq = torch.rand(5, 3, 16, 16), torch.rand(5, 3, 16, 16), torch.rand(4, 3, 16, 16)
    m.train()
    for x in (x1, x2):  # two updates: the first copies, the second averages
        enc = m.encode(x, keep_cams=True)
        feats = m.features(x)
        with torch.no_grad():
            cams = pub.cams(feats)
        for a, b in zip(enc.embeddings, pub.embed(feats)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for a, b in zip(enc.cams, cams):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for a, b in zip(enc.reliabilities, pub.certainty(cams)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        pub.update(cams)
    for a, b in zip(m.edges, pub.links):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    m.eval()
    with torch.no_grad():
        q, g = m.encode(xq), m.encode(x2)
        fq, fg = m.features(xq), m.features(x2)
        eq, eg = pub.embed(fq), pub.embed(fg)
        cq, cg = pub.certainty(pub.cams(fq)), pub.certainty(pub.cams(fg))
        final, per_level, top_nodes = pub.all_mat(eq, eg, cq, cg)
    torch.testing.assert_close(m.distance(q, g), final, atol=1e-5, rtol=1e-5)
    for a, b in zip(m.level_distances(q, g), per_level):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ex = m.explain(xq[1], x2[3])
    torch.testing.assert_close(ex.deltas[-1], top_nodes[1, 3], atol=1e-6, rtol=1e-5)
    assert ex.distance == pytest.approx(float(final[1, 3]), rel=1e-5, abs=1e-6)
    vals, idx = m.topk(q, g, 2)
    torch.testing.assert_close(vals, final.sort(dim=1).values[:, :2], atol=1e-5, rtol=1e-5)


def test_learned_coef_bias_and_proxies_match_the_published_collector():
    m = _model("published", seed=1)
    m.train()
    x = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        for c, b in zip(m.coef, m.bias):
            c.uniform_(0.5, 1.5)
            b.uniform_(-0.2, 0.2)
    enc = m.encode(x)
    pub = _Published(list(m.convs), topk=TOPK)
    pub.links = [e.clone() for e in m.edges]
    pub.coef = [None] + [c.detach() for c in m.coef]
    pub.bias = [None] + [b.detach() for b in m.bias]
    loss = AVSLLoss(4, 3, DIM)
    cols, col_labels, same = loss.columns(enc, torch.tensor([0, 0, 1, 1, 2, 3]))
    assert not same and col_labels.tolist() == [0, 1, 2, 3]
    pr = [p.detach() for p in loss.proxies]
    cert2 = [torch.ones_like(p) * r.mean() for p, r in zip(pr, enc.reliabilities)]
    final, _, _ = pub.all_mat([e.detach() for e in enc.embeddings], pr, enc.reliabilities, cert2)
    torch.testing.assert_close(m.distance(enc, cols), final, atol=1e-5, rtol=1e-5)


def test_proxy_anchor_matches_the_published_loss():
    g = torch.Generator().manual_seed(3)
    d = torch.rand(8, 5, generator=g) * 4
    rows, cols = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.arange(5)  # column 4 has no positive
    for alpha, pm, nm in ((16.0, 1.8, 2.2), (32.0, 0.5, 3.0)):
        torch.testing.assert_close(proxy_anchor_distance(d, rows, cols, alpha=alpha, pos_margin=pm, neg_margin=nm),
                                   _pub_proxy_anchor(d, rows, cols, alpha, pm, nm, False))
    sq = torch.rand(8, 8, generator=g) * 4
    torch.testing.assert_close(proxy_anchor_distance(sq, rows, rows, same_source=True),
                               _pub_proxy_anchor(sq, rows, rows, 16.0, 1.8, 2.2, True))


def test_cam_mean_is_the_embedding_and_linearization():
    m = _model("map")
    enc = m.encode(torch.rand(3, 3, 16, 16), keep_cams=True)
    for cam, e in zip(enc.cams, enc.embeddings):
        torch.testing.assert_close(cam.mean(dim=(2, 3)), e.detach(), atol=1e-5, rtol=1e-5)
    f = torch.rand(2, 4, 5, 3)
    lin = linearized_input(f)
    torch.testing.assert_close(lin.mean(dim=(2, 3)), f.mean(dim=(2, 3)) + f.amax(dim=(2, 3)))


def test_reliability_map_differs_from_published_row_minimum():
    a, b = _model("map"), _model("published")
    x = torch.rand(4, 3, 16, 16)
    ra, rb = a.encode(x).reliabilities, b.encode(x).reliabilities
    assert not torch.allclose(ra[0], rb[0])
    cams = a.eval().encode(x, keep_cams=True).cams
    flat = cams[0].flatten(2)
    want = F.normalize(flat - flat.amin(-1, keepdim=True), p=1, dim=-1).std(-1)
    torch.testing.assert_close(a.encode(x).reliabilities[0], want, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ behaviour
def test_whole_backbone_runs_by_default_and_later_hooks_see_the_last_level():
    torch.manual_seed(0)
    trunk = _Trunk()
    trunk.forbid_head = False
    m = AVSL(trunk, ("low", "mid", "high"), dim=DIM, topk=TOPK)
    seen = []
    trunk.high.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    early = _model()
    early.load_state_dict(m.state_dict())
    x = torch.rand(2, 3, 16, 16)
    m.eval(), early.eval()
    torch.testing.assert_close(m.encode(x).embeddings[2], early.encode(x).embeddings[2])
    assert len(seen) == 1  # the later hook saw the last level
    trunk.head.weight.grad = None
    m.train()
    m.level_distances(m.encode(x), m.encode(x))[2].sum().backward()
    assert trunk.head.weight.grad is None  # the head ran but its output is unused
    seen.clear()
    early.backbone.high.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    early.encode(x)
    assert seen == []  # stop_early: AVSL's hook stops the backbone before the later hook runs


def test_shapes_and_eval_freezes_edges():
    m = _model()
    assert m.channels == (10, 12, 14)
    x = torch.rand(4, 3, 16, 16)
    enc = m.encode(x, keep_cams=True)
    assert [tuple(c.shape) for c in enc.cams] == [(4, DIM, 8, 8), (4, DIM, 4, 4), (4, DIM, 4, 4)]
    assert [tuple(c.shape) for c in enc.correlations] == [(DIM, DIM), (DIM, DIM)]
    assert bool(m.edges_initialized)
    torch.testing.assert_close(m.edges[0], enc.correlations[0])  # the first update copies
    before = [e.clone() for e in m.edges]
    m.eval()
    enc2 = m.encode(torch.rand(4, 3, 16, 16))
    assert enc2.correlations is None
    assert all(torch.equal(a, b) for a, b in zip(before, m.edges))
    assert m(x).shape == (4, 3 * DIM)
    assert m.distance(enc2, enc).shape == (4, 4)
    m.train()
    m.encode(torch.rand(4, 3, 16, 16))
    assert not torch.equal(before[0], m.edges[0])
    assert {"edges_0", "edges_1", "edges_initialized"} <= set(m.state_dict())
    import copy

    twin = copy.deepcopy(m).eval()  # the copy's hooks feed the copy
    with torch.no_grad():
        twin.convs[2].bias.add_(1.0)
    torch.testing.assert_close(twin.encode(x).embeddings[2], m.eval().encode(x).embeddings[2] + 1.0)


def test_level_and_overall_margins_are_separate():
    loss = AVSLLoss(4, 3, DIM, neg_margin=2.4, overall_neg_margin=2.2, overall_pos_margin=1.7)
    assert [lv.neg_margin for lv in loss.level_losses] == [2.4, 2.4, 2.4]
    assert [lv.pos_margin for lv in loss.level_losses] == [1.8, 1.8, 1.8]
    assert (loss.overall_loss.neg_margin, loss.overall_loss.pos_margin) == (2.2, 1.7)
    same = AVSLLoss(4, 3, DIM, neg_margin=2.4)
    assert same.overall_loss.neg_margin == 2.4 and same.overall_loss.alpha == 16.0
    with pytest.raises(ValueError, match="overall_alpha"):
        AVSLLoss(4, 3, DIM, overall_alpha=0.0)


def test_gradients_level_losses_train_the_network_overall_only_coef_bias():
    m = _model()
    loss = AVSLLoss(3, 3, DIM)
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2])
    out = loss(m, x, y)
    assert set(out.parts()) == {"loss", "loss_overall", "loss_level0", "loss_level1", "loss_level2"}
    out.overall.backward(retain_graph=True)
    for name, p in list(m.named_parameters()) + list(loss.named_parameters()):
        g = p.grad
        if name.startswith(("coef", "bias")):
            assert g is not None and g.abs().sum() > 0, name
        else:
            assert g is None or g.abs().sum() == 0, name
    m.zero_grad(set_to_none=True)
    loss.zero_grad(set_to_none=True)
    sum(out.levels).backward()
    assert m.backbone.stem.weight.grad.abs().sum() > 0
    assert all(c.weight.grad.abs().sum() > 0 for c in m.convs)
    assert all(p.grad.abs().sum() > 0 for p in loss.proxies)
    assert all(p.grad is None for p in list(m.coef) + list(m.bias))


def test_in_batch_and_margin_losses_train():
    m = _model()
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2])
    for loss in (AVSLLoss(levels=3, dim=DIM, use_proxy=False), AVSLLoss(3, 3, DIM, loss="margin")):
        out = loss(m, x, y)
        assert torch.isfinite(out.total)
        out.total.backward()
    opt = torch.optim.AdamW(list(m.parameters()) + list(loss.parameters()), lr=1e-2)
    opt.step()


def test_explain_lambdas_follow_the_chain():
    m = _model("map")
    m.train()
    m.encode(torch.rand(6, 3, 16, 16))
    x = torch.rand(2, 3, 16, 16)
    ex = m.explain(x[0], x[1], top=4)
    assert m.training  # mode restored
    assert ex.distance == pytest.approx(sum(float((lam * d).sum()) for lam, d in zip(ex.lambdas, ex.deltas)),
                                        rel=1e-5)
    m.eval()
    enc = m.encode(x)
    coef, bias = m.coefs()
    links = m.links()
    r = enc.reliabilities
    p = [torch.sigmoid(10 * (r[lv][0] * r[lv][1] * coef[lv] + bias[lv])) for lv in range(3)]
    g2 = torch.ones(DIM)
    g1 = links[1] @ (g2 * (1 - p[2]))
    g0 = links[0] @ (g1 * (1 - p[1]))
    for got, want in zip(ex.lambdas, (g0, g1 * p[1], g2 * p[2])):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for lv, le in enumerate(ex.levels):
        assert le.level == ("low", "mid", "high")[lv]
        assert le.nodes.shape == (4,) and le.cam1.shape == le.cam2.shape == (4, 16, 16)
        assert torch.all(le.lambdas[:-1] >= le.lambdas[1:])
        torch.testing.assert_close(le.lambdas, ex.lambdas[lv].topk(4).values)
    by_c = m.explain(x[0], x[1], top=4, by="contribution")
    torch.testing.assert_close(by_c.levels[2].contributions, (ex.lambdas[2] * ex.deltas[2]).topk(4).values)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="levels: the backbone has no module 'nope'"):
        AVSL(_Trunk(), ("low", "nope"), dim=DIM)
    with pytest.raises(ValueError, match="reliability must be one of"):
        _model("rowwise")
    with pytest.raises(ValueError, match="channels must give one count per level"):
        AVSL(_Trunk(), ("low", "mid"), dim=DIM, channels=(10,))
    with pytest.raises(TypeError, match="backbone must be"):
        AVSL("resnet", dim=DIM)
    m = _model()
    x = torch.rand(4, 3, 16, 16)
    with pytest.raises(ValueError, match="labels must hold one label per image"):
        AVSLLoss(2, 3, DIM)(m, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, n_classes=2\)"):
        AVSLLoss(2, 3, DIM)(m, x, torch.tensor([0, 1, 2, 2]))
    with pytest.raises(ValueError, match="n_classes must be given"):
        AVSLLoss(None, 3, DIM)
    with pytest.raises(ValueError, match="built for levels=2"):
        AVSLLoss(2, 2, DIM)(m, x, torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="top must be <="):
        m.explain(x[0], x[1], top=DIM + 1)
    with pytest.raises(ValueError, match="x2 must have x1's shape"):
        m.explain(x[0], x[1, :, :8])
    with pytest.raises(TypeError, match="query must be an AVSLEncoding"):
        m.distance(x, x)
    enc = m.encode(x)
    with pytest.raises(ValueError, match="k must be <="):
        m.topk(enc, enc, 4, exclude_self=True)
    with pytest.raises(ValueError, match="gallery must have the query's 3 levels"):
        m.distance(enc, AVSLEncoding(enc.embeddings[:2], enc.reliabilities[:2]))
    assert math.isfinite(float(m.distance(enc, enc).detach().sum()))


# ------------------------------------------------------------------ training
def _avsl_cfg(out, **kw):
    from whymatch.train import AVSLConfig

    base = dict(data="shapesworld", image_size=32, n_train=180, n_test=60, batch_p=3, batch_k=2,
                batches_per_epoch=2, embedding_dim=8, topk=4, out=str(out), show_progress=False, epochs=2)
    base.update(kw)
    return AVSLConfig(**base)


def test_train_avsl_resume_gives_identical_weights_and_edges(tmp_path):
    from whymatch.train import train_avsl

    straight = train_avsl(_avsl_cfg(tmp_path / "a"))
    first = train_avsl(_avsl_cfg(tmp_path / "b", stop_after=1))
    assert first.epoch == 1
    resumed = train_avsl(_avsl_cfg(tmp_path / "b", resume=True))
    assert resumed.epoch == 2
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert "embedder.edges_0" in a and bool(a["embedder.edges_initialized"])
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for pa, pb in zip(straight.loss.proxies, resumed.loss.proxies):
        assert torch.equal(pa, pb)
    rec = resumed.history[-1]
    for key in ("loss", "loss_overall", "loss_level0", "loss_level2", "recall@1"):
        assert key in rec
    assert 0.0 <= rec["recall@1"] <= 1.0
    assert rec["loss"] == pytest.approx(straight.history[-1]["loss"])


# a tiny `whymatch train avsl` run (add --n-test, --epochs, --out)
_TINY_AVSL = ("train", "avsl", "--data", "shapesworld", "--image-size", "32", "--n-train", "180", "--batch-p", "3",
              "--batch-k", "2", "--batches-per-epoch", "2", "--embedding-dim", "8", "--topk", "4", "--quiet",
              "--device", "cpu")


def test_cli_train_avsl_and_resume(tmp_path, capsys):
    from whymatch import cli

    out = tmp_path / "run"
    base = ["train", "avsl", "--data", "shapesworld", "--image-size", "32", "--n-train", "180", "--n-test", "60",
            "--batch-p", "3", "--batch-k", "2", "--batches-per-epoch", "2", "--embedding-dim", "8", "--topk", "4",
            "--out", str(out), "--quiet", "--reliability", "published", "--level-weights", "0.5,1,0.5"]
    assert cli.main(base + ["--epochs", "1"]) == 0
    assert "trained 1 epochs" in capsys.readouterr().out
    assert cli.main(base + ["--epochs", "2", "--resume"]) == 0
    assert "trained 2 epochs" in capsys.readouterr().out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["edges_0"].shape == (8, 8)
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"] == "avsl" and cfg["reliability"] == "published" and cfg["level_weights"] == [0.5, 1.0, 0.5]
    assert cli.main(base[:-2] + ["--level-weights", "1,x", "--epochs", "1"]) == 2
    assert "--level-weights" in capsys.readouterr().err
    assert cli.main(base[:-2] + ["--level-weights", "1,1", "--epochs", "1", "--overwrite"]) == 2
    assert "weights must give one weight per level" in capsys.readouterr().err
    assert (out / "model.pt").is_file()  # a failed --overwrite run removes nothing


@pytest.mark.parametrize("chunk", [None, 4, 1])
@pytest.mark.parametrize("duplicates", [False, True])
def test_avsl_recall_at_k_matches_a_full_distance_matrix(chunk, duplicates):
    from whymatch.train import TensorImages, avsl_recall_at_k

    m = _model("map")
    m.train()
    m.encode(torch.rand(6, 3, 16, 16))
    x = torch.rand(10, 3, 16, 16)
    if duplicates:  # six identical images: ties at distance 0, the query itself among them
        x[:6] = x[0]
    y = torch.tensor([0, 1, 1, 0, 2, 2, 3, 3, 4, 4])
    got = avsl_recall_at_k(m, TensorImages(x, y), (1, 2, 4), batch_size=3, chunk=chunk)
    assert m.training
    m.eval()
    enc = m.encode(x)
    d = m.distance(enc, enc).detach()
    d.fill_diagonal_(float("inf"))
    order = torch.stack([torch.tensor(sorted(range(10), key=lambda j: (float(d[i, j]), j))) for i in range(10)])
    for k in (1, 2, 4):
        want = float((y[order[:, :k]] == y[:, None]).any(dim=1).float().mean())
        assert got[f"recall@{k}"] == pytest.approx(want)


def test_avsl_recall_at_k_errors():
    from whymatch.train import TensorImages, avsl_recall_at_k

    m = _model("map")
    ds = TensorImages(torch.rand(4, 3, 16, 16), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="ks must be positive"):
        avsl_recall_at_k(m, ds, (0, 1))
    with pytest.raises(ValueError, match="chunk"):
        avsl_recall_at_k(m, ds, (1,), chunk=0)
    with pytest.raises(ValueError, match="at least 2 items"):
        avsl_recall_at_k(m, TensorImages(torch.rand(1, 3, 16, 16), torch.tensor([0])), (1,))


@pytest.mark.slow
def test_cli_train_avsl_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m whymatch.cli train avsl ...`: two gloo ranks (DDP sees every parameter used)."""
    import json

    from helpers import torchrun_cli

    out = tmp_path / "run"
    p = torchrun_cli(*_TINY_AVSL, "--n-test", "120", "--epochs", "1", "--out", out)
    assert p.stdout.count("trained 1 epochs") == 1
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1


def test_avsl_report_draws_every_level(tmp_path):
    from whymatch.viz import write_avsl_report

    m = _model("map")
    m.train()
    m.encode(torch.rand(6, 3, 16, 16))
    x = torch.rand(2, 3, 16, 16)
    ex = m.explain(x[0], x[1], top=3)
    key = torch.zeros(16, 16, dtype=torch.bool)
    key[4:9, 4:9] = True
    out = write_avsl_report(tmp_path / "rep", [{"name": "pair 0", "x1": x[0], "x2": x[1], "explanation": ex,
                                                 "key_mask1": key}])
    page = out.read_text()
    assert out.name == "index.html" and "pair 0" in page
    for lv, le in enumerate(ex.levels):
        assert f"level {lv}: {le.level}" in page
        for j in range(3):
            assert (tmp_path / "rep" / f"p0_l{lv}_n{j}_0.png").is_file()
            assert f"<td>{int(le.nodes[j])}</td>" in page
    pngs = list((tmp_path / "rep").glob("*.png"))
    assert len(pngs) == 3 * (3 * 2 + 2)
    with pytest.raises(ValueError, match=r"pairs\[0\] lacks the keys 'explanation'"):  # leaves nothing behind
        write_avsl_report(tmp_path / "bad", [{"name": "x", "x1": x[0], "x2": x[1]}])
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------ the published training recipe
def test_published_recipe_values_per_data_set_and_overrides():
    from whymatch.train import AVSLConfig, published_avsl_recipe

    # zbr17/AVSL examples/samples_avsl.sh: --lr_trunk / --lr_embedder / --lr_collector, --gamma, --step, loss weights;
    # --warm_up 5 (trunk not stepped, StepLR not stepped), 61 epochs, batch 180, --wd 1e-4
    # --pa_neg_margin (level losses) / --final_pa_neg_margin (overall): 2.2 / 2.2, SOP 2.4 / 2.2
    want = {"cub": ((1e-5, 5.5e-4, 1.1e-4), 0.5, (15, 25, 35, 45, 55), (0.5, 1.0, 0.5), 2.2),
            "cars196": ((0.00025230934618157737, 0.00016294139202611374, 0.09918213648327627), 0.5,
                        tuple(range(10, 61, 5)), (1.0, 4.0, 4.0), 2.2),
            "sop": ((6e-4, 6e-4, 0.06), 0.25, (20, 35, 50), (1.0, 4.0, 4.0), 2.4)}
    for data, (lrs, decay, milestones, weights, neg) in want.items():
        cfg = AVSLConfig.from_recipe("published", data=f"{data}:/nowhere")
        assert (cfg.neg_margin, cfg.overall_neg_margin) == (neg, 2.2)
        assert cfg.recipe == "published" and cfg.scheduler == "step" and cfg.lr_decay == decay
        assert cfg.group_lr == {"backbone": lrs[0], "head": lrs[1], "coef_bias": lrs[2], "loss": lrs[2]}
        assert cfg.milestones == milestones and cfg.level_weights == weights
        assert (cfg.epochs, cfg.freeze_epochs, cfg.freeze_groups) == (61, 5, ("backbone",))
        assert (cfg.batch_p * cfg.batch_k, cfg.weight_decay, cfg.embedding_dim, cfg.topk) == (180, 1e-4, 512, 128)
        assert cfg.backbone == "resnet50" and cfg.warmup_steps == cfg.warmup_epochs == 0 and cfg.use_proxy
    shapes = published_avsl_recipe("shapesworld")
    assert shapes["backbone"] == "shapes" and (shapes["batch_p"], shapes["batch_k"]) == (60, 3)
    assert shapes["group_lr"] == published_avsl_recipe("cub")["group_lr"]
    # explicit values win; the milestones follow epochs / freeze_epochs; --lr / --loss-lr replace group lrs
    cfg = AVSLConfig.from_recipe("published", data="cub:/x", epochs=30, freeze_epochs=0, batch_p=45, batch_k=4)
    assert cfg.milestones == (10, 20) and cfg.epochs == 30 and (cfg.batch_p, cfg.batch_k) == (45, 4)
    cfg = AVSLConfig.from_recipe("published", data="cub:/x", lr=1e-3, group_lr={"head": 2e-3})
    assert cfg.group_lr == {"head": 2e-3, "loss": 1.1e-4} and cfg.lr == 1e-3
    cfg = AVSLConfig.from_recipe("published", data="cub:/x", loss_lr=0.5, scheduler="cosine")
    assert "loss" not in cfg.group_lr and cfg.milestones == () and cfg.scheduler == "cosine"
    assert AVSLConfig.from_recipe("published", data="sop:/x", milestones=(3,)).milestones == (3,)
    with pytest.raises(ValueError, match="recipe must be one of 'published'"):
        AVSLConfig.from_recipe("paper", data="cub:/x")
    with pytest.raises(ValueError, match="data must be one of"):
        AVSLConfig.from_recipe("published", data="imagenet")
    with pytest.raises(TypeError, match="no field 'lr_trunk'"):
        AVSLConfig.from_recipe("published", data="cub:/x", lr_trunk=1e-5)


def test_cli_train_avsl_published_recipe_config_freeze_and_resume(tmp_path, capsys):
    import json

    from whymatch import cli
    from whymatch.train import build_avsl_model

    torch.set_num_threads(1)
    small = ["--data", "shapesworld", "--image-size", "32", "--n-train", "180", "--n-test", "60", "--batch-p", "3",
             "--batch-k", "2", "--batches-per-epoch", "2", "--embedding-dim", "8", "--topk", "4", "--quiet",
             "--recipe", "published", "--freeze-epochs", "1", "--milestones", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(["train", "avsl", *small, "--out", str(a), "--epochs", "2"]) == 0
    assert cli.main(["train", "avsl", *small, "--out", str(b), "--epochs", "1"]) == 0
    capsys.readouterr()
    # after the frozen epoch the backbone's parameters are the initialization (batch-norm running
    # statistics, buffers, do move), the rest has moved
    torch.manual_seed(0)
    model0 = build_avsl_model("shapes", 8, topk=4)
    init = model0.state_dict()
    after = torch.load(b / "checkpoint.pt", weights_only=False)["model"]
    backbone = [n for n, _ in model0.named_parameters() if n.startswith("embedder.backbone.")]
    assert backbone
    for name in backbone:
        assert torch.equal(after[name], init[name]), name
    assert not torch.equal(after["embedder.convs.0.weight"], init["embedder.convs.0.weight"])
    assert not torch.equal(after["embedder.coef.0"], init["embedder.coef.0"])
    assert cli.main(["train", "avsl", *small, "--out", str(b), "--epochs", "2", "--resume"]) == 0
    assert "trained 2 epochs" in capsys.readouterr().out
    sa, sb = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["recipe"] == "published" and "samples_avsl.sh" in cfg["recipe_source"]
    assert cfg["group_lr"] == {"backbone": 1e-5, "head": 5.5e-4, "coef_bias": 1.1e-4, "loss": 1.1e-4}
    assert [(g["name"], g["lr"]) for g in cfg["param_groups"]] == [("backbone", 1e-5), ("head", 5.5e-4),
                                                                    ("coef_bias", 1.1e-4), ("loss", 1.1e-4)]
    assert (cfg["scheduler"], cfg["milestones"], cfg["lr_decay"], cfg["weight_decay"]) == ("step", [1], 0.5, 1e-4)
    assert (cfg["freeze_epochs"], cfg["freeze_groups"], cfg["level_weights"]) == (1, ["backbone"], [0.5, 1.0, 0.5])
    assert (cfg["backbone"], cfg["embedding_dim"], cfg["topk"], cfg["batch_p"], cfg["epochs"]) == ("shapes", 8, 4, 3, 2)
    rec = json.loads((a / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["lr_backbone"] == pytest.approx(0.5e-5) and rec["lr_coef_bias"] == pytest.approx(0.55e-4)
    # option errors name the option and the value
    for opt, val, msg in [("--recipe", "paper", "invalid choice"), ("--group-lr", "proxies=1", "unknown group"),
                          ("--freeze-groups", "trunk", "backbone, head, coef_bias, loss")]:
        assert cli.main(["train", "avsl", *small, "--out", str(tmp_path / "x"), opt, val]) == 2
        err = capsys.readouterr().err
        assert opt in err and val in err and msg in err, err
    assert cli.main(["train", "avsl", *small, "--out", str(tmp_path / "x"), "--scheduler", "none"]) == 2
    assert "--milestones 1 needs --scheduler step, got --scheduler none" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_avsl_recipe_with_frozen_backbone_under_torchrun(tmp_path):
    """DDP with the backbone frozen (its gradients are computed and dropped): no unused-parameter error."""
    import json

    from helpers import torchrun_cli

    out = tmp_path / "run"
    torchrun_cli(*_TINY_AVSL, "--n-test", "120", "--epochs", "2", "--out", out, "--recipe", "published",
                 "--freeze-epochs", "1", "--milestones", "1")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2 and [g["name"] for g in cfg["param_groups"]] == ["backbone", "head", "coef_bias",
                                                                                    "loss"]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr_backbone"] for r in recs] == pytest.approx([0.5e-5, 0.5e-5])


def test_explain_refuses_non_finite_images_and_model_outputs():
    m = _model("map")
    m.eval()
    x = torch.rand(2, 3, 16, 16)
    bad = x[0].clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x1 must be finite"):
        m.explain(bad, x[1])
    with torch.no_grad():
        next(p for n, p in m.named_parameters() if n.startswith("trunk") or "conv" in n).fill_(float("nan"))
    with pytest.raises(ValueError, match="the AVSL model produced non-finite"):
        m.explain(x[0], x[1])
