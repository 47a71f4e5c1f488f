"""Every saliency method on the same ShapesWorld test pairs: causal metrics, ground truth, and cost.

Protocol (SANE, Plummer et al. 2020, Tables 1 and 3, on ShapesWorld where the
true explanation is known):

- Pairs: ``--queries`` ShapesWorld test queries x ``--refs`` same-class references
  (``ShapesWorld('test').pairs(...)``, seed 0), explained with the shipped model
  (``whymatch.models.load_default_model``: test-class Recall@1 0.951). Both images
  of a positive pair contain the same key object; distractors differ.
- Insertion / deletion AUC (SANE Table 1): 101 thresholds (1 % of the pixels per
  step) in descending saliency order; the substrate is a constant grey (0.5 in
  image space, SANE's AwA choice) for both curves; each pair's curve is min-max
  normalized; AUC by the trapezoid rule, reported x100. Higher insertion and
  lower deletion are better.
- Ground truth: pointing game (is the map's maximum on the key object?) and the
  share of saliency mass on the key object (map shifted to min 0); chance = the
  key object's share of the image.
- Seconds: wall time of ``attribute(query, K references)`` per query, median
  over the queries after one warm-up call, divided by K for the per-pair column
  (SANE Table 3 reports seconds per explanation). Fixed-reference RISE, LIME and
  sliding window explain K references for the price of one, so their per-pair
  cost falls with K; the gradient methods grow with K. Mask is timed as a
  production job would run it: all pairs optimized 100 at a time
  (``attribute_pairs``), total time / pairs.

Each method is run with its published settings scaled to 96 x 96 images:
RISE N=2000, s=8, p=0.5 (SANE); sliding window 24 px, stride 3 (SANE's 32 px of
112, stride 4, scaled); LIME 1000 samples on SLIC superpixels; Mask 500 Adam
steps on a 14 x 14 mask (SANE); the gradient methods at ``layer4``.

Usage::

    python benchmarks/saliency_table.py                 # writes benchmarks/results/saliency_table.{json,md}
    python benchmarks/saliency_table.py --queries 10 --methods rise,attention --stem /tmp/quick

Completed methods are cached in ``<stem>.partial.json`` (git-ignored) so that an
interrupted run resumes where it stopped and methods can be added to a table
later (``--fresh`` ignores the cache).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common as C  # noqa: E402
from whymatch import metrics, saliency  # noqa: E402
from whymatch.data import ShapesWorld  # noqa: E402
from whymatch.models import load_default_model  # noqa: E402

SUBSTRATE_GREY = 0.5
N_STEPS = 100


def configs(batch_size: int) -> dict[str, tuple[str, dict, object]]:
    """name -> (label, settings, factory(sim) -> explainer)."""
    rise = dict(n_masks=2000, grid=8, p=0.5, batch_size=batch_size, seed=0)
    slide = dict(window=24, stride=3, batch_size=batch_size)
    lime = dict(n_samples=1000, segments="slic", batch_size=batch_size, seed=0)
    mask = dict(n_iter=500, seed=0, batch_size=100)
    return {
        "rise": ("RISE", rise, lambda s: saliency.RISE(s, **rise)),
        "rise_both": ("RISE (both images)", {**rise, "n_reference_masks": 30},
                      lambda s: saliency.RISE(s, fixed_reference=False, n_reference_masks=30, **rise)),
        "sliding": ("Sliding window", slide, lambda s: saliency.SlidingWindow(s, **slide)),
        "sliding_both": ("Sliding window (both images)", slide,
                         lambda s: saliency.SlidingWindow(s, fixed_reference=False, **slide)),
        "lime": ("LIME", lime, lambda s: saliency.LIME(s, **lime)),
        "mask": ("Mask", mask, lambda s: saliency.Mask(s, **mask)),
        "mask_both": ("Mask (both images)", mask, lambda s: saliency.Mask(s, fixed_reference=False, **mask)),
        "attention": ("SimilarityAttention", {"target_layers": "layer4", "mode": "siamese"},
                      lambda s: saliency.SimilarityAttention(s, "layer4", mode="siamese")),
        "gradcam": ("EmbeddingGradCAM", {"target_layers": "layer4"},
                    lambda s: saliency.EmbeddingGradCAM(s, "layer4")),
    }


def load_pairs(n_queries: int, n_refs: int, device: torch.device):
    ds = ShapesWorld("test", n_samples=3000, seed=0)
    ps = ds.pairs(n_queries, n_refs, seed=0)
    out = []
    for qi, refs in zip(ps.query.tolist(), ps.references):
        smp = ds.sample(qi)
        out.append((smp.image.to(device), torch.stack([ds[int(r)][0] for r in refs]).to(device),
                    smp.key_mask.to(device)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def explain_all(explainer, pairs) -> tuple[list[torch.Tensor], list[float]]:
    """Maps of every pair and the seconds per query (see the module docstring for the protocol)."""
    k = pairs[0][1].shape[0]
    if isinstance(explainer, saliency.Mask):  # optimized in batches of pairs, as a job would run it
        queries = torch.cat([q[None].expand(r.shape[0], -1, -1, -1) for q, r, _ in pairs])
        refs = torch.cat([r for _, r, _ in pairs])
        warm = copy.copy(explainer)
        warm.n_iter = 2
        warm.attribute_pairs(queries[:2], refs[:2])  # warm-up (2 steps)
        t0 = time.perf_counter()
        maps = [explainer.attribute_pairs(queries, refs)]
        _sync(queries.device)
        return maps, [(time.perf_counter() - t0) / queries.shape[0] * k]  # one query's share
    explainer.attribute(pairs[0][0], pairs[0][1])  # warm-up: thread pools, allocator, lazy layer lookup
    maps, secs = [], []
    for q, r, _ in pairs:
        t0 = time.perf_counter()
        m = explainer.attribute(q, r)
        _sync(q.device)
        secs.append(time.perf_counter() - t0)
        maps.append(m.detach().float())
    return maps, secs


def run_method(sim, explainer, pairs, batch_size: int) -> dict:
    """Explain every pair, time it, score it."""
    k = pairs[0][1].shape[0]
    queries = torch.cat([q[None].expand(r.shape[0], -1, -1, -1) for q, r, _ in pairs])
    refs = torch.cat([r for _, r, _ in pairs])
    batched = isinstance(explainer, saliency.Mask)
    maps, secs = explain_all(explainer, pairs)
    keys = torch.cat([km[None].expand(r.shape[0], -1, -1) for _, r, km in pairs])
    sal = torch.cat(maps)
    res = metrics.insertion_deletion(sim, queries, refs, sal, mode="both", substrate=SUBSTRATE_GREY,
                                     n_steps=N_STEPS, batch_size=batch_size)
    point = metrics.pointing_game(sal, keys).float()
    mass = metrics.mass_on_mask(sal, keys)
    n = sal.shape[0]

    def sem(x: torch.Tensor) -> float:
        return float(x.float().std() / n ** 0.5) if n > 1 else 0.0

    return {
        "pairs": n,
        "insertion_auc": 100 * float(res.insertion.auc.mean()), "insertion_sem": 100 * sem(res.insertion.auc),
        "deletion_auc": 100 * float(res.deletion.auc.mean()), "deletion_sem": 100 * sem(res.deletion.auc),
        "pointing_acc": float(point.mean()), "pointing_sem": sem(point),
        "mass_on_key": float(mass.mean()), "mass_sem": sem(mass),
        "sec_per_query": statistics.median(secs), "sec_per_pair": statistics.median(secs) / k,
        "sec_per_query_all": secs,
        "timing": ("attribute_pairs over all pairs in batches of the explainer's batch_size; per query = "
                   "per pair x K") if batched else "median over queries of attribute(query, K references)",
        "finite_maps": bool(torch.isfinite(sal).all()),
    }


def winners(rows: dict[str, dict]) -> dict[str, str]:
    cols = {"insertion_auc": max, "deletion_auc": min, "pointing_acc": max, "mass_on_key": max, "sec_per_pair": min}
    return {c: f(rows, key=lambda m: rows[m][c]) for c, f in cols.items()}


def markdown(data: dict) -> str:
    rows, labels = data["methods"], data["labels"]
    win = winners(rows)
    head = ["method", "insertion AUC ↑", "deletion AUC ↓", "pointing ↑", "mass on key ↑", "s / query", "s / pair"]
    body = []
    for m, r in rows.items():
        def cell(c, v):
            s = v
            return f"**{s}**" if win.get(c) == m else s
        body.append([labels[m],
                     cell("insertion_auc", f"{r['insertion_auc']:.1f} ± {r['insertion_sem']:.1f}"),
                     cell("deletion_auc", f"{r['deletion_auc']:.1f} ± {r['deletion_sem']:.1f}"),
                     cell("pointing_acc", f"{r['pointing_acc']:.3f}"),
                     cell("mass_on_key", f"{r['mass_on_key']:.3f}"),
                     f"{r['sec_per_query']:.3f}", cell("sec_per_pair", f"{r['sec_per_pair']:.3f}")])
    body.append(["chance (key-object area)", "", "", f"{data['chance']:.3f}", f"{data['chance']:.3f}", "", ""])
    m = data["machine"]
    skipped = [f"{labels[k]} ({v})" for k, v in data.get("skipped", {}).items()]
    lines = [
        "# Saliency methods on ShapesWorld (ground truth known)",
        "",
        f"`python benchmarks/saliency_table.py --queries {data['queries']} --refs {data['refs']}` on "
        f"{m.get('gpu') or m.get('cpu_model', '?')} ({m.get('device', 'cpu')}, {m.get('torch_threads')} threads), "
        f"torch {m.get('torch', '?')}, commit {str(m.get('git_commit'))[:10]}.",
        f"{data['queries']} test queries x {data['refs']} same-class references = {data['pairs']} pairs, shipped "
        "ShapesWorld model (cosine). Insertion/deletion: SANE protocol (101 thresholds, grey substrate, per-pair "
        "min-max, x100). ± is the standard error over pairs. Bold: best in the column.",
        "",
        C.md_table(head, body),
        "",
        *([f"Skipped: {'; '.join(skipped)}.", ""] if skipped else []),
        "## Which method wins which column",
        "",
    ]
    for c, name in (("insertion_auc", "insertion AUC"), ("deletion_auc", "deletion AUC"),
                    ("pointing_acc", "pointing game"), ("mass_on_key", "saliency mass on the key object"),
                    ("sec_per_pair", "seconds per pair")):
        lines.append(f"- {name}: {labels[win[c]]}")
    quality = ("insertion_auc", "deletion_auc", "pointing_acc", "mass_on_key")
    if "rise" in rows:
        won = [c for c in quality if win[c] == "rise"]
        lines += ["", "## Against SANE's finding",
                  "",
                  "SANE (Table 1) found fixed-reference RISE the best saliency method for similarity overall. "
                  f"Here fixed-reference RISE is best on {len(won)} of the 4 quality columns"
                  + (f" ({', '.join(won)})." if won else ".")]
        ranks = {}
        for c in quality:
            order = sorted(rows, key=lambda k: rows[k][c], reverse=(c != "deletion_auc"))
            ranks[c] = order.index("rise") + 1
        lines.append("Its rank per column (1 = best of " + str(len(rows)) + "): "
                     + ", ".join(f"{c} {ranks[c]}" for c in quality) + ".")
    if data.get("retimed"):
        rt = data["retimed"]
        lines += ["", f"Seconds re-timed on the first {rt['queries']} queries with `--retime {rt['queries']}` "
                      f"on an otherwise idle machine ({rt['date_utc']}); the quality columns come from the full run."]
    if data.get("note"):
        lines += ["", data["note"]]
    return "\n".join(lines) + "\n"


def retime(args) -> None:
    data = json.loads(Path(args.stem + ".json").read_text())
    device = torch.device(data["machine"]["device"])
    sim = load_default_model(device)
    pairs = load_pairs(data["queries"], data["refs"], device)[:args.retime]
    cfgs = configs(args.batch_size)
    load = C.system_load()
    for name, row in data["methods"].items():
        _, secs = explain_all(cfgs[name][2](sim), pairs)
        row["sec_per_query"] = statistics.median(secs)
        row["sec_per_pair"] = row["sec_per_query"] / data["refs"]
        row["sec_per_query_all"] = secs
        print(f"{name}: {row['sec_per_query']:.3f} s/query", flush=True)
    data["retimed"] = {"queries": args.retime, "load_at_start": load, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                             time.gmtime())}
    data["winners"] = winners(data["methods"])
    C.write_results(args.stem, data, markdown(data))
    print(Path(args.stem + ".md").read_text())


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--refs", type=int, default=3)
    ap.add_argument("--methods", default="all", help="comma-separated names of configs(), or 'all'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--stem", default=str(C.RESULTS / "saliency_table"))
    ap.add_argument("--fresh", action="store_true", help="ignore the partial results of an earlier run")
    ap.add_argument("--note", default="", help="a paragraph appended to the markdown")
    ap.add_argument("--render", action="store_true", help="only rewrite <stem>.md from <stem>.json (with --note)")
    ap.add_argument("--retime", type=int, default=0, metavar="Q",
                    help="only re-time the methods of <stem>.json on its first Q queries (run on an idle "
                         "machine: the quality columns of a long run stay valid when the machine was shared, "
                         "its timings do not) and rewrite the results")
    args = ap.parse_args()
    if args.retime:
        retime(args)
        return
    if args.render:
        data = json.loads(Path(args.stem + ".json").read_text())
        if args.note:
            data["note"] = args.note
        C.write_results(args.stem, data, markdown(data))
        print(Path(args.stem + ".md").read_text())
        return

    device = torch.device(args.device)
    cfgs = configs(args.batch_size)
    names = list(cfgs) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in names if m not in cfgs]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(cfgs)}")
    torch.manual_seed(0)
    sim = load_default_model(device)
    pairs = load_pairs(args.queries, args.refs, device)
    chance = float(metrics.chance_level(torch.stack([km for _, _, km in pairs])).mean())

    partial = Path(args.stem + ".partial.json")
    key = {"queries": args.queries, "refs": args.refs, "device": str(device)}
    done: dict[str, dict] = {}
    if partial.is_file() and not args.fresh:
        old = json.loads(partial.read_text())
        if old.get("key") == key:
            done = old["methods"]
    skipped: dict[str, str] = {}
    for name in names:
        if name in done:
            print(f"{name}: cached in {partial}")
            continue
        label, settings, factory = cfgs[name]
        t0 = time.perf_counter()
        try:
            explainer = factory(sim)
            row = run_method(sim, explainer, pairs, args.batch_size)
        except ImportError as exc:  # e.g. LIME's superpixels without scikit-image
            print(f"{name}: skipped ({exc})")
            skipped[name] = str(exc)
            continue
        row["settings"] = settings
        row["total_s"] = time.perf_counter() - t0
        done[name] = row
        C.atomic_write_text(partial, json.dumps({"key": key, "methods": done}, indent=1) + "\n")
        print(f"{name}: ins {row['insertion_auc']:.1f} del {row['deletion_auc']:.1f} point {row['pointing_acc']:.3f} "
              f"mass {row['mass_on_key']:.3f} {row['sec_per_query']:.3f} s/query ({row['total_s']:.0f} s total)",
              flush=True)

    rows = {n: done[n] for n in names if n in done}
    data = {
        "benchmark": "saliency_table",
        "queries": args.queries, "refs": args.refs, "pairs": args.queries * args.refs,
        "protocol": {"n_steps": N_STEPS, "substrate": SUBSTRATE_GREY, "normalize": "minmax", "auc_scale": 100,
                     "timing": "median over queries of attribute(query, K refs), one warm-up call"},
        "chance": chance,
        "labels": {n: cfgs[n][0] for n in names},
        "skipped": skipped,
        "methods": rows,
        "winners": winners(rows),
        "machine": C.machine_info(device),
        "note": args.note,
    }
    C.write_and_show(args.stem, data, markdown(data))


if __name__ == "__main__":
    main()
