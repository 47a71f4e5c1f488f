#!/usr/bin/env python
"""Train the ShapesWorld CNN that ships with whymatch, evaluate it, write weights and results.

    python scripts/train_shapesworld.py            # the shipped model (about 6 min on 2 CPU cores)

What it does, all from a fixed seed:

1. Renders the ShapesWorld train split (60 classes) into one uint8 tensor and the
   test split (60 other classes) into a float tensor.
2. Trains :class:`whymatch.models.ShapesCNN` with a normalized-softmax (proxy)
   loss, temperature 0.05 (Zhai & Wu, "Classification is a strong baseline for
   deep metric learning", BMVC 2019), on P x K class-balanced batches, Adam,
   cosine learning-rate decay, random horizontal flips.
3. Evaluates Recall@{1,2,4,8} on the TEST classes (zero-shot): exact cosine kNN
   over the test images, the query itself excluded.
4. Checks that the model looks at the key object: for positive test pairs it
   measures how much the similarity drops when the key object is removed from
   the query (re-rendered without it) versus a distractor, and when a grey
   occluder the shape and area of the key object covers the key object versus
   the same occluder moved onto a distractor.
5. Writes the weights (state dict) to python/whymatch/models/weights/shapesworld_cnn.pt
   and benchmarks/results/shapesworld_model.{json,md}.

``--classes fit`` trains on the 48 ``FIT_CLASSES`` only, so the 12 ``VALIDATION_CLASSES`` stay unseen;
``--classes half0`` / ``half1`` train on every other training-split class (``TRAIN_CLASSES[0::2]`` /
``[1::2]``), so the other half stays unseen. These are validation proxies of the shipped model, for
choosing explainer settings on classes the model never saw (as the test classes are to the shipped
model) without touching test. Give them their own ``--weights`` and ``--results-dir``; they are never
shipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from whymatch import SimilarityModel
from whymatch.data import TEST_CLASSES, TRAIN_CLASSES, ShapesWorld
from whymatch.data.shapesworld import FIT_CLASSES
from whymatch.models import ShapesCNN

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = ROOT / "python" / "whymatch" / "models" / "weights" / "shapesworld_cnn.pt"
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
#: the training classes of each --classes choice
CLASS_SETS = {"train": TRAIN_CLASSES, "fit": FIT_CLASSES, "half0": TRAIN_CLASSES[0::2], "half1": TRAIN_CLASSES[1::2]}


class NormSoftmaxLoss(nn.Module):
    """Normalized softmax: cross-entropy over cosine similarities to one learned proxy per class / T.

    Args:
        n_classes: number of training classes.
        dim: embedding size.
        temperature: T; 0.05 as in Zhai & Wu (2019).
    """

    def __init__(self, n_classes: int, dim: int, temperature: float = 0.05) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(n_classes, dim) / math.sqrt(dim))
        self.temperature = temperature

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        """Mean loss of embeddings (B, D) with class indices (B,) in [0, n_classes)."""
        logits = F.normalize(emb, dim=1) @ F.normalize(self.proxies, dim=1).T
        return F.cross_entropy(logits / self.temperature, labels)


def pk_batches(labels: np.ndarray, p: int, k: int, n_batches: int, rng: np.random.Generator):
    """Yield index arrays (p * k,): p distinct classes, k distinct images each."""
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(n_batches):
        chosen = rng.choice(len(classes), size=p, replace=False)
        yield np.concatenate([rng.choice(by_class[c], size=k, replace=False) for c in chosen])


@torch.no_grad()
def embed_all(model: nn.Module, images: Tensor, batch_size: int = 250) -> Tensor:
    """Embeddings (N, D) of float images (N, 3, H, W) in eval mode."""
    model.eval()
    out = [model(images[i:i + batch_size].contiguous(memory_format=torch.channels_last))
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def recall_at_k(emb: Tensor, labels: Tensor, ks=(1, 2, 4, 8)) -> dict[str, float]:
    """Recall@K with exact cosine kNN over the same set, each query's own match excluded."""
    e = F.normalize(emb.float(), dim=1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    top = sim.topk(max(ks), dim=1).indices
    hit = labels[top] == labels[:, None]
    return {f"recall_at_{k}": float(hit[:, :k].any(dim=1).float().mean()) for k in ks}


def _shift_mask(mask: Tensor, dy: int, dx: int) -> Tensor:
    """mask (H, W) bool moved by (dy, dx) pixels, zero-filled (no wrap-around)."""
    h, w = mask.shape
    out = torch.zeros_like(mask)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


@torch.no_grad()
def occlusion_check(sim: SimilarityModel, ds: ShapesWorld, n_pairs: int, seed: int) -> dict:
    """Similarity drop of positive pairs when the query's key object vs a distractor is hidden.

    Two kinds of hiding, both on the query only (the reference is untouched):
    - removed: the query re-rendered without the object (background shows through);
    - occluded: a grey (0.5) occluder with the exact shape and area of the key
      object's mask, placed on the key object, or moved onto a distractor's centre
      (pixels of the key object excluded, so the key object stays fully visible).
    """
    rng = np.random.default_rng(seed)
    pairs = ds.pairs(n_pairs, 1, n_negatives=1, seed=seed)
    q_imgs, r_imgs, n_imgs = [], [], []
    key_rm, dis_rm, key_occ, dis_occ = [], [], [], []
    key_area, dis_area = [], []
    for qi, ri, ni in zip(pairs.query.tolist(), pairs.references[:, 0].tolist(), pairs.negatives[:, 0].tolist()):
        s = ds.sample(qi)
        j = int(rng.integers(1, len(s.objects)))  # a distractor (every image has at least one)
        q_imgs.append(s.image)
        r_imgs.append(ds[ri][0])
        n_imgs.append(ds[ni][0])
        key_rm.append(ds.render(qi, hide=[0]))
        dis_rm.append(ds.render(qi, hide=[j]))
        km = s.key_mask
        kc, dc = s.objects[0].centre, s.objects[j].centre
        moved = _shift_mask(km, round(dc[0] - kc[0]), round(dc[1] - kc[1])) & ~km
        a = s.image.clone()
        a[:, km] = 0.5
        b = s.image.clone()
        b[:, moved] = 0.5
        key_occ.append(a)
        dis_occ.append(b)
        key_area.append(int(km.sum()))
        dis_area.append(int(moved.sum()))
    stack = torch.stack
    dev = sim.device
    e_r = sim.embed(stack(r_imgs).to(dev))
    e_n = sim.embed(stack(n_imgs).to(dev))

    def pair_sim(imgs: list[Tensor], other: Tensor) -> Tensor:
        e = sim.embed(stack(imgs).to(dev))
        return F.cosine_similarity(e, other, dim=1).cpu()

    s0 = pair_sim(q_imgs, e_r)
    s_neg = pair_sim(q_imgs, e_n)
    drops = {
        "key_removed": s0 - pair_sim(key_rm, e_r),
        "distractor_removed": s0 - pair_sim(dis_rm, e_r),
        "key_occluded": s0 - pair_sim(key_occ, e_r),
        "distractor_occluded_same_area": s0 - pair_sim(dis_occ, e_r),
    }
    out = {
        "n_pairs": n_pairs,
        "split": ds.split,
        "mean_positive_similarity": float(s0.mean()),
        "mean_negative_similarity": float(s_neg.mean()),
        "positive_above_negative_fraction": float((s0 > s_neg).float().mean()),
        "mean_similarity_drop": {k: float(v.mean()) for k, v in drops.items()},
        "median_similarity_drop": {k: float(v.median()) for k, v in drops.items()},
        "fraction_key_drop_larger": {
            "removed": float((drops["key_removed"] > drops["distractor_removed"]).float().mean()),
            "occluded": float((drops["key_occluded"] > drops["distractor_occluded_same_area"]).float().mean()),
        },
        "mean_occluder_area_px": {"key": float(np.mean(key_area)), "distractor": float(np.mean(dis_area))},
        "occluder": "grey 0.5 fill of the key object's mask; for distractors the same mask moved onto a "
                    "distractor's centre, key pixels excluded",
    }
    return out


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def write_markdown(path: Path, res: dict) -> None:
    r, o = res["recall"], res["occlusion"]
    d = o["mean_similarity_drop"]
    lines = [
        "# ShapesWorld default model",
        "",
        f"`{res['command']}`: {res['model']['architecture']} ({res['model']['n_parameters']:,} parameters, "
        f"{res['model']['weights_bytes'] / 1024:.0f} KiB), trained {res['training']['epochs']} epochs on "
        f"{res['data']['n_train_images']} images of {res['data']['n_train_classes']} train classes, "
        f"seed {res['seed']}, {res['wall_time_s']['total']:.0f} s wall on {res['machine']['cpu_count']} CPU cores "
        f"(torch {res['machine']['torch']}).",
        "",
        f"Zero-shot retrieval on {res['data']['n_test_images']} images of {res['data']['n_test_classes']} "
        "unseen test classes (exact cosine kNN, query excluded):",
        "",
        "| Recall@1 | Recall@2 | Recall@4 | Recall@8 | chance@1 |",
        "|---|---|---|---|---|",
        f"| {r['recall_at_1']:.3f} | {r['recall_at_2']:.3f} | {r['recall_at_4']:.3f} | {r['recall_at_8']:.3f} "
        f"| {res['data']['chance_recall_at_1']:.3f} |",
        "",
        f"Does the model look at the key object? {o['n_pairs']} positive test pairs, query modified, "
        f"mean positive similarity {o['mean_positive_similarity']:.3f} "
        f"(negatives {o['mean_negative_similarity']:.3f}):",
        "",
        "| query change | mean similarity drop | pairs where the key drop is larger |",
        "|---|---|---|",
        f"| key object removed | {d['key_removed']:.3f} | {o['fraction_key_drop_larger']['removed']:.2f} |",
        f"| one distractor removed | {d['distractor_removed']:.3f} | |",
        f"| key object occluded (grey, its own shape) | {d['key_occluded']:.3f} "
        f"| {o['fraction_key_drop_larger']['occluded']:.2f} |",
        f"| same occluder on a distractor | {d['distractor_occluded_same_area']:.3f} | |",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=9000, help="training images (150 per class by default)")
    ap.add_argument("--n-test", type=int, default=3000, help="test images (50 per class by default)")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--p", type=int, default=16, help="classes per batch")
    ap.add_argument("--k", type=int, default=4, help="images per class per batch")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--proxy-lr", type=float, default=2e-2)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    ap.add_argument("--n-occlusion-pairs", type=int, default=300)
    ap.add_argument("--classes", choices=tuple(CLASS_SETS), default="train",
                    help="train: all 60 train-split classes (the shipped model); fit: the 48 FIT_CLASSES, leaving "
                         "VALIDATION_CLASSES unseen; half0 / half1: TRAIN_CLASSES[0::2] / [1::2], leaving the other "
                         "half unseen (validation proxies; give them their own --weights)")
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    args = ap.parse_args(argv)
    classes = CLASS_SETS[args.classes]
    if args.classes != "train" and args.weights.resolve() == DEFAULT_WEIGHTS.resolve():
        ap.error(f"--classes {args.classes} would overwrite the shipped weights {DEFAULT_WEIGHTS}: give --weights")

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    # ---------------------------------------------------------------- data
    train = ShapesWorld("train", args.n_train, args.image_size, seed=args.seed,
                        classes=None if args.classes == "train" else classes)
    test = ShapesWorld("test", args.n_test, args.image_size, seed=args.seed)
    t0 = time.perf_counter()
    x_train = train.images(dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    x_test = test.images()
    t_gen = time.perf_counter() - t0
    class_index = {c: i for i, c in enumerate(classes)}
    y_train = torch.tensor([class_index[int(c)] for c in train.labels])
    y_test = test.labels
    print(f"rendered {len(train)} train + {len(test)} test images in {t_gen:.1f} s", flush=True)

    # ---------------------------------------------------------------- model
    model = ShapesCNN().to(memory_format=torch.channels_last)
    loss_fn = NormSoftmaxLoss(len(classes), model.embedding_dim, args.temperature)
    opt = torch.optim.Adam([
        {"params": model.parameters(), "lr": args.lr, "weight_decay": args.weight_decay},
        {"params": loss_fn.parameters(), "lr": args.proxy_lr, "weight_decay": 0.0},
    ])
    batch = args.p * args.k
    steps_per_epoch = len(train) // batch
    total_steps = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))

    t0 = time.perf_counter()
    step = 0
    history = []
    y_np = y_train.numpy()
    for epoch in range(args.epochs):
        model.train()
        run_loss = 0.0
        for idx in pk_batches(y_np, args.p, args.k, steps_per_epoch, rng):
            idx_t = torch.from_numpy(idx)
            xb = x_train[idx_t].float().div_(255.0)
            flip = torch.from_numpy(rng.random(batch) < 0.5)
            xb[flip] = xb[flip].flip(-1)
            loss = loss_fn(model(xb.contiguous(memory_format=torch.channels_last)), y_train[idx_t])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += float(loss.detach())
            step += 1
        rec = recall_at_k(embed_all(model, x_test), y_test)
        history.append({"epoch": epoch + 1, "loss": run_loss / steps_per_epoch, **rec})
        print(f"epoch {epoch + 1}/{args.epochs}  loss {run_loss / steps_per_epoch:.3f}  "
              f"test R@1 {rec['recall_at_1']:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    t_train = time.perf_counter() - t0

    # ---------------------------------------------------------------- evaluation
    model.eval()
    model = model.to(memory_format=torch.contiguous_format)
    t0 = time.perf_counter()
    emb = embed_all(model, x_test)
    recall = recall_at_k(emb, y_test)
    sim = SimilarityModel(model, "cosine").eval()
    occ = occlusion_check(sim, test, args.n_occlusion_pairs, seed=args.seed + 1)
    t_eval = time.perf_counter() - t0

    # ---------------------------------------------------------------- write
    args.weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, args.weights)
    blob = args.weights.read_bytes()
    n_params = sum(p.numel() for p in model.parameters())
    counts = torch.bincount(y_test)
    counts = counts[counts > 0].float()
    chance = float(((counts - 1) / (len(y_test) - 1)).mean())
    try:
        weights_rel = str(args.weights.resolve().relative_to(ROOT))
    except ValueError:
        weights_rel = str(args.weights)
    res = {
        "command": "python scripts/train_shapesworld.py" + ("" if argv is None and len(sys.argv) == 1
                                                            else " " + " ".join(argv or sys.argv[1:])),
        "seed": args.seed,
        "data": {
            "dataset": "ShapesWorld", "image_size": args.image_size,
            "n_train_classes": len(classes), "train_classes": args.classes, "n_test_classes": len(TEST_CLASSES),
            "n_train_images": len(train), "n_test_images": len(test),
            "chance_recall_at_1": chance,
        },
        "model": {
            "architecture": "ShapesCNN(embedding_dim=64, widths=(16, 32, 64, 128))",
            "n_parameters": n_params, "weights": weights_rel, "weights_bytes": len(blob),
            "weights_sha256": hashlib.sha256(blob).hexdigest(), "similarity": "cosine",
        },
        "training": {
            "loss": f"normalized softmax (proxy) cross-entropy, temperature {args.temperature}",
            "optimizer": f"Adam lr {args.lr} (proxies {args.proxy_lr}), weight decay {args.weight_decay}, "
                         "50-step warm-up then cosine decay",
            "batch": f"P x K = {args.p} classes x {args.k} images", "augmentation": "random horizontal flip",
            "epochs": args.epochs, "steps": total_steps, "history": history,
        },
        "recall": recall,
        "occlusion": occ,
        "wall_time_s": {"total": time.perf_counter() - t_start, "render": t_gen, "train": t_train,
                        "evaluate": t_eval},
        "machine": machine(),
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "shapesworld_model.json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(args.results_dir / "shapesworld_model.md", res)
    d = occ["mean_similarity_drop"]
    print(json.dumps(recall))
    print(f"similarity drop: key removed {d['key_removed']:.3f} vs distractor removed {d['distractor_removed']:.3f}; "
          f"key occluded {d['key_occluded']:.3f} vs same occluder on a distractor "
          f"{d['distractor_occluded_same_area']:.3f}")
    print(f"wrote {args.weights} ({len(blob) / 1024:.0f} KiB) and {args.results_dir}/shapesworld_model.{{json,md}} "
          f"in {res['wall_time_s']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
