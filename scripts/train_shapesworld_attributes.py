#!/usr/bin/env python
"""Rebuild the ShapesWorld attribute model and SANE phi that ship with whymatch; compare them with the shipped files.

    python scripts/train_shapesworld_attributes.py          # rebuild into build/sane_shapesworld (~1 min, 2 cores)
    python scripts/train_shapesworld_attributes.py --ship   # ... and replace the package's files with it
    python scripts/train_shapesworld_attributes.py --results R.json --out DIR

Where the shipped files come from. ``python/whymatch/models/weights/shapesworld_attributes.pt`` and
``shapesworld_sane.json`` are written by ``benchmarks/attribute_causal.py`` (``--write-shipped`` in a full
run, or ``--ship-from RESULTS.json``): SANE's attribute head (a 3 x 3 conv to the 18 attribute maps) on the
shipped similarity model's frozen ShapesCNN trunk, trained with key-object labels and the per-object
localization term, seed 0, with the attribute-model settings and the Eq. 4 phi ('sane_eq4') that the run
chose on validation-class pairs by causal top-1 agreement. This script runs the same code
(``attribute_causal.build_shipped_model`` and ``write_shipped``) from a results JSON (default: the committed
``benchmarks/results/attribute_causal.json``):

1. Retrains the head exactly as that run's seed 0 did (same images of the 48 fit classes, settings, seed).
2. Writes it to OUT/shapesworld_attributes.pt and its phi to OUT/shapesworld_sane.json (never to the package
   unless asked), and OUT/results.json: the results JSON it came from, the settings and phi, key-object
   attribute mAP and key-attribute pointing of the rebuilt and the shipped model on images of the 12
   validation classes (``shapesworld.VALIDATION_CLASSES``; nothing is chosen here), and whether the rebuilt
   weights and phi equal the shipped ones.
3. The package's files are written only where they are missing (what the error of
   ``load_default_attribute_model`` asks for) or with ``--ship``. A shipped model that differs from the rebuilt
   one is reported, never replaced by default.

Training the whole attribute network (trunk included) with SANE's published loss, image-level or per-object
labels, is ``whymatch train sane --data shapesworld --out DIR`` (``whymatch.attributes.train``); it does not
write the shipped files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import attribute_causal as AC  # noqa: E402
from whymatch.attributes.model import default_attribute_weights_path, load_attribute_model  # noqa: E402
from whymatch.data import ShapesWorld  # noqa: E402
from whymatch.data.shapesworld import ATTRIBUTE_NAMES, VALIDATION_CLASSES  # noqa: E402
from whymatch.io import atomic_write_text  # noqa: E402
from whymatch.metrics.attributes import mean_average_precision  # noqa: E402

DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "attribute_causal.json"


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


@torch.no_grad()
def check(model, ds: ShapesWorld) -> dict:
    """Key-object attribute mAP and key-attribute pointing of ``model`` on ``ds``."""
    x = ds.images()
    conf = torch.cat([model(x[i:i + 256]).confidences.float() for i in range(0, len(x), 256)])
    key = torch.stack([ds.attributes(i, "key") for i in range(len(ds))])
    return {"key_map": mean_average_precision(conf, key)[0], **key_pointing(model, ds)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_model(a, b) -> tuple[bool, float]:
    """Whether two attribute models hold the same tensors, and the largest absolute difference."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        return False, float("inf")
    diff = max((float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if sa[k].numel()), default=0.0)
    return diff == 0.0, diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                    help="results JSON of a full benchmarks/attribute_causal.py run (settings, seed-0 'sane_eq4' phi)")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "sane_shapesworld",
                    help="where the rebuilt model, its phi and results.json go")
    ap.add_argument("--ship", action="store_true",
                    help="also replace the package's shipped attribute model and phi with the rebuilt ones")
    ap.add_argument("--n-check", type=int, default=400, help="validation-class images of the mAP / pointing check")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not args.results.is_file():
        raise FileNotFoundError(f"--results must be a results JSON of benchmarks/attribute_causal.py, "
                                f"got a missing file {args.results}")
    data = json.loads(args.results.read_text())
    for key in ("chosen_settings", "settings", "methods", "tuning"):
        if key not in data:
            raise ValueError(f"--results must hold '{key}' (a full attribute_causal.py run), got keys {sorted(data)}")
    if "sane_eq4" not in data["methods"]:
        raise ValueError(f"--results must hold the 'sane_eq4' row (attribute_causal.py since 1f99685), "
                         f"got rows {sorted(data['methods'])}")

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    model, phi = AC.build_shipped_model(data)
    built_w, built_j = AC.write_shipped(model, phi, data, args.out / "shapesworld_attributes.pt")
    shipped_w = default_attribute_weights_path()
    shipped_j = shipped_w.with_name("shapesworld_sane.json")
    val = ShapesWorld("train", args.n_check, 96, seed=data["settings"]["seed"] + 12, classes=VALIDATION_CLASSES)
    res = {
        "command": " ".join(["python scripts/train_shapesworld_attributes.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "results_json": str(args.results), "results_commit": (data.get("machine") or {}).get("git_commit"),
        "settings": data["chosen_settings"], "phi": list(phi),
        "rebuilt": {"weights": str(built_w), "sha256": sha256(built_w), "phi_file": str(built_j),
                    "check_on_validation_classes": check(model, val)},
    }
    if shipped_w.is_file():
        shipped = load_attribute_model(shipped_w)
        equal, diff = same_model(model, shipped)
        shipped_phi = json.loads(shipped_j.read_text()).get("phi") if shipped_j.is_file() else None
        res["shipped"] = {"weights": str(shipped_w), "sha256": sha256(shipped_w),
                          "equal_weights": equal, "max_abs_weight_difference": diff,
                          "phi": shipped_phi, "equal_phi": shipped_phi == list(phi),
                          "check_on_validation_classes": check(shipped, val)}
    if args.ship or not shipped_w.is_file():
        AC.write_shipped(model, phi, data)
        res["wrote_package_files"] = [str(shipped_w), str(shipped_j)]
    res["seconds"] = time.perf_counter() - t0
    atomic_write_text(args.out / "results.json", json.dumps(res, indent=2) + "\n")

    r = res["rebuilt"]["check_on_validation_classes"]
    print(f"rebuilt from {args.results} (settings {data['chosen_settings']}, phi {tuple(phi)}) -> {built_w}: "
          f"validation-class key mAP {r['key_map']:.3f}, key-attribute pointing {r['key_pointing']:.3f}")
    if "shipped" in res:
        s = res["shipped"]
        c = s["check_on_validation_classes"]
        same = "the same model and phi" if s["equal_weights"] and s["equal_phi"] else (
            f"a DIFFERENT model (max |weight difference| {s['max_abs_weight_difference']:.3g}, phi {s['phi']})")
        print(f"shipped {shipped_w}: {same}; validation-class key mAP {c['key_map']:.3f}, "
              f"key-attribute pointing {c['key_pointing']:.3f}")
    wrote = res.get("wrote_package_files")
    print("package files " + ("written: " + ", ".join(wrote) if wrote else "unchanged (--ship replaces them)")
          + f"; {res['seconds']:.0f} s; {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
