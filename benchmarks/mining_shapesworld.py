#!/usr/bin/env python
"""Similarity mining on ShapesWorld: L_ml alone vs L_ml + gamma * L_sm, same seed and budget.

    python benchmarks/mining_shapesworld.py            # about 8-10 min on 2 CPU cores

Both models start from the same initial weights (same seed) and see the same
batches (same P x K sampler seed, same flips); only the loss differs. Reported,
for the model at initialization and for both trained models:

- Recall@1/2/4/8 on the held-out ShapesWorld TEST classes (zero-shot, exact
  cosine kNN over the test images, query excluded);
- where the model's similarity attention (SimilarityAttention, triplet mode, layer4)
  falls on test triplets (anchor, positive of its class, negative of another
  class): the share of each anchor map's mass on the key object (the object that
  defines the class: the ground-truth explanation), mass_on_mask with
  shift='none', the pointing game, and the key object's share of the image (chance).

Smaller than the shipped model's recipe (scripts/train_shapesworld.py: 96 px,
9000 images, 8 epochs, normalized softmax) so that both runs fit the CPU budget;
the settings are in the JSON.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (machine_info, md_table, shapesworld_data_info, shapesworld_sets,  # noqa: E402
                    shapesworld_training_parser, system_load, write_results)

from whymatch.data import ShapesWorld  # noqa: E402
from whymatch.metrics import chance_level, mass_on_mask, pointing_game  # noqa: E402
from whymatch.mining import SimilarityMiningLoss  # noqa: E402
from whymatch.saliency import SimilarityAttention  # noqa: E402
from whymatch.train import Trainer, build_backbone, build_metric_loss, random_flip  # noqa: E402


def attention_scores(model, test: ShapesWorld, n: int, seed: int) -> dict:
    """Mass on the key object and pointing game of the anchor maps of n test triplets."""
    pairs = test.pairs(n, 1, n_negatives=1, seed=seed)
    anchors, positives, negatives, masks = [], [], [], []
    for q, r, ng in zip(pairs.query.tolist(), pairs.references[:, 0].tolist(), pairs.negatives[:, 0].tolist()):
        s = test.sample(q)
        anchors.append(s.image)
        masks.append(s.key_mask)
        positives.append(test[r][0])
        negatives.append(test[ng][0])
    model.eval()
    sa = SimilarityAttention(model, "layer4", mode="triplet", batch_size=100)
    maps = sa.attribute_tuples(torch.stack(anchors), torch.stack(positives), torch.stack(negatives))[0]
    m = torch.stack(masks)
    mass = mass_on_mask(maps, m, shift="none")
    point = pointing_game(maps, m).float()
    return {"n_triplets": n, "mass_on_key_object": float(mass.mean()), "mass_on_key_object_median": float(mass.median()),
            "pointing_game": float(point.mean()), "chance_key_area": float(chance_level(m).mean())}


def run(args) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    tr, te, train, test = shapesworld_sets(args.n_train, args.n_test, args.image_size, args.seed)
    n_classes = int(torch.unique(train.labels).numel())
    results: dict = {}
    for name, gamma in (("init", None), ("metric_only", 0.0), ("metric_plus_mining", args.gamma)):
        torch.manual_seed(args.seed)
        model, layer = build_backbone("shapes", args.embedding_dim)
        metric = build_metric_loss(args.loss, n_classes, args.embedding_dim)
        loss = SimilarityMiningLoss("triplet", args.alpha, args.beta, metric, gamma or 0.0, target_layers=layer)
        with tempfile.TemporaryDirectory() as out:
            trainer = Trainer(model, loss, train, out_dir=out, test_set=test, epochs=args.epochs,
                              batch_p=args.p, batch_k=args.k, lr=args.lr, seed=args.seed, augment=random_flip,
                              show_progress=args.progress, device="cpu")
            t0 = time.perf_counter()
            if gamma is not None:
                trainer.fit()
            t_train = time.perf_counter() - t0
            recall = trainer.evaluate()
        att = attention_scores(model, te, args.n_attention, args.seed)
        results[name] = {"gamma": gamma, "recall": recall, "attention": att, "train_time_s": t_train,
                         "history": trainer.history}
        print(name, {k: round(v, 4) for k, v in recall.items()}, {k: round(v, 4) for k, v in att.items()},
              f"{t_train:.0f} s", flush=True)
    return {
        "benchmark": "mining_shapesworld",
        "command": "python benchmarks/mining_shapesworld.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k != "progress"},
        "method": {
            "metric_loss": f"pytorch-metric-learning {args.loss}",
            "mining": f"SimilarityMiningLoss('triplet', alpha={args.alpha}, beta={args.beta}), gamma={args.gamma}, "
                      "batch-hard tuples, attention at layer4",
            "optimizer": f"AdamW lr {args.lr}, weight decay 1e-4, cosine decay per step",
            "batch": f"P x K = {args.p} x {args.k}, random horizontal flips",
            "model": f"ShapesCNN(embedding_dim={args.embedding_dim}), random init from seed {args.seed}",
            "attention_metric": "SimilarityAttention(mode='triplet', layer4) anchor maps of test triplets; "
                                "mass_on_mask(shift='none') and pointing_game against the key object's mask",
        },
        "data": shapesworld_data_info(train, test, args.image_size),
        "results": results,
        "wall_time_s": time.perf_counter() - t_start,
        "machine": machine_info("cpu"),
        "load_at_end": system_load(),
    }


def markdown(res: dict) -> str:
    s, d, r = res["settings"], res["data"], res["results"]
    rows = []
    for name, label in (("init", "at initialization"), ("metric_only", "L_ml alone"),
                        ("metric_plus_mining", f"L_ml + {s['gamma']} L_sm")):
        x = r[name]
        rc, a = x["recall"], x["attention"]
        rows.append([label, f"{rc['recall@1']:.3f}", f"{rc['recall@2']:.3f}", f"{rc['recall@4']:.3f}",
                     f"{rc['recall@8']:.3f}", f"{a['mass_on_key_object']:.3f}", f"{a['pointing_game']:.3f}",
                     f"{x['train_time_s']:.0f}"])
    chance = r["init"]["attention"]["chance_key_area"]
    return (
        "# Similarity mining on ShapesWorld\n\n"
        f"`{res['command']}`: ShapesCNN (embedding {s['embedding_dim']}) trained {s['epochs']} epochs on "
        f"{d['n_train_images']} images of {d['n_train_classes']} train classes at {d['image_size']} px, "
        f"P x K = {s['p']} x {s['k']}, AdamW lr {s['lr']}, pml `{s['loss']}` loss, seed {s['seed']}; both runs "
        "start from the same weights and see the same batches. Mining: triplet mode, "
        f"alpha {s['alpha']}, beta {s['beta']}, gamma {s['gamma']}. {res['wall_time_s']:.0f} s wall in all on "
        f"{res['machine']['cpu_count']} CPU cores.\n\n"
        f"Recall@K on {d['n_test_images']} images of {d['n_test_classes']} unseen test classes (chance@1 "
        f"{d['chance_recall_at_1']:.3f}); attention of the anchor on {r['init']['attention']['n_triplets']} test "
        f"triplets: share of its mass on the key object (chance = the key object's area, {chance:.3f}) and "
        "pointing game (its maximum on the key object).\n\n"
        + md_table(["model", "R@1", "R@2", "R@4", "R@8", "attention mass on key object", "pointing game",
                    "train s"], rows)
        + "\nOne seed, one budget: differences of a few points are within run-to-run noise.\n"
    )


def main(argv=None) -> int:
    ap = shapesworld_training_parser(__doc__, "mining_shapesworld")
    ap.add_argument("--loss", default="triplet", choices=("contrastive", "triplet", "margin", "proxyanchor"))
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=10.0)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--embedding-dim", type=int, default=64)
    ap.add_argument("--n-attention", type=int, default=300)
    args = ap.parse_args(argv)
    res = run(args)
    js, md = write_results(args.out, res, markdown(res))
    print(markdown(res))
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
