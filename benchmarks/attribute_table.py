"""SANE attribute explanations on ShapesWorld against baselines (the layout of SANE's Table 2).

Protocol. The shipped ShapesWorld similarity model is explained. Positive pairs come from the
test split (unseen classes): a query and one same-class reference, drawn with
``ShapesWorld.pairs``. Their RISE saliency maps are computed once and shared by every method.
Pairs are split in two: ``--held-out`` pairs choose SANE's weights phi (grid search against the
attribute deletion metric, as the paper does), the other ``--pairs`` pairs are scored.

Attributes: ShapesWorld's 18 binary attributes (shape, colour, pattern, size of any object in the
image). Ground truth for a pair: the attributes its two KEY objects share (at least shape, colour
and pattern, which define the class). Top-1 accuracy = the chosen attribute is one of them.

Two attribute models, same trunk, data, seed and schedule (``whymatch.attributes.train``):
with saliency matching (lambda = ``--lam``) and without (lambda = 0, a plain attribute
classifier). The TCAV prior is fitted on train-split embeddings and scored on test triplets
(``hinge=False``: with a margin of machine epsilon, the hinged loss is flat on almost every
nearest-positive triplet, so the hinged score would be 0 for every attribute).

Rows:
- random attribute (uniform over the 18);
- TCAV alone (the attribute with the highest TCAV score, the same for every pair);
- attribute classifier: the plain model's most confident attribute for the query;
- SANE w/o map matching: the plain model with all three terms, phi fitted;
- SANE w/o TCAV: the matching model, phi3 = 0, phi fitted;
- SANE: the matching model, all three terms, phi fitted.

Columns: attribute recognition mAP of the model on test images, attribute deletion and insertion
(``whymatch.metrics.attributes.attribute_insertion_deletion``, database = the test images), and
top-1 accuracy against the key-object ground truth.

Usage::

    python benchmarks/attribute_table.py                 # writes benchmarks/results/attribute_table.{json,md}
    python benchmarks/attribute_table.py --quick --out /tmp/attr
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common as C  # noqa: E402
from whymatch.attributes.explain import SANE, phi_grid, rank_scores  # noqa: E402
from whymatch.attributes.tcav import TCAV  # noqa: E402
from whymatch.data import ShapesWorld  # noqa: E402
from whymatch.data.shapesworld import ATTRIBUTE_NAMES  # noqa: E402
from whymatch.metrics.attributes import attribute_insertion_deletion, mean_average_precision  # noqa: E402
from whymatch.models import load_default_model  # noqa: E402
from whymatch.saliency import RISE  # noqa: E402

ROWS = {
    "random": "random attribute",
    "tcav": "TCAV alone",
    "classifier": "attribute classifier (no saliency matching)",
    "sane_no_matching": "SANE w/o map matching (plain model, a + cos + TCAV)",
    "sane_no_tcav": "SANE w/o TCAV (matching model, a + cos)",
    "sane": "SANE (matching model, a + cos + TCAV)",
}


def train_attribute_model(args, lam: float, out: Path):
    """Train one ShapesWorld attribute model with ``whymatch.attributes.train`` (the settings of
    scripts/train_shapesworld_attributes.py); returns (best-by-validation-mAP model, seconds, best mAP).
    A second run with the same settings reuses the saliency cache under ``out/saliency``."""
    from whymatch.attributes import load_attribute_model
    from whymatch.attributes.train import SANEConfig, train_sane

    cfg = SANEConfig(data="shapesworld", backbone="shapes", out=str(out), epochs=args.epochs, batch_size=32,
                     lam=lam, temperature=0.05, n_train=args.n_train, n_val=args.n_val, n_masks=args.train_masks,
                     seed=args.seed, device="cpu", show_progress=args.progress, overwrite=True)
    t0 = time.perf_counter()
    trainer = train_sane(cfg)
    return load_attribute_model(out / "best.pt"), time.perf_counter() - t0, trainer.best_map


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--pairs", type=int, default=160, help="scored pairs")
    ap.add_argument("--held-out", type=int, default=80, help="pairs that choose phi")
    ap.add_argument("--n-test", type=int, default=1500, help="test images (database of the metrics)")
    ap.add_argument("--n-tcav", type=int, default=2000, help="train images that fit the CAVs")
    ap.add_argument("--n-masks", type=int, default=500, help="RISE masks per explained pair")
    ap.add_argument("--n-train", type=int, default=1500, help="attribute-model training images")
    ap.add_argument("--n-val", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--train-masks", type=int, default=100, help="RISE masks per training saliency map")
    ap.add_argument("--lam", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/.work/attribute_table"),
                    help="training outputs and the saliency cache (reused by a second run)")
    ap.add_argument("--train-matching", action="store_true",
                    help="train the saliency-matching model here too instead of loading the shipped one")
    ap.add_argument("--write-phi", type=Path, default=None,
                    help="write the fitted SANE phi here (JSON) for the demo: "
                         "python/whymatch/models/weights/shapesworld_sane.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", type=Path, default=C.RESULTS / "attribute_table")
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs, args.held_out, args.n_test, args.n_tcav, args.n_masks = 24, 12, 200, 300, 100
        args.n_train, args.n_val, args.epochs, args.train_masks = 200, 60, 2, 50
    torch.set_num_threads(args.threads)
    machine = C.machine_info("cpu")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    # ---------------------------------------------------------------- attribute models
    models, model_info = {}, {}
    if args.train_matching:
        runs = (("matching", args.lam), ("plain", 0.0))
    else:   # the shipped model: scripts/train_shapesworld_attributes.py, the same settings and seed
        from whymatch.attributes import load_default_attribute_model

        models["matching"] = load_default_attribute_model()
        model_info["matching"] = {"lam": args.lam, "source": "shipped weights (scripts/train_shapesworld_attributes.py)"}
        runs = (("plain", 0.0),)
    for name, lam in runs:
        model, secs, best = train_attribute_model(args, lam, args.work / name)
        models[name] = model.eval()
        model_info[name] = {"lam": lam, "train_s": secs, "best_val_map": best}
        timings[f"train_{name}"] = secs

    # ---------------------------------------------------------------- data, embeddings, TCAV
    sim = load_default_model()
    test = ShapesWorld("test", args.n_test, 96, seed=args.seed)
    train = ShapesWorld("train", args.n_tcav, 96, seed=args.seed + 1)
    t0 = time.perf_counter()
    test_imgs = test.images()
    db_attr = torch.stack([test.attributes(i, "all") for i in range(len(test))])
    key_attr = torch.stack([test.attributes(i, "key") for i in range(len(test))])
    db_emb = sim.embed(test_imgs, 256)
    tr_emb = sim.embed(train.images(), 256)
    tr_attr = torch.stack([train.attributes(i, "all") for i in range(len(train))])
    tcav = TCAV(similarity=sim, hinge=False, seed=args.seed, attribute_names=ATTRIBUTE_NAMES).fit(tr_emb, tr_attr)
    a, p, n = TCAV.triplets(db_emb, test.labels, seed=args.seed, similarity=sim)
    tcav_scores = tcav.scores(db_emb[a], db_emb[p], db_emb[n])
    timings["embeddings_and_tcav"] = time.perf_counter() - t0

    # mAP of each model on the test images
    for name, model in models.items():
        with torch.no_grad():
            conf = torch.cat([model(test_imgs[i:i + 256]).confidences for i in range(0, len(test), 256)])
        model_info[name]["test_map"], ap_per = mean_average_precision(conf, db_attr)
        model_info[name]["test_ap"] = dict(zip(ATTRIBUTE_NAMES, ap_per.tolist()))

    # ---------------------------------------------------------------- pairs and saliency
    total = args.pairs + args.held_out
    ps = test.pairs(total, 1, seed=args.seed)
    q_idx, r_idx = ps.query, ps.references[:, 0]
    rise = RISE(sim, n_masks=args.n_masks, grid=8, p=0.5, batch_size=250, seed=args.seed)
    t0 = time.perf_counter()
    sal = torch.stack([rise.attribute(test_imgs[int(q)], test_imgs[int(r)][None])[0]
                       for q, r in zip(q_idx.tolist(), r_idx.tolist())])
    timings["rise_saliency"] = time.perf_counter() - t0
    truth = key_attr[q_idx] & key_attr[r_idx]                                   # (P, A)
    held, scored = torch.arange(args.held_out), torch.arange(args.held_out, total)

    def metrics_of(chosen: torch.Tensor, rows: torch.Tensor) -> dict:
        res = attribute_insertion_deletion(db_emb[q_idx[rows]], db_emb[r_idx[rows]], chosen, db_attr[q_idx[rows]],
                                           db_emb, db_attr, similarity=sim, query_index=q_idx[rows],
                                           reference_index=r_idx[rows])
        acc = truth[rows].gather(1, chosen[:, None])[:, 0].float()
        return {"deletion": res.mean_deletion, "insertion": res.mean_insertion,
                "top1_accuracy": float(acc.mean()), "top1_sem": float(acc.std() / len(acc) ** 0.5),
                "chosen_hist": torch.bincount(chosen, minlength=len(ATTRIBUTE_NAMES)).tolist()}

    def deletion_of(rows):
        return lambda chosen: metrics_of(chosen, rows)["deletion"]

    results, fitted, tables = {}, {}, {}
    g = torch.Generator().manual_seed(args.seed)
    results["random"] = metrics_of(torch.randint(0, len(ATTRIBUTE_NAMES), (len(scored),), generator=g), scored)
    results["tcav"] = metrics_of(torch.full((len(scored),), int(torch.nan_to_num(tcav_scores, -1).argmax())),
                                 scored)
    t0 = time.perf_counter()
    for name in ("plain", "matching"):
        sane = SANE(sim, models[name], tcav_scores, saliency=rise)
        terms = sane.terms(test_imgs[q_idx], sal)
        if name == "plain":
            results["classifier"] = metrics_of(terms.confidence[scored].argmax(1), scored)
            variants = (("sane_no_matching", None),)
        else:
            variants = (("sane_no_tcav", [t for t in phi_grid() if t[2] == 0]), ("sane", None))
        for row, grid in variants:
            phi, tables[row] = sane.fit_phi(terms[held], deletion_of(held), grid=grid)
            fitted[row] = phi
            results[row] = metrics_of(rank_scores(terms[scored], phi).argmax(1), scored)
            results[row]["phi"] = phi
    timings["sane"] = time.perf_counter() - t0
    for row in ("classifier", "sane_no_matching"):
        results[row]["model_map"] = model_info["plain"]["test_map"]
    for row in ("sane_no_tcav", "sane"):
        results[row]["model_map"] = model_info["matching"]["test_map"]

    data = {
        "benchmark": "attribute_table",
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": model_info,
        "tcav_scores": dict(zip(ATTRIBUTE_NAMES, tcav_scores.tolist())),
        "tcav_accuracy": dict(zip(ATTRIBUTE_NAMES, tcav.accuracy.tolist())),
        "chance_top1": float(truth[scored].float().mean()),
        "results": results,
        "timings_s": timings,
        "total_s": time.perf_counter() - t_start,
        "load_at_end": C.system_load(),
    }
    C.write_results(args.out, data, markdown(data))
    if args.write_phi is not None:
        import json

        from whymatch.io import atomic_write_text

        atomic_write_text(args.write_phi, json.dumps({
            "phi": list(fitted["sane"]), "temperature": 0.05,
            "source": "benchmarks/attribute_table.py: grid search on held-out ShapesWorld test pairs against the "
                      f"attribute deletion metric ({args.held_out} pairs, seed {args.seed})",
            "deletion_held_out": max(r["value"] for r in tables["sane"])}, indent=1) + "\n")
    print(markdown(data))
    return 0


def _f(v, nd=3):
    return "—" if v is None else f"{v:.{nd}f}"


def markdown(data: dict) -> str:
    m, s = data["machine"], data["settings"]
    rows = []
    for key, label in ROWS.items():
        r = data["results"][key]
        phi = r.get("phi")
        rows.append([label, _f(r.get("model_map")), _f(r["deletion"]), _f(r["insertion"]),
                     f"{r['top1_accuracy']:.3f} ± {r['top1_sem']:.3f}",
                     "" if phi is None else "(" + ", ".join(f"{v:g}" for v in phi) + ")"])
    tc = data["tcav_scores"]
    top_tcav = sorted(tc.items(), key=lambda kv: -(kv[1] if kv[1] == kv[1] else -1))[:4]
    lines = [
        "# SANE attribute explanations on ShapesWorld (SANE Table 2 layout)",
        "",
        f"`python benchmarks/attribute_table.py` on {m.get('cpu_model', '?')} ({m.get('torch_threads')} threads), "
        f"torch {m.get('torch', '?')}, commit {str(m.get('git_commit'))[:10]}; {data['total_s']:.0f} s in all.",
        f"{s['pairs']} scored positive test pairs (unseen classes; {s['held_out']} more pairs chose phi), RISE "
        f"{s['n_masks']} masks per pair, database of {s['n_test']} test images. Attribute models: ShapesCNN trunk, "
        f"{s['epochs']} epochs on {s['n_train']} train images, with saliency matching (lambda {s['lam']}; "
        + ("trained here" if s["train_matching"] else "the shipped weights, same settings") + ") or without. Deletion / insertion: relative similarity change when the query is swapped for the database "
        "image that lacks / regains the chosen attribute (higher is better, bound 1). Top-1: the chosen "
        "attribute is one the two key objects share (± standard error).",
        "",
        C.md_table(["method", "model mAP", "deletion ↑", "insertion ↑", "top-1 accuracy ↑", "phi"], rows),
        f"Chance top-1 (a uniformly random attribute is shared): {data['chance_top1']:.3f}. "
        "Highest TCAV scores: " + ", ".join(f"{k} {v:.2f}" for k, v in top_tcav) + ".",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in data["timings_s"].items()) + ".",
        "",
        C.load_note(data),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
