"""`whymatch explain QUERY REF... --out DIR`: explain your own query against one or more reference images."""

from __future__ import annotations

import os
from pathlib import Path

from .checks import _check_explain_settings, _check_images, _check_report_out
from .common import _image_size, _load_model, _resolve_device, _settings, explainer_options, model_options
from .option_types import _out_path


NAME = "explain"
HELP = "explain your own query against one or more reference images"


def _process_age() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere): the interpreter and imports before
    the command's own work."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _phase_line(startup: float | None, phases: dict[str, float], t0: float) -> str:
    """'time: start-up 1.9 s, model 0.8 s, ...; total 14.2 s': where a command's wall time went."""
    import time

    parts = ([f"start-up (interpreter and imports) {startup:.1f} s"] if startup is not None else []) + \
        [f"{k} {v:.1f} s" for k, v in phases.items()]
    total = time.perf_counter() - t0 + (startup or 0.0)
    return f"time: {', '.join(parts)}; total {total:.1f} s"


def cmd_explain(args) -> int:
    import time

    t0 = time.perf_counter()
    startup = _process_age()
    import torch

    from ..io import load_image
    from ..jobs import CPU_SCORE_STEPS, default_methods, explain_sets, summarize, write
    from ..viz import format_table

    phases: dict[str, float] = {}
    size = _image_size(args)  # refuses --model with --pretrained before anything else
    device = _resolve_device(args.device)
    methods = args.method if args.method is not None else default_methods("explain", device)
    chosen = _explain_defaults(args, device)
    _check_explain_settings(args, size, methods)
    # nothing is loaded before it is checked: the output directory, then every image's header, then the model
    _check_report_out(args.out)
    _check_images([args.query, *args.references])
    t = time.perf_counter()
    sim = _load_model(args, device)
    # Read every image before anything is written, so a bad file leaves no output behind.
    query = load_image(args.query, size=(size, size))
    refs = torch.stack([load_image(r, size=(size, size)) for r in args.references])
    dev = sim.device
    phases["model and images"] = time.perf_counter() - t
    s = _settings(args)
    if chosen:
        s.n_steps = CPU_SCORE_STEPS
        print(f"settings for a CPU: methods {', '.join(methods)}; {', '.join(chosen)}; "
              f"{s.n_steps} insertion/deletion steps (--device cuda, --method all or the options change them)")
    estimate = None
    if not args.quiet:
        from ..jobs import estimate_job

        t = time.perf_counter()
        estimate = estimate_job(sim, query.to(dev), len(args.references), methods, s)
        phases["estimate"] = time.perf_counter() - t
        print(f"on {dev}: {estimate.describe()}")
    sets = explain_sets(sim, [(Path(args.query).name, query.to(dev), refs.to(dev), None)], methods, s, print,
                        estimate=estimate, timings=phases)
    summary = summarize(sets, methods)
    t = time.perf_counter()
    index = write(args.out, sets, methods, summary, f"whymatch explain: {Path(args.query).name}")
    phases["report"] = time.perf_counter() - t
    print(format_table(summary))
    print(f"report: {index}")
    print(_phase_line(startup, phases, t0))
    return 0


def _explain_defaults(args, device) -> list[str]:
    """On a CPU, the fast settings of `whymatch explain` for every option not given (None); elsewhere the
    general defaults. Returns the settings chosen for the CPU, as 'option value' strings (empty on CUDA)."""
    from ..jobs import CPU_EXPLAIN_SETTINGS, JobSettings

    chosen, general = [], JobSettings()
    for option, name, value in CPU_EXPLAIN_SETTINGS:
        dest = option.lstrip("-").replace("-", "_")
        if getattr(args, dest) is None:
            if device.type == "cpu":
                setattr(args, dest, value)
                chosen.append(f"{option} {value}")
            else:
                setattr(args, dest, 2000 if name == "n_masks" else getattr(general, name))
    return chosen


def add_options(parser) -> None:
    """The options of `whymatch explain`."""
    parser.add_argument("query", help="query image file")
    parser.add_argument("references", nargs="+", help="reference image file(s)")
    parser.add_argument("--out", required=True, type=_out_path, help="output directory")
    model_options(parser)
    explainer_options(parser, None, None, methods_help="rise,attention,gradcam on a CPU, all on CUDA")
