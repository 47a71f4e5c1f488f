"""Attribute discovery: clusters of salient patches as attributes (SANE, Plummer et al., ECCV 2020, appendix C).

A data set without attribute annotations can still get attribute explanations:
SANE finds the image regions that a similarity model relies on, embeds them and
clusters the embeddings; each cluster is a "discovered attribute" that the rest
of the pipeline (the attribute model, TCAV, the ranking) uses in place of
annotated ones. The steps, for N images:

1. Embed every image with the model.
2. Find each image's K nearest references under the model's own similarity
   (the image itself excluded).
3. Saliency of each image for each of its K references (RISE by default, one
   pass over the image's perturbations for all K references).
4. Bin the peak (argmax) of each of the K maps on a ``grid x grid`` lattice and
   keep the most common cell: the region that explains the image's matches most
   often. Ties go to the cell with the largest summed saliency.
5. Cut a patch centred on that cell's centre, resize it to the image size and
   embed it.
6. k-means on the patch embeddings: ``n_attributes`` clusters, the discovered
   attributes. Image i has attribute c when one of its patches falls in cluster c.

:func:`full_frame_attributes` is the baseline of the same appendix: k-means on
whole-image embeddings, no saliency. :func:`cluster_purity` scores clusters
against ground truth (purity and NMI).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..evaluation.retrieval import _faiss, _faiss_available, knn
from ..ops import _validate as V
from ..saliency.rise import RISE
from ..similarity import SimilarityModel

__all__ = ["DiscoveredAttributes", "discover_attributes", "full_frame_attributes", "kmeans", "peak_cells",
           "patch_boxes", "cluster_purity", "normalized_mutual_info"]

BACKENDS = ("auto", "faiss", "torch")
_KNN_DISTANCE = {"cosine": "cosine", "dot": "inner_product", "neg_l2": "l2"}


# ----------------------------------------------------------------------------- result

@dataclass
class DiscoveredAttributes:
    """Attributes found by :func:`discover_attributes` (or the :func:`full_frame_attributes` baseline).

    Attributes:
        labels: (N, n_attributes) bool; image i has attribute c when one of its patches is in cluster c.
        assignments: (N, n_peaks) int64 cluster of each patch (n_peaks = 1 for the full-frame baseline).
        centroids: (n_attributes, D) float32 cluster centres, in the space that was clustered
            (l2-normalized embeddings when the model's similarity is cosine).
        peak_cells: (N, n_peaks) int64 lattice cell ``row * grid + col`` of each patch; -1 for
            the full-frame baseline, which has no peak.
        patch_boxes: (N, n_peaks, 4) int64 boxes (y0, x0, y1, x1), half-open pixel ranges of each
            patch (the whole image for the baseline).
        names: ("discovered_0", ..., "discovered_{n_attributes-1}").
        references: (N, K) int64 indices of the kNN references whose saliency located the peaks;
            None when the saliency maps were given or for the baseline.
        timings: host-clock seconds per step ('embed', 'knn', 'saliency', 'peaks', 'patches', 'kmeans').
    """

    labels: Tensor
    assignments: Tensor
    centroids: Tensor
    peak_cells: Tensor
    patch_boxes: Tensor
    names: tuple[str, ...]
    references: Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_attributes(self) -> int:
        return len(self.names)

    def to_annotations(self) -> tuple[Tensor, tuple[str, ...]]:
        """(labels (N, n_attributes) bool, names): the form of a data set's attribute annotations,
        so that attribute-model training and TCAV take discovered attributes in place of annotated ones."""
        return self.labels.clone(), tuple(self.names)


# ----------------------------------------------------------------------------- checks

def _check_backend(backend: object) -> str:
    V.choice("backend", backend, BACKENDS)
    if backend == "faiss":
        _faiss()  # a clear ImportError now rather than after the saliency step
    return backend  # type: ignore[return-value]


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed


def _as_images(sim: SimilarityModel, images: object) -> Tensor:
    """(N, C, H, W) float32 on the model's device from a tensor or a map-style Dataset."""
    if not isinstance(images, Tensor):
        if not (hasattr(images, "__len__") and hasattr(images, "__getitem__")):
            raise TypeError(f"images must be a (N, C, H, W) tensor or a map-style Dataset, got "
                            f"{type(images).__name__}")
        n = len(images)
        if n == 0:
            raise ValueError("images must not be empty, got a Dataset of length 0")
        items = []
        for i in range(n):
            item = images[i]
            if isinstance(item, (tuple, list)):
                item = item[0] if item else None
            if not isinstance(item, Tensor):
                raise TypeError(f"images[{i}] must be an image tensor (C, H, W) or a tuple starting with one, "
                                f"got {type(item).__name__}")
            items.append(item)
        shapes = {tuple(t.shape) for t in items}
        if len(shapes) != 1:
            raise ValueError(f"images must all have one shape, got {len(shapes)} shapes, e.g. {sorted(shapes)[:2]}")
        images = torch.stack(items)
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
    images = sim.check_images("images", images)
    return images.to(sim.device).float()


def _is_cosine(sim: SimilarityModel) -> bool:
    return isinstance(sim.similarity_fn, str) and sim.similarity_fn == "cosine" and sim.conditional_similarity is None


def _cluster_space(sim: SimilarityModel, emb: Tensor) -> Tensor:
    """Embeddings as k-means sees them: l2-normalized for a cosine model (then squared euclidean distance
    is 2 - 2 cos, so k-means groups by the model's own similarity), raw otherwise."""
    emb = emb.float()
    return F.normalize(emb, dim=1) if _is_cosine(sim) else emb


# ----------------------------------------------------------------------------- kNN references

def _neighbours(sim: SimilarityModel, emb: Tensor, k: int, backend: str) -> Tensor:
    """(N, k) int64: each row's k most similar other rows under the model's similarity, best first."""
    if sim.conditional_similarity is not None:
        raise ValueError("sim has a conditional_similarity: discovery needs one similarity for every pair of "
                         "images, so pass saliency maps computed with your conditions instead")
    kind = sim.similarity_fn
    if isinstance(kind, str):
        _, idx = knn(emb, emb, k, distance=_KNN_DISTANCE[kind], backend=backend, self_offset=0)
        return idx
    n = emb.shape[0]
    out = []
    for s in range(0, n, 1024):  # a callable similarity: chunked pairwise + topk, the diagonal masked
        block = sim.pairwise(emb[s:s + 1024], emb)
        rows = torch.arange(s, min(n, s + 1024), device=block.device)
        block[rows - s, rows] = float("-inf")
        out.append(block.topk(k, dim=1).indices)
    return torch.cat(out)


# ----------------------------------------------------------------------------- peaks and patches

def _cell_of(coord: Tensor, size: int, grid: int) -> Tensor:
    """Lattice row (or column) of integer pixel coordinates: cell r holds pixels [r*size/grid, (r+1)*size/grid)."""
    return torch.clamp(coord * grid // size, max=grid - 1)


def peak_cells(saliency: Tensor, grid: int = 7, n_peaks: int = 1) -> Tensor:
    """The lattice cells that hold the peaks of each image's saliency maps most often.

    The argmax of every map is binned on a ``grid x grid`` lattice (cell r covers rows
    [r*H/grid, (r+1)*H/grid), columns likewise). Cells are ranked by the number of the K maps
    whose peak they hold; ties (and cells that hold no peak, when ``n_peaks`` asks for more
    cells than hold one) are ranked by the saliency inside the cell summed over the K maps,
    then by cell index. The first ``n_peaks`` cells are returned.

    Args:
        saliency: (N, K, H, W) float maps, K per image (one per reference).
        grid: side of the lattice (SANE appendix C: 7).
        n_peaks: cells to keep per image, at most grid * grid.

    Returns:
        (N, n_peaks) int64 cells ``row * grid + col``, most common first.
    """
    saliency = V.tensor("saliency", saliency, ndim=4, dtypes=V.FLOAT_DTYPES + (torch.float64,), nonempty=True)
    V.finite("saliency", saliency)
    grid = V.positive_int("grid", grid)
    n_peaks = V.positive_int("n_peaks", n_peaks)
    n, k, h, w = saliency.shape
    if grid > min(h, w):
        raise ValueError(f"grid must be <= the map side min(H, W) = {min(h, w)}, got {grid}")
    if n_peaks > grid * grid:
        raise ValueError(f"n_peaks must be <= grid * grid = {grid * grid}, got {n_peaks}")
    sal = saliency.double()
    flat = sal.reshape(n, k, h * w)
    arg = flat.argmax(dim=2)                                            # (N, K), first maximum on ties
    ys = torch.div(arg, w, rounding_mode="floor")
    xs = arg - ys * w
    peak_bin = _cell_of(ys, h, grid) * grid + _cell_of(xs, w, grid)       # (N, K)
    n_bins = grid * grid
    counts = torch.zeros(n, n_bins, dtype=torch.float64, device=sal.device)
    counts.scatter_add_(1, peak_bin, torch.ones_like(peak_bin, dtype=torch.float64))
    # saliency mass per cell, summed over the K maps
    pix_bin = (_cell_of(torch.arange(h, device=sal.device), h, grid)[:, None] * grid
               + _cell_of(torch.arange(w, device=sal.device), w, grid)[None, :]).reshape(-1)
    mass = torch.zeros(n, n_bins, dtype=torch.float64, device=sal.device)
    mass.scatter_add_(1, pix_bin.expand(n, -1), sal.sum(dim=1).reshape(n, h * w))
    # rank by count, then by mass, then by cell index: two stable sorts (the last key first)
    order = torch.sort(mass, dim=1, descending=True, stable=True).indices
    by_count = torch.sort(counts.gather(1, order), dim=1, descending=True, stable=True).indices
    return order.gather(1, by_count)[:, :n_peaks].to(torch.int64)


def _patch_side(patch: object, size: int, name: str = "patch") -> int:
    if isinstance(patch, bool) or not isinstance(patch, (int, float)):
        raise TypeError(f"{name} must be a float fraction in (0, 1] or an int number of pixels, got "
                        f"{type(patch).__name__}")
    if isinstance(patch, int):
        if not 1 <= patch <= size:
            raise ValueError(f"{name} must be in [1, {size}] pixels (the image side), got {patch}")
        return patch
    V.real(name, patch, low=0.0, high=1.0, open_low=True)
    return max(1, min(size, int(round(patch * size))))


def patch_boxes(cells: Tensor, size: tuple[int, int], grid: int = 7, patch: float | int = 0.25) -> Tensor:
    """Boxes of side ``patch`` centred on lattice cells, shifted to lie inside the image.

    The box is centred on the cell's centre ((r + 0.5) * H / grid, (c + 0.5) * W / grid);
    a box that would cross the border is shifted inward (its size is kept).

    Args:
        cells: (...,) int64 cells ``row * grid + col``.
        size: (H, W) of the image.
        grid: side of the lattice.
        patch: side as a fraction of the image side (float in (0, 1], applied to H and W
            separately), or an int number of pixels.

    Returns:
        (..., 4) int64 boxes (y0, x0, y1, x1), half-open.
    """
    h, w = size
    ph, pw = _patch_side(patch, h), _patch_side(patch, w)
    r = torch.div(cells, grid, rounding_mode="floor").double()
    c = (cells % grid).double()
    cy, cx = (r + 0.5) * h / grid, (c + 0.5) * w / grid
    y0 = torch.clamp(torch.round(cy - ph / 2), 0, h - ph).to(torch.int64)
    x0 = torch.clamp(torch.round(cx - pw / 2), 0, w - pw).to(torch.int64)
    return torch.stack([y0, x0, y0 + ph, x0 + pw], dim=-1)


def _crop_resize(images: Tensor, img_idx: Tensor, boxes: Tensor) -> Tensor:
    """(M, C, H, W): the box of image img_idx[m], resized bilinearly back to the image size.

    Every box has the same size (``patch_boxes`` shifts boxes, never shrinks them), so the crops
    are gathered with one indexing operation and resized with one interpolate call.
    """
    h, w = images.shape[2:]
    ph, pw = int(boxes[0, 2] - boxes[0, 0]), int(boxes[0, 3] - boxes[0, 1])
    dev = images.device
    ys = boxes[:, 0:1].to(dev) + torch.arange(ph, device=dev)[None]          # (M, ph)
    xs = boxes[:, 1:2].to(dev) + torch.arange(pw, device=dev)[None]          # (M, pw)
    idx = img_idx.to(dev)[:, None, None]
    crops = images.permute(0, 2, 3, 1)[idx, ys[:, :, None], xs[:, None, :]]  # (M, ph, pw, C)
    crops = crops.permute(0, 3, 1, 2).contiguous()
    if (ph, pw) == (h, w):
        return crops
    return F.interpolate(crops, size=(h, w), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- k-means

def _kmeanspp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur and Vassilvitskii 2007): (k,) int64 row indices, from ``gen`` only."""
    n = x.shape[0]
    x64 = x.double()
    first = int(torch.randint(n, (1,), generator=gen))
    idx = [first]
    d2 = ((x64 - x64[first]) ** 2).sum(dim=1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: take the first rows not chosen yet
            chosen = set(idx)
            idx.append(next(i for i in range(n) if i not in chosen))
        else:
            idx.append(int(torch.multinomial((d2 / total).float().cpu(), 1, generator=gen)))
        d2 = torch.minimum(d2, ((x64 - x64[idx[-1]]) ** 2).sum(dim=1))
    return torch.tensor(idx, dtype=torch.int64)


def _assign(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid (squared euclidean) of every row, first index on ties; and the distances."""
    d2 = (x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None]
    d, a = d2.min(dim=1)
    return a, d.clamp_min(0)


def _lloyd_torch(x: Tensor, init: Tensor, n_iter: int) -> Tensor:
    """Lloyd iterations in float64. An emptied cluster takes the point farthest from its centroid."""
    x64 = x.double()
    c = init.double().clone()
    k = c.shape[0]
    for _ in range(n_iter):
        a, d = _assign(x64, c)
        counts = torch.bincount(a, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, a, x64)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].double(), c)
        for j in torch.nonzero(counts == 0).flatten().tolist():
            far = int(d.argmax())
            new[j] = x64[far]
            d[far] = -1.0  # do not give the same point to two empty clusters
        c = new
    return c.float()


def _lloyd_faiss(x: Tensor, init: Tensor, n_iter: int, seed: int) -> Tensor:
    faiss = _faiss()
    xn = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    n, d = xn.shape
    k = init.shape[0]
    # no subsampling (max_points_per_centroid) and no "too few points" warning (min_points_per_centroid)
    km = faiss.Kmeans(d, k, niter=n_iter, seed=seed, verbose=False, spherical=False,
                      max_points_per_centroid=n // k + 1, min_points_per_centroid=1)
    km.train(xn, init_centroids=np.ascontiguousarray(init.detach().cpu().numpy(), dtype=np.float32))
    return torch.from_numpy(np.array(km.centroids, dtype=np.float32, copy=True)).reshape(k, d).to(x.device)


def kmeans(x: Tensor, k: int, *, n_iter: int = 20, seed: int = 0, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Deterministic k-means (squared euclidean): (centroids (k, D) float32, assignments (N,) int64).

    Both backends start from the same k-means++ seeding, drawn from a ``torch.Generator``
    seeded with ``seed`` (global RNG state untouched), then run ``n_iter`` Lloyd iterations
    (assign every point to its nearest centroid, move each centroid to its points' mean);
    the returned assignments are those to the final centroids. 'faiss' runs the iterations
    with ``faiss.Kmeans`` (``init_centroids`` given, no subsampling) and 'torch' in float64
    on the tensor's device. They agree whenever no cluster empties; when one does, faiss
    splits a large cluster in two and the torch backend moves the empty centroid to the point
    farthest from its own centroid, so the results may then differ.

    Args:
        x: (N, D) float points, N >= k.
        k: number of clusters.
        n_iter: Lloyd iterations (>= 0; 0 returns the seeding).
        seed: seed of the k-means++ seeding (and of faiss's cluster splitting).
        backend: 'faiss', 'torch', or 'auto' (faiss when installed).
    """
    x = V.tensor("x", x, ndim=2, dtypes=V.FLOAT_DTYPES + (torch.float64,), nonempty=True)
    V.finite("x", x)
    k = V.positive_int("k", k)
    n_iter = V.positive_int("n_iter", n_iter, minimum=0)
    seed = _check_seed(seed)
    backend = _check_backend(backend)
    if x.shape[0] < k:
        raise ValueError(f"k must be <= the number of points ({x.shape[0]}), got {k}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    xf = x.float()
    init = xf[_kmeanspp(xf.cpu(), k, gen).to(x.device)]
    use_faiss = backend == "faiss" or (backend == "auto" and _faiss_available())
    if n_iter == 0:
        cent = init.clone()
    elif use_faiss:
        cent = _lloyd_faiss(xf, init, n_iter, seed)
    else:
        cent = _lloyd_torch(xf, init, n_iter)
    assign, _ = _assign(xf.double(), cent.double())
    return cent, assign


def _result(assign: Tensor, n_images: int, n_attributes: int, centroids: Tensor, cells: Tensor, boxes: Tensor,
            references: Tensor | None, timings: dict[str, float]) -> DiscoveredAttributes:
    assign = assign.reshape(n_images, -1).cpu()
    labels = torch.zeros(n_images, n_attributes, dtype=torch.bool)
    labels.scatter_(1, assign, True)
    return DiscoveredAttributes(labels=labels, assignments=assign, centroids=centroids.cpu(), peak_cells=cells.cpu(),
                                patch_boxes=boxes.cpu(), names=tuple(f"discovered_{i}" for i in range(n_attributes)),
                                references=None if references is None else references.cpu(), timings=timings)


# ----------------------------------------------------------------------------- discovery

def discover_attributes(sim: SimilarityModel, images: Tensor | object, n_attributes: int, *, k_refs: int = 5,
                        saliency: Tensor | None = None, explainer: object = None, n_masks: int = 2000,
                        grid: int = 7, patch: float | int = 0.25, n_peaks: int = 1, n_iter: int = 20,
                        seed: int = 0, batch_size: int = 256, backend: str = "auto",
                        show_progress: bool = False) -> DiscoveredAttributes:
    """Discover attributes as clusters of the patches that a similarity model relies on (SANE appendix C).

    Choices where the paper leaves room (SANE appendix C describes the steps, not these details):

    - References: each image's ``k_refs`` nearest other images under the model's own
      similarity (exact kNN, :func:`whymatch.evaluation.knn`), i.e. the matches the model would
      retrieve, not same-class images: discovery needs no labels.
    - Saliency: RISE in fixed-reference mode (one pass of ``n_masks`` perturbations per image
      for all K references), seeded with ``seed``; any ``explainer`` with
      ``.attribute(query, references) -> (K, H, W)`` or precomputed ``saliency`` replaces it.
    - Peak: the argmax of each map, binned on a ``grid x grid`` lattice; the most common cell
      over the K maps wins, ties going to the cell with the most saliency summed over the K maps
      (:func:`peak_cells`). ``n_peaks > 1`` adds the next cells in that order.
    - Patch: a square (for square images) of side ``patch`` centred on the cell centre, shifted
      inside the image, resized bilinearly to the image size (the model's input size) and embedded
      (:func:`patch_boxes`).
    - Clustering: k-means (:func:`kmeans`: k-means++ seeding from ``seed``, ``n_iter`` Lloyd
      iterations, faiss or torch) on the patch embeddings, l2-normalized first when the model's
      similarity is cosine so that clusters follow the model's similarity.

    Args:
        sim: the SimilarityModel (not a conditional one unless ``saliency`` is given).
        images: (N, C, H, W) float images in the model's input space, or a map-style Dataset whose
            items are images or tuples starting with an image (e.g. ShapesWorld).
        n_attributes: number of clusters, <= N * n_peaks.
        k_refs: K, references per image (1 <= K <= N - 1); ignored when ``saliency`` is given.
        saliency: (N, K, H, W) maps, K of them per image; skips the kNN and saliency steps.
        explainer: an object with ``.attribute(query (C, H, W), references (K, C, H, W)) -> (K, H, W)``;
            default ``RISE(sim, n_masks=n_masks, batch_size=batch_size, seed=seed)``.
        n_masks: RISE masks per image when the default explainer is used (2000: RISE's default and SANE's).
        grid: side of the peak lattice (SANE: 7).
        patch: patch side as a fraction of the image side (float in (0, 1]) or in pixels (int).
        n_peaks: patches per image (the most common peak cell, then the next ones).
        n_iter: k-means iterations.
        seed: seed of RISE's masks and of the k-means seeding.
        batch_size: images per forward pass (embedding, RISE perturbations).
        backend: 'auto', 'faiss' or 'torch', for both the kNN search and k-means.
        show_progress: tqdm bar over the images during the saliency step.

    Returns:
        A :class:`DiscoveredAttributes`; ``to_annotations()`` gives (labels (N, n_attributes) bool,
        names) for attribute-model training and TCAV.
    """
    if not isinstance(sim, SimilarityModel):
        raise TypeError(f"sim must be a whymatch.SimilarityModel, got {type(sim).__name__}")
    n_attributes = V.positive_int("n_attributes", n_attributes)
    k_refs = V.positive_int("k_refs", k_refs)
    n_masks = V.positive_int("n_masks", n_masks)
    grid = V.positive_int("grid", grid)
    n_peaks = V.positive_int("n_peaks", n_peaks)
    n_iter = V.positive_int("n_iter", n_iter, minimum=0)
    seed = _check_seed(seed)
    batch_size = V.positive_int("batch_size", batch_size)
    backend = _check_backend(backend)
    if saliency is not None and explainer is not None:
        raise ValueError("give saliency (precomputed maps) or explainer, not both")
    if explainer is not None and not callable(getattr(explainer, "attribute", None)):
        raise TypeError(f"explainer must have an .attribute(query, references) method, got "
                        f"{type(explainer).__name__}")
    imgs = _as_images(sim, images)
    n, _, h, w = imgs.shape
    if grid > min(h, w):
        raise ValueError(f"grid must be <= the image side min(H, W) = {min(h, w)}, got {grid}")
    if n_peaks > grid * grid:
        raise ValueError(f"n_peaks must be <= grid * grid = {grid * grid}, got {n_peaks}")
    _patch_side(patch, min(h, w))
    if n_attributes > n * n_peaks:
        raise ValueError(f"n_attributes must be <= the number of patches N * n_peaks = {n * n_peaks}, "
                         f"got {n_attributes}")
    if saliency is not None:
        saliency = V.tensor("saliency", saliency, ndim=4, dtypes=V.FLOAT_DTYPES + (torch.float64,), nonempty=True)
        if saliency.shape[0] != n or tuple(saliency.shape[2:]) != (h, w):
            raise ValueError(f"saliency must have shape ({n}, K, {h}, {w}) (K maps per image), got "
                             f"{tuple(saliency.shape)}")
        V.finite("saliency", saliency)
    elif k_refs > n - 1:
        raise ValueError(f"k_refs must be <= N - 1 = {n - 1} (an image is not its own reference), got {k_refs}")

    timings: dict[str, float] = {}
    refs = None
    with torch.random.fork_rng(devices=[]):  # nothing below should draw from it; guarantee it anyway
        t = time.perf_counter()
        if saliency is None:
            emb = sim.embed(imgs, batch_size)
            timings["embed"] = time.perf_counter() - t
            t = time.perf_counter()
            refs = _neighbours(sim, emb, k_refs, backend).to(imgs.device)
            timings["knn"] = time.perf_counter() - t
            t = time.perf_counter()
            exp = explainer if explainer is not None else RISE(sim, n_masks=n_masks, batch_size=batch_size,
                                                               seed=seed)
            saliency = _saliency_maps(exp, imgs, refs, show_progress)
            timings["saliency"] = time.perf_counter() - t
        t = time.perf_counter()
        cells = peak_cells(saliency, grid, n_peaks).to(imgs.device)          # (N, P)
        timings["peaks"] = time.perf_counter() - t
        t = time.perf_counter()
        boxes = patch_boxes(cells, (h, w), grid, patch)                     # (N, P, 4)
        img_idx = torch.arange(n, device=imgs.device).repeat_interleave(n_peaks)
        flat_boxes = boxes.reshape(-1, 4)
        pemb = []
        for s in range(0, flat_boxes.shape[0], batch_size):
            crops = _crop_resize(imgs, img_idx[s:s + batch_size], flat_boxes[s:s + batch_size])
            pemb.append(sim.embed(crops))
        pemb = torch.cat(pemb)
        timings["patches"] = time.perf_counter() - t
        t = time.perf_counter()
        cent, assign = kmeans(_cluster_space(sim, pemb), n_attributes, n_iter=n_iter, seed=seed, backend=backend)
        timings["kmeans"] = time.perf_counter() - t
    return _result(assign, n, n_attributes, cent, cells, boxes, refs, timings)


def _saliency_maps(explainer: object, imgs: Tensor, refs: Tensor, show_progress: bool) -> Tensor:
    """(N, K, H, W) maps: image i against its K references, one explainer call per image."""
    n, _, h, w = imgs.shape
    k = refs.shape[1]
    out = torch.empty((n, k, h, w), dtype=torch.float32, device=imgs.device)
    it = range(n)
    if show_progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="discovery saliency", unit="img")
    for i in it:
        m = explainer.attribute(imgs[i], imgs[refs[i]])
        if not isinstance(m, Tensor) or tuple(m.shape) != (k, h, w):
            got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"explainer.attribute must return ({k}, {h}, {w}) maps, got {got}")
        out[i] = m.to(out.device, torch.float32)
    return out


def full_frame_attributes(sim: SimilarityModel, images: Tensor | object, n_attributes: int, *, seed: int = 0,
                          backend: str = "auto", batch_size: int = 256, n_iter: int = 20) -> DiscoveredAttributes:
    """The baseline of SANE appendix C: k-means on whole-image embeddings, no saliency, no patches.

    Same clustering as :func:`discover_attributes` (l2-normalized embeddings for a cosine
    model, k-means++ seeding from ``seed``, ``n_iter`` Lloyd iterations). The result has one
    "patch" per image: ``peak_cells`` is -1 and ``patch_boxes`` is the whole image.

    Args:
        sim: the SimilarityModel.
        images: (N, C, H, W) images or a map-style Dataset (see :func:`discover_attributes`).
        n_attributes: number of clusters, <= N.
        seed, backend, batch_size, n_iter: as in :func:`discover_attributes`.
    """
    if not isinstance(sim, SimilarityModel):
        raise TypeError(f"sim must be a whymatch.SimilarityModel, got {type(sim).__name__}")
    n_attributes = V.positive_int("n_attributes", n_attributes)
    seed = _check_seed(seed)
    backend = _check_backend(backend)
    batch_size = V.positive_int("batch_size", batch_size)
    n_iter = V.positive_int("n_iter", n_iter, minimum=0)
    imgs = _as_images(sim, images)
    n, _, h, w = imgs.shape
    if n_attributes > n:
        raise ValueError(f"n_attributes must be <= the number of images ({n}), got {n_attributes}")
    timings: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        t = time.perf_counter()
        emb = sim.embed(imgs, batch_size)
        timings["embed"] = time.perf_counter() - t
        t = time.perf_counter()
        cent, assign = kmeans(_cluster_space(sim, emb), n_attributes, n_iter=n_iter, seed=seed, backend=backend)
        timings["kmeans"] = time.perf_counter() - t
    cells = torch.full((n, 1), -1, dtype=torch.int64)
    boxes = torch.tensor([0, 0, h, w], dtype=torch.int64).expand(n, 1, 4).clone()
    return _result(assign, n, n_attributes, cent, cells, boxes, None, timings)


# ----------------------------------------------------------------------------- evaluation

def _entropy(counts: Tensor) -> float:
    p = counts[counts > 0].double()
    p = p / p.sum()
    return float(-(p * p.log()).sum())


def normalized_mutual_info(a: Tensor, b: Tensor) -> float:
    """NMI of two labelings (N,) int: I(a; b) / ((H(a) + H(b)) / 2), natural log.

    The arithmetic normalization of scikit-learn's ``normalized_mutual_info_score`` (its
    default), with its conventions: 1.0 when both labelings have a single value (or N = 0),
    0.0 when the mutual information is 0.
    """
    a = V.tensor("a", a, ndim=1)
    b = V.tensor("b", b, ndim=1)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same length, got {a.shape[0]} and {b.shape[0]}")
    if a.is_floating_point() or b.is_floating_point():
        raise ValueError(f"a and b must be integer labels, got {a.dtype} and {b.dtype}")
    ua, ia = torch.unique(a.cpu(), return_inverse=True)
    ub, ib = torch.unique(b.cpu(), return_inverse=True)
    if len(ua) == len(ub) <= 1:
        return 1.0
    n = a.shape[0]
    cont = torch.zeros(len(ua), len(ub), dtype=torch.float64)
    cont.index_put_((ia, ib), torch.ones(n, dtype=torch.float64), accumulate=True)
    pa, pb = cont.sum(1), cont.sum(0)
    nz = cont > 0
    # MI = sum p_ij log(p_ij / (p_i p_j)) = sum (n_ij / n) (log n_ij + log n - log n_i - log n_j)
    nij = cont[nz]
    ii, jj = torch.nonzero(nz, as_tuple=True)
    mi = float((nij / n * (nij.log() + math.log(n) - pa[ii].log() - pb[jj].log())).sum())
    mi = max(mi, 0.0)
    if mi == 0.0:
        return 0.0
    return mi / ((_entropy(pa) + _entropy(pb)) / 2)


def cluster_purity(assignments: Tensor, truth: Tensor) -> dict[str, object]:
    """How well clusters match ground truth: purity and NMI.

    For each cluster, the ground-truth value most frequent among its members (the majority);
    its purity is the fraction of members that have it, and the overall purity is the mean over
    clusters weighted by size (= the fraction of all points that have their cluster's majority).

    ``truth`` is categorical (N,) int, or (N, A) bool annotations. With (N, A) bool, "has the
    value" means "has the attribute", so a member may count for several attributes; NMI is then
    computed on the argmax when every row has exactly one True (one-hot), and is NaN otherwise
    (NMI needs one category per point).

    Args:
        assignments: (N,) int cluster ids (e.g. ``DiscoveredAttributes.assignments[:, 0]``).
        truth: (N,) int categories or (N, A) bool attributes.

    Returns:
        {'purity': float, 'nmi': float, 'n_clusters': int (non-empty clusters),
        'cluster_ids': (C,) int64, 'cluster_sizes': (C,) int64, 'cluster_purity': (C,) float64,
        'majority': (C,) int64 the majority category (or attribute index) of each cluster}.
    """
    assignments = V.tensor("assignments", assignments, ndim=1, nonempty=True)
    if assignments.is_floating_point() or assignments.dtype == torch.bool:
        raise ValueError(f"assignments must be integer cluster ids, got dtype {assignments.dtype}")
    truth = V.tensor("truth", truth, ndim=(1, 2))
    n = assignments.shape[0]
    if truth.shape[0] != n:
        raise ValueError(f"truth must have one row per assignment ({n}), got {truth.shape[0]}")
    a = assignments.detach().cpu().to(torch.int64)
    t = truth.detach().cpu()
    ids, inv = torch.unique(a, return_inverse=True)
    c = len(ids)
    if t.dim() == 1:
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"truth (N,) must hold integer categories, got dtype {t.dtype}")
        cats, tinv = torch.unique(t.to(torch.int64), return_inverse=True)
        onehot = torch.zeros(n, len(cats), dtype=torch.float64)
        onehot[torch.arange(n), tinv] = 1.0
        values = cats
        categorical = t.to(torch.int64)
    else:
        if t.dtype != torch.bool:
            if t.is_floating_point() or not bool(((t == 0) | (t == 1)).all()):
                raise ValueError(f"truth (N, A) must be bool or 0/1, got dtype {t.dtype}")
            t = t.bool()
        onehot = t.double()
        values = torch.arange(t.shape[1])
        categorical = t.to(torch.int64).argmax(1) if bool((t.sum(1) == 1).all()) else None
    counts = torch.zeros(c, onehot.shape[1], dtype=torch.float64).index_add_(0, inv, onehot)   # (C, values)
    sizes = torch.bincount(inv, minlength=c)
    best, arg = counts.max(dim=1)
    per = best / sizes.double()
    return {
        "purity": float(best.sum() / n),
        "nmi": normalized_mutual_info(a, categorical) if categorical is not None else float("nan"),
        "n_clusters": c,
        "cluster_ids": ids,
        "cluster_sizes": sizes,
        "cluster_purity": per,
        "majority": values[arg],
    }

