"""RetrievalEvaluator: hand-computed cases, faiss == torch, agreement with pytorch-metric-learning, bad input."""

from __future__ import annotations

import pytest
import torch

from whymatch.evaluation import RetrievalEvaluator, knn, recall_at_k

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(
    "__import__('importlib').util.find_spec('faiss') is None", reason="faiss not installed"))]


def line_points():
    # six points on a line (l2), labels    a a b a b b
    x = torch.tensor([[0.0], [1.0], [2.5], [4.0], [6.0], [6.6]])
    y = torch.tensor([0, 0, 1, 0, 1, 1])
    return x, y


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_self_retrieval(backend):
    x, y = line_points()
    ev = RetrievalEvaluator((1, 2), backend=backend, distance="l2", query_chunk=4)
    out = ev.get_accuracy(x, y)
    # nearest neighbours (self excluded):
    #   0 -> 1(a) 2(b) 3(a) ...  R=2: hits at ranks 1 and 3
    #   1 -> 0(a) 2(b) 3(a)      R=2: ranks 1, 3
    #   2 -> 1(a) 3(a) 0(a)/4(b) R=2 (b's: 4, 5): 4 is at distance 3.5, 0 at 2.5 -> rank of 4 is 4
    #   3 -> 2(b) 4(b) 1(a)      R=2: rank of 1 is 3 (dist 3), 5 at 2.6 -> order 2(1.5) 4(2.0) 5(2.6) 1(3.0)
    #   4 -> 5(b) 3(a) 2(b)      R=2: ranks 1, 3
    #   5 -> 4(b) 3(a) 2(b)      R=2: ranks 1, 3
    # recall@1: queries 0,1,4,5 hit -> 4/6; recall@2: query 2 (1(a),3(a)) misses, query 3 (2(b),4(b)) misses
    assert out["recall@1"] == pytest.approx(4 / 6)
    assert out["recall@2"] == pytest.approx(4 / 6)
    assert out["precision_at_1"] == pytest.approx(4 / 6)
    # R-precision (R = 2): queries 0,1,4,5 have 1 match in the first 2 -> 1/2; queries 2, 3 -> 0
    assert out["r_precision"] == pytest.approx((4 * 0.5) / 6)
    # MAP@R: queries 0,1,4,5: (1/1) / 2 = 0.5; queries 2 and 3: no match in the first 2 -> 0
    assert out["mean_average_precision_at_r"] == pytest.approx(4 * 0.5 / 6)
    assert out["n_queries_scored"] == 6


def test_lone_queries_are_left_out_and_separate_gallery():
    q = torch.tensor([[0.0], [10.0]])
    ql = torch.tensor([0, 7])  # label 7 has no reference
    ref = torch.tensor([[0.5], [3.0], [9.0]])
    rl = torch.tensor([0, 1, 1])
    out = RetrievalEvaluator((1, 3), backend="torch", distance="l2").get_accuracy(q, ql, ref, rl)
    assert out["n_queries_scored"] == 1 and out["recall@1"] == 1.0 and out["mean_average_precision_at_r"] == 1.0


def clustered(seed, n_classes=20, per_class=12, dim=16, noise=0.7):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=g)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = centers[y] + noise * torch.randn(len(y), dim, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


@pytest.mark.parametrize("distance", ["cosine", "l2", "inner_product"])
def test_faiss_equals_torch(distance):
    pytest.importorskip("faiss")
    x, y = clustered(0)
    q, ql = clustered(1)
    for args in [(x, y), (q, ql, x, y)]:
        a = RetrievalEvaluator(backend="torch", distance=distance, query_chunk=37).get_accuracy(*args)
        b = RetrievalEvaluator(backend="faiss", distance=distance, query_chunk=50).get_accuracy(*args)
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-9), key


def test_knn_excludes_self_and_chunks_agree():
    x, _ = clustered(2)
    s1, i1 = knn(x, x, 5, backend="torch", query_chunk=7, self_offset=0)
    s2, i2 = knn(x, x, 5, backend="torch", query_chunk=1000, self_offset=0)
    assert torch.equal(i1, i2) and not bool((i1 == torch.arange(len(x))[:, None]).any())
    assert bool((s1[:, :-1] >= s1[:, 1:]).all())


@pytest.mark.parametrize("mode", ["self", "separate", "ref_includes_query"])
def test_matches_pytorch_metric_learning(mode):
    acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    x, y = clustered(3, noise=1.2)
    q, ql = clustered(4, noise=1.2)
    metrics = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    pml = acc.AccuracyCalculator(include=metrics, k=None)
    ours = RetrievalEvaluator(metrics=metrics, distance="l2", backend="torch")
    if mode == "self":
        args, kw = (x, y), {}
    elif mode == "separate":
        args, kw = (q, ql, x, y), {}
    else:
        args, kw = (q, ql, torch.cat([q, x]), torch.cat([ql, y])), {"ref_includes_query": True}
    expected = pml.get_accuracy(*args, **kw)
    got = ours.get_accuracy(*args, **kw)
    for m in metrics:
        assert got[m] == pytest.approx(expected[m], abs=1e-6), (m, got[m], expected[m])


def test_recall_at_k_function_and_cosine_scale_invariance():
    x, y = clustered(5)
    a = recall_at_k(x, y, k=(1, 4), backend="torch")
    b = recall_at_k(3.0 * x, y, k=(1, 4), backend="torch")
    assert set(a) == {"recall@1", "recall@4", "n_queries_scored"} and a == b
    assert 0 < a["recall@1"] <= a["recall@4"] <= 1


def test_bad_input_errors():
    x, y = clustered(6)
    ev = RetrievalEvaluator(backend="torch")
    with pytest.raises(ValueError, match="k\\[1\\] must be >= 1"):
        RetrievalEvaluator((1, 0))
    with pytest.raises(ValueError, match="metrics must be one of"):
        RetrievalEvaluator(metrics=("recall", "nmi"))
    with pytest.raises(ValueError, match="backend must be one of"):
        RetrievalEvaluator(backend="annoy")
    with pytest.raises(ValueError, match="distance must be one of"):
        RetrievalEvaluator(distance="manhattan")
    with pytest.raises(ValueError, match="query_labels must hold one label per row of query"):
        ev.get_accuracy(x, y[:-1])
    with pytest.raises(ValueError, match="query_labels must have dtype"):
        ev.get_accuracy(x, y.float())
    with pytest.raises(ValueError, match="same dimension"):
        ev.get_accuracy(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="query must be finite"):
        ev.get_accuracy(torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="query must be a 2-D tensor"):
        ev.get_accuracy(x[0], y[:1])
    with pytest.raises(ValueError, match="ref_includes_query=True needs the queries"):
        ev.get_accuracy(x, y, x[:3], y[:3], ref_includes_query=True)


def _sharded_worker(rank, world, port, backend, mode, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y = clustered(7, noise=1.3)
        q, ql = clustered(8, noise=1.3)
        ev = RetrievalEvaluator((1, 2, 4), backend=backend)
        if mode == "self":
            res = ev.get_accuracy(x, y, shard=True)
        elif mode == "separate":
            xs, ys = torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank]
            res = ev.get_accuracy(q, ql, xs, ys, shard=True)
        else:  # ref_includes_query: the gallery is [q; x], split unevenly
            g, gl = torch.cat([q, x]), torch.cat([ql, y])
            cut = 50
            gs, gls = (g[:cut], gl[:cut]) if rank == 0 else (g[cut:], gl[cut:])
            res = ev.get_accuracy(q, ql, gs, gls, ref_includes_query=True, shard=True)
        torch.save(res, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["self", "separate", "ref_includes_query"])
def test_sharded_gallery_equals_one_process(tmp_path, mode):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_worker, args=(2, port, "torch", mode, str(tmp_path)), nprocs=2, join=True)
    x, y = clustered(7, noise=1.3)
    q, ql = clustered(8, noise=1.3)
    ev = RetrievalEvaluator((1, 2, 4), backend="torch")
    if mode == "self":
        expected = ev.get_accuracy(x, y)
    elif mode == "separate":
        expected = ev.get_accuracy(q, ql, x, y)
    else:
        expected = ev.get_accuracy(q, ql, torch.cat([q, x]), torch.cat([ql, y]), ref_includes_query=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], abs=1e-12), (rank, key)


def test_shard_without_process_group_is_a_named_error():
    x, y = clustered(9)
    with pytest.raises(ValueError, match="shard=True needs an initialized torch.distributed"):
        RetrievalEvaluator(backend="torch").get_accuracy(x, y, shard=True)
