"""Per-query latency of explaining a retrieval list: embed the query, search, load the k images, explain.

``whymatch.search.explain_search(sim, query, GalleryIndex, source, k=10)`` on the CPU for two models:
the shipped ShapesWorld CNN (96 px, gallery: ShapesWorld test images) and EfficientNet-lite0 ImageNet
features (224 px, when ``whymatch[pretrained]`` is installed; gallery: ShapesWorld images rendered at
96 px and resized to 224 px: the cost does not depend on what the pictures show). Methods: RISE with the
CPU default of `whymatch search-explain` (500 masks, batches of 64: one pass for all k results) and
EmbeddingGradCAM (one forward + backward of the query against the k embeddings).

Correctness first: the top result of a gallery image used as the query must be itself, and the maps
must be (k, H, W). Then one warm-up query (module loading, the first custom-op call) and ``--queries``
timed ones; medians reported. The gallery index is built once (timed), saved, and loaded back (timed):
what `whymatch search-explain --index FILE` does on its first and later calls.

Usage::

    python benchmarks/search_explain.py      # writes benchmarks/results/search_explain.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common as C  # noqa: E402
from whymatch import search  # noqa: E402


def _models(names):
    out = []
    for name in names:
        if name == "shapesworld":
            from whymatch.models import load_default_model

            out.append((name, load_default_model(), 96))
        elif name == "efficientnet-lite0":
            try:
                from whymatch.models.efficientnet import efficientnet_lite0_similarity

                out.append((name, efficientnet_lite0_similarity(), 224))
            except ImportError as exc:
                print(f"skipping {name}: {exc}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="shapesworld,efficientnet-lite0")
    ap.add_argument("--gallery", type=int, default=300, help="gallery images (default %(default)s)")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=3, help="timed queries per model and method")
    ap.add_argument("--n-masks", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=str(C.RESULTS))
    args = ap.parse_args()

    from whymatch.data import ShapesWorld

    ds = ShapesWorld("test", n_samples=args.gallery, seed=0)
    cfg = {k: getattr(args, k) for k in ("gallery", "k", "queries", "n_masks", "batch_size")}
    res: dict = {"benchmark": "search_explain", "machine": C.machine_info("cpu"), "config": cfg, "models": {}}
    rows = []
    for name, sim, size in _models(args.models.split(",")):
        src = search.DatasetImages(ds, size=size)
        t0 = time.perf_counter()
        gi = search.GalleryIndex.build(sim, src, batch_size=args.batch_size, image_size=size)
        build_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "gallery.faiss"
            gi.save(path)
            t0 = time.perf_counter()
            search.GalleryIndex.load(path, sim, src, image_size=size)
            load_s = time.perf_counter() - t0
        entry = {"image_size": size, "gallery": len(src), "index_build_s": build_s, "index_load_s": load_s,
                 "methods": {}}
        for method in ("rise", "gradcam"):
            qids = [0] + [7 * (i + 1) % len(src) for i in range(args.queries)]  # first: warm-up
            runs = []
            for qi in qids:
                r = search.explain_search(sim, src.load(qi), gi, src, args.k, method=method, n_masks=args.n_masks,
                                          batch_size=args.batch_size)
                if int(r.ids[0]) != qi or tuple(r.maps.shape) != (args.k, size, size):
                    raise SystemExit(f"{name} {method}: query {qi} retrieved {int(r.ids[0])} first, maps "
                                     f"{tuple(r.maps.shape)}: wrong")
                runs.append(r.seconds)
            timed = runs[1:]
            med = {step: statistics.median(t[step] for t in timed) for step in timed[0]}
            med["total"] = statistics.median(sum(t.values()) for t in timed)
            entry["methods"][method] = {"median_s": med, "warmup_query_s": runs[0], "runs_s": timed}
            rows.append([name, size, method, f"{med['embed'] * 1e3:.1f} ms",
                         f"{(med['search']) * 1e3:.2f} ms", f"{med['load'] * 1e3:.1f} ms",
                         f"{med['explain']:.2f} s", f"{med['total']:.2f} s",
                         f"{sum(runs[0].values()):.2f} s"])
            print(rows[-1], flush=True)
        entry["index_row"] = [name, f"{len(src)} images", f"{build_s:.1f} s", f"{load_s * 1e3:.0f} ms"]
        res["models"][name] = entry
    res["load_at_end"] = C.system_load()
    m = res["machine"]
    md = "\n".join([
        "# search-explain: per-query latency on the CPU",
        "",
        f"`benchmarks/search_explain.py`, {m.get('cpu_model', '?')}, torch {m.get('torch', '?')}, "
        f"{m.get('torch_threads', '?')} threads, commit {m.get('git_commit', '?')}.",
        "",
        C.load_note(res),
        f"One query against a gallery of {args.gallery} images, top k = {args.k}, every result explained; "
        f"RISE {args.n_masks} masks in batches of {args.batch_size} (one pass over the query's masks for all "
        f"{args.k} results, from the embeddings the index holds); gradcam: EmbeddingGradCAM against the k "
        f"embeddings. Median of {args.queries} queries after one warm-up query (its total in the last column: "
        "module loading and the first custom-op call).",
        "",
        C.md_table(["model", "px", "method", "embed query", "search (faiss, exact)", "load k images",
                    "explain k", "total", "first query"], rows),
        "",
        "Gallery index (`--index FILE`): built once (embedding every gallery image), then loaded and checked "
        "(manifest, model fingerprint, sha256, header) on later calls.",
        "",
        C.md_table(["model", "gallery", "build", "load + checks"], [e["index_row"] for e in res["models"].values()]),
        "",
    ])
    js, mdp = C.write_results(Path(args.out) / "search_explain", res, md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
