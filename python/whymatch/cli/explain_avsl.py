"""`whymatch explain-avsl QUERY REF... --run DIR`: which AVSL similarity nodes made a query match each reference."""

from __future__ import annotations

from .checks import _check_avsl_run, _check_images, _check_report_out
from .option_types import _device, _image_side, _int_in, _out_path


NAME = "explain-avsl"
HELP = ("which AVSL similarity nodes made a query match each reference (a model trained with "
        "`whymatch train avsl`)")


def cmd_explain_avsl(args) -> int:
    from ..jobs import run_avsl_explain
    from ..viz import format_table

    _check_report_out(args.out)
    _check_images([args.query, *args.references])
    _check_avsl_run(args.run, args.weights, args.top)
    rows, index = run_avsl_explain(args.run, args.query, args.references, args.out, top=args.top, by=args.by,
                                   weights=args.weights, size=args.size, device=args.device)
    print(format_table(rows))
    print(f"report: {index}")
    return 0


def add_options(parser) -> None:
    """The options of `whymatch explain-avsl`."""
    parser.add_argument("query", help="query image file")
    parser.add_argument("references", nargs="+", help="reference image file(s)")
    parser.add_argument("--run", required=True, type=_out_path,
                        help="the --out directory of `whymatch train avsl` (config.json + weights)")
    parser.add_argument("--out", required=True, type=_out_path, help="output directory of the report")
    parser.add_argument("--weights", default="model", choices=("model", "best", "checkpoint"),
                        help="model.pt (end of training), best.pt (best Recall@1) or checkpoint.pt "
                             "(default %(default)s)")
    parser.add_argument("--top", type=_int_in(1, 16384), default=5, help="nodes shown per level (default %(default)s)")
    parser.add_argument("--by", default="lambda", choices=("lambda", "contribution"),
                        help="rank nodes by sensitivity lambda (Eq. 11) or lambda x node value (default %(default)s)")
    parser.add_argument("--size", type=_image_side, default=None,
                        help="resize images to SIZE x SIZE (default: the run's)")
    parser.add_argument("--device", default=None, type=_device, help="cpu, cuda, ... (default cpu)")
