"""The low-shot segmentation protocol on ShapesWorld (the harness behind benchmarks/segment_table.py).

Scores :func:`whymatch.segment.one_shot` and its baselines against the key objects of ShapesWorld images,
whose true masks are known. Kept out of the library: it measures whymatch, it is not part of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from whymatch import _checks, segment as S
from whymatch.similarity import SimilarityModel

#: Methods that :func:`evaluate_shapesworld` can score.
EVAL_METHODS = ("one_way", "two_way", "two_way_difference", "attention_threshold", "two_way_threshold",
                "center_box", "all_foreground")


def evaluate_shapesworld(sim: SimilarityModel, n_queries: int = 200, *, split: str = "test", n_samples: int = 3000,
                         seed: int = 0, methods: Sequence[str] = EVAL_METHODS, attention: Any = None,
                         fg_quantile: float = S.DEFAULT_FG_QUANTILE, bg_quantile: float = S.DEFAULT_BG_QUANTILE,
                         iterations: int = 5, hard_negatives: bool = False,
                         timer: Callable[[], float] | None = None) -> dict[str, Any]:
    """Run the low-shot protocol on ShapesWorld images and score each method's masks against the key objects.

    Each query (``ShapesWorld(split, n_samples, seed=seed).pairs(n_queries, 1, n_negatives=1, seed=seed)``)
    gets one same-class support and one other-class negative support. Methods:

    - 'one_way': :func:`whymatch.segment.one_shot` with the support;  'two_way': with the negative too (contrast 'auto');
      'two_way_difference': 2-way with ``contrast='difference'``;
    - 'attention_threshold' / 'two_way_threshold': :func:`whymatch.segment.threshold_cue` of the 1-way / 2-way cue, no GrabCut;
    - 'center_box': :func:`whymatch.segment.center_box`;  'all_foreground': every pixel (chance).

    Attention maps are computed in batches (one :func:`whymatch.segment.attention_cue` call per cue type)
    and passed to :func:`whymatch.segment.one_shot` as precomputed maps; the per-image seconds of a method
    are its share of the batched cue time plus its own GrabCut time.

    Returns:
        dict with 'iou' {method: (N,) float32}, 'seconds' {method: mean seconds per image},
        'fallbacks' {method: count of fallback paths taken}, 'key_area' (N,) key-object area
        fractions, and 'indices' {'query', 'support', 'negative'} (N,) int64.
    """
    import time

    from whymatch.data import ShapesWorld

    unknown = [m for m in methods if m not in EVAL_METHODS]
    if unknown:
        raise ValueError(f"methods must be among {', '.join(EVAL_METHODS)}, got {unknown}")
    _checks.positive_int("n_queries", n_queries)
    clock = timer or time.perf_counter
    ds = ShapesWorld(split, n_samples=n_samples, seed=seed)
    ps = ds.pairs(n_queries, 1, n_negatives=1, hard_negatives=hard_negatives, seed=seed)
    samples = [ds.sample(int(i)) for i in ps.query]
    dev = sim.device
    tests = torch.stack([smp.image for smp in samples]).to(dev)
    keys = torch.stack([smp.key_mask for smp in samples])
    sup = ds.images(ps.references[:, 0]).to(dev)
    neg = ds.images(ps.negatives[:, 0]).to(dev)
    n = len(samples)
    cues: dict[str, Tensor] = {}
    cue_secs: dict[str, float] = {}

    def cue(kind: str) -> Tensor:
        if kind not in cues:
            t0 = clock()
            if kind == "one":
                cues[kind] = S.attention_cue(tests, sup, sim, attention)
            elif kind == "two":
                cues[kind] = S.attention_cue(tests, sup, sim, attention, negative_supports=neg)
            else:
                cues[kind] = S.attention_cue(tests, sup, sim, attention, negative_supports=neg, contrast="difference")
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            cue_secs[kind] = (clock() - t0) / n
        return cues[kind]

    which_cue = {"one_way": "one", "two_way": "two", "two_way_difference": "diff", "attention_threshold": "one",
                 "two_way_threshold": "two"}
    out_iou: dict[str, Tensor] = {}
    secs: dict[str, float] = {}
    fallbacks: dict[str, int] = {}
    for m in methods:
        c = cue(which_cue[m]) if m in which_cue else None
        masks, nfb = [], 0
        t0 = clock()
        for i in range(n):
            x = tests[i]
            if m in ("one_way", "two_way", "two_way_difference"):
                pm, det = S.one_shot(x, None, None, c[i], fg_quantile=fg_quantile, bg_quantile=bg_quantile,
                                   iterations=iterations, return_details=True)
                nfb += det["fallback"] is not None
            elif m in ("attention_threshold", "two_way_threshold"):
                pm = S.threshold_cue(c[i], fg_quantile, bg_quantile)
            elif m == "center_box":
                pm = S.center_box(x, iterations=iterations)
            else:
                pm = torch.ones(x.shape[1:], dtype=torch.bool, device=x.device)
            masks.append(pm.cpu())
        secs[m] = (clock() - t0) / n + (cue_secs[which_cue[m]] if m in which_cue else 0.0)
        fallbacks[m] = nfb
        out_iou[m] = S.iou(torch.stack(masks), keys)
    return {"iou": out_iou, "seconds": secs, "fallbacks": fallbacks,
            "key_area": keys.float().mean(dim=(1, 2)),
            "indices": {"query": ps.query, "support": ps.references[:, 0], "negative": ps.negatives[:, 0]}}
