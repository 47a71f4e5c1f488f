"""Saliency on the same footing as SANE's attributes: agreement with causal object removal (issue 17, item 6).

For each ShapesWorld pair (a query and a same-class reference, shipped model, cosine):

- Causal ground truth (``whymatch.metrics.causal_objects.causal_object_effects``): every object of the
  query is rendered away in turn (``ShapesWorld.render(i, hide=[k])``: the background shows, every
  other pixel identical) and the drop in similarity is measured; the causal object drops it most.
- A map names an object by two rules (``saliency_top_object``): 'mass', the object whose mask holds
  the largest sum of the centred map (none when no sum is positive), and 'point', the object under
  the map's maximum (none on the background). Agreement = the named object is the causal one.
  Chance: a random object ('mass') or a random pixel ('point'); the "largest object" row names the
  object with the most pixels, a prior any map could exploit here (the key object is always largest).
- The pointing game on the key object, as in ``saliency_table.py``.

Stages (each cached in ``<stem>.partial.json``, so an interrupted run resumes):

1. ``validation``: pairs from the training-split classes (never test classes), scored by models that
   never saw them (``--val-model``, default ``crossfit``): two proxies of the shipped model, trained by
   ``scripts/train_shapesworld.py --classes half0`` / ``half1`` on every other training class, each
   scoring the pairs of the half it did not see, as the shipped model never saw the test classes. Why:
   the shipped model saw every training class, and the 12 ``VALIDATION_CLASSES`` alone hold one star
   class of 12 (the test classes: 16 of 60); on them every grid-6 setting pointed perfectly, with the
   shipped model and with a proxy that never saw them (``--val-model proxy``), so they could not choose.
   Proxies are trained into ``build/val_proxy`` when missing (fixed seed, about 3 min each on 2 cores)
   and their sha256 is recorded. Fixed-reference RISE: for each grid, one draw of ``--n-max`` masks is
   embedded once and the maps for every N prefix and every normalization ('centered', 'sane', 'rise') are computed from
   the same scores (checked against ``RISE.attribute`` on the first query). The setting with the best
   validation pointing game is chosen (ties: fewer masks, then 'centered', then the grid nearest the
   library default 6). Both-images RISE (SANE's 30 reference masks) is analysed on the same masks:
   its normalizations, and each perturbed reference's own map against how much of the reference's key
   object that reference mask kept.
2. ``test``: every method once on the test pairs (test classes, shipped model), RISE with the validation
   choice. ``--reuse-test JSON`` takes the test rows of an earlier results file whose test pairs and
   method settings are the same (checked), so a new validation choice reruns only what it changes.

Standard errors: over pairs, and over queries (each query's pairs share its image: the honest one).

Usage::

    # the committed results (about 20 min on 2 cores, plus 8 min to train the two proxies the first time)
    python benchmarks/saliency_causal.py --threads 2
    # a tiny run (the shipped model validates, so no proxy is trained)
    python benchmarks/saliency_causal.py --val-queries 2 --val-refs 2 --test-queries 2 --test-refs 2 \\
        --grids 6 --n-list 50,100 --n-max 100 --stem /tmp/quick --fast --val-model shipped
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common as C  # noqa: E402
from whymatch import metrics, ops, saliency  # noqa: E402
from whymatch.data import ShapesWorld  # noqa: E402
from whymatch.data.shapesworld import TRAIN_CLASSES, VALIDATION_CLASSES  # noqa: E402
from whymatch.metrics import causal_objects as CO  # noqa: E402
from whymatch.io import FileFormatError  # noqa: E402
from whymatch.models import load_default_model  # noqa: E402

P_KEEP = 0.5
ROOT = Path(__file__).resolve().parents[1]
SEED = 0
#: slack of the tolerant pointing game column: Zhang et al.'s 15 px at 224 px, scaled to ShapesWorld's 96 px
TOLERANCE = round(15 * 96 / 224)
NORMALIZATIONS = ("centered", "sane", "rise")
#: validation proxies: name -> [(train_shapesworld.py --classes choice, training images, the classes it never saw)]
PROXIES = {
    "proxy": [("fit", 7200, VALIDATION_CLASSES)],
    "crossfit": [("half0", 4500, TRAIN_CLASSES[1::2]), ("half1", 4500, TRAIN_CLASSES[0::2])],
}


def proxy_path(choice: str) -> Path:
    return ROOT / "build" / "val_proxy" / f"shapesworld_cnn_{choice}.pt"


def load_validation_models(spec: str) -> tuple[list, dict]:
    """([(model, classes)] folds of the validation stage, a description).

    'shipped': the shipped model on VALIDATION_CLASSES (it saw them in training); 'proxy': one proxy trained
    on FIT_CLASSES, on VALIDATION_CLASSES; 'crossfit': two proxies, each trained on half of the 60 training-split
    classes and validating on the other half (all 60 classes are validation classes, each unseen by the model
    that scores it); a path: those ShapesCNN weights on VALIDATION_CLASSES. Proxies are trained into
    build/val_proxy when missing (fixed seed; about 3-5 min each on 2 cores).
    """
    if spec == "shipped":
        return [(load_default_model("cpu"), VALIDATION_CLASSES)], {"model": "shipped", "sees_validation_classes": True}
    if spec not in PROXIES:
        path = Path(spec)
        if not path.is_file():
            raise SystemExit(f"--val-model: no weights file {path}")
        try:
            model = load_default_model("cpu", weights=path)
        except FileFormatError as exc:
            raise SystemExit(f"--val-model: {exc}") from None
        return [(model, VALIDATION_CLASSES)], {
            "model": str(path), "sees_validation_classes": None,
            "weights_sha256": [hashlib.sha256(path.read_bytes()).hexdigest()]}
    folds, commands, shas = [], [], []
    for choice, n_train, unseen in PROXIES[spec]:
        path = proxy_path(choice)
        cmd = ["scripts/train_shapesworld.py", "--classes", choice, "--n-train", str(n_train), "--weights",
               str(path.relative_to(ROOT)), "--results-dir", str(path.parent.relative_to(ROOT) / choice)]
        if not path.is_file():
            print(f"training a validation proxy: python {' '.join(cmd)}", flush=True)
            subprocess.run([sys.executable, *cmd], check=True, cwd=ROOT)
        folds.append((load_default_model("cpu", weights=path), unseen))
        commands.append("python " + " ".join(cmd))
        shas.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return folds, {"model": spec, "sees_validation_classes": False, "train_commands": commands,
                   "weights_sha256": shas, "classes": sum(len(c) for _, c in folds)}


# ------------------------------------------------------------------ pairs and ground truth
def load_pairs(split: str, n_queries: int, n_refs: int, folds) -> dict:
    """Query/reference images, key masks, object masks and the causal object effects of every pair.

    ``folds``: [(model, classes)]: the queries are split evenly over the folds; fold f draws its pairs from
    ``classes`` (None: the whole split) and its causal truth (and, in the validation stage, its maps) come from
    its own model. ``pairs["fold"][i]`` is query i's fold, ``pairs["sims"]`` the models.
    """
    queries, refs, keys, objs, ref_keys, qidx, ridx, fold_of, effs = [], [], [], [], [], [], [], [], []
    key_kind: list[tuple[str, str]] = []
    for f, (sim, classes) in enumerate(folds):
        nq = n_queries // len(folds) + (1 if f < n_queries % len(folds) else 0)
        if split == "validation":
            ds = ShapesWorld("train", n_samples=50 * len(classes), seed=0, classes=classes)
        else:
            ds = ShapesWorld("test", n_samples=3000, seed=0, classes=classes)
        ps = ds.pairs(nq, n_refs, seed=SEED)
        f_refs, f_q = [], []
        for qi, rr in zip(ps.query.tolist(), ps.references.tolist()):
            smp = ds.sample(qi)
            queries.append(smp.image)
            f_refs.append(torch.stack([ds[r][0] for r in rr]))
            ref_keys.append(torch.stack([ds.sample(r).key_mask for r in rr]))
            keys.append(smp.key_mask)
            objs.append(smp.object_masks)
            key_kind.append((smp.objects[0].shape, smp.objects[0].size))
            f_q += [qi] * len(rr)
            ridx += rr
            fold_of.append(f)
        refs += f_refs
        qidx += f_q
        effs.append(CO.causal_object_effects(sim, ds, f_q, sim.embed(torch.cat(f_refs))))
    width = max(e.effects.shape[1] for e in effs)
    eff = CO.CausalObjectEffects(
        effects=torch.cat([torch.nn.functional.pad(e.effects, (0, width - e.effects.shape[1]), value=float("nan"))
                           for e in effs]),
        base=torch.cat([e.base for e in effs]), n_objects=torch.cat([e.n_objects for e in effs]))
    pair_objs = CO.pad_object_masks([o for o in objs for _ in range(n_refs)])
    if pair_objs.shape[1] < eff.effects.shape[1]:  # pragma: no cover - same objects, same count
        raise RuntimeError("object masks and effects disagree on the object count")
    return {"queries": queries, "refs": refs, "ref_keys": ref_keys, "keys": keys, "objs": pair_objs,
            "effects": eff, "qidx": qidx, "ridx": ridx, "n_refs": n_refs, "fold": fold_of, "key_kind": key_kind,
            "sims": [sim for sim, _ in folds]}


def model_of(pairs: dict, qi: int):
    """The model that scores query ``qi``'s pairs (its fold's)."""
    return pairs["sims"][pairs["fold"][qi]]


def pair_keys(pairs: dict) -> torch.Tensor:
    return torch.cat([k[None].expand(pairs["n_refs"], -1, -1) for k in pairs["keys"]])


def sem(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)].float()
    return float(x.std() / x.numel() ** 0.5) if x.numel() > 1 else 0.0


def sem_by_query(x: torch.Tensor, n_refs: int) -> float:
    """Standard error over queries of the per-query means (the pairs of one query are not independent)."""
    per_q = torch.nanmean(x.float().reshape(-1, n_refs), dim=1)
    return sem(per_q)


def score_maps(maps: torch.Tensor, pairs: dict, shift: str = "none") -> dict:
    """Pointing game on the key object and agreement with the causal object, by both rules."""
    keys = pair_keys(pairs)
    eff = pairs["effects"]
    point = metrics.pointing_game(maps, keys).float()
    out = {"pairs": int(maps.shape[0]), "pointing": float(point.mean()), "pointing_sem": sem(point),
           "pointing_sem_query": sem_by_query(point, pairs["n_refs"])}
    loose = metrics.pointing_game(maps, keys, tolerance=TOLERANCE).float()
    out.update(pointing_tol=float(loose.mean()), pointing_tol_sem=sem(loose),
               pointing_tol_sem_query=sem_by_query(loose, pairs["n_refs"]))
    for rule in ("mass", "point"):
        top = CO.saliency_top_object(maps, pairs["objs"], rule, shift=shift if rule == "mass" else "none")
        agree = CO.causal_object_agreement(top, eff)
        out[f"agree_{rule}"] = float(torch.nanmean(agree))
        out[f"agree_{rule}_sem"] = sem(agree)
        out[f"agree_{rule}_sem_query"] = sem_by_query(agree, pairs["n_refs"])
        out[f"none_{rule}"] = float((top < 0).float().mean())
    return out


def truth_summary(pairs: dict) -> dict:
    eff = pairs["effects"]
    objs = pairs["objs"]
    top = eff.top
    largest = objs.flatten(2).sum(2).argmax(1)
    agree_largest = CO.causal_object_agreement(largest, eff)
    second = torch.nan_to_num(eff.effects, nan=-float("inf")).topk(2, dim=1).values[:, 1]
    return {
        "pairs": len(eff), "queries": len(pairs["queries"]), "refs_per_query": pairs["n_refs"],
        "causal_is_key": float((top == 0).float().mean()),
        "mean_top_drop": float(torch.nan_to_num(eff.effects, nan=-float("inf")).amax(1).mean()),
        "mean_second_drop": float(second[torch.isfinite(second)].mean()),
        "mean_base_similarity": float(eff.base.mean()),
        "chance_mass": float(CO.causal_object_chance(objs, eff, "mass").mean()),
        "chance_point": float(CO.causal_object_chance(objs, eff, "point").mean()),
        "chance_pointing_key": float(metrics.chance_level(pair_keys(pairs)).mean()),
        "largest_object_agreement": float(torch.nanmean(agree_largest)),
        "largest_object_agreement_sem": sem(agree_largest),
    }


# ------------------------------------------------------------------ RISE from shared scores
def rise_maps(grids, shifts, scores, size, normalize: str) -> torch.Tensor:
    """RISE maps from precomputed scores (N, K), as ``saliency.RISE`` normalizes them (checked in ``verify``)."""
    n = grids.shape[0]
    if normalize == "rise":
        return ops.rise_saliency(grids, shifts, scores, size) / (n * P_KEEP)
    if normalize == "centered":
        scores = scores - scores.mean(dim=0, keepdim=True)
    k = scores.shape[1]
    both = ops.rise_saliency(grids, shifts, torch.cat([scores, torch.ones(n, 1)], dim=1), size)
    msum = both[k:]
    scale = 1.0 if normalize == "centered" else float(n)
    return torch.where(msum > 0, both[:k] * scale / msum.clamp_min(1e-12), torch.zeros_like(both[:k]))


def perturbed_embeddings(sim, image, grids, shifts, batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, grids.shape[0], batch_size):
        out.append(sim(ops.rise_apply(grids[i:i + batch_size], shifts[i:i + batch_size], image, 0.0)))
    return torch.cat(out)


def masks_of(grids, shifts, size) -> torch.Tensor:
    """(M, H, W) full-size masks (a white image blended with a black baseline)."""
    return ops.rise_apply(grids, shifts, torch.ones(1, *size), 0.0)[:, 0]


def kept_share(grids, shifts, size, key: torch.Tensor) -> torch.Tensor:
    """(M,) share of the (H, W) boolean ``key`` object that each of M masks keeps."""
    return (masks_of(grids, shifts, size) * key).flatten(1).sum(1) / key.sum()


#: bins of the share of the reference's key object a reference mask kept (the last one includes 1.0)
KEPT_BINS = [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.01)]


def kept_bins(recs: list[tuple], stats: dict) -> list[dict]:
    """``recs`` = (kept share, value...) tuples binned by KEPT_BINS; ``stats`` = {name: f(selected recs)}."""
    out = []
    for lo, hi in KEPT_BINS:
        sel = [r for r in recs if lo <= r[0] < hi]
        if sel:
            out.append({"kept_from": lo, "kept_to": min(hi, 1.0), "maps": len(sel),
                        **{name: f(sel) for name, f in stats.items()}})
    return out


def verify(pairs: dict, grid: int, n_max: int, batch_size: int) -> dict:
    """The shared-score maps equal RISE.attribute's, fixed reference ('centered') and both images ('sane')."""
    q, r = pairs["queries"][0], pairs["refs"][0]
    sim = model_of(pairs, 0)
    size = tuple(q.shape[1:])
    ex = saliency.RISE(sim, n_masks=n_max, grid=grid, p=P_KEEP, seed=SEED, batch_size=batch_size)
    gen = torch.Generator().manual_seed(SEED)
    grids, shifts = ex.generate_masks(size, n_max, gen, torch.device("cpu"))
    with torch.no_grad():
        emb = perturbed_embeddings(sim, q, grids, shifts, batch_size)
        ref_emb = sim.embed(r)
        mine = rise_maps(grids, shifts, sim.pairwise(emb, ref_emb), size, "centered")
        lib = ex.attribute(q, r)
        m = 30
        scores = torch.zeros(n_max, r.shape[0])
        for k in range(r.shape[0]):
            rg, rs = ex.generate_masks(size, m, gen, torch.device("cpu"))
            scores[:, k] = sim.pairwise(emb, perturbed_embeddings(sim, r[k], rg, rs, batch_size)).mean(1)
        mine_both = rise_maps(grids, shifts, scores, size, "sane")
        lib_both = saliency.RISE(sim, n_masks=n_max, grid=grid, p=P_KEEP, seed=SEED, batch_size=batch_size,
                                 normalize="sane", fixed_reference=False, n_reference_masks=m).attribute(q, r)
    out = {"fixed_centered_max_abs_diff": float((mine - lib).abs().max()),
           "both_sane_max_rel_diff": float((mine_both - lib_both).abs().max() / lib_both.abs().max())}
    if out["fixed_centered_max_abs_diff"] > 1e-4 * float(lib.abs().max()) + 1e-6 or out["both_sane_max_rel_diff"] > 1e-4:
        raise RuntimeError(f"shared-score RISE maps differ from RISE.attribute: {out}")
    return out


def validation_sweep(pairs: dict, grids_list, n_list, n_max: int, m_ref: int, batch_size: int,
                     log) -> dict:
    size = tuple(pairs["queries"][0].shape[1:])
    rows, both_rows, per_ref = [], [], []
    for grid in grids_list:
        t0 = time.perf_counter()
        ex = saliency.RISE(model_of(pairs, 0), n_masks=n_max, grid=grid, p=P_KEEP, seed=SEED)     # masks only
        maps = {(n, z): [] for n in n_list for z in NORMALIZATIONS}
        both = {key: [] for key in [(z, m) for z in NORMALIZATIONS for m in (5, m_ref)] + [("centered_weighted", m_ref)]}
        for qi, (q, r) in enumerate(zip(pairs["queries"], pairs["refs"])):
            sim = model_of(pairs, qi)
            gen = torch.Generator().manual_seed(SEED + qi)
            grids, shifts = ex.generate_masks(size, n_max, gen, torch.device("cpu"))
            with torch.no_grad():
                emb = perturbed_embeddings(sim, q, grids, shifts, batch_size)
                ref_emb = sim.embed(r)
                scores = sim.pairwise(emb, ref_emb)                                  # (N, K)
                for n in n_list:
                    for z in NORMALIZATIONS:
                        maps[(n, z)].append(rise_maps(grids[:n], shifts[:n], scores[:n], size, z))
                # both images: M reference masks per reference, scores (N, M) per reference
                mean_scores = {key: torch.zeros(n_max, r.shape[0]) for key in both}
                for k in range(r.shape[0]):
                    rg, rs = ex.generate_masks(size, m_ref, gen, torch.device("cpu"))
                    r_emb = perturbed_embeddings(sim, r[k], rg, rs, batch_size)
                    sm = sim.pairwise(emb, r_emb)                                    # (N, M)
                    to_clean = sim.pairwise(r_emb, ref_emb[k:k + 1])[:, 0]           # (M,)
                    for (z, m) in both:
                        if z == "centered_weighted":
                            w = to_clean.clamp_min(0)
                            mean_scores[(z, m)][:, k] = (sm * w).sum(1) / w.sum().clamp_min(1e-12)
                        else:
                            mean_scores[(z, m)][:, k] = sm[:, :m].mean(1)
                    # each perturbed reference's own centred map: does it point, given what it kept?
                    own = rise_maps(grids, shifts, sm, size, "centered")             # (M, H, W)
                    kept = kept_share(rg, rs, size, pairs["ref_keys"][qi][k])
                    hit = metrics.pointing_game(own, pairs["keys"][qi][None].expand(m_ref, -1, -1)).float()
                    per_ref += [(grid, float(a), float(b), float(c)) for a, b, c in zip(kept, to_clean, hit)]
                for (z, m), sc in mean_scores.items():
                    both[(z, m)].append(rise_maps(grids, shifts, sc, size, "centered" if z.startswith("centered")
                                                  else z))
        for (n, z), ms in maps.items():
            row = score_maps(torch.cat(ms), pairs, shift="none" if z == "centered" else "mean")
            rows.append({"grid": grid, "n_masks": n, "normalize": z, **row})
        for (z, m), ms in both.items():
            row = score_maps(torch.cat(ms), pairs, shift="none" if z.startswith("centered") else "mean")
            both_rows.append({"grid": grid, "n_masks": n_max, "reference_masks": m, "normalize": z, **row})
        log(f"validation grid {grid}: {time.perf_counter() - t0:.0f} s; best pointing so far "
            f"{max(x['pointing'] for x in rows):.3f}")
    return {"rise": rows, "rise_both": both_rows, "per_reference": per_ref}


def choose(rows: list[dict]) -> dict:
    def key(r):
        return (-r["pointing"], r["n_masks"], NORMALIZATIONS.index(r["normalize"]), abs(r["grid"] - 6))
    return sorted(rows, key=key)[0]


def per_reference_table(per_ref: list, grid: int) -> list[dict]:
    """Pointing of each perturbed reference's own map, binned by the share of its key object it kept."""
    recs = [(k, s, h) for g, k, s, h in per_ref if g == grid]
    return kept_bins(recs, {"similarity_to_clean_reference": lambda sel: sum(r[1] for r in sel) / len(sel),
                            "pointing": lambda sel: sum(r[2] for r in sel) / len(sel)})


def both_images_why(pairs: dict, n_queries: int, grid: int, n_masks: int, m_ref: int, batch_size: int) -> dict:
    """Both-images RISE, per perturbed reference: how much of the reference's key object its mask kept, and the
    sign of its own centred query map on the query's key object (mean value there minus the mean elsewhere)."""
    size = tuple(pairs["queries"][0].shape[1:])
    ex = saliency.RISE(model_of(pairs, 0), n_masks=n_masks, grid=grid, p=P_KEEP, seed=SEED)     # masks only
    recs, avg = [], []
    for qi in range(min(n_queries, len(pairs["queries"]))):
        q, r = pairs["queries"][qi], pairs["refs"][qi]
        sim = model_of(pairs, qi)
        key = pairs["keys"][qi]
        gen = torch.Generator().manual_seed(SEED + 1000 + qi)
        grids, shifts = ex.generate_masks(size, n_masks, gen, torch.device("cpu"))
        with torch.no_grad():
            emb = perturbed_embeddings(sim, q, grids, shifts, batch_size)
            ref_emb = sim.embed(r)
            for k in range(r.shape[0]):
                rg, rs = ex.generate_masks(size, m_ref, gen, torch.device("cpu"))
                r_emb = perturbed_embeddings(sim, r[k], rg, rs, batch_size)
                own = rise_maps(grids, shifts, sim.pairwise(emb, r_emb), size, "centered")      # (M, H, W)
                contrast = own[:, key].mean(1) - own[:, ~key].mean(1)
                scale = own.flatten(1).abs().amax(1).clamp_min(1e-12)
                kept = kept_share(rg, rs, size, pairs["ref_keys"][qi][k])
                to_clean = sim.pairwise(r_emb, ref_emb[k:k + 1])[:, 0]
                recs += [(float(a), float(b), float(c)) for a, b, c in zip(kept, to_clean, contrast / scale)]
                mean_map = own.mean(0)
                avg.append(float((mean_map[key].mean() - mean_map[~key].mean()) / mean_map.abs().max()))
    bins = kept_bins(recs, {"similarity_to_clean_reference": lambda sel: sum(r[1] for r in sel) / len(sel),
                            "key_contrast": lambda sel: sum(r[2] for r in sel) / len(sel),
                            "share_negative": lambda sel: sum(r[2] < 0 for r in sel) / len(sel)})
    return {"queries": min(n_queries, len(pairs["queries"])), "grid": grid, "n_masks": n_masks,
            "reference_masks": m_ref, "bins": bins, "mean_kept": sum(k for k, _, _ in recs) / len(recs),
            "averaged_map_key_contrast": sum(avg) / len(avg)}


def where_misses(pairs: dict, chosen: dict, n_max: int, batch_size: int) -> dict:
    """The chosen fixed-reference RISE setting on the validation pairs again, pair by pair: where each map's
    maximum lies (the key object, another object, the background) and how far a miss is from the key object,
    by the key object's shape and size. Same masks as ``validation_sweep`` (the prefix of its ``n_max`` draw)."""
    size = tuple(pairs["queries"][0].shape[1:])
    grid, n = chosen["grid"], chosen["n_masks"]
    ex = saliency.RISE(model_of(pairs, 0), n_masks=n, grid=grid, p=P_KEEP, seed=SEED)     # masks only
    recs = []
    for qi, (q, r) in enumerate(zip(pairs["queries"], pairs["refs"])):
        sim = model_of(pairs, qi)
        gen = torch.Generator().manual_seed(SEED + qi)
        grids, shifts = ex.generate_masks(size, n_max, gen, torch.device("cpu"))
        grids, shifts = grids[:n], shifts[:n]
        with torch.no_grad():
            scores = sim.pairwise(perturbed_embeddings(sim, q, grids, shifts, batch_size), sim.embed(r))
            maps = rise_maps(grids, shifts, scores, size, chosen["normalize"])
        key = pairs["keys"][qi]
        objs = pairs["objs"][qi * pairs["n_refs"]]
        dist = key_distance(key)
        for m in maps:
            at = int(m.flatten().argmax())
            y, x = divmod(at, size[1])
            on_obj = objs[:, y, x].nonzero().flatten().tolist()
            where = "key" if key[y, x] else ("object" if on_obj else "background")
            recs.append((*pairs["key_kind"][qi], where, float(dist[y, x])))
    pointing = sum(r[2] == "key" for r in recs) / len(recs)
    if abs(pointing - chosen["pointing"]) > 1e-6:
        raise RuntimeError(f"where_misses: pointing {pointing} differs from the sweep's {chosen['pointing']}")
    out = {"setting": {k: chosen[k] for k in ("grid", "n_masks", "normalize")}, "pointing": pointing, "by": {}}
    for field, pos in (("shape", 0), ("size", 1)):
        rows = []
        for value in sorted({r[pos] for r in recs}):
            sel = [r for r in recs if r[pos] == value]
            miss = [r for r in sel if r[2] != "key"]
            rows.append({field: value, "pairs": len(sel), "pointing": sum(r[2] == "key" for r in sel) / len(sel),
                         "miss_background": sum(r[2] == "background" for r in sel) / len(sel),
                         "miss_object": sum(r[2] == "object" for r in sel) / len(sel),
                         "miss_median_px": sorted(r[3] for r in miss)[len(miss) // 2] if miss else None})
        out["by"][field] = rows
    return out


def key_distance(key: torch.Tensor) -> torch.Tensor:
    """(H, W) Euclidean distance in pixels from each pixel to the nearest pixel of the boolean mask ``key``."""
    pts = key.nonzero().float()                                                   # (K, 2)
    h, w = key.shape
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2).float()
    return torch.cdist(grid, pts).amin(1).reshape(h, w)


# ------------------------------------------------------------------ test: the library's explainers
def test_configs(chosen: dict, n_both: int, args) -> dict:
    rise = dict(n_masks=chosen["n_masks"], grid=chosen["grid"], p=P_KEEP, normalize=chosen["normalize"], seed=SEED,
                batch_size=args.batch_size)
    both = dict(n_masks=n_both, grid=8, p=P_KEEP, normalize="sane", fixed_reference=False, n_reference_masks=30,
                seed=SEED, batch_size=args.batch_size)
    lime = dict(n_samples=args.lime_samples, segments="slic", batch_size=args.batch_size, seed=SEED)
    mask = dict(n_iter=args.mask_steps, seed=SEED, batch_size=64)
    return {
        "attention": ("SimilarityAttention (layer4)", {"target_layers": "layer4"},
                      lambda s: saliency.SimilarityAttention(s, "layer4"), "none"),
        "gradcam": ("EmbeddingGradCAM (layer4)", {"target_layers": "layer4"},
                    lambda s: saliency.EmbeddingGradCAM(s, "layer4"), "none"),
        "sliding": ("Sliding window (defaults: window 24, stride 6)", {}, lambda s: saliency.SlidingWindow(s), "none"),
        "rise": ("RISE fixed reference (chosen on validation)", rise, lambda s: saliency.RISE(s, **rise),
                 "none" if rise["normalize"] == "centered" else "mean"),
        "rise_both": ("RISE both images (SANE: grid 8, 30 reference masks, normalize 'sane')", both,
                      lambda s: saliency.RISE(s, **both), "mean"),
        "lime": (f"LIME (SLIC, {args.lime_samples} samples)", lime, lambda s: saliency.LIME(s, **lime), "none"),
        "mask": (f"Mask (preset 'real', {args.mask_steps} steps)", mask, lambda s: saliency.Mask(s, **mask), "none"),
    }


def test_row(sim, cfg: tuple, pairs: dict) -> dict:
    """One test method's row: its maps scored (``score_maps``), its settings, seconds and the load after it."""
    label, settings, factory, shift = cfg
    maps, secs = run_test_method(sim, factory, pairs)
    row = score_maps(maps, pairs, shift)
    row.update(label=label, settings=settings, settings_key=json.dumps(settings, sort_keys=True), seconds=secs,
               mass_shift=shift, load_after=C.system_load())
    return row


def run_test_method(sim, factory, pairs: dict) -> tuple[torch.Tensor, float]:
    ex = factory(sim)
    t0 = time.perf_counter()
    if isinstance(ex, saliency.Mask):
        qs = torch.cat([q[None].expand(r.shape[0], -1, -1, -1) for q, r in zip(pairs["queries"], pairs["refs"])])
        maps = ex.attribute_pairs(qs, torch.cat(pairs["refs"])).detach().float()
    else:
        maps = torch.cat([ex.attribute(q, r).detach().float() for q, r in zip(pairs["queries"], pairs["refs"])])
    return maps, time.perf_counter() - t0


# ------------------------------------------------------------------ markdown
def fmt(r: dict, key: str) -> str:
    return f"{r[key]:.3f} ± {r[key + '_sem']:.3f} ({r[key + '_sem_query']:.3f})"


def validation_model_note(vm: dict | None, vt: dict) -> str:
    """The sentence that says which classes and models the validation stage used."""
    pairs = f"{vt['queries']} x {vt['refs_per_query']} = {vt['pairs']} pairs"
    if not vm or vm.get("model") == "shipped":
        return (f"Validation: {pairs} from the 12 VALIDATION_CLASSES (training split, never test), scored with the "
                "shipped model (which saw those classes in training)")
    if vm["model"] == "crossfit":
        cmds = "`, `".join(vm["train_commands"])
        return (f"Validation: {pairs} from all {vm['classes']} training-split classes (never test), cross-fitted: "
                f"two proxies of the shipped model (its recipe on half of those classes: `{cmds}`; weights sha256 "
                f"{', '.join(h[:12] for h in vm['weights_sha256'])}), each scoring the pairs of the half it never "
                "saw, as the shipped model never saw the test classes")
    cmd = "; ".join(vm.get("train_commands") or [vm["model"]])
    return (f"Validation: {pairs} from the 12 VALIDATION_CLASSES (training split, never test), scored with a "
            f"model that never saw them (`{cmd}`; weights sha256 {', '.join(h[:12] for h in vm['weights_sha256'])})")


def markdown(data: dict) -> str:
    m = data["machine"]
    tt, vt = data["truth"]["test"], data["truth"]["validation"]
    lines = [
        "# Saliency against causal object removal (ShapesWorld, issue 17 item 6)", "",
        f"`{data['command']}` on {m.get('cpu_model', '?')} ({m.get('torch_threads')} threads), torch "
        f"{m.get('torch', '?')}, commit {str(m.get('git_commit'))[:10]}; {data['seconds_total']:.0f} s in all "
        f"(this run's stages; cached stages keep their own times). Seed {SEED} for pairs and masks.", "",
        C.load_note(data).strip(), "",
        f"Test: {tt['queries']} queries x {tt['refs_per_query']} same-class references = {tt['pairs']} pairs from "
        "the unseen test classes, shipped model. " + validation_model_note(data.get("validation_model"), vt)
        + "; every setting was chosen there, and test was run once.", "",
        "Causal object = the object whose removal (re-render without it, everything else pixel-identical) drops "
        "the similarity most. A map agrees when it names that object: **mass** = the object whose mask holds the "
        "largest sum of the centred map (uncentred maps: minus their mean), **point** = the object under the "
        "map's maximum (background: no object). Values ± standard error over pairs (in brackets: over queries, "
        "the honest one, since a query's pairs share its image).", "",
        f"Ground truth (test): the causal object is the key object in {tt['causal_is_key']:.3f} of pairs; removing "
        f"it drops the similarity by {tt['mean_top_drop']:.3f} on average (the next object: "
        f"{tt['mean_second_drop']:.3f}; base similarity {tt['mean_base_similarity']:.3f}). Naming the largest "
        f"object (always the key object here) agrees in {tt['largest_object_agreement']:.3f}: object removal on "
        "ShapesWorld asks little more than the pointing game does.", "",
        "## Test (once)", "",
        f"'pointing (key)' is the strict pointing game (the map's maximum on the key object's pixels), the one "
        f"the goal is stated in; the column after it gives the maximum {TOLERANCE} pixels of slack, Zhang et al.'s "
        "15 px at 224 px scaled to 96 px.", "",
    ]
    head = ["method", "agreement (mass) ↑", "agreement (point) ↑", "pointing (key) ↑",
            f"pointing, {TOLERANCE} px slack ↑", "s / query"]
    body = []
    for name, r in data["test"].items():
        body.append([r["label"], fmt(r, "agree_mass"), fmt(r, "agree_point"), fmt(r, "pointing"),
                     fmt(r, "pointing_tol") if "pointing_tol" in r else "not run",
                     f"{r['seconds'] / tt['queries']:.2f}"])
    body.append(["chance (random object / random pixel)", f"{tt['chance_mass']:.3f}", f"{tt['chance_point']:.3f}",
                 f"{tt['chance_pointing_key']:.3f}", "", ""])
    body.append(["largest object (a prior, not a map)", f"{tt['largest_object_agreement']:.3f}", "", "", "", ""])
    lines += [C.md_table(head, body), ""]
    missing = [k for k in data.get("planned", []) if k not in data["test"]]
    if missing:
        lines += [f"Not run (time): {', '.join(missing)}.", ""]
    ch = data["chosen"]
    lines += ["## Fixed-reference RISE: settings chosen on validation", "",
              f"Chosen: grid {ch['grid']}, N = {ch['n_masks']}, normalize '{ch['normalize']}' (validation pointing "
              f"{ch['pointing']:.3f}); rule: best validation pointing, ties to fewer masks, then 'centered', then "
              "the grid nearest the library default 6. One mask draw per grid, embedded once; every N is a prefix "
              "of it. The shared-score maps equal `RISE.attribute`'s (max difference "
              f"{data['verify']['fixed_centered_max_abs_diff']:.1e}; both images {data['verify']['both_sane_max_rel_diff']:.1e} "
              "relative).", ""]
    head = ["grid", "N", "normalize", "pointing ↑", "agreement (mass)", "agreement (point)"]
    body = [[r["grid"], r["n_masks"], r["normalize"], fmt(r, "pointing"), fmt(r, "agree_mass"), fmt(r, "agree_point")]
            for r in sorted(data["validation"]["rise"], key=lambda r: (r["grid"], r["n_masks"], r["normalize"]))]
    lines += [C.md_table(head, body), ""]
    lines += ["## Both-images RISE (SANE's mode) on validation", "",
              "Same query masks as above; each reference perturbed by M RISE masks (SANE: 30); the map is the mean "
              "of the M maps (computed exactly as the map of the mean scores). 'sane' = N x (centred + mean score) "
              "per pixel, an increasing affine map of the 'centered' one, so the two always point at the same pixel. "
              "'centered_weighted' (exploratory, not a library option) weights each perturbed reference by its "
              "similarity to the clean reference.", ""]
    head = ["grid", "M", "normalize", "pointing ↑", "agreement (mass)", "agreement (point)"]
    body = [[r["grid"], r["reference_masks"], r["normalize"], fmt(r, "pointing"), fmt(r, "agree_mass"),
             fmt(r, "agree_point")]
            for r in sorted(data["validation"]["rise_both"], key=lambda r: (r["grid"], r["reference_masks"],
                                                                            r["normalize"]))]
    lines += [C.md_table(head, body), ""]
    lines += ["Each perturbed reference's own (centred) map, by the share of the reference's key object its mask "
              "kept (all validation grids pooled per grid):", ""]
    head = ["grid", "key object kept", "maps", "similarity to the clean reference", "pointing of its own map"]
    body = []
    for g, rows in data["validation"]["per_reference_bins"].items():
        for b in rows:
            body.append([g, f"[{b['kept_from']:.2f}, {b['kept_to']:.2f})", b["maps"],
                         f"{b['similarity_to_clean_reference']:.3f}", f"{b['pointing']:.3f}"])
    lines += [C.md_table(head, body), ""]
    wm = data.get("where_misses")
    if wm:
        st_ = wm["setting"]
        lines += [f"Where the chosen setting (grid {st_['grid']}, N = {st_['n_masks']}, '{st_['normalize']}') misses, "
                  f"on the validation pairs (pointing {wm['pointing']:.3f}, the same maps as the sweep): where each "
                  "map's maximum lies, by the query's key object; 'distance' is the median distance of a miss from "
                  "the key object, in pixels of the 96-pixel image.", ""]
        for field in ("shape", "size"):
            head = [field, "pairs", "pointing", "max on the background", "max on another object",
                    "miss distance (px)"]
            body = [[r[field], r["pairs"], f"{r['pointing']:.3f}", f"{r['miss_background']:.3f}",
                     f"{r['miss_object']:.3f}", "" if r["miss_median_px"] is None else f"{r['miss_median_px']:.1f}"]
                    for r in wm["by"][field]]
            lines += [C.md_table(head, body), ""]
    why = data.get("both_why")
    if why:
        lines += [f"Why (validation, first {why['queries']} queries x their references, grid {why['grid']}, "
                  f"N = {why['n_masks']}, {why['reference_masks']} masks per reference): each perturbed reference's "
                  "own centred map, its key-object contrast = (mean on the query's key object - mean elsewhere) / "
                  f"max |map|. Reference masks keep {why['mean_kept']:.2f} of the reference's key object on average; "
                  f"the averaged (both-images) map's contrast is {why['averaged_map_key_contrast']:.3f}.", ""]
        head = ["key object kept", "maps", "similarity to the clean reference", "key-object contrast",
                "share with negative contrast"]
        body = [[f"[{b['kept_from']:.2f}, {b['kept_to']:.2f})", b["maps"], f"{b['similarity_to_clean_reference']:.3f}",
                 f"{b['key_contrast']:.3f}", f"{b['share_negative']:.3f}"] for b in why["bins"]]
        lines += [C.md_table(head, body), ""]
    if data.get("note"):
        lines += [data["note"], ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ main
def reuse_test_rows(path: Path, truth: dict, into: dict) -> list[str]:
    """Copy the test rows of an earlier results file ``path`` into ``into`` when its test pairs are this run's.

    The pairs are compared by their ground-truth summary (counts exactly, every mean to 1e-6: the thread count
    changes float sums in the last bits); a row is then used only where its ``settings_key`` equals the current
    method's (checked where the methods run).
    """
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--reuse-test: cannot read {path} as a results file: {exc}") from None
    if not isinstance(old, dict):
        raise SystemExit(f"--reuse-test: {path} is not a saliency_causal results file (no JSON object)")
    prev = old.get("truth", {})
    prev = prev.get("test", {}) if isinstance(prev, dict) else {}
    if not isinstance(prev, dict) or not isinstance(old.get("test", {}), dict):
        raise SystemExit(f"--reuse-test: {path} is not a saliency_causal results file (its 'truth' or 'test' is "
                         "not an object)")
    if set(prev) != set(truth) or any(
            (prev[k] != v) if isinstance(v, int) else abs(prev[k] - v) > 1e-6 * max(1.0, abs(v))
            for k, v in truth.items()):
        raise SystemExit(f"--reuse-test: {path} was run on other test pairs (its ground truth differs)")
    taken = []
    for name, row in old.get("test", {}).items():
        if name not in into:
            into[name] = row
            taken.append(name)
    return taken


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--val-queries", type=int, default=32)
    ap.add_argument("--val-refs", type=int, default=8)
    ap.add_argument("--test-queries", type=int, default=38)
    ap.add_argument("--test-refs", type=int, default=8)
    ap.add_argument("--grids", default="6,8,10")
    ap.add_argument("--n-list", default="250,500,1000,2000,4000")
    ap.add_argument("--n-max", type=int, default=4000)
    ap.add_argument("--val-model", default="crossfit",
                    help="models of the validation stage: 'crossfit' (two proxies, each trained on half the training "
                         "classes, validating on the other half), 'proxy' (trained without VALIDATION_CLASSES), "
                         "'shipped' (saw them in training), or a ShapesCNN weights file; proxies are built into "
                         "build/val_proxy when missing")
    ap.add_argument("--reuse-test", default="", metavar="JSON",
                    help="take test rows from this earlier results file where its test pairs and a method's "
                         "settings are the same as this run's")
    ap.add_argument("--both-masks", type=int, default=1000, help="query masks of both-images RISE on test")
    ap.add_argument("--lime-samples", type=int, default=300)
    ap.add_argument("--mask-steps", type=int, default=50)
    ap.add_argument("--methods", default="attention,gradcam,sliding,rise,rise_both,lime,mask")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--stem", default=str(C.RESULTS / "saliency_causal"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--note", default="")
    ap.add_argument("--fast", action="store_true", help="skip the check of the shared-score maps against RISE.attribute (smoke tests)")
    ap.add_argument("--why-queries", type=int, default=8, help="validation queries of the both-images analysis")
    ap.add_argument("--why-masks", type=int, default=500, help="query masks of the both-images analysis")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--only-test", action="store_true",
                    help="run only the listed test methods (not 'rise', which needs the validation choice) into "
                         "<stem>.partial.json, write no results: for a second process beside the main run")
    ap.add_argument("--cached-only", action="store_true",
                    help="run no test method that is not cached (the table names what is missing)")
    ap.add_argument("--merge", default="", metavar="STEM",
                    help="take the test rows of STEM.partial.json (an --only-test run with the same settings)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    load0 = C.system_load()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sim = load_default_model("cpu")
    val_folds, val_model = load_validation_models(args.val_model)
    grids_list = [int(x) for x in args.grids.split(",")]
    n_list = sorted(int(x) for x in args.n_list.split(","))
    if max(n_list) > args.n_max:
        raise SystemExit(f"--n-list must not exceed --n-max ({args.n_max}), got {n_list}")
    partial = Path(args.stem + ".partial.json")
    key = {k: v for k, v in vars(args).items() if k not in ("stem", "fresh", "note", "methods", "lime_samples",
                                                             "mask_steps", "batch_size", "threads", "only_test",
                                                             "merge", "why_queries", "why_masks", "cached_only",
                                                             "reuse_test")}
    cache = {"key": key, "stages": {}}
    if partial.is_file() and not args.fresh:
        old = json.loads(partial.read_text())
        if old.get("key") == key:
            cache = old

    def save():
        C.atomic_write_text(partial, json.dumps(cache, indent=1) + "\n")

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    val = load_pairs("validation", args.val_queries, args.val_refs, val_folds)
    test = load_pairs("test", args.test_queries, args.test_refs, [(sim, None)])
    log("pairs and causal ground truth ready")
    st = cache["stages"]
    if args.reuse_test:
        reused = reuse_test_rows(Path(args.reuse_test), truth_summary(test), st.setdefault("test", {}))
        log(f"test rows offered by {args.reuse_test}: {', '.join(reused) or 'none'}")

    def run_and_save(name: str, cfgs: dict) -> None:
        row = st["test"][name] = test_row(sim, cfgs[name], test)
        save()
        log(f"{name}: mass {row['agree_mass']:.3f} point {row['agree_point']:.3f} pointing {row['pointing']:.3f} "
            f"({row['seconds']:.0f} s)")

    if args.merge:
        other = json.loads(Path(args.merge + ".partial.json").read_text())
        if other.get("key") != key:
            raise SystemExit(f"--merge: {args.merge}.partial.json was run with other settings: {other.get('key')}")
        st.setdefault("test", {}).update(other["stages"].get("test", {}))
        save()
    if args.only_test:
        if "rise" in args.methods.split(","):
            raise SystemExit("--only-test cannot run 'rise': its setting is chosen on validation")
        cfgs = test_configs({"grid": 6, "n_masks": args.n_max, "normalize": "centered"}, args.both_masks, args)
        st.setdefault("test", {})
        for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
            if name in st["test"]:
                continue
            run_and_save(name, cfgs)
        return
    if "verify" not in st:
        st["verify"] = ({"fixed_centered_max_abs_diff": float("nan"), "both_sane_max_rel_diff": float("nan")}
                        if args.fast else verify(val, grids_list[0], args.n_max, args.batch_size))
        save()
    if "validation" not in st:
        t0 = time.perf_counter()
        res = validation_sweep(val, grids_list, n_list, args.n_max, 30, args.batch_size, log)
        res["per_reference_bins"] = {str(g): per_reference_table(res["per_reference"], g) for g in grids_list}
        res["seconds"] = time.perf_counter() - t0
        del res["per_reference"]
        st["validation"] = res
        save()
    if "both_why" not in st and args.why_queries:
        t0 = time.perf_counter()
        st["both_why"] = both_images_why(val, args.why_queries, 8, args.why_masks, 30, args.batch_size)
        st["both_why"]["seconds"] = time.perf_counter() - t0
        save()
    chosen = choose(st["validation"]["rise"])
    log(f"chosen: {chosen['grid']} {chosen['n_masks']} {chosen['normalize']} ({chosen['pointing']:.3f})")
    if "where_misses" not in st:
        t0 = time.perf_counter()
        st["where_misses"] = where_misses(val, chosen, args.n_max, args.batch_size)
        st["where_misses"]["seconds"] = time.perf_counter() - t0
        save()
    cfgs = test_configs(chosen, args.both_masks, args)
    planned = [m.strip() for m in args.methods.split(",") if m.strip()]
    st.setdefault("test", {})
    for name in planned:
        row = st["test"].get(name)
        if row and row.get("settings_key") == json.dumps(cfgs[name][1], sort_keys=True) and (
                "pointing_tol" in row or args.cached_only):
            log(f"{name}: cached" + ("" if "pointing_tol" in row else " (older row: no tolerant pointing column)"))
            continue
        if args.cached_only:
            log(f"{name}: not in the cache, not run (--cached-only)")
            continue
        run_and_save(name, cfgs)
    data = {
        "benchmark": "saliency_causal",
        "command": "python benchmarks/saliency_causal.py " + " ".join(sys.argv[1:]),
        "seed": SEED, "p": P_KEEP,
        "settings_selected_on": "validation",
        "validation_model": val_model,
        "truth": {"validation": truth_summary(val), "test": truth_summary(test)},
        "verify": st["verify"],
        "validation": st["validation"],
        "both_why": st.get("both_why"),
        "where_misses": st.get("where_misses"),
        "chosen": {k: chosen[k] for k in ("grid", "n_masks", "normalize", "pointing", "agree_mass", "agree_point")},
        "test": {k: st["test"][k] for k in planned if k in st["test"]},
        "planned": planned,
        "machine": {**C.machine_info("cpu"), "load_at_start": load0},
        "load_at_end": C.system_load(),
        "seconds_total": time.perf_counter() - t_start,
        "note": args.note,
    }
    C.write_and_show(args.stem, data, markdown(data))


if __name__ == "__main__":
    main()
