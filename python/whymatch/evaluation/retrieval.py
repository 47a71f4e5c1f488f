"""Recall@K and the metric-learning retrieval metrics, exact kNN with faiss or chunked torch.

The call follows pytorch-metric-learning's ``AccuracyCalculator.get_accuracy``
so that training code can swap one for the other; the numbers agree with it on
the metrics both have (``tests/test_retrieval.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import _validate as V

__all__ = ["RetrievalEvaluator", "recall_at_k", "knn"]

DISTANCES = ("cosine", "inner_product", "l2")
BACKENDS = ("auto", "faiss", "torch")
METRICS = ("recall", "precision_at_1", "r_precision", "mean_average_precision_at_r")
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("backend='faiss' needs faiss: pip install faiss-cpu (or faiss-gpu); "
                          "backend='torch' needs nothing more") from exc
    return faiss


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _prepare(x: Tensor, distance: str) -> Tensor:
    x = x.float()
    return F.normalize(x, dim=1) if distance == "cosine" else x


def _drop_self(scores: Tensor, idx: Tensor, self_ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Remove each row's own id (when present) from k + 1 neighbours, keeping the order of the rest."""
    is_self = idx == self_ids[:, None]
    # rank of each column among the non-self ones; the self entry (or the last column) goes last
    order = torch.argsort(is_self.to(torch.int8), dim=1, stable=True)
    return scores.gather(1, order)[:, :k], idx.gather(1, order)[:, :k]


def knn(query: Tensor, reference: Tensor, k: int, *, distance: str = "cosine", backend: str = "auto",
        query_chunk: int = 4096, self_offset: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact k nearest references of every query: (scores (Q, k), indices (Q, k) int64), best first.

    Scores are similarities (higher is nearer): cosine, inner product, or minus the
    squared euclidean distance for 'l2'. ``self_offset=o`` says query i is
    reference o + i, which is then excluded from its own neighbours.

    Memory: O(query_chunk x n_references) for the torch backend (one chunk of the
    similarity matrix at a time) and O(Q x k) for the result; faiss's flat index
    holds a copy of the references. Equal scores may come back in a different order
    from faiss and from torch.
    """
    V.choice("distance", distance, DISTANCES)
    V.choice("backend", backend, BACKENDS)
    n_ref = reference.shape[0]
    excl = self_offset is not None
    kk = min(n_ref, k + 1) if excl else min(n_ref, k)
    q_all, r = _prepare(query, distance), _prepare(reference, distance)
    use_faiss = backend == "faiss" or (backend == "auto" and _faiss_available())
    out_s, out_i = [], []
    if use_faiss:
        faiss = _faiss()
        d = r.shape[1]
        index = faiss.IndexFlatL2(d) if distance == "l2" else faiss.IndexFlatIP(d)
        if query.is_cuda and hasattr(faiss, "StandardGpuResources"):
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), query.device.index or 0, index)
        index.add(r.detach().cpu().contiguous().numpy())
    for start in range(0, q_all.shape[0], query_chunk):
        q = q_all[start:start + query_chunk]
        if use_faiss:
            dist, ids = index.search(q.detach().cpu().contiguous().numpy(), kk)
            s = torch.from_numpy(dist).to(query.device)
            s = -s if distance == "l2" else s
            i = torch.from_numpy(ids).to(query.device)
        else:
            if distance == "l2":
                sim = -torch.cdist(q, r).pow(2)
            else:
                sim = q @ r.T
            s, i = sim.topk(kk, dim=1)
        if excl:
            ids = torch.arange(start, start + q.shape[0], device=i.device) + self_offset
            s, i = _drop_self(s, i, ids, min(k, n_ref - 1))
        out_s.append(s)
        out_i.append(i)
    return torch.cat(out_s), torch.cat(out_i)


class RetrievalEvaluator:
    """Recall@K, precision@1, R-precision and MAP@R of an embedding, by exact kNN.

    Definitions (metric-learning papers; pytorch-metric-learning for the last three):
    recall@K = 1 if any of the K nearest references has the query's label;
    R = the number of references with the query's label (the query itself not
    counted); R-precision = matches among the R nearest / R; MAP@R = mean over the
    R nearest of precision@i at each match, divided by R. Queries with R = 0 (no
    reference shares their label) are left out of every metric, as
    pytorch-metric-learning leaves them out; ``n_queries_scored`` says how many counted.

    Self-matches: with ``reference=None`` the queries are the gallery; with
    ``ref_includes_query=True`` the first len(query) references are the queries
    (pytorch-metric-learning's convention). Either way query i never retrieves
    reference i. pytorch-metric-learning instead drops each query's first
    neighbour, which differs only when exact duplicates tie with the query.

    Args:
        k: the K values of recall@K.
        metrics: any of 'recall', 'precision_at_1', 'r_precision', 'mean_average_precision_at_r'.
        backend: 'faiss' (faiss-cpu, or faiss-gpu for CUDA tensors when it has GPU support),
            'torch' (chunked matmul + topk on the tensors' device), 'auto' (faiss when installed).
        query_chunk: queries per chunk (memory: query_chunk x references similarities).
        distance: 'cosine' (l2-normalized inner product), 'inner_product' or 'l2'.
    """

    def __init__(self, k: Sequence[int] = (1, 2, 4, 8), metrics: Sequence[str] = METRICS, *,
                 backend: str = "auto", query_chunk: int = 4096, distance: str = "cosine") -> None:
        ks = [k] if isinstance(k, int) else list(k)
        if not ks:
            raise ValueError("k must hold at least one positive int, got an empty sequence")
        self.k = tuple(V.positive_int(f"k[{i}]", v) for i, v in enumerate(ks))
        ms = [metrics] if isinstance(metrics, str) else list(metrics)
        self.metrics = tuple(V.choice("metrics", m, METRICS) for m in ms)
        self.backend = V.choice("backend", backend, BACKENDS)
        if backend == "faiss":
            _faiss()
        self.query_chunk = V.positive_int("query_chunk", query_chunk)
        self.distance = V.choice("distance", distance, DISTANCES)

    @staticmethod
    def _check(name: str, emb: object, labels: object, labels_name: str) -> tuple[Tensor, Tensor]:
        emb = V.tensor(name, emb, ndim=2, dtypes=V.FLOAT_DTYPES + (torch.float64,), nonempty=True)
        V.finite(name, emb)
        labels = V.tensor(labels_name, labels, ndim=1, dtypes=INT_DTYPES)
        if labels.shape[0] != emb.shape[0]:
            raise ValueError(f"{labels_name} must hold one label per row of {name} ({emb.shape[0]}), "
                             f"got {labels.shape[0]}")
        return emb, labels.to(torch.int64)

    def get_accuracy(self, query: Tensor, query_labels: Tensor, reference: Tensor | None = None,
                     reference_labels: Tensor | None = None, ref_includes_query: bool = False) -> dict[str, float]:
        """Metrics of the queries against the reference set (see the class docstring).

        Returns:
            {'recall@K': ..., 'precision_at_1': ..., 'r_precision': ...,
            'mean_average_precision_at_r': ..., 'n_queries_scored': ...} (Python numbers).
        """
        query, query_labels = self._check("query", query, query_labels, "query_labels")
        if reference is None:
            if reference_labels is not None:
                raise ValueError("reference_labels given without reference")
            reference, reference_labels, offset = query, query_labels, 0
        else:
            reference, reference_labels = self._check("reference", reference, reference_labels,
                                                      "reference_labels")
            offset = 0 if ref_includes_query else None
            if ref_includes_query and reference.shape[0] < query.shape[0]:
                raise ValueError(f"ref_includes_query=True needs the queries as the first rows of reference: "
                                 f"reference has {reference.shape[0]} rows, query {query.shape[0]}")
        if reference.shape[1] != query.shape[1]:
            raise ValueError(f"query and reference must have the same dimension, got {query.shape[1]} and "
                             f"{reference.shape[1]}")
        dev = query.device
        reference_labels = reference_labels.to(dev)
        query_labels = query_labels.to(dev)
        # R per query: references with the query's label, minus itself when it is in the gallery
        uniq, counts = torch.unique(reference_labels, return_counts=True)
        pos = torch.searchsorted(uniq, query_labels).clamp_max(len(uniq) - 1)
        r = torch.where(uniq[pos] == query_labels, counts[pos], torch.zeros_like(pos))
        if offset is not None:
            r = r - 1
        scored = r > 0
        need_r = any(m in self.metrics for m in ("r_precision", "mean_average_precision_at_r"))
        k_search = max(self.k) if "recall" in self.metrics else 1
        if need_r and bool(scored.any()):
            k_search = max(k_search, int(r.max()))
        _, idx = knn(query, reference, k_search, distance=self.distance, backend=self.backend,
                     query_chunk=self.query_chunk, self_offset=offset)
        hit = reference_labels[idx] == query_labels[:, None]          # (Q, kk)
        hit, r_s = hit[scored], r[scored]
        out: dict[str, float] = {}
        n = int(scored.sum())
        if "recall" in self.metrics:
            for kv in self.k:
                out[f"recall@{kv}"] = float(hit[:, :kv].any(dim=1).double().mean()) if n else float("nan")
        if "precision_at_1" in self.metrics:
            out["precision_at_1"] = float(hit[:, 0].double().mean()) if n else float("nan")
        if need_r:
            cols = torch.arange(1, hit.shape[1] + 1, device=dev)
            within = cols[None] <= r_s[:, None]                          # the R nearest
            rel = hit & within
            if "r_precision" in self.metrics:
                out["r_precision"] = float((rel.sum(1).double() / r_s).mean()) if n else float("nan")
            if "mean_average_precision_at_r" in self.metrics:
                prec = rel.cumsum(1).double() / cols[None]
                ap = (prec * rel).sum(1) / r_s
                out["mean_average_precision_at_r"] = float(ap.mean()) if n else float("nan")
        out["n_queries_scored"] = n
        return out


def recall_at_k(query: Tensor, query_labels: Tensor, reference: Tensor | None = None,
                reference_labels: Tensor | None = None, k: Sequence[int] = (1, 2, 4, 8), *,
                ref_includes_query: bool = False, **kwargs) -> dict[str, float]:
    """Recall@K only: ``RetrievalEvaluator(k, metrics=('recall',), **kwargs).get_accuracy(...)``."""
    ev = RetrievalEvaluator(k, metrics=("recall",), **kwargs)
    return ev.get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query)
