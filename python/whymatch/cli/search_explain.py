"""`whymatch search-explain QUERY --gallery DIR`: search a gallery and explain each of the top k results."""

from __future__ import annotations

import sys
from pathlib import Path

from .checks import _check_images, _check_index_path, _check_report_out
from .common import _image_size, _load_model, _resolve_device, device_options, model_options
from .option_types import _int_in, _out_path, _seed


NAME = "search-explain"
HELP = "search a gallery for a query and explain each of the top k results"


def cmd_search_explain(args) -> int:
    """`whymatch search-explain QUERY --gallery DIR [--index FILE] -k 10 --out REPORT`."""
    from ..io import load_image
    from ..search import DirectoryImages, GalleryIndex, explain_search, write_search_report
    from ..viz import format_table

    size = _image_size(args)  # refuses --model with --pretrained before anything else
    device = _resolve_device(args.device)
    _check_report_out(args.out)
    _check_images([args.query])
    if args.index is not None:
        _check_index_path(args.index)
    source = DirectoryImages(args.gallery, size)
    n_masks = args.n_masks if args.n_masks is not None else (500 if device.type == "cpu" else 2000)
    sim = _load_model(args, device)
    query = load_image(args.query, size=(size, size))
    bars = not args.quiet and sys.stderr.isatty()  # progress bars on a terminal
    if not args.quiet:
        print(_search_estimate(args, sim, query, len(source), n_masks))
    gallery, _built = GalleryIndex.open(args.index, sim, source, rebuild=args.rebuild_index,
                                       batch_size=args.batch_size, show_progress=bars, image_size=size, log=print)
    result = explain_search(sim, query, gallery, source, args.k, method=args.method, n_masks=n_masks,
                            batch_size=args.batch_size, seed=args.seed, show_progress=bars)
    index = write_search_report(args.out, result, query_name=Path(args.query).name)
    rows = [{"rank": r + 1, "gallery image": n, "similarity": float(sc)}
            for r, (n, sc) in enumerate(zip(result.names, result.scores.tolist()))]
    print(format_table(rows))
    t = result.seconds
    print(f"latency on {device}: embed query {t['embed'] * 1e3:.1f} ms, search {t['search'] * 1e3:.1f} ms, "
          f"load {len(rows)} images {t['load'] * 1e3:.1f} ms, explain {len(rows)} results ({args.method}"
          f"{f', {n_masks} masks' if args.method == 'rise' else ''}) {t['explain']:.2f} s")
    print(f"report: {index}")
    return 0


def _search_estimate(args, sim, query, n_gallery: int, n_masks: int) -> str:
    """search-explain's up-front estimate: embedding the gallery (unless --index will be reused) and explaining
    the k results, from one forward batch timed now (a guide: a stale index is rebuilt, loading is not counted)."""
    from ..jobs import _secs, forward_cost

    per = forward_cost(sim, query.to(sim.device), max(1, min(16, args.batch_size)))
    reuse = args.index is not None and Path(args.index).is_file() and not args.rebuild_index
    n_embed = 0 if reuse else n_gallery
    k = min(args.k, n_gallery)
    passes = n_masks + k if args.method == "rise" else 3.0 * (k + 1)
    embed, explain = n_embed * per, passes * per
    return (f"estimated time: {_secs(embed + explain)} (embed {n_embed} gallery images ~{_secs(embed)}"
            f"{' (index reused)' if reuse else ''}, explain {k} results with {args.method} ~{_secs(explain)}; "
            f"from one forward batch timed now: {per * 1e3:.1f} ms per image)")


def add_options(parser) -> None:
    """The options of `whymatch search-explain`."""
    parser.add_argument("query", help="query image file")
    parser.add_argument("--gallery", required=True, help="directory of gallery images (searched recursively)")
    parser.add_argument("--index", default=None,
                        help="faiss index file of the gallery's embeddings (+ FILE.json, its manifest): built and "
                             "saved when missing, reused when it matches the model and the gallery, refused when stale")
    parser.add_argument("--rebuild-index", action="store_true", help="rebuild --index even if it exists")
    parser.add_argument("-k", type=_int_in(1, 1000), default=10, help="results to explain (default %(default)s)")
    parser.add_argument("--out", required=True, type=_out_path, help="output directory of the report")
    parser.add_argument("--method", default="rise", choices=("rise", "gradcam", "attention"),
                        help="rise: one RISE pass for all k results; gradcam: one backward; attention: similarity "
                             "attention (default %(default)s)")
    model_options(parser)
    parser.add_argument("--n-masks", type=_int_in(1, 1_000_000), default=None,
                        help="RISE masks (default 500 on a CPU, 2000 on CUDA)")
    parser.add_argument("--batch-size", type=_int_in(1, 65536), default=64,
                        help="images per forward pass (default %(default)s)")
    parser.add_argument("--seed", type=_seed, default=0)
    device_options(parser)
