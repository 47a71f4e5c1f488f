"""Low-shot segmentation: attention cue + GrabCut (whymatch.segment)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("cv2")

from helpers import devices  # noqa: E402
from whymatch import segment as S  # noqa: E402
from whymatch.data import ShapesWorld  # noqa: E402


def _scene(h: int = 64, w: int = 64, seed: int = 0):
    """A noisy grey background with a red disc; returns (image (3, H, W), disc mask (H, W))."""
    g = torch.Generator().manual_seed(seed)
    img = 0.45 + 0.05 * torch.rand(3, h, w, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    disc = (yy - 24) ** 2 + (xx - 38) ** 2 <= 11 ** 2
    img[:, disc] = torch.tensor([0.9, 0.1, 0.1])[:, None]
    return img, disc


def _blob_cue(h: int = 64, w: int = 64, cy: float = 24, cx: float = 38, sigma: float = 9.0):
    """A coarse, broad hand-made cue peaked on the disc (like an upsampled attention map)."""
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))


# ------------------------------------------------------------------ iou

def test_iou_hand_computed():
    a = torch.zeros(4, 4, dtype=torch.bool)
    b = torch.zeros(4, 4, dtype=torch.bool)
    a[0, :2] = True          # 2 px
    b[0, 1:4] = True         # 3 px, 1 shared -> 1 / 4
    assert float(S.iou(a, b)) == pytest.approx(0.25)
    assert float(S.iou(a, a)) == 1.0
    assert float(S.iou(a, torch.zeros_like(a))) == 0.0
    empty = torch.zeros(4, 4, dtype=torch.bool)
    assert float(S.iou(empty, empty)) == 1.0  # two empty masks agree
    batch = S.iou(torch.stack([a, a, empty]), torch.stack([b, a, empty]))
    assert batch.shape == (3,) and batch.tolist() == pytest.approx([0.25, 1.0, 1.0])


def test_iou_errors_name_the_argument():
    a = torch.zeros(4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="pred must have dtype bool, got float32"):
        S.iou(a.float(), a)
    with pytest.raises(ValueError, match=r"target must have shape \(4, 4\), got \(4, 5\)"):
        S.iou(a, torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="pred must be a torch.Tensor, got ndarray"):
        S.iou(np.zeros((4, 4), bool), a)


# ------------------------------------------------------------------ GrabCut with a hand-made cue

def test_grabcut_recovers_object_from_a_coarse_cue():
    img, disc = _scene()
    cue = _blob_cue()
    mask, det = S.one_shot(img, None, None, cue, return_details=True)
    assert det["fallback"] is None
    assert mask.dtype == torch.bool and mask.shape == disc.shape
    got = float(S.iou(mask, disc))
    thr = float(S.iou(S.threshold_cue(cue), disc))
    assert got > 0.9, got
    assert got > thr  # GrabCut sharpens the coarse cue


def test_init_mask_labels_follow_the_documented_quantiles():
    import cv2

    cue = torch.arange(100.0).reshape(10, 10)
    m = S.init_mask(cue, fg_quantile=0.9, bg_quantile=0.2)
    # q(0.9) = 89.1, q(0.2) = 19.8, midpoint 54.45
    flat = torch.from_numpy(m).flatten()
    assert (flat[90:] == cv2.GC_FGD).all() and (flat[:20] == cv2.GC_BGD).all()
    assert (flat[20:55] == cv2.GC_PR_BGD).all() and (flat[55:90] == cv2.GC_PR_FGD).all()


def test_precomputed_map_path_is_scale_free_and_deterministic():
    img, disc = _scene(seed=3)
    cue = _blob_cue()
    a = S.one_shot(img, None, None, cue)
    b = S.one_shot(img, None, None, 7.0 * cue + 2.0)  # min-max normalized first
    assert torch.equal(a, b)
    assert torch.equal(a, S.one_shot(img, None, None, cue))


def test_callable_attention_and_two_way_difference():
    img, disc = _scene()
    support = img.clone()
    neg = torch.zeros_like(img)
    calls = []

    def attention(test, other):
        calls.append(other)
        return _blob_cue() if bool(other.any()) else _blob_cue(cy=55, cx=8, sigma=5)  # neg is all zeros

    mask, det = S.one_shot(img, support, None, attention, negative_support=neg, return_details=True)
    assert len(calls) == 2 and det["fallback"] is None and float(S.iou(mask, disc)) > 0.9
    cue = S.attention_cue(img, support, None, attention, negative_supports=neg)
    assert cue.shape == disc.shape and float(cue.min()) >= 0 and float(cue.max()) == pytest.approx(1.0)


# ------------------------------------------------------------------ degenerate cues

def test_flat_cue_falls_back_to_the_centre_box():
    img, disc = _scene()
    for flat in (torch.zeros(64, 64), torch.full((64, 64), 3.0)):
        mask, det = S.one_shot(img, None, None, flat, return_details=True)
        assert det["fallback"] == "flat_cue" and det["init"] is None
        assert torch.equal(mask, S.center_box(img))


def test_grabcut_error_falls_back_to_the_thresholded_cue():
    # a uniform image: OpenCV cannot fit colour models (k-means on identical pixels) or the mask is refused;
    # whatever OpenCV does, one_shot must not raise and must return a mask of the right shape
    img = torch.full((3, 32, 32), 0.5)
    cue = _blob_cue(32, 32, 16, 16, 4)
    mask, det = S.one_shot(img, None, None, cue, return_details=True)
    assert mask.shape == (32, 32) and mask.dtype == torch.bool
    assert det["fallback"] in (None, "grabcut_error")
    if det["fallback"] == "grabcut_error":
        assert torch.equal(mask, S.threshold_cue(cue))


def test_grabcut_error_path(monkeypatch):
    import cv2

    def boom(*a, **k):
        raise cv2.error("no foreground")

    monkeypatch.setattr(cv2, "grabCut", boom)
    img, _ = _scene()
    cue = _blob_cue()
    mask, det = S.one_shot(img, None, None, cue, return_details=True)
    assert det["fallback"] == "grabcut_error"
    assert torch.equal(mask, S.threshold_cue(cue))


# ------------------------------------------------------------------ errors

def test_errors_name_the_argument():
    img, _ = _scene()
    cue = _blob_cue()
    with pytest.raises(ValueError, match=r"test_image must be a \(3, H, W\) RGB image, got shape \(1, 64, 64\)"):
        S.one_shot(img[:1], None, None, cue)
    with pytest.raises(TypeError, match="test_image must be a torch.Tensor, got list"):
        S.one_shot([1, 2], None, None, cue)
    with pytest.raises(ValueError, match=r"attention must have shape \(64, 64\), got \(32, 32\)"):
        S.one_shot(img, None, None, cue[:32, :32])
    with pytest.raises(ValueError, match=r"fg_quantile must be in \(0, 1\), got 1"):
        S.one_shot(img, None, None, cue, fg_quantile=1.0)
    with pytest.raises(ValueError, match="bg_quantile must be < fg_quantile"):
        S.one_shot(img, None, None, cue, fg_quantile=0.5, bg_quantile=0.6)
    with pytest.raises(ValueError, match="iterations must be >= 1, got 0"):
        S.one_shot(img, None, None, cue, iterations=0)
    with pytest.raises(ValueError, match="negative_support must be None when attention is a precomputed map"):
        S.one_shot(img, None, None, cue, negative_support=img)
    with pytest.raises(ValueError, match=r"support_image must have shape \(3, 64, 64\), got \(3, 32, 32\)"):
        S.one_shot(img, img[:, :32, :32], None, lambda t, s: cue)
    with pytest.raises(TypeError, match="support_image must be a torch.Tensor, got NoneType"):
        S.one_shot(img, None, None, lambda t, s: cue)
    with pytest.raises(ValueError, match="contrast must be one of"):
        S.one_shot(img, img, None, lambda t, s: cue, contrast="ratio")
    with pytest.raises(ValueError, match="sim must be given when attention is None"):
        S.one_shot(img, img, None)
    with pytest.raises(ValueError, match=r"test_image must be finite"):
        S.one_shot(img * float("nan"), None, None, cue)


def test_missing_opencv_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    img, _ = _scene()
    with pytest.raises(ImportError, match=r'pip install "whymatch\[segment\]"'):
        S.one_shot(img, None, None, _blob_cue())


# ------------------------------------------------------------------ device

@pytest.mark.parametrize("device", devices())
def test_output_on_the_test_images_device(device):
    img, disc = _scene()
    img = img.to(device)
    cue = _blob_cue().to(device)
    mask = S.one_shot(img, None, None, cue)
    assert mask.device.type == torch.device(device).type and mask.dtype == torch.bool
    assert S.threshold_cue(cue).device == mask.device
    assert S.center_box(img).device == mask.device
    assert S.iou(mask, disc.to(device)).device == mask.device


# ------------------------------------------------------------------ shipped model on ShapesWorld

@pytest.fixture(scope="module")
def shapes():
    from whymatch.models import load_default_model

    sim = load_default_model()
    ds = ShapesWorld("test", n_samples=300, seed=5)
    ps = ds.pairs(8, 1, n_negatives=1, seed=1)
    items = []
    for qi, r, ng in zip(ps.query.tolist(), ps.references[:, 0].tolist(), ps.negatives[:, 0].tolist()):
        smp = ds.sample(qi)
        items.append((smp.image, ds[r][0], ds[ng][0], smp.key_mask))
    return sim, items


def test_shipped_model_one_way_beats_the_centre_box(shapes):
    from whymatch.saliency import SimilarityAttention

    sim, items = shapes
    sa = SimilarityAttention(sim, "layer4")
    tests, sups, negs, keys = (torch.stack(t) for t in zip(*items))
    cue1 = S.attention_cue(tests, sups, sim, sa)  # batched; one_shot then takes the precomputed maps
    cue2 = S.attention_cue(tests, sups, sim, sa, negative_supports=negs)
    one = [float(S.iou(S.one_shot(t, None, None, c), k)) for t, c, k in zip(tests, cue1, keys)]
    two = [float(S.iou(S.one_shot(t, None, None, c), k)) for t, c, k in zip(tests, cue2, keys)]
    box = [float(S.iou(S.center_box(t), k)) for t, k in zip(tests, keys)]
    assert np.mean(one) > np.mean(box), (one, box)
    assert np.mean(one) > 0.6 and np.mean(two) > 0.6, (one, two)


def test_shipped_model_default_attention_and_batched_cue(shapes):
    sim, items = shapes
    test, sup, neg, key = items[0]
    mask = S.one_shot(test, sup, sim)  # attention=None: SimilarityAttention at the last feature map
    assert mask.shape == key.shape
    tests = torch.stack([it[0] for it in items[:3]])
    sups = torch.stack([it[1] for it in items[:3]])
    cues = S.attention_cue(tests, sups, sim)
    assert cues.shape == (3, 96, 96) and float(cues.amin()) >= 0 and float(cues.amax()) <= 1
    assert torch.equal(S.one_shot(test, None, None, cues[0]), mask)


def test_evaluate_shapesworld_runs(shapes):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import segment_eval as E  # the benchmark harness (benchmarks/segment_eval.py)

    sim, _ = shapes
    res = E.evaluate_shapesworld(sim, 3, n_samples=300, seed=2, methods=("one_way", "all_foreground"))
    assert res["iou"]["one_way"].shape == (3,)
    assert torch.allclose(res["iou"]["all_foreground"], res["key_area"])
    with pytest.raises(ValueError, match="methods must be among"):
        E.evaluate_shapesworld(sim, 3, methods=("magic",))
