"""Explain a retrieval list: the top-k gallery images of a query, each with a saliency map.

A retrieval system already has a gallery of embeddings; whymatch adds why each of the top-k results
matched, for the price of one explanation: RISE perturbs the query once and scores every perturbation
against all k retrieved embeddings in one matrix product (``RISE.attribute(query,
reference_embeddings=...)``), so explaining 10 results costs what explaining one does.

- :class:`DirectoryImages`, :class:`DatasetImages`, :class:`CallableImages`: where the gallery's
  images come from (:func:`image_source` picks one).
- :class:`GalleryIndex`: an exact faiss index over the gallery's embeddings. ``build`` embeds the
  gallery once; ``save`` writes the index and a JSON manifest beside it (the model's fingerprint, the
  similarity, the image size, every file's size and mtime, the index file's sha256); ``load`` refuses
  an index whose manifest does not match the model and the gallery (stale), and checks the index
  file's header, size and sha256 before faiss parses it, so a file that is not a whymatch gallery
  index is a one-line :class:`whymatch.io.FileFormatError`, never a crash.
- :func:`explain_search`: query -> top-k list with one map per item and the time of each step.

Data flow: images -> SimilarityModel -> faiss (search) -> explainer -> ops.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .similarity import SimilarityModel

__all__ = ["DirectoryImages", "DatasetImages", "CallableImages", "image_source", "model_fingerprint",
           "GalleryIndex", "StaleIndexError", "SearchExplanation", "explain_search", "SEARCH_METHODS",
           "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SEARCH_METHODS = ("rise", "gradcam", "attention")
_FORMAT = "whymatch-gallery-index"
_FORMAT_VERSION = 1
# faiss IndexFlat file: fourcc, d (int32), ntotal (int64), two int64 dummies, is_trained (bool), metric (int32),
# then the codes as a vector: its length in floats (uint64) and the floats
_FLAT_HEADER = struct.Struct("<4siqqq?iQ")
_FOURCC = {"ip": b"IxFI", "l2": b"IxF2"}


class StaleIndexError(ValueError):
    """A saved gallery index that does not match the model or the gallery it is asked to serve."""


# ------------------------------------------------------------------ image sources
class DirectoryImages:
    """Every image file under ``root`` (recursively, sorted by relative path), loaded at ``size`` x ``size``."""

    kind = "directory"

    def __init__(self, root: str | os.PathLike, size: int) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            what = "missing" if not self.root.exists() else "not a directory"
            raise ValueError(f"gallery {self.root} is {what}: give a directory of images")
        self.size = int(size)
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"gallery {self.root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.paths = files
        self.names = [p.relative_to(self.root).as_posix() for p in files]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Tensor:
        from .io import load_image

        return load_image(self.paths[i], size=(self.size, self.size))

    def fingerprint(self) -> list[list]:
        """[relative path, bytes, mtime in ns] of every file: what makes a saved index stale."""
        out = []
        for name, p in zip(self.names, self.paths):
            st = p.stat()
            out.append([name, st.st_size, st.st_mtime_ns])
        return out


class DatasetImages:
    """Images of a map-style dataset: ``dataset[i]`` is an image (3, H, W) or a tuple whose first item is one."""

    kind = "dataset"

    def __init__(self, dataset, size: int | None = None, names: Sequence[str] | None = None) -> None:
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(f"gallery dataset must have __getitem__ and __len__, got {type(dataset).__name__}")
        self.dataset, self.size = dataset, size
        n = len(dataset)
        if n == 0:
            raise ValueError("gallery dataset is empty")
        self.names = list(names) if names is not None else [f"#{i}" for i in range(n)]
        if len(self.names) != n:
            raise ValueError(f"names must hold one name per gallery image ({n}), got {len(self.names)}")

    def __len__(self) -> int:
        return len(self.names)

    def _get(self, i: int):
        return self.dataset[i]

    def load(self, i: int) -> Tensor:
        x = self._get(i)
        if isinstance(x, (tuple, list)):
            x = x[0]
        if not isinstance(x, Tensor) or x.dim() != 3:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"gallery image {self.names[i]} must be a (C, H, W) tensor, got {got}")
        x = x.float()
        if self.size is not None and x.shape[1:] != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)[0]
        return x

    def fingerprint(self) -> list[list]:
        return [[n] for n in self.names]  # names only: a dataset's content is not checked


class CallableImages(DatasetImages):
    """Images from a callable: ``fn(i)`` returns image i (3, H, W), for i in range(n)."""

    kind = "callable"

    def __init__(self, fn: Callable[[int], Tensor], n: int, size: int | None = None,
                 names: Sequence[str] | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.fn, self.size = fn, size
        self.names = list(names) if names is not None else [f"#{i}" for i in range(n)]
        if len(self.names) != n:
            raise ValueError(f"names must hold one name per gallery image ({n}), got {len(self.names)}")

    def _get(self, i: int):
        return self.fn(i)


def image_source(gallery, size: int):
    """A directory path, a dataset, or an image source already -> an image source at ``size``."""
    if isinstance(gallery, (DirectoryImages, DatasetImages)):
        return gallery
    if isinstance(gallery, (str, os.PathLike)):
        return DirectoryImages(gallery, size)
    return DatasetImages(gallery, size)


def model_fingerprint(sim: SimilarityModel) -> str:
    """sha256 of what decides the embeddings: the embedder's class, its parameters and buffers, the similarity."""
    h = hashlib.sha256()
    h.update(f"{type(sim.embedder).__module__}.{type(sim.embedder).__qualname__}|{sim.similarity_fn!r}".encode())
    if sim.preprocess is not None:
        h.update(repr(getattr(sim.preprocess, "__qualname__", type(sim.preprocess).__qualname__)).encode())
    for name, t in sorted(sim.embedder.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _metric(sim: SimilarityModel) -> str:
    kind = sim.similarity_fn
    if kind in ("cosine", "dot"):
        return "ip"
    if kind == "neg_l2":
        return "l2"
    raise ValueError(f"a gallery index needs a model with similarity 'cosine', 'dot' or 'neg_l2', "
                     f"got {kind!r}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ the index
@dataclass
class GalleryIndex:
    """An exact faiss index over a gallery's embeddings, with what it was built from.

    Attributes:
        index: the faiss index (IndexFlatIP for 'cosine' (unit embeddings) and 'dot', IndexFlatL2 for 'neg_l2').
        embeddings: (N, D) float32 CPU tensor, what the index holds (unit rows for 'cosine').
        names: the gallery's image names (relative paths for a directory).
        manifest: model fingerprint, similarity, image size, source fingerprint (saved beside the index).
    """

    index: object
    embeddings: Tensor
    names: list[str]
    manifest: dict = field(default_factory=dict)

    # -- build
    @classmethod
    def build(cls, sim: SimilarityModel, source, *, batch_size: int = 64, show_progress: bool = False,
              image_size: int | None = None) -> "GalleryIndex":
        """Embed every gallery image (batches of ``batch_size`` on the model's device) and index them."""
        from .evaluation.retrieval import _faiss

        faiss = _faiss()
        metric = _metric(sim)
        n = len(source)
        chunks = []
        starts = range(0, n, batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, total=(n + batch_size - 1) // batch_size, desc="embedding the gallery",
                          unit="batch")
        dev = sim.device
        with torch.no_grad():
            for i in starts:
                imgs = torch.stack([source.load(j) for j in range(i, min(n, i + batch_size))]).to(dev)
                chunks.append(sim.embed(imgs).float().cpu())
        emb = torch.cat(chunks)
        if not torch.isfinite(emb).all():
            raise ValueError("the model returned NaN or Inf embeddings for some gallery images")
        if sim.similarity_fn == "cosine":
            emb = F.normalize(emb, dim=1)
        index = faiss.IndexFlatIP(emb.shape[1]) if metric == "ip" else faiss.IndexFlatL2(emb.shape[1])
        index.add(emb.contiguous().numpy())
        manifest = {"format": _FORMAT, "version": _FORMAT_VERSION, "model": model_fingerprint(sim),
                    "similarity": sim.similarity_fn, "metric": metric, "dim": int(emb.shape[1]), "count": n,
                    "image_size": image_size if image_size is not None else getattr(source, "size", None),
                    "source": {"kind": source.kind, "files": source.fingerprint()}}
        return cls(index, emb, list(source.names), manifest)

    # -- save / load
    def save(self, path: str | os.PathLike) -> Path:
        """Write the faiss index to ``path`` and the manifest to ``path + '.json'`` (each atomically)."""
        import json
        import tempfile

        from .evaluation.retrieval import _faiss
        from .io import atomic_write_bytes, atomic_write_text

        faiss = _faiss()
        p = Path(path)
        with tempfile.TemporaryDirectory(dir=p.parent if p.parent.exists() else None) as tmp:
            t = Path(tmp) / "index"
            faiss.write_index(self.index, str(t))
            data = t.read_bytes()
        atomic_write_bytes(p, data)
        manifest = dict(self.manifest, names=self.names, index_bytes=len(data),
                        index_sha256=hashlib.sha256(data).hexdigest())
        atomic_write_text(_manifest_path(p), json.dumps(manifest))
        return p

    @classmethod
    def load(cls, path: str | os.PathLike, sim: SimilarityModel, source, *,
             image_size: int | None = None) -> "GalleryIndex":
        """Read a saved index for ``sim`` and ``source``; refuse a stale or malformed one.

        The manifest (JSON) is checked first: its keys and types, then the model fingerprint,
        similarity, image size and the gallery's files (names, sizes, mtimes) against now. The index
        file is checked before faiss reads it: its byte count and sha256 against the manifest, then
        its header (an exact flat index of the manifest's metric, dimension and count).

        Raises:
            FileNotFoundError: ``path`` or its manifest is missing.
            StaleIndexError (a ValueError): built for another model, image size or gallery (what differs is named).
            FileFormatError (a ValueError): not a whymatch gallery index, or damaged.
        """
        from .evaluation.retrieval import _faiss
        from .io import FileFormatError, read_json_file

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"gallery index not found: {p}")
        mpath = _manifest_path(p)
        if not mpath.is_file():
            raise FileFormatError(f"gallery index {p}: its manifest {mpath} is missing (not written by whymatch, "
                                  f"or moved without it)")
        man = read_json_file(mpath, "gallery index manifest",
                             required_keys=("format", "version", "model", "similarity", "metric", "dim", "count",
                                            "image_size", "source", "names", "index_bytes", "index_sha256"))
        _check_manifest(man, mpath)
        _check_stale(man, p, sim, source, image_size if image_size is not None else getattr(source, "size", None))
        size = p.stat().st_size
        if size != man["index_bytes"]:
            raise FileFormatError(f"gallery index {p}: {size} bytes, its manifest says {man['index_bytes']} "
                                  f"(truncated or replaced)")
        if _sha256(p) != man["index_sha256"]:
            raise FileFormatError(f"gallery index {p}: its sha256 differs from its manifest's (changed since saved)")
        _check_flat_header(p, man)
        faiss = _faiss()
        try:
            index = faiss.read_index(str(p))
        except (RuntimeError, MemoryError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise FileFormatError(f"cannot read gallery index {p}: {first[:300]}") from None
        if index.ntotal != man["count"] or index.d != man["dim"]:
            raise FileFormatError(f"gallery index {p}: holds {index.ntotal} x {index.d}, its manifest says "
                                  f"{man['count']} x {man['dim']}")
        rec = index.reconstruct_n(0, index.ntotal)
        # faiss.contrib.torch_utils (imported by pytorch-metric-learning) makes this return a tensor
        emb = (rec if isinstance(rec, torch.Tensor) else torch.from_numpy(rec)).float()
        man = {k: v for k, v in man.items() if k not in ("names", "index_bytes", "index_sha256")}
        return cls(index, emb, list(source.names), man)

    @classmethod
    def open(cls, path: str | os.PathLike | None, sim: SimilarityModel, source, *, rebuild: bool = False,
             batch_size: int = 64, show_progress: bool = False, image_size: int | None = None,
             log: Callable[[str], None] = lambda _m: None) -> tuple["GalleryIndex", bool]:
        """The saved index at ``path`` when it exists (refused when stale unless ``rebuild``), else a new one,
        saved to ``path`` when given. Returns (index, whether it was built now)."""
        if path is not None and Path(path).exists() and not rebuild:
            gi = cls.load(path, sim, source, image_size=image_size)
            log(f"gallery index: {path} ({len(gi.names)} images, reused)")
            return gi, False
        gi = cls.build(sim, source, batch_size=batch_size, show_progress=show_progress, image_size=image_size)
        if path is not None:
            gi.save(path)
            log(f"gallery index: {len(gi.names)} images embedded, saved to {path}")
        return gi, True

    # -- search
    def search(self, query_embeddings: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(similarities (Q, k), gallery ids (Q, k) int64), best first, for query embeddings (Q, D)."""
        q = query_embeddings.detach().float().cpu()
        if q.dim() != 2 or q.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"query_embeddings must be (Q, {self.embeddings.shape[1]}), got {tuple(q.shape)}")
        if self.manifest.get("similarity") == "cosine":
            q = F.normalize(q, dim=1)
        k = min(int(k), len(self.names))
        scores, ids = self.index.search(q.contiguous().numpy(), k)
        s = torch.from_numpy(scores)
        if self.manifest.get("metric") == "l2":  # faiss gives squared distances; the model's similarity is -l2
            s = -s.clamp_min(0).sqrt()
        return s, torch.from_numpy(ids).long()


def _manifest_path(p: Path) -> Path:
    return p.with_name(p.name + ".json")


def _check_manifest(man: dict, mpath: Path) -> None:
    from .io import FileFormatError

    if man["format"] != _FORMAT or man["version"] != _FORMAT_VERSION:
        raise FileFormatError(f"gallery index manifest {mpath}: format {man['format']!r} version {man['version']!r}, "
                              f"expected {_FORMAT!r} version {_FORMAT_VERSION}")
    ints = {"dim": (1, 1 << 20), "count": (1, 1 << 40), "index_bytes": (0, 1 << 50)}
    for key, (lo, hi) in ints.items():
        v = man[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise FileFormatError(f"gallery index manifest {mpath}: {key!r} must be an integer in [{lo}, {hi}], "
                                  f"got {v!r}")
    if man["metric"] not in _FOURCC:
        raise FileFormatError(f"gallery index manifest {mpath}: 'metric' must be 'ip' or 'l2', got {man['metric']!r}")
    names, src = man["names"], man["source"]
    if not (isinstance(names, list) and len(names) == man["count"] and all(isinstance(n, str) for n in names)):
        raise FileFormatError(f"gallery index manifest {mpath}: 'names' must be {man['count']} strings")
    if not (isinstance(src, dict) and isinstance(src.get("files"), list) and isinstance(src.get("kind"), str)):
        raise FileFormatError(f"gallery index manifest {mpath}: 'source' must hold 'kind' and 'files'")
    if not (isinstance(man["index_sha256"], str) and isinstance(man["model"], str)):
        raise FileFormatError(f"gallery index manifest {mpath}: 'index_sha256' and 'model' must be strings")


def _check_stale(man: dict, p: Path, sim: SimilarityModel, source, image_size) -> None:
    """Name every way the saved index differs from the model and gallery it is asked to serve."""
    why = []
    if man["model"] != model_fingerprint(sim):
        why.append("it was built with another model or other weights")
    if man["similarity"] != sim.similarity_fn:
        why.append(f"similarity {man['similarity']!r}, the model's is {sim.similarity_fn!r}")
    if man["image_size"] != image_size:
        why.append(f"image size {man['image_size']}, asked {image_size}")
    if man["source"]["kind"] != source.kind:
        why.append(f"built from a {man['source']['kind']}, the gallery is a {source.kind}")
    old = {f[0]: f[1:] for f in man["source"]["files"] if isinstance(f, list) and f and isinstance(f[0], str)}
    new = {f[0]: f[1:] for f in source.fingerprint()}
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(n for n in set(new) & set(old) if new[n] != old[n])

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")

    for what, names in (("added", added), ("removed", removed), ("changed (size or mtime)", changed)):
        if names:
            why.append(f"gallery files {what} since it was built: {some(names)}")
    if why:
        raise StaleIndexError(f"gallery index {p} is stale: {'; '.join(why)}; rebuild it (whymatch search-explain "
                              f"--rebuild-index) or give another --index path")


def _check_flat_header(p: Path, man: dict) -> None:
    """The file is an exact flat faiss index of the manifest's metric, dimension and count (checked from its
    bytes, before faiss reads it)."""
    from .io import FileFormatError

    with open(p, "rb") as f:
        head = f.read(_FLAT_HEADER.size)
    if len(head) < _FLAT_HEADER.size:
        raise FileFormatError(f"gallery index {p}: not a faiss flat index (only {len(head)} bytes)")
    fourcc, d, ntotal, _, _, _, metric, n_codes = _FLAT_HEADER.unpack(head)
    want = _FOURCC[man["metric"]]
    if fourcc != want:
        raise FileFormatError(f"gallery index {p}: not a faiss flat index of metric {man['metric']!r} "
                              f"(starts with {fourcc!r}, expected {want!r})")
    expected_size = _FLAT_HEADER.size + 4 * man["count"] * man["dim"]
    if (d, ntotal, n_codes) != (man["dim"], man["count"], man["count"] * man["dim"]) or \
            p.stat().st_size != expected_size or metric not in (0, 1):
        raise FileFormatError(f"gallery index {p}: its header ({ntotal} x {d}) or size does not match its manifest "
                              f"({man['count']} x {man['dim']})")


# ------------------------------------------------------------------ explain a search
@dataclass
class SearchExplanation:
    """The top-k of one query with one saliency map per item.

    Attributes:
        query: (C, H, W) the query image (on the model's device).
        ids: (k,) gallery ids, best first; names: their names.
        scores: (k,) the model's similarity of the query to each.
        references: (k, C, H, W) the retrieved images (CPU), for the report.
        maps: (k, H, W) saliency of the query for each retrieved item (CPU).
        method: the explainer ('rise', 'gradcam' or 'attention').
        seconds: wall time of each step: 'embed' (the query), 'search', 'load' (the k images), 'explain'.
    """

    query: Tensor
    ids: Tensor
    names: list[str]
    scores: Tensor
    references: Tensor
    maps: Tensor
    method: str
    seconds: dict[str, float]
    scores_kind: str | None = None  # the model's similarity ('cosine', 'dot', 'neg_l2')


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def explain_search(sim: SimilarityModel, query: Tensor, gallery: GalleryIndex, source, k: int = 10, *,
                   method: str = "rise", explainer=None, n_masks: int = 1000, batch_size: int = 250,
                   seed: int = 0, show_progress: bool = False) -> SearchExplanation:
    """Search the gallery for ``query`` and explain every one of the top ``k`` results.

    'rise' (default) and 'gradcam' explain all k results at once from the embeddings the index already
    holds (one pass over the query's perturbations for RISE, one forward+backward for Grad-CAM);
    'attention' (SimilarityAttention, siamese) reads the k images. ``explainer`` overrides the method
    with any explainer whose ``attribute(query, references)`` returns (k, H, W).

    Args:
        query: (C, H, W) image in [0, 1] at the gallery's image size.
        k: results to return (at most the gallery's size).

    Returns:
        A :class:`SearchExplanation`.
    """
    from . import saliency
    from .ops import _validate as V

    if explainer is None:
        V.choice("method", method, SEARCH_METHODS)
    k = V.positive_int("k", k)
    dev = sim.device
    q = query.to(dev)
    secs = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        q_emb = sim.embed(q[None])
    _sync(dev)
    secs["embed"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, ids = gallery.search(q_emb, k)
    secs["search"] = time.perf_counter() - t0
    ids, scores = ids[0], scores[0]
    t0 = time.perf_counter()
    refs = torch.stack([source.load(int(i)) for i in ids])
    secs["load"] = time.perf_counter() - t0
    ref_emb = gallery.embeddings[ids].to(dev)
    t0 = time.perf_counter()
    if explainer is not None:
        maps = explainer.attribute(q, refs.to(dev))
    elif method == "rise":
        ex = saliency.RISE(sim, n_masks=n_masks, batch_size=batch_size, seed=seed, show_progress=show_progress)
        maps = ex.attribute(q, reference_embeddings=ref_emb)
    elif method == "gradcam":
        maps = saliency.EmbeddingGradCAM(sim).attribute(q, reference_embeddings=ref_emb)
    else:
        maps = saliency.SimilarityAttention(sim, mode="siamese").attribute(q, refs.to(dev))
    _sync(dev)
    secs["explain"] = time.perf_counter() - t0
    if sim.similarity_fn == "cosine":  # the index held unit rows: report the model's own similarity
        scores = sim.pairwise(q_emb, ref_emb)[0].float().cpu()
    return SearchExplanation(q, ids, [gallery.names[int(i)] for i in ids], scores, refs, maps.detach().float().cpu(),
                             method if explainer is None else type(explainer).__name__, secs,
                             sim.similarity_fn if isinstance(sim.similarity_fn, str) else None)


def write_search_report(out_dir: str | os.PathLike, result: SearchExplanation, *, title: str | None = None,
                        query_name: str = "query") -> Path:
    """The ranked list as an HTML report (:func:`whymatch.viz.write_ranked_report`): one row per result, best
    first, with its rank, name, similarity and the query's map for it; the summary gives the latency of
    each step."""
    from .viz import write_ranked_report

    m = result.method
    results = [{"image": img, "maps": {m: result.maps[r]}, "name": n,
                "scores": {"rank": r + 1, "similarity": float(sc)}}
               for r, (img, n, sc) in enumerate(zip(result.references, result.names, result.scores.tolist()))]
    summary = [{"step": step, "seconds": round(secs, 4)} for step, secs in result.seconds.items()]
    summary.append({"step": "total", "seconds": round(sum(result.seconds.values()), 4)})
    query = {"name": f"{query_name}: top {len(results)} of the gallery, best first", "query": result.query.cpu(),
             "results": results}
    scale = "similarity" if result.scores_kind == "cosine" else "shared"
    return write_ranked_report(out_dir, [query], summary=summary, methods=[m], scale=scale,
                               title=title or f"whymatch search-explain: {query_name}")
