#!/usr/bin/env python
"""Train the ShapesWorld attribute model that ships with whymatch (SANE, Plummer et al. 2020).

    python scripts/train_shapesworld_attributes.py             # the shipped weights (about 9 min on 2 CPU cores)
    python scripts/train_shapesworld_attributes.py --lam 0 --weights none --out build/sane_lam0   # no matching

What it does, all from a fixed seed:

1. Renders ShapesWorld train-split images (60 classes) for training and test-split images
   (60 other classes: new combinations of the same attribute values) for validation, at
   96 x 96, the size the shipped similarity model was trained at. Labels: the 18 binary
   attributes of every object in the image (``ShapesWorld.attributes(i, which='all')``).
2. Computes RISE saliency maps of every training image against its ``--k-maps`` most similar
   images of its class under the shipped similarity model (``load_default_model()``), into a
   :class:`whymatch.attributes.cache.SaliencyCache` under OUT/saliency (reused by a rerun).
3. Trains :func:`whymatch.attributes.model.build_attribute_model` ('shapes': the ShapesCNN conv
   trunk, fresh weights, a 3 x 3 conv to 18 maps of 12 x 12) with
   :class:`whymatch.attributes.losses.AttributeLoss` (Huber on softmax confidences vs labels /
   A_gt, plus lambda x the saliency matching term), Adam 5e-4 decayed by 0.985 per epoch.
4. Reports validation mAP (attributes ranked by confidence) and a localization check on the
   validation set: for each attribute only the key object has, does the arg-max cell of its
   activation map lie on the key object?
5. Writes the model (state dict + attribute names + config, ``weights_only``-loadable) to
   python/whymatch/models/weights/shapesworld_attributes.pt and the numbers to OUT/results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from whymatch.attributes.model import attribute_model_state
from whymatch.attributes.train import SANEConfig, train_sane
from whymatch.data import ShapesWorld
from whymatch.data.shapesworld import ATTRIBUTE_NAMES
from whymatch.io import atomic_torch_save, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = ROOT / "python" / "whymatch" / "models" / "weights" / "shapesworld_attributes.pt"


@torch.no_grad()
def key_pointing(model, ds: ShapesWorld, batch_size: int = 200) -> dict:
    """Fraction of (image, attribute) pairs, over attributes present on the key object and on no
    distractor, whose activation map peaks on a cell that touches the key object's mask."""
    model.eval()
    hits = total = 0
    per_kind: dict[str, list[int]] = {}
    for s in range(0, len(ds), batch_size):
        idx = range(s, min(len(ds), s + batch_size))
        samples = [ds.sample(i) for i in idx]
        out = model(torch.stack([x.image for x in samples]))
        h, w = out.maps.shape[2:]
        for b, smp in enumerate(samples):
            key = {f"{k}:{getattr(smp.key_object, k)}" for k in ("shape", "colour", "pattern", "size")}
            others = {f"{k}:{getattr(o, k)}" for o in smp.distractors for k in ("shape", "colour", "pattern", "size")}
            cells = F.adaptive_max_pool2d(smp.key_mask.float()[None, None], (h, w))[0, 0].flatten() > 0
            for name in sorted(key - others):
                a = ATTRIBUTE_NAMES.index(name)
                hit = int(cells[int(out.maps[b, a].flatten().argmax())])
                hits += hit
                total += 1
                per_kind.setdefault(name.split(":")[0], []).append(hit)
    return {"key_pointing": hits / max(1, total), "n_pairs": total,
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-val", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lam", type=float, default=5e-3)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--normalize", default="softmax", choices=("softmax", "l1"))
    ap.add_argument("--k-maps", type=int, default=5)
    ap.add_argument("--n-masks", type=int, default=100)
    ap.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "sane_shapesworld",
                    help="training directory (checkpoints, saliency cache, results.json)")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="where the model goes; 'none' to skip")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    cfg = SANEConfig(data="shapesworld", backbone="shapes", out=str(args.out), epochs=args.epochs,
                     batch_size=args.batch_size, lam=args.lam, temperature=args.temperature,
                     normalize=args.normalize, k_maps=args.k_maps, n_masks=args.n_masks, n_train=args.n_train,
                     n_val=args.n_val, image_size=96, seed=args.seed, device="cpu", show_progress=not args.quiet,
                     overwrite=True)  # a rerun replaces the run and reuses its saliency cache
    trainer = train_sane(cfg)
    t_train = time.perf_counter() - t_start
    model = trainer.model.eval()
    final = trainer.evaluate()
    val = ShapesWorld("test", args.n_val, 96, seed=args.seed)
    point = key_pointing(model, val)
    saliency_s = None
    if trainer.cache is not None:
        saliency_s = trainer.cache.manifest.get("build_time_s")
    res = {
        "command": "python scripts/train_shapesworld_attributes.py" + ("" if not (argv or sys.argv[1:])
                                                                       else " " + " ".join(argv or sys.argv[1:])),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "weights")},
        "val_map": final["map"], "val_map_logits": final["map_logits"], "val_ap": final["ap"],
        "localization": point,
        "history": trainer.history,
        "wall_time_s": {"total": time.perf_counter() - t_start, "train_incl_data_and_saliency": t_train,
                        "saliency_cache": saliency_s},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }
    if args.weights != "none":
        w = Path(args.weights)
        atomic_torch_save(attribute_model_state(model, epoch=trainer.epoch, map=final["map"],
                                                train=trainer.config), w)
        blob = w.read_bytes()
        res["weights"] = {"path": str(w), "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write_text(args.out / "results.json", json.dumps(res, indent=2) + "\n")
    print(f"validation mAP {final['map']:.4f} (by logits {final['map_logits']:.4f}); key-attribute pointing "
          f"{point['key_pointing']:.3f} over {point['n_pairs']} pairs; {res['wall_time_s']['total']:.0f} s; "
          f"results in {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
