"""Attribute discovery on ShapesWorld (SANE appendix C): salient-patch clusters against full-frame clusters.

Protocol: ``--n`` ShapesWorld test-split images (96 px, the shipped model's size; seed
``--seed``, 3000 samples; a random subset drawn with ``--seed``), the shipped model
(``load_default_model()``). Each image gets its ``--k-refs`` nearest other images under the
model's cosine similarity; the saliency of the image for those references locates its peak
cell on a 7 x 7 lattice; a patch around that cell is embedded and the patches are clustered
into ``--n-attributes`` discovered attributes (``whymatch.attributes.discovery``). Rows:

- discovery with RISE (the SANE explainer; ``--rise-masks`` masks per image) on the first
  ``--n-rise`` images of the subset only, because RISE costs n_masks forward passes per image on this CPU;
- discovery with similarity attention (SimilarityAttention at layer4, siamese; one
  forward/backward per image) on all ``--n`` images, the same pipeline with a cheap explainer;
- an oracle peak: saliency maps peaked at the key object's true centre, so the patch is the
  best the 7 x 7 binning allows (an upper bound for the peak step);
- the full-frame baseline: k-means on whole-image embeddings;
- random clusters (uniform), the chance level of purity and NMI for this many clusters.

Every patch size in ``--patches`` reuses the same saliency maps (computed once per explainer).
Scores: purity and NMI of the clusters against the KEY object's shape (5 values), colour (6)
and pattern (4), each separately, and the fraction of patches whose box covers the key
object's centre. Times: host clock, one process, after a short warm-up.

Usage::

    python benchmarks/discovery_shapesworld.py          # writes benchmarks/results/discovery_shapesworld.{json,md}
    python benchmarks/discovery_shapesworld.py --n 60 --n-rise 12 --rise-masks 100 --stem /tmp/quick
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common as C  # noqa: E402
from whymatch.attributes.discovery import (cluster_purity, discover_attributes,  # noqa: E402
                                           full_frame_attributes)
from whymatch.data import ShapesWorld  # noqa: E402
from whymatch.data.shapesworld import COLOURS, PATTERNS, SHAPES  # noqa: E402
from whymatch.models import load_default_model  # noqa: E402
from whymatch.saliency import RISE, SimilarityAttention  # noqa: E402

FACTORS = ("shape", "colour", "pattern")


class Recording:
    """Wraps an explainer and keeps its maps, so that other patch sizes reuse them."""

    def __init__(self, explainer) -> None:
        self.explainer = explainer
        self.maps: list[torch.Tensor] = []

    def attribute(self, query, references):
        m = self.explainer.attribute(query, references)
        self.maps.append(m.detach().cpu())
        return m

    def stacked(self) -> torch.Tensor:
        return torch.stack(self.maps)


def key_truth(ds: ShapesWorld, indices: list[int]) -> dict[str, torch.Tensor]:
    shape, colour, pattern, centre = [], [], [], []
    for i in indices:
        k = ds.sample(i).key_object
        shape.append(SHAPES.index(k.shape))
        colour.append(COLOURS.index(k.colour))
        pattern.append(PATTERNS.index(k.pattern))
        centre.append(k.centre)
    return {"shape": torch.tensor(shape), "colour": torch.tensor(colour), "pattern": torch.tensor(pattern),
            "centre": torch.tensor(centre, dtype=torch.float64)}


def oracle_maps(centres: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, H, W) maps with a single peak at each key object's centre pixel."""
    n = centres.shape[0]
    maps = torch.zeros(n, 1, size, size)
    yx = centres.floor().long().clamp(0, size - 1)
    maps[torch.arange(n), 0, yx[:, 0], yx[:, 1]] = 1.0
    return maps


def score(res, truth: dict[str, torch.Tensor], n: int) -> dict:
    a = res.assignments[:n, 0]
    out = {}
    for f in FACTORS:
        r = cluster_purity(a, truth[f][:n])
        out[f] = {"purity": r["purity"], "nmi": r["nmi"]}
    b = res.patch_boxes[:n, 0].double()
    cy, cx = truth["centre"][:n, 0], truth["centre"][:n, 1]
    cover = (b[:, 0] <= cy) & (cy < b[:, 2]) & (b[:, 1] <= cx) & (cx < b[:, 3])
    out["covers_key_centre"] = float(cover.double().mean())
    out["n_clusters_used"] = int(torch.unique(a).numel())
    out["timings_s"] = dict(res.timings)
    return out


def markdown(data: dict) -> str:
    m = data["machine"]
    s = data["settings"]
    headers = ["method", "images", "patch"] + [f"{f} purity / NMI" for f in FACTORS] + ["covers key centre",
                                                                                         "seconds"]
    rows = []
    for r in data["rows"]:
        cells = [r["label"], r["n_images"], r["patch"]]
        for f in FACTORS:
            cells.append(f"{r[f]['purity']:.3f} / {r[f]['nmi']:.3f}")
        cells.append("" if r["covers_key_centre"] is None else f"{r['covers_key_centre']:.3f}")
        cells.append("" if r["seconds"] is None else f"{r['seconds']:.1f}")
        rows.append(cells)
    lines = [
        "# Attribute discovery on ShapesWorld (SANE appendix C)",
        "",
        f"`{data['command']}` on {m.get('gpu') or m.get('cpu_model', '?')} ({m.get('device', 'cpu')}, "
        f"{m.get('torch_threads')} threads), torch {m.get('torch', '?')}, faiss {data['faiss']}, commit "
        f"{str(m.get('git_commit'))[:10]}; {data['total_s']:.0f} s in all.",
        f"ShapesWorld test split (unseen classes, {data['image_size']} px), shipped model; "
        f"{s['n_attributes']} clusters (k-means, {s['backend']} backend, {s['n_iter']} iterations, seed "
        f"{s['seed']}); K = {s['k_refs']} kNN references per image; peaks on a {s['grid']} x {s['grid']} lattice; "
        f"patch side as a fraction of the image side. RISE: {s['rise_masks']} masks, grid {s['rise_grid']}, "
        f"p 0.5. Purity and NMI of the clusters against the key object's shape (5 values), colour (6) and pattern "
        f"(4); 'covers key centre': fraction of patches whose box holds the key object's centre. Seconds: the "
        f"whole discovery call (saliency included) for the first patch size; later patch sizes reuse the maps.",
        "",
        C.md_table(headers, rows),
        C.load_note(data),
    ]
    if data.get("note"):
        lines += [data["note"], ""]
    return "\n".join(lines)


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--n", type=int, default=600, help="images for attention / oracle / full-frame rows")
    ap.add_argument("--n-rise", type=int, default=90, help="images for the RISE rows (the first ones)")
    ap.add_argument("--rise-masks", type=int, default=300)
    ap.add_argument("--rise-grid", type=int, default=8)
    ap.add_argument("--n-attributes", type=int, default=18)
    ap.add_argument("--k-refs", type=int, default=5)
    ap.add_argument("--patches", type=float, nargs="+", default=[0.25, 0.4])
    ap.add_argument("--grid", type=int, default=7)
    ap.add_argument("--n-iter", type=int, default=20)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--stem", default=str(C.RESULTS / "discovery_shapesworld"))
    ap.add_argument("--note", default="", help="a paragraph appended to the markdown")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import faiss

    machine = C.machine_info("cpu")
    t_all = time.perf_counter()
    sim = load_default_model()
    size = 96
    ds = ShapesWorld("test", 3000, size, seed=args.seed)
    n = args.n
    # a seeded random subset: consecutive samples run through the classes in id order, so the
    # first few share a shape
    indices = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
    imgs = ds.images(indices)
    truth = key_truth(ds, indices)
    common = dict(grid=args.grid, n_iter=args.n_iter, seed=args.seed, backend=args.backend)
    # warm-up: thread pools, faiss import, the allocator
    discover_attributes(sim, imgs[:8], 2, k_refs=2, n_masks=16, **common)

    rows = []

    def add(key, label, res, n_img, patch, seconds):
        r = {"key": key, "label": label, "n_images": n_img, "patch": patch, "seconds": seconds}
        r.update(score(res, truth, n_img))
        if res.peak_cells[0, 0] < 0:
            r["covers_key_centre"] = None
        rows.append(r)
        print(f"{label:45s} n={n_img:4d} patch={patch} " + " ".join(
            f"{f}={r[f]['purity']:.3f}/{r[f]['nmi']:.3f}" for f in FACTORS)
            + f" cover={r['covers_key_centre']} t={seconds}", flush=True)

    def explained(key, label, explainer, n_img):
        rec = Recording(explainer)
        for j, patch in enumerate(args.patches):
            t = time.perf_counter()
            if j == 0:
                res = discover_attributes(sim, imgs[:n_img], args.n_attributes, k_refs=args.k_refs, explainer=rec,
                                          patch=patch, show_progress=args.progress, **common)
            else:
                res = discover_attributes(sim, imgs[:n_img], args.n_attributes, saliency=rec.stacked(),
                                          patch=patch, **common)
            add(key, label, res, n_img, patch, time.perf_counter() - t if j == 0 else None)

    # RISE (the SANE explainer) on the first n_rise images, with its own baselines on the same images
    nr = args.n_rise
    explained("rise", f"discovery, RISE ({args.rise_masks} masks)",
              RISE(sim, n_masks=args.rise_masks, grid=args.rise_grid, seed=args.seed), nr)
    for patch in args.patches:
        res = discover_attributes(sim, imgs[:nr], args.n_attributes, saliency=oracle_maps(truth["centre"][:nr], size),
                                  patch=patch, **common)
        add("oracle", "oracle peak (key object centre)", res, nr, patch, None)
    t = time.perf_counter()
    res = full_frame_attributes(sim, imgs[:nr], args.n_attributes, seed=args.seed, backend=args.backend,
                                n_iter=args.n_iter)
    add("full_frame", "full-frame baseline", res, nr, 1.0, time.perf_counter() - t)

    # similarity attention on all n images
    explained("attention", "discovery, similarity attention (layer4)",
              SimilarityAttention(sim, "layer4", mode="siamese"), n)
    for patch in args.patches:
        res = discover_attributes(sim, imgs, args.n_attributes, saliency=oracle_maps(truth["centre"], size),
                                  patch=patch, **common)
        add("oracle", "oracle peak (key object centre)", res, n, patch, None)
    t = time.perf_counter()
    res = full_frame_attributes(sim, imgs, args.n_attributes, seed=args.seed, backend=args.backend,
                                n_iter=args.n_iter)
    add("full_frame", "full-frame baseline", res, n, 1.0, time.perf_counter() - t)

    # chance: uniform random clusters
    g = torch.Generator().manual_seed(args.seed)
    for n_img in (nr, n):
        rnd = torch.randint(0, args.n_attributes, (n_img,), generator=g)
        r = {"key": "random", "label": "random clusters (chance)", "n_images": n_img, "patch": "", "seconds": None,
             "covers_key_centre": None}
        for f in FACTORS:
            p = cluster_purity(rnd, truth[f][:n_img])
            r[f] = {"purity": p["purity"], "nmi": p["nmi"]}
        rows.append(r)

    total = time.perf_counter() - t_all
    argv = " ".join(sys.argv[1:])
    data = {
        "benchmark": "discovery_shapesworld",
        "command": f"python benchmarks/discovery_shapesworld.py{(' ' + argv) if argv else ''}",
        "dataset": "ShapesWorld", "split": "test", "n_samples": 3000, "image_size": size, "seed": args.seed,
        "settings": {"n_images": n, "n_images_rise": nr, "n_attributes": args.n_attributes, "k_refs": args.k_refs,
                     "grid": args.grid, "patches": args.patches, "n_iter": args.n_iter, "seed": args.seed,
                     "backend": args.backend, "rise_masks": args.rise_masks, "rise_grid": args.rise_grid,
                     "rise_p": 0.5, "attention": "SimilarityAttention(layer4, siamese)",
                     "similarity": "cosine (embeddings l2-normalized before k-means)"},
        "ground_truth": {"shape": list(SHAPES), "colour": list(COLOURS), "pattern": list(PATTERNS),
                         "object": "the key object (the one that sets the class)"},
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "rows": rows,
        "total_s": total,
        "timing": "host clock, one process, after an 8-image warm-up; the first patch size's call includes the "
                  "saliency maps, later patch sizes reuse them",
        "indices": indices,
        "machine": machine,
        "load_at_end": C.system_load(),
        "note": args.note,
    }
    C.write_and_show(args.stem, data, markdown(data))


if __name__ == "__main__":
    main()
