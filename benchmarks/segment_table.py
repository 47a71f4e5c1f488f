"""Low-shot segmentation on ShapesWorld: similarity attention + GrabCut (Zheng et al. 3.3) against baselines.

Protocol (benchmarks/segment_eval.py, evaluate_shapesworld): ``--queries`` test-split images
(ShapesWorld seed ``--seed``, 3000 samples), each with one support image of the
same class and, for 2-way, one negative support of another class, drawn with
``pairs(n, 1, n_negatives=1, seed=--seed)``. The shipped ShapesWorld model,
SimilarityAttention at ``layer4`` (siamese, positive pair). Every mask is scored
by IoU against the key object's ground-truth mask. Methods, all in one run:

- 1-way / 2-way: whymatch.segment.one_shot (2-way: triplet contrast, the default;
  and the 'difference' contrast);
- thresholded attention alone (no GrabCut): the foreground of GrabCut's initialisation;
- GrabCut from a centre box (the central 75 % of each side), no attention;
- all foreground (chance: IoU = key-object area fraction).

The GrabCut thresholds (fg_quantile 0.995, bg_quantile 0.02) were chosen on
train-split images (see whymatch/segment.py), not on these test images.
Seconds per image: the method's own work per image plus its share of the
batched attention computation, host clock, one process.

Usage::

    python benchmarks/segment_table.py                    # writes benchmarks/results/segment_shapesworld.{json,md}
    python benchmarks/segment_table.py --queries 20 --stem /tmp/quick
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common as C  # noqa: E402
import segment_eval as E  # noqa: E402
from whymatch import segment  # noqa: E402
from whymatch.models import load_default_model  # noqa: E402
from whymatch.saliency import SimilarityAttention  # noqa: E402

LABELS = {
    "one_way": "1-way: attention + GrabCut",
    "two_way": "2-way: triplet-contrast attention + GrabCut",
    "two_way_difference": "2-way: difference-contrast attention + GrabCut",
    "attention_threshold": "1-way attention thresholded (no GrabCut)",
    "two_way_threshold": "2-way attention thresholded (no GrabCut)",
    "center_box": "GrabCut from the centre box (no attention)",
    "all_foreground": "all foreground (chance)",
}


def markdown(data: dict) -> str:
    m = data["machine"]
    rows = []
    best = max(data["methods"], key=lambda k: data["methods"][k]["mean_iou"])
    for k, r in data["methods"].items():
        cell = f"{r['mean_iou']:.3f} ± {r['sem_iou']:.3f}"
        rows.append([LABELS[k], f"**{cell}**" if k == best else cell, C.fmt_s(r["sec_per_image"]),
                     str(r["fallbacks"]) if k in ("one_way", "two_way", "two_way_difference") else ""])
    lines = [
        "# Low-shot segmentation on ShapesWorld (similarity attention + GrabCut)",
        "",
        f"`python benchmarks/segment_table.py --queries {data['queries']} --seed {data['seed']}` on "
        f"{m.get('gpu') or m.get('cpu_model', '?')} ({m.get('device', 'cpu')}, {m.get('torch_threads')} threads), "
        f"torch {m.get('torch', '?')}, OpenCV {data['opencv']}, commit {str(m.get('git_commit'))[:10]}; "
        f"{data['total_s']:.0f} s in all.",
        f"{data['queries']} ShapesWorld test images ({data['image_size']} px, unseen classes), each with one "
        "same-class support and (2-way) one other-class negative support; shipped model, SimilarityAttention at "
        f"layer4; GrabCut {data['settings']['iterations']} iterations, fg_quantile "
        f"{data['settings']['fg_quantile']}, bg_quantile {data['settings']['bg_quantile']} (chosen on train-split "
        "images). IoU against the key-object mask; ± is the standard error over images. Bold: best.",
        "",
        C.md_table(["method", "mean IoU ↑", "s / image", "fallbacks"], rows),
        f"Mean key-object area: {data['mean_key_area']:.3f} of the image.",
        "",
        C.load_note(data),
    ]
    if data.get("note"):
        lines += [data["note"], ""]
    return "\n".join(lines)


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--stem", default=str(C.RESULTS / "segment_shapesworld"))
    ap.add_argument("--note", default="", help="a paragraph appended to the markdown")
    args = ap.parse_args()

    import cv2

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    machine = C.machine_info(device)
    t0 = time.perf_counter()
    sim = load_default_model(device)
    sa = SimilarityAttention(sim, "layer4", mode="siamese")
    # warm-up outside the timed evaluation: thread pools, allocator, OpenCV's first call
    E.evaluate_shapesworld(sim, 2, seed=args.seed + 1, attention=sa, iterations=args.iterations)
    res = E.evaluate_shapesworld(sim, args.queries, seed=args.seed, attention=sa, iterations=args.iterations)
    total = time.perf_counter() - t0
    n = args.queries
    methods = {}
    for k, v in res["iou"].items():
        methods[k] = {
            "label": LABELS[k],
            "mean_iou": float(v.mean()),
            "sem_iou": float(v.std() / n ** 0.5) if n > 1 else 0.0,
            "median_iou": float(v.median()),
            "frac_iou_above_0.5": float((v > 0.5).float().mean()),
            "sec_per_image": res["seconds"][k],
            "fallbacks": res["fallbacks"][k],
            "iou_all": v,
        }
    pairwise = {}
    for a, b in (("one_way", "center_box"), ("two_way", "center_box"), ("one_way", "attention_threshold"),
                 ("two_way", "one_way")):
        d = res["iou"][a] - res["iou"][b]
        pairwise[f"{a}-{b}"] = {"mean_diff": float(d.mean()), "sem_diff": float(d.std() / n ** 0.5),
                                "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}
    data = {
        "benchmark": "segment_shapesworld",
        "queries": n, "seed": args.seed, "image_size": 96, "split": "test", "n_samples": 3000,
        "settings": {"fg_quantile": segment.DEFAULT_FG_QUANTILE, "bg_quantile": segment.DEFAULT_BG_QUANTILE,
                     "iterations": args.iterations, "target_layer": "layer4", "center_box_margin": 0.125,
                     "two_way_contrast": "triplet (default 'auto')", "opencv_rng_seed": 0},
        "opencv": cv2.__version__,
        "torch": torch.__version__,
        "device": str(device),
        "mean_key_area": float(res["key_area"].mean()),
        "methods": methods,
        "paired_differences": pairwise,
        "indices": res["indices"],
        "total_s": total,
        "timing": "per image: own work + share of the batched attention; host clock; after a 2-query warm-up",
        "machine": machine,
        "load_at_end": C.system_load(),
        "note": args.note,
    }
    C.write_and_show(args.stem, data, markdown(data))


if __name__ == "__main__":
    main()
