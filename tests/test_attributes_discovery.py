"""Attribute discovery (SANE appendix C): peaks, patches, k-means backends, the baseline, purity / NMI."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from whymatch import SimilarityModel
from whymatch.attributes import discovery as D
from whymatch.attributes.discovery import (DiscoveredAttributes, cluster_purity, discover_attributes,
                                           full_frame_attributes, kmeans, normalized_mutual_info, patch_boxes,
                                           peak_cells)

SIZE = 28
COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]])


class MeanColour(nn.Module):
    """Embedding = mean colour minus grey: a patch on a coloured square embeds as that colour."""

    def forward(self, x):
        return (x - 0.5).mean(dim=(2, 3))


def toy(n: int = 18, side: int = 7, seed: int = 0):
    """Grey noise images with one coloured square each: (images, colour ids (N,), square boxes (N, 4))."""
    g = torch.Generator().manual_seed(seed)
    imgs = 0.5 + 0.05 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    colour = torch.arange(n) % 3
    boxes = []
    for i in range(n):
        y, x = (int(v) for v in torch.randint(0, SIZE - side + 1, (2,), generator=g))
        imgs[i, :, y:y + side, x:x + side] = COLOURS[colour[i]][:, None, None]
        boxes.append((y, x, y + side, x + side))
    return imgs.clamp(0, 1), colour, torch.tensor(boxes)


def toy_model(similarity="cosine"):
    return SimilarityModel(MeanColour(), similarity).eval()


def square_saliency(boxes: torch.Tensor, k: int = 3) -> torch.Tensor:
    """(N, K, H, W) maps peaked at each square's centre (a Gaussian bump)."""
    n = boxes.shape[0]
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    cy = (boxes[:, 0] + boxes[:, 2] - 1).float() / 2
    cx = (boxes[:, 1] + boxes[:, 3] - 1).float() / 2
    bump = torch.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / 8.0)
    return bump[:, None].expand(n, k, SIZE, SIZE).contiguous()


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two labelings are equal up to a permutation of the labels."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ----------------------------------------------------------------------------- peaks and patches

def _point_maps(points_per_image, k, h=SIZE, w=SIZE):
    maps = torch.zeros(len(points_per_image), k, h, w)
    for i, pts in enumerate(points_per_image):
        for j, (y, x, v) in enumerate(pts):
            maps[i, j, y, x] = v
    return maps


def test_peak_cells_most_common_cell():
    # 28 px, grid 7: cells of 4 px. Three peaks in cell (2, 3), two in (5, 1).
    pts = [(9, 13, 1.0), (10, 12, 1.0), (8, 15, 1.0), (21, 5, 5.0), (22, 6, 5.0)]
    maps = _point_maps([pts], 5)
    assert peak_cells(maps, 7).tolist() == [[2 * 7 + 3]]
    assert peak_cells(maps, 7, n_peaks=2).tolist() == [[2 * 7 + 3, 5 * 7 + 1]]
    # a third cell holds no peak: ranked by summed saliency, which is 0 for every other cell, then by index
    assert peak_cells(maps, 7, n_peaks=3).tolist() == [[17, 36, 0]]


def test_peak_cells_tie_goes_to_most_saliency():
    pts = [(1, 1, 1.0), (2, 2, 1.0), (25, 25, 3.0), (26, 26, 3.0)]
    maps = _point_maps([pts], 4)
    assert peak_cells(maps, 7).tolist() == [[6 * 7 + 6]]
    maps[0, 0].fill_(-0.01)
    maps[0, 0, 1, 1] = 100.0  # more mass in cell 0 now
    assert peak_cells(maps, 7).tolist() == [[0]]


def test_peak_cells_uneven_lattice():
    # 30 px on a 7 lattice: pixel y is in row floor(7 y / 30); pixel 29 is in row 6, pixel 4 in row 0, 5 in row 1
    maps = torch.zeros(3, 1, 30, 30)
    maps[0, 0, 29, 29] = 1
    maps[1, 0, 4, 0] = 1
    maps[2, 0, 5, 0] = 1
    assert peak_cells(maps, 7).flatten().tolist() == [48, 0, 7]


def test_patch_boxes_centre_and_clamp():
    b = patch_boxes(torch.tensor([0, 24, 48]), (28, 28), 7, 8)
    assert b.tolist() == [[0, 0, 8, 8], [10, 10, 18, 18], [20, 20, 28, 28]]
    # fraction: round(0.25 * 28) = 7 px; the centre cell (3, 3) is centred at 14
    b = patch_boxes(torch.tensor([[24]]), (28, 28), 7, 0.25)
    assert b.shape == (1, 1, 4)
    y0, x0, y1, x1 = b[0, 0].tolist()
    assert y1 - y0 == x1 - x0 == 7 and abs((y0 + y1) / 2 - 14) <= 0.5
    # non-square image: the fraction applies to each side
    b = patch_boxes(torch.tensor([6]), (20, 40), 7, 0.5)
    assert b.tolist() == [[0, 20, 10, 40]]


# ----------------------------------------------------------------------------- k-means

def blobs(seed=0, n_per=40, k=4, d=8):
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(k, d, generator=g)
    x = centres.repeat_interleave(n_per, 0) + 0.3 * torch.randn(k * n_per, d, generator=g)
    perm = torch.randperm(k * n_per, generator=g)
    return x[perm], torch.arange(k).repeat_interleave(n_per)[perm]


def test_kmeans_backends_agree_and_are_deterministic():
    pytest.importorskip("faiss")
    x, truth = blobs()
    state = torch.random.get_rng_state()
    cf, af = kmeans(x, 4, backend="faiss", seed=3)
    ct, at = kmeans(x, 4, backend="torch", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert af.dtype == torch.int64 and af.shape == (160,) and cf.shape == (4, 8) and cf.dtype == torch.float32
    assert same_partition(af, truth) and same_partition(at, truth)
    assert torch.equal(af, at)  # same seeding, same Lloyd steps: same labels, not only the same partition
    torch.testing.assert_close(cf, ct, rtol=1e-4, atol=1e-4)
    for backend in ("faiss", "torch"):
        c2, a2 = kmeans(x, 4, backend=backend, seed=3)
        assert torch.equal(a2, af) and torch.equal(c2, cf if backend == "faiss" else ct)


def test_kmeans_torch_without_faiss(monkeypatch):
    monkeypatch.setattr(D, "_faiss_available", lambda: False)
    monkeypatch.setattr(D, "_lloyd_faiss", lambda *a: pytest.fail("faiss used"))
    x, truth = blobs(seed=1)
    c, a = kmeans(x, 4, backend="auto")
    assert same_partition(a, truth)


def test_kmeans_degenerate_points():
    x = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    c, a = kmeans(x, 3, backend="torch", n_iter=5)
    assert torch.isfinite(c).all() and a.shape == (10,)
    assert same_partition(a[[0, 5]], torch.tensor([0, 1]))
    c0, a0 = kmeans(x, 2, n_iter=0, backend="torch")  # the seeding alone
    assert same_partition(a0, torch.tensor([0] * 5 + [1] * 5))


# ----------------------------------------------------------------------------- discovery

def test_discover_with_given_saliency_finds_the_colours(monkeypatch):
    imgs, colour, sq = toy(18)
    monkeypatch.setattr("whymatch.saliency.rise.RISE.attribute", lambda *a, **k: pytest.fail("RISE ran"))
    sal = square_saliency(sq)
    res = discover_attributes(toy_model(), imgs, 3, saliency=sal, patch=8, seed=0)
    assert isinstance(res, DiscoveredAttributes)
    assert res.labels.shape == (18, 3) and res.labels.dtype == torch.bool
    assert res.assignments.shape == (18, 1) and res.assignments.dtype == torch.int64
    assert res.peak_cells.shape == (18, 1) and res.patch_boxes.shape == (18, 1, 4)
    assert res.centroids.shape == (3, 3) and res.names == ("discovered_0", "discovered_1", "discovered_2")
    assert res.references is None and "saliency" not in res.timings
    assert (res.labels.sum(1) == 1).all()
    # every patch covers its square's centre, and the clusters are the colours
    b = res.patch_boxes[:, 0]
    cy, cx = (sq[:, 0] + sq[:, 2]) / 2, (sq[:, 1] + sq[:, 3]) / 2
    assert ((b[:, 0] <= cy) & (cy < b[:, 2]) & (b[:, 1] <= cx) & (cx < b[:, 3])).all()
    assert same_partition(res.assignments[:, 0], colour)
    assert cluster_purity(res.assignments[:, 0], colour)["purity"] == 1.0
    labels, names = res.to_annotations()
    assert torch.equal(labels, res.labels) and names == res.names
    # centroids in the clustered space: unit norm for a cosine model
    torch.testing.assert_close(res.centroids.norm(dim=1), torch.ones(3), rtol=0, atol=0.05)


def test_discover_n_peaks():
    imgs, colour, sq = toy(12)
    sal = square_saliency(sq, k=2)
    res = discover_attributes(toy_model(), imgs, 4, saliency=sal, n_peaks=2, patch=0.25)
    assert res.assignments.shape == (12, 2) and res.peak_cells.shape == (12, 2) and res.patch_boxes.shape == (12, 2, 4)
    assert (res.peak_cells[:, 0] != res.peak_cells[:, 1]).all()
    assert torch.equal(res.labels, torch.zeros(12, 4, dtype=torch.bool).scatter_(1, res.assignments, True))


def test_discover_with_rise_default():
    imgs, colour, sq = toy(9)
    sim = toy_model()
    state = torch.random.get_rng_state()
    a = discover_attributes(sim, imgs, 3, k_refs=2, n_masks=64, batch_size=64, patch=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.references.shape == (9, 2)
    assert not (a.references == torch.arange(9)[:, None]).any()
    assert set(a.timings) == {"embed", "knn", "saliency", "peaks", "patches", "kmeans"}
    b = discover_attributes(sim, imgs, 3, k_refs=2, n_masks=64, batch_size=64, patch=8)
    assert torch.equal(a.assignments, b.assignments) and torch.equal(a.patch_boxes, b.patch_boxes)


def test_discover_custom_explainer_and_dataset_input():
    imgs, colour, sq = toy(8)
    bumps = square_saliency(sq, k=1)[:, 0]
    calls = []

    class Oracle:
        def attribute(self, query, references):
            i = int(((imgs - query[None]).abs().flatten(1).sum(1)).argmin())
            calls.append((i, references.shape[0]))
            return bumps[i][None].expand(references.shape[0], -1, -1)

    ds = TensorDataset(imgs, colour)
    res = discover_attributes(toy_model(), ds, 3, k_refs=3, explainer=Oracle(), patch=8)
    assert sorted(c[0] for c in calls) == list(range(8)) and {c[1] for c in calls} == {3}
    assert same_partition(res.assignments[:, 0], colour)

    class Wrong:
        def attribute(self, query, references):
            return torch.zeros(1, 5, 5)

    with pytest.raises(ValueError, match=r"explainer.attribute must return \(3, 28, 28\)"):
        discover_attributes(toy_model(), imgs, 3, k_refs=3, explainer=Wrong())


@pytest.mark.parametrize("similarity", ["neg_l2", "dot", "callable"])
def test_neighbours_follow_the_similarity(similarity):
    emb = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.2, 5.0], [0.0, 0.3]])
    fn = (lambda a, b: -torch.cdist(a, b)) if similarity == "callable" else similarity
    sim = SimilarityModel(MeanColour(), fn)
    idx = D._neighbours(sim, emb, 2, "torch")
    assert not (idx == torch.arange(5)[:, None]).any()
    if similarity != "dot":
        assert idx[0].tolist() == [1, 4] and idx[2, 0] == 3


def test_full_frame_baseline():
    imgs, colour, _ = toy(12)
    res = full_frame_attributes(toy_model(), imgs, 3, seed=1, backend="torch")
    assert res.labels.shape == (12, 3) and res.assignments.shape == (12, 1)
    assert (res.peak_cells == -1).all()
    assert (res.patch_boxes == torch.tensor([0, 0, SIZE, SIZE])).all()
    assert res.centroids.shape == (3, 3)
    again = full_frame_attributes(toy_model(), imgs, 3, seed=1, backend="torch")
    assert torch.equal(again.assignments, res.assignments)


# ----------------------------------------------------------------------------- purity and NMI

def test_nmi_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    for n, ka, kb in ((200, 5, 7), (50, 2, 2), (31, 9, 3)):
        a = torch.randint(0, ka, (n,), generator=g)
        b = torch.randint(0, kb, (n,), generator=g)
        want = metrics.normalized_mutual_info_score(b.numpy(), a.numpy())
        assert normalized_mutual_info(a, b) == pytest.approx(want, abs=1e-10)
        assert cluster_purity(a, b)["nmi"] == pytest.approx(want, abs=1e-10)
    a = torch.tensor([3, 3, 7, 7, 9])
    assert normalized_mutual_info(a, a * 2 + 1) == pytest.approx(1.0)
    assert normalized_mutual_info(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)) == 1.0
    assert normalized_mutual_info(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 1])) == \
        metrics.normalized_mutual_info_score([0, 1, 0, 1], [0, 0, 0, 0])


def test_cluster_purity_by_hand():
    assign = torch.tensor([0, 0, 0, 5, 5, 9])
    truth = torch.tensor([1, 1, 2, 3, 3, 3])
    r = cluster_purity(assign, truth)
    assert r["purity"] == pytest.approx(5 / 6)
    assert r["n_clusters"] == 3 and r["cluster_ids"].tolist() == [0, 5, 9]
    assert r["cluster_sizes"].tolist() == [3, 2, 1] and r["majority"].tolist() == [1, 3, 3]
    torch.testing.assert_close(r["cluster_purity"], torch.tensor([2 / 3, 1.0, 1.0], dtype=torch.float64))
    # (N, A) one-hot: the same numbers, majority as attribute index
    onehot = torch.nn.functional.one_hot(truth, 4).bool()
    r2 = cluster_purity(assign, onehot)
    assert r2["purity"] == r["purity"] and r2["nmi"] == pytest.approx(r["nmi"])
    # multi-label: a member counts for each attribute it has; NMI undefined
    multi = onehot.clone()
    multi[2, 1] = True
    r3 = cluster_purity(assign, multi)
    assert r3["purity"] == pytest.approx(1.0) and r3["nmi"] != r3["nmi"]


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(n_attributes=0), ValueError, "n_attributes must be >= 1"),
    (dict(n_attributes=40), ValueError, r"n_attributes must be <= the number of patches N \* n_peaks = 6"),
    (dict(k_refs=6), ValueError, r"k_refs must be <= N - 1 = 5"),
    (dict(grid=40), ValueError, "grid must be <= the image side"),
    (dict(n_peaks=50), ValueError, r"n_peaks must be <= grid \* grid = 49"),
    (dict(patch=1.5), ValueError, r"patch must be in \(0, 1\]"),
    (dict(patch=0), ValueError, r"patch must be in \[1, 28\] pixels"),
    (dict(patch=99), ValueError, r"patch must be in \[1, 28\] pixels"),
    (dict(patch="big"), TypeError, "patch must be a float fraction"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(seed=-1), ValueError, "seed must be >= 0"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(saliency=torch.zeros(6, 2, 28)), ValueError, "saliency must be a 4-D tensor"),
    (dict(saliency=torch.zeros(5, 2, 28, 28)), ValueError, r"saliency must have shape \(6, K, 28, 28\)"),
    (dict(saliency=torch.full((6, 1, 28, 28), float("nan"))), ValueError, "saliency must be finite"),
    (dict(saliency=torch.zeros(6, 1, 28, 28), explainer=object()), ValueError, "saliency .* or explainer"),
    (dict(explainer=object()), TypeError, "explainer must have an .attribute"),
])
def test_errors_name_the_argument(kwargs, exc, match):
    imgs, _, _ = toy(6)
    args = dict(n_attributes=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        discover_attributes(toy_model(), imgs, **args)


def test_more_errors():
    imgs, colour, _ = toy(6)
    with pytest.raises(TypeError, match="sim must be a whymatch.SimilarityModel"):
        discover_attributes(MeanColour(), imgs, 2)
    with pytest.raises(ValueError, match="images must have 3 channels"):
        discover_attributes(toy_model(), imgs[:, :1], 2)
    with pytest.raises(TypeError, match="images must be a"):
        discover_attributes(toy_model(), 42, 2)
    with pytest.raises(ValueError, match=r"n_attributes must be <= the number of images \(6\)"):
        full_frame_attributes(toy_model(), imgs, 7)
    with pytest.raises(ValueError, match=r"k must be <= the number of points \(3\)"):
        kmeans(torch.randn(3, 2), 4)
    with pytest.raises(ValueError, match="x must be a 2-D tensor"):
        kmeans(torch.randn(3), 1)
    with pytest.raises(ValueError, match=r"truth must have one row per assignment \(6\)"):
        cluster_purity(colour, colour[:5])
    with pytest.raises(ValueError, match="assignments must be integer cluster ids"):
        cluster_purity(colour.float(), colour)
    with pytest.raises(ValueError, match=r"truth \(N, A\) must be bool or 0/1"):
        cluster_purity(colour, torch.full((6, 2), 2))
    with pytest.raises(ValueError, match="a and b must have the same length"):
        normalized_mutual_info(colour, colour[:2])
