"""Low-shot segmentation from similarity attention and GrabCut (Zheng et al., section 3.3).

Zheng et al. ("Towards Visually Explaining Similarity Models") segment a test
image from one support image of the same class, without a segmentation
network: the test image's similarity attention against the support image says
where the matching object is, and GrabCut turns that coarse cue into a mask
that follows the image's edges and colours. The text of that section could not
be retrieved while this module was written (only the abstract, which names
"low-shot semantic segmentation"), so the details below are whymatch's own
design, written down here; this module is their definition.

Protocol of :func:`one_shot`:

1. Cue. ``A+`` = attention of the test image in the Siamese pair (test, support)
   taken as a positive pair (:class:`whymatch.saliency.SimilarityAttention`,
   or any explainer / callable / precomputed map), min-max normalized to [0, 1].
   2-way (``negative_support`` given, an image of another class):

   - ``contrast='auto'`` (default): 'triplet' when the attention is computed by
     a SimilarityAttention (or ``attention=None``), else 'difference'.
   - ``contrast='difference'``: cue = relu(A+ - A-), renormalized,
     where A- is the normalized attention of the test image in the pair
     (test, negative_support), also taken as positive ("what of the test image
     looks like the other class"). Pixels that explain both matches cancel.
   - ``contrast='triplet'``: the test image's attention as the anchor of the
     triplet (test, support, negative_support), w = (1 - |fa - fp|) * |fa - fn|
     (:func:`whymatch.saliency.similarity_weights`): the model's own contrast
     of the two classes. Needs a SimilarityAttention (or ``attention=None``).

   On the train-split images above, 2-way IoU was 0.83 with 'triplet' and 0.66
   with 'difference': attention against another ShapesWorld class still lands
   largely on the test image's key object (the largest, most colourful one), so
   subtracting it removes part of the object.

2. GrabCut initialisation from the cue's quantiles over the image's pixels
   (q(p) = the p-quantile of the cue), with ``fg_quantile`` > ``bg_quantile``:

   ==================================  ==========
   cue value c                         label
   ==================================  ==========
   c >= q(fg_quantile)                 GC_FGD
   (q(fg) + q(bg)) / 2 <= c < q(fg)    GC_PR_FGD
   q(bg) <= c < (q(fg) + q(bg)) / 2    GC_PR_BGD
   c < q(bg)                           GC_BGD
   ==================================  ==========

   Defaults fg_quantile = 0.995, bg_quantile = 0.02 (at 96 x 96: 46 sure-foreground
   and 184 sure-background pixels); GrabCut decides the rest, starting from
   "probable foreground" where the cue is above the midpoint of the two
   thresholds. A layer4 attention map is a 12 x 12 map upsampled, broader
   than the object, so a few sure seeds at its peak and a soft prior elsewhere
   work better than a wide hard labelling: on 100 images of the *train* split
   (ShapesWorld seed 123, never the test images that the benchmark reports),
   1-way IoU was 0.51 with (0.95, 0.6), 0.60 with (0.98, 0.85), 0.72 with
   (0.99, 0.3) and 0.88 with (0.995, 0.02). ``bg_quantile=0`` leaves GC_BGD empty.

3. ``cv2.grabCut(..., GC_INIT_WITH_MASK)`` for ``iterations`` rounds on the
   image as uint8 BGR; the mask is the pixels labelled GC_FGD or GC_PR_FGD.

Degenerate cues never raise. A cue with no contrast (max - min <= 1e-12 of its
scale, e.g. an all-zero attention map) carries no location: GrabCut is
initialised with the centre box instead (:func:`center_box`, the no-attention
baseline). If GrabCut raises (OpenCV refuses a mask in which the foreground or
the background class is empty, or an image it cannot model), the result is the
initialisation's foreground (GC_FGD | GC_PR_FGD), i.e. the thresholded cue
(:func:`threshold_cue`), or the centre box itself when the cue was flat.
``return_details=True`` says which path was taken (``details['fallback']``).

OpenCV's k-means initialisation of the colour models draws from OpenCV's global
RNG, which has no getter: with ``seed`` (default 0) it is reseeded before each
GrabCut call so that results are reproducible (its previous state cannot be
restored); ``seed=None`` leaves it alone.

Needs OpenCV: ``pip install "whymatch[segment]"`` (opencv-python-headless).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _checks as V
from .similarity import SimilarityModel

__all__ = ["one_shot", "attention_cue", "init_mask", "threshold_cue", "center_box", "grabcut", "iou",
           "DEFAULT_FG_QUANTILE", "DEFAULT_BG_QUANTILE"]

#: Default quantile of the cue above which pixels are sure foreground (GC_FGD).
DEFAULT_FG_QUANTILE = 0.995
#: Default quantile of the cue below which pixels are sure background (GC_BGD).
DEFAULT_BG_QUANTILE = 0.02

_FLAT_EPS = 1e-12
_CONTRASTS = ("auto", "difference", "triplet")


def _cv2():
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in the tests
        raise ImportError('whymatch.segment needs OpenCV for GrabCut: pip install "whymatch[segment]" '
                          f"(opencv-python-headless); importing cv2 failed: {exc}") from exc
    return cv2


# ------------------------------------------------------------------ validation helpers

def _image(name: str, x: object) -> Tensor:
    x = V.tensor(name, x, ndim=3, dtypes=V.FLOAT_DTYPES, nonempty=True)
    if x.shape[0] != 3:
        raise ValueError(f"{name} must be a (3, H, W) RGB image, got shape {tuple(x.shape)}")
    return V.finite(name, x)


def _quantiles(fg_quantile: object, bg_quantile: object) -> tuple[float, float]:
    fq = V.real("fg_quantile", fg_quantile, low=0.0, high=1.0, open_low=True, open_high=True)
    bq = V.real("bg_quantile", bg_quantile, low=0.0, high=1.0, open_high=True)
    if bq >= fq:
        raise ValueError(f"bg_quantile must be < fg_quantile ({fq:g}), got {bq:g}")
    return fq, bq


def _normalize(m: Tensor) -> Tensor:
    """Per-map min-max to [0, 1] of (..., H, W); a flat map becomes all zeros."""
    m = m.float()
    lo = m.amin(dim=(-2, -1), keepdim=True)
    hi = m.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    scale = torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)
    ok = span > _FLAT_EPS * scale
    return torch.where(ok, (m - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(m))


def _is_flat(cue: Tensor) -> bool:
    span = float(cue.max() - cue.min())
    scale = max(abs(float(cue.max())), abs(float(cue.min())), 1.0)
    return not span > _FLAT_EPS * scale


def _to_bgr_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) float RGB in [0, 1] -> (H, W, 3) uint8 BGR, contiguous, on the host."""
    x = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy()[:, :, ::-1])


# ------------------------------------------------------------------ cue

def _explain(attention: Any, sim: SimilarityModel | None, test: Tensor, other: Tensor) -> Tensor:
    """(B, H, W) maps of the tests (B, 3, H, W), each against its own ``other`` image, as a positive pair."""
    from .saliency import SimilarityAttention

    if attention is None or isinstance(attention, SimilarityAttention):
        sa = attention if attention is not None else SimilarityAttention(sim, mode="siamese")
        if sa.mode != "siamese":
            raise ValueError(f"attention must be a SimilarityAttention in mode 'siamese', got mode {sa.mode!r}")
        dev = sa.sim.device
        return sa.attribute_tuples(test.to(dev), other.to(dev), positive=True)[0]
    maps = []
    for t, o in zip(test, other):
        if hasattr(attention, "attribute"):
            m = attention.attribute(t, o[None])
        elif callable(attention):
            m = attention(t, o)
        else:
            raise TypeError("attention must be None, a SimilarityAttention, an explainer with .attribute(query, "
                            f"references), a callable (test, support) -> (H, W) map, or a (H, W) tensor, got "
                            f"{type(attention).__name__}")
        m = V.tensor("attention(test, support)", m, ndim=(2, 3))
        if m.dim() == 3:
            if m.shape[0] != 1:
                raise ValueError(f"attention(test, support) must return one map (H, W) or (1, H, W), got shape "
                                 f"{tuple(m.shape)}")
            m = m[0]
        maps.append(m.detach().float())
    return torch.stack(maps)


def attention_cue(test_images: Tensor, support_images: Tensor, sim: SimilarityModel | None = None,
                  attention: Any = None, *, negative_supports: Tensor | None = None,
                  contrast: str = "auto") -> Tensor:
    """The segmentation cue of each test image: its similarity attention against its support (2-way: contrasted).

    See the module docstring for the 1-way cue and the two 2-way contrasts.

    Args:
        test_images: (3, H, W) or (B, 3, H, W) float images in [0, 1].
        support_images: same shape as ``test_images``: one same-class support per test image.
        sim: the SimilarityModel; needed when ``attention`` is None.
        attention: None (a SimilarityAttention in siamese mode at the model's last feature map),
            a SimilarityAttention, an explainer with ``.attribute(query, references) -> (K, H, W)``,
            or a callable ``(test (3, H, W), support (3, H, W)) -> (H, W)``.
        negative_supports: optional, same shape as ``test_images``: images of another class (2-way).
        contrast: 2-way only: 'auto', 'difference' (relu(A+ - A-)) or 'triplet' (triplet-mode attention).

    Returns:
        (H, W) or (B, H, W) float32 in [0, 1] on the test images' device (all zeros where the cue is flat).
    """
    single = isinstance(test_images, Tensor) and test_images.dim() == 3
    t = V.tensor("test_images", test_images, ndim=(3, 4), dtypes=V.FLOAT_DTYPES, nonempty=True)
    t = t[None] if single else t
    s = V.tensor("support_images", support_images, ndim=(3, 4), dtypes=V.FLOAT_DTYPES, nonempty=True)
    s = s[None] if s.dim() == 3 else s
    V.shape("support_images", s, (t.shape[0], 3, t.shape[2], t.shape[3]))
    V.shape("test_images", t, (None, 3, None, None))
    V.finite("test_images", t)
    V.finite("support_images", s)
    V.choice("contrast", contrast, _CONTRASTS)
    if attention is None and sim is None:
        raise ValueError("sim must be given when attention is None (the attention is computed from the model)")
    if attention is None and not isinstance(sim, SimilarityModel) and not isinstance(sim, torch.nn.Module):
        raise TypeError(f"sim must be a SimilarityModel, got {type(sim).__name__}")
    neg = None
    if negative_supports is not None:
        neg = V.tensor("negative_supports", negative_supports, ndim=(3, 4), dtypes=V.FLOAT_DTYPES, nonempty=True)
        neg = neg[None] if neg.dim() == 3 else neg
        V.shape("negative_supports", neg, tuple(t.shape))
        V.finite("negative_supports", neg)
    from .saliency import SimilarityAttention

    if contrast == "auto":
        contrast = "triplet" if attention is None or isinstance(attention, SimilarityAttention) else "difference"
    if neg is not None and contrast == "triplet":
        if attention is not None and not isinstance(attention, SimilarityAttention):
            raise ValueError("contrast='triplet' needs attention=None or a SimilarityAttention, got "
                             f"{type(attention).__name__}")
        base = attention if attention is not None else SimilarityAttention(sim, mode="siamese")
        tri = SimilarityAttention(base.sim, base.target_layers, mode="triplet", batch_size=base.batch_size)
        dev = tri.sim.device
        cue = _normalize(tri.attribute_tuples(t.to(dev), s.to(dev), neg.to(dev))[0].detach())
    else:
        pos = _normalize(_explain(attention, sim, t, s).detach())
        if neg is None:
            cue = pos
        else:
            negm = _normalize(_explain(attention, sim, t, neg).detach().to(pos.device))
            cue = _normalize((pos - negm).clamp_min(0))
    cue = cue.to(t.device)
    V.shape("attention map", cue, (t.shape[0], t.shape[2], t.shape[3]))
    return cue[0] if single else cue


# ------------------------------------------------------------------ GrabCut pieces

def init_mask(cue: Tensor, fg_quantile: float = DEFAULT_FG_QUANTILE,
              bg_quantile: float = DEFAULT_BG_QUANTILE) -> np.ndarray:
    """GrabCut initialisation (H, W) uint8 of GC_* labels from a cue's quantiles (table in the module docstring).

    Args:
        cue: (H, W) float map, larger = more likely foreground; finite.

    Returns:
        (H, W) uint8 numpy array with values cv2.GC_BGD (0), GC_FGD (1), GC_PR_BGD (2), GC_PR_FGD (3).
    """
    cv2 = _cv2()
    cue = V.finite("cue", V.tensor("cue", cue, ndim=2, nonempty=True))
    fq, bq = _quantiles(fg_quantile, bg_quantile)
    c = cue.detach().float().cpu()
    hi, lo = torch.quantile(c.flatten(), torch.tensor([fq, bq])).tolist()
    mid = 0.5 * (hi + lo)
    out = np.full(tuple(c.shape), cv2.GC_BGD, dtype=np.uint8)
    cn = c.numpy()
    out[cn >= lo] = cv2.GC_PR_BGD
    out[cn >= mid] = cv2.GC_PR_FGD
    out[cn >= hi] = cv2.GC_FGD
    return out


def threshold_cue(cue: Tensor, fg_quantile: float = DEFAULT_FG_QUANTILE,
                  bg_quantile: float = DEFAULT_BG_QUANTILE) -> Tensor:
    """The thresholded cue alone (no GrabCut): pixels that :func:`init_mask` labels GC_FGD or GC_PR_FGD.

    That is, cue >= (q(fg_quantile) + q(bg_quantile)) / 2. Returns (H, W) bool on the cue's device.
    """
    cv2 = _cv2()
    m = init_mask(cue, fg_quantile, bg_quantile)
    return torch.from_numpy((m == cv2.GC_FGD) | (m == cv2.GC_PR_FGD)).to(cue.device)


def _center_rect(h: int, w: int, margin: float) -> tuple[int, int, int, int]:
    mx, my = int(round(margin * w)), int(round(margin * h))
    return mx, my, max(1, w - 2 * mx), max(1, h - 2 * my)


def grabcut(image: Tensor, mask: np.ndarray | None = None, *, rect: tuple[int, int, int, int] | None = None,
            iterations: int = 5, seed: int | None = 0) -> np.ndarray:
    """cv2.grabCut on a (3, H, W) float image in [0, 1], from a GC_* mask or a rectangle (x, y, w, h).

    Raises cv2.error as OpenCV does (e.g. when the initialisation has no background or no
    foreground pixel); :func:`one_shot` catches it. Returns the (H, W) bool numpy foreground.
    """
    cv2 = _cv2()
    img = _to_bgr_uint8(image)
    bgd = np.zeros((1, 65), np.float64)
    fgd = np.zeros((1, 65), np.float64)
    if seed is not None:
        cv2.setRNGSeed(int(seed))
    if mask is not None:
        m = np.ascontiguousarray(mask, dtype=np.uint8).copy()
        m, _, _ = cv2.grabCut(img, m, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    else:
        m = np.zeros(img.shape[:2], np.uint8)
        m, _, _ = cv2.grabCut(img, m, rect, bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
    return (m == cv2.GC_FGD) | (m == cv2.GC_PR_FGD)


def center_box(test_image: Tensor, *, margin: float = 0.125, iterations: int = 5, seed: int | None = 0) -> Tensor:
    """Baseline without attention: GrabCut initialised with the centre box (``margin`` of each side left out).

    At 96 x 96 and margin 0.125 the box is the central 72 x 72 pixels. If GrabCut raises
    (e.g. a uniform image), the box itself is returned.

    Returns:
        (H, W) bool on the image's device.
    """
    cv2 = _cv2()
    x = _image("test_image", test_image)
    V.real("margin", margin, low=0.0, high=0.5, open_high=True)
    V.positive_int("iterations", iterations)
    h, w = x.shape[1:]
    rect = _center_rect(h, w, margin)
    try:
        fg = grabcut(x, rect=rect, iterations=iterations, seed=seed)
    except cv2.error:
        fg = np.zeros((h, w), bool)
        fg[rect[1]:rect[1] + rect[3], rect[0]:rect[0] + rect[2]] = True
    return torch.from_numpy(fg).to(x.device)


# ------------------------------------------------------------------ the method

def one_shot(test_image: Tensor, support_image: Tensor | None, sim: SimilarityModel | None,
             attention: Any = None, *, negative_support: Tensor | None = None,
             fg_quantile: float = DEFAULT_FG_QUANTILE, bg_quantile: float = DEFAULT_BG_QUANTILE,
             iterations: int = 5, contrast: str = "auto", seed: int | None = 0,
             return_details: bool = False) -> Tensor | tuple[Tensor, dict]:
    """Segment the test image's object that matches a support image (1-way; 2-way with a negative support).

    Protocol, thresholds and fallbacks: see the module docstring.

    Args:
        test_image: (3, H, W) float RGB in [0, 1].
        support_image: (3, H, W) float RGB in [0, 1], an image of the class to segment (ignored,
            may be None, when ``attention`` is a precomputed map).
        sim: the SimilarityModel (may be None when ``attention`` is given as a map or an explainer
            or a callable).
        attention: None (SimilarityAttention, siamese, positive pair, the model's last feature map),
            a SimilarityAttention, an explainer with ``.attribute(query, references)``, a callable
            ``(test, support) -> (H, W)``, or a precomputed (H, W) cue (larger = foreground; any scale).
        negative_support: optional (3, H, W) image of another class: 2-way segmentation.
        fg_quantile: cue quantile in (0, 1) above which pixels are sure foreground.
        bg_quantile: cue quantile in [0, fg_quantile) below which pixels are sure background.
        iterations: GrabCut iterations.
        contrast: 2-way cue: 'auto', 'difference' or 'triplet'.
        seed: OpenCV RNG seed for GrabCut's colour-model initialisation (None: leave it alone).
        return_details: also return a dict with 'cue' (H, W) in [0, 1], 'init' (H, W) uint8 GC_* labels
            (None when the centre box was used) and 'fallback' (None, 'flat_cue' or 'grabcut_error').

    Returns:
        (H, W) bool mask on the test image's device (and the details dict).
    """
    cv2 = _cv2()
    x = _image("test_image", test_image)
    fq, bq = _quantiles(fg_quantile, bg_quantile)
    V.positive_int("iterations", iterations)
    V.choice("contrast", contrast, _CONTRASTS)
    h, w = x.shape[1:]
    if isinstance(attention, Tensor):
        if negative_support is not None:
            raise ValueError("negative_support must be None when attention is a precomputed map (pass the 2-way cue "
                             "itself, e.g. from attention_cue(..., negative_supports=...))")
        cue = V.finite("attention", V.tensor("attention", attention, ndim=2, nonempty=True))
        V.shape("attention", cue, (h, w))
        cue = _normalize(cue.detach().float())
    else:
        s = _image("support_image", support_image)
        V.shape("support_image", s, (3, h, w))
        neg = None
        if negative_support is not None:
            neg = _image("negative_support", negative_support)
            V.shape("negative_support", neg, (3, h, w))
        cue = attention_cue(x, s, sim, attention, negative_supports=neg, contrast=contrast)
    cue = cue.to(x.device)
    details: dict[str, Any] = {"cue": cue, "init": None, "fallback": None}
    if _is_flat(cue):
        details["fallback"] = "flat_cue"
        out = center_box(x, iterations=iterations, seed=seed)
    else:
        init = init_mask(cue, fq, bq)
        details["init"] = init
        try:
            fg = grabcut(x, init, iterations=iterations, seed=seed)
        except cv2.error:
            details["fallback"] = "grabcut_error"
            fg = (init == cv2.GC_FGD) | (init == cv2.GC_PR_FGD)
        out = torch.from_numpy(fg).to(x.device)
    return (out, details) if return_details else out


# ------------------------------------------------------------------ scoring

def iou(pred: Tensor, target: Tensor) -> Tensor:
    """Intersection over union of boolean masks, (H, W) -> () or (B, H, W) -> (B,), float32.

    Two empty masks agree perfectly: their IoU is 1.
    """
    p = V.tensor("pred", pred, ndim=(2, 3), dtypes=(torch.bool,))
    t = V.tensor("target", target, ndim=(2, 3), dtypes=(torch.bool,), device=p.device)
    V.shape("target", t, tuple(p.shape))
    inter = (p & t).sum(dim=(-2, -1)).float()
    union = (p | t).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
