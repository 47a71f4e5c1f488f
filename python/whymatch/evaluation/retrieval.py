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

__all__ = ["RetrievalEvaluator", "recall_at_k", "knn", "faiss_gpu_device", "faiss_index"]

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


_gpu_resources: dict[int, object] = {}


def faiss_gpu_device(device: torch.device | str, faiss=None) -> int | None:
    """The GPU faiss should search on for tensors on ``device``, or None for CPU faiss.

    GPU faiss is used when the tensors are on CUDA and the installed faiss has GPU support
    (faiss-gpu: ``StandardGpuResources``) and sees a GPU (``faiss.get_num_gpus() > 0``); otherwise
    the flat index stays on the CPU (faiss-cpu, or faiss-gpu on a machine without a GPU).
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    faiss = faiss if faiss is not None else _faiss()
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return None
    n = int(faiss.get_num_gpus())
    if n <= 0:
        return None
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return index if index < n else None


def faiss_index(dim: int, distance: str, device: torch.device | str = "cpu", faiss=None):
    """An empty exact (flat) faiss index for ``distance`` ('l2': IndexFlatL2, else IndexFlatIP), on the GPU
    that :func:`faiss_gpu_device` picks for ``device`` (one StandardGpuResources per GPU, reused)."""
    faiss = faiss if faiss is not None else _faiss()
    index = faiss.IndexFlatL2(dim) if distance == "l2" else faiss.IndexFlatIP(dim)
    gpu = faiss_gpu_device(device, faiss)
    if gpu is not None:
        res = _gpu_resources.get(gpu)
        if res is None:
            res = _gpu_resources[gpu] = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, gpu, index)
    return index


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
        index = faiss_index(r.shape[1], distance, query.device, faiss)  # GPU faiss for CUDA tensors when it can
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
        backend: 'faiss' (faiss-cpu; for CUDA tensors GPU faiss when faiss-gpu is installed and
            ``faiss.get_num_gpus() > 0``, see :func:`faiss_gpu_device`, else the CPU index),
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
                     reference_labels: Tensor | None = None, ref_includes_query: bool = False, *,
                     shard: bool = False) -> dict[str, float]:
        """Metrics of the queries against the reference set (see the class docstring).

        Args:
            shard: the gallery is split across the ranks of the initialized torch.distributed
                process group: every rank passes the same queries and its own consecutive shard
                of the references (rank 0 the first rows, and so on). Each rank searches its
                shard; the per-query top neighbours and the label counts are gathered and merged,
                so every rank returns what one process would over the whole gallery. With
                ``reference=None`` the queries are the whole gallery and each rank searches its
                share of them (rows split as ``torch.tensor_split``); with
                ``ref_includes_query=True`` query i is global reference row i.

        Returns:
            {'recall@K': ..., 'precision_at_1': ..., 'r_precision': ...,
            'mean_average_precision_at_r': ..., 'n_queries_scored': ...} (Python numbers).
        """
        query, query_labels = self._check("query", query, query_labels, "query_labels")
        if shard:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("shard=True needs an initialized torch.distributed process group")
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = 0, 1
        if reference is None:
            if reference_labels is not None:
                raise ValueError("reference_labels given without reference")
            reference = torch.tensor_split(query, world)[rank]
            reference_labels = torch.tensor_split(query_labels, world)[rank]
            self_match = True
        else:
            reference, reference_labels = self._check("reference", reference, reference_labels,
                                                      "reference_labels")
            self_match = bool(ref_includes_query)
        if reference.shape[1] != query.shape[1]:
            raise ValueError(f"query and reference must have the same dimension, got {query.shape[1]} and "
                             f"{reference.shape[1]}")
        dev = query.device
        reference_labels = reference_labels.to(dev)
        query_labels = query_labels.to(dev)
        sizes = [reference.shape[0]]
        if world > 1:
            sizes = _all_gather_sizes(reference.shape[0], dev)
        offset = sum(sizes[:rank])
        n_ref = sum(sizes)
        if self_match and n_ref < query.shape[0]:
            raise ValueError(f"ref_includes_query=True needs the queries as the first rows of reference: "
                             f"reference has {n_ref} rows, query {query.shape[0]}")
        # R per query: references with the query's label, minus itself when it is in the gallery
        uniq, counts = torch.unique(reference_labels, return_counts=True)
        pos = torch.searchsorted(uniq, query_labels).clamp_max(max(len(uniq) - 1, 0))
        r = torch.where(uniq[pos] == query_labels, counts[pos], torch.zeros_like(pos)) if len(uniq) else \
            torch.zeros_like(query_labels)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(r)
        if self_match:
            r = r - 1
        scored = r > 0
        need_r = any(m in self.metrics for m in ("r_precision", "mean_average_precision_at_r"))
        k_search = max(self.k) if "recall" in self.metrics else 1
        if need_r and bool(scored.any()):
            k_search = max(k_search, int(r.max()))
        k_search = min(k_search, n_ref - 1 if self_match else n_ref)
        # Ask each shard for one extra neighbour, push the query's own row (global row i for query i)
        # to the end with score -inf, merge, and keep k_search: n_ref - 1 >= k_search real
        # candidates exist, so neither the self match nor shard padding survives the cut.
        kq = min(reference.shape[0], k_search + (1 if self_match else 0))
        if kq > 0:
            s, idx = knn(query, reference, kq, distance=self.distance, backend=self.backend,
                         query_chunk=self.query_chunk)
        else:  # an empty shard
            s = torch.empty(query.shape[0], 0, device=dev)
            idx = torch.empty(query.shape[0], 0, dtype=torch.int64, device=dev)
        if self_match:
            own = torch.arange(query.shape[0], device=idx.device)[:, None]
            s = s.masked_fill(idx + offset == own, float("-inf"))
        labels = reference_labels[idx]
        if world > 1:
            s, labels = _merge_shards(s, labels, k_search + (1 if self_match else 0))
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k_search]
        labels = labels.gather(1, order)
        hit = labels == query_labels[:, None]                          # (Q, kk)
        return self._metrics(hit[scored], r[scored])

    def _metrics(self, hit: Tensor, r: Tensor) -> dict[str, float]:
        """Metrics from the neighbour matches (Q, kk) and R (Q,) of the scored queries."""
        out: dict[str, float] = {}
        n = hit.shape[0]
        nan = float("nan")
        if "recall" in self.metrics:
            for kv in self.k:
                out[f"recall@{kv}"] = float(hit[:, :kv].any(dim=1).double().mean()) if n else nan
        if "precision_at_1" in self.metrics:
            out["precision_at_1"] = float(hit[:, 0].double().mean()) if n else nan
        if any(m in self.metrics for m in ("r_precision", "mean_average_precision_at_r")):
            cols = torch.arange(1, hit.shape[1] + 1, device=hit.device)
            rel = hit & (cols[None] <= r[:, None])                       # matches among the R nearest
            if "r_precision" in self.metrics:
                out["r_precision"] = float((rel.sum(1).double() / r).mean()) if n else nan
            if "mean_average_precision_at_r" in self.metrics:
                prec = rel.cumsum(1).double() / cols[None]
                out["mean_average_precision_at_r"] = float(((prec * rel).sum(1) / r).mean()) if n else nan
        out["n_queries_scored"] = n
        return out


def _all_gather_sizes(n: int, device: torch.device) -> list[int]:
    import torch.distributed as dist

    t = torch.tensor([n], device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(x) for x in out]


def _merge_shards(scores: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Every rank's (Q, <= k) neighbours side by side, (Q, world * k), padded with -inf (sorted by the caller)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    kmax = k
    pad = kmax - scores.shape[1]
    if pad > 0:  # a shard smaller than k: pad with -inf so every rank sends the same shape
        scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), float("-inf"))], dim=1)
        labels = torch.cat([labels, labels.new_full((labels.shape[0], pad), -1)], dim=1)
    if scores.shape[1] > kmax:
        scores, labels = scores[:, :kmax], labels[:, :kmax]
    all_s = [torch.empty_like(scores) for _ in range(world)]
    all_l = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(all_s, scores.contiguous())
    dist.all_gather(all_l, labels.contiguous())
    return torch.cat(all_s, dim=1), torch.cat(all_l, dim=1)


def recall_at_k(query: Tensor, query_labels: Tensor, reference: Tensor | None = None,
                reference_labels: Tensor | None = None, k: Sequence[int] = (1, 2, 4, 8), *,
                ref_includes_query: bool = False, **kwargs) -> dict[str, float]:
    """Recall@K only: ``RetrievalEvaluator(k, metrics=('recall',), **kwargs).get_accuracy(...)``."""
    ev = RetrievalEvaluator(k, metrics=("recall",), **kwargs)
    return ev.get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query)
