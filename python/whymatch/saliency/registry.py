"""The explainer registry: method name -> class, its options and their defaults, in one place.

``jobs.make_explainer`` builds explainers from it, ``jobs.JobSettings`` takes its defaults from it, and the
CLI builds its ``--method`` help and per-method options from it. Nothing here repeats a default that an
explainer's constructor already has: :meth:`Option.default` reads it from the signature, and only an option
whose job default deliberately differs from the library default says so (``job_default``, with the reason).

For the CLI::

    from whymatch.saliency.registry import EXPLAINERS, method_names, cli_options

    method_names()                 # ('rise', 'sliding', 'lime', 'mask', 'attention', 'gradcam'): report order
    EXPLAINERS["rise"].summary     # one line for the --method help
    for opt in cli_options():      # every per-method and shared option once, in help order
        parser.add_argument(opt.flag, **opt.argparse_kwargs())   # type/choices/action/help; the default is
                                                                 # opt.job_value() (None: the explainer decides)

``opt.low`` / ``opt.high`` give an int option's allowed range (the CLI wraps them in its own argparse type;
``argparse_kwargs`` gives a plain ``int`` type). ``opt.setting`` is both the argparse ``dest`` and the
:class:`whymatch.jobs.JobSettings` field, except ``--both-images`` (``negate``: the flag sets
``fixed_reference`` to False).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .attention import SimilarityAttention
from .gradcam import EmbeddingGradCAM
from .lime import LIME
from .mask import Mask
from .rise import RISE
from .sliding_window import SlidingWindow

__all__ = ["Option", "ExplainerSpec", "EXPLAINERS", "SHARED_OPTIONS", "method_names", "get", "cli_options",
           "setting_default", "build"]

_OWN = object()  # sentinel: the job default is the explainer's own

#: the largest window/stride the CLI accepts: its largest image side (whymatch.cli.option_types.MAX_IMAGE_SIDE)
_MAX_SIDE = 4096


@dataclass(frozen=True)
class Option:
    """One setting of a method: its CLI flag, JobSettings field, constructor keyword, type and help.

    Attributes:
        setting: the :class:`whymatch.jobs.JobSettings` field and the argparse ``dest``.
        param: the explainer's constructor keyword it sets.
        flag: the CLI option (None: a job setting with no CLI option).
        help: the CLI help, without the default.
        type: int, float, str or bool (bool: a store_true flag).
        low, high: inclusive range of an int/float option (None: unbounded).
        choices: the allowed strings of a str option.
        negate: a flag whose presence sets the setting False (``--both-images``: fixed_reference=False;
            ``argparse_kwargs`` gives ``action='store_false'``).
        job_default: the jobs' default when it deliberately differs from the explainer's own.
        why: the reason for ``job_default``.
    """

    setting: str
    param: str
    flag: str | None
    help: str
    type: type = int
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    negate: bool = False
    job_default: object = _OWN
    why: str = ""
    owners: tuple[type, ...] = field(default=(), compare=False, repr=False)

    def default(self) -> object:
        """The library default: the first owner explainer's constructor default for ``param``."""
        for cls in self.owners:
            p = inspect.signature(cls.__init__).parameters.get(self.param)
            if p is not None and p.default is not inspect.Parameter.empty:
                return p.default
        raise ValueError(f"option {self.setting!r}: no explainer among "
                         f"{[c.__name__ for c in self.owners]} has a default for {self.param!r}")

    def job_value(self) -> object:
        """The default the jobs and the CLI use: ``job_default`` when set, else the explainer's own."""
        return self.default() if self.job_default is _OWN else self.job_default

    def argparse_kwargs(self) -> dict:
        """Keywords for ``parser.add_argument(self.flag, **kw)``, except the default (the caller's choice:
        ``self.job_value()``, None, or ``argparse.SUPPRESS``)."""
        if self.type is bool:
            return {"action": "store_false" if self.negate else "store_true", "dest": self.setting, "help": self.help}
        kw: dict = {"dest": self.setting, "type": self.type, "help": self.help}
        if self.choices is not None:
            kw["choices"] = self.choices
        return kw


@dataclass(frozen=True)
class ExplainerSpec:
    """One method: its name, class, one-line summary, its own options and the shared ones it takes.

    Attributes:
        name: the method's name in the CLI and the reports.
        cls: the :class:`~whymatch.saliency.base.Explainer` subclass.
        summary: one line for the --method help.
        options: settings only this method (or a few) reads.
        shared: names (``setting``) of the :data:`SHARED_OPTIONS` it takes.
        fixed: constructor keywords the jobs always pass (e.g. attention's mode='siamese').
    """

    name: str
    cls: type
    summary: str
    options: tuple[Option, ...]
    shared: tuple[str, ...] = ()
    fixed: Mapping[str, object] = field(default_factory=dict)

    def all_options(self) -> tuple[Option, ...]:
        return self.options + tuple(o for o in SHARED_OPTIONS if o.setting in self.shared)

    def build(self, sim, settings: object = None, **overrides):
        """The explainer configured from ``settings`` (any object with the option ``setting`` attributes, e.g.
        a JobSettings; a missing attribute or None: the explainer's default) and ``overrides`` (by setting)."""
        opts = self.all_options()
        unknown = sorted(set(overrides) - {o.setting for o in opts})
        if unknown:
            raise ValueError(f"{self.name} takes the settings {', '.join(o.setting for o in opts)}; got "
                             f"{', '.join(unknown)}")
        kw = dict(self.fixed)
        for o in opts:
            v = overrides[o.setting] if o.setting in overrides else getattr(settings, o.setting, None)
            if v is not None:
                kw[o.param] = v
        return self.cls(sim, **kw)


def _opt(setting: str, param: str, flag: str | None, help: str, *owners: type, **kw) -> Option:
    return Option(setting, param, flag, help, owners=owners, **kw)


_TARGET_LAYER = _opt("target_layer", "target_layers", "--target-layer",
                     "layer for attention/gradcam, a module name of the embedder (default: the last feature map)",
                     SimilarityAttention, EmbeddingGradCAM, type=str)

#: options several methods read (each spec lists the ones it takes in ``shared``)
SHARED_OPTIONS: tuple[Option, ...] = (
    _opt("batch_size", "batch_size", "--batch-size", "perturbed images per forward pass",
         RISE, SlidingWindow, LIME, low=1, high=65536, job_default=250,
         why="the jobs' batch of perturbed images (RISE, sliding window, LIME); kept from before the registry"),
    _opt("fixed_reference", "fixed_reference", "--both-images",
         "perturb the references too (SANE; RISE, sliding window and Mask)", RISE, SlidingWindow, Mask,
         type=bool, negate=True),
    _opt("seed", "seed", "--seed", "seed of the random masks, samples and noise", RISE, LIME, Mask,
         low=0, high=2**32 - 1),
    _opt("show_progress", "show_progress", "--progress", "also show each method's own progress bar",
         RISE, SlidingWindow, LIME, Mask, SimilarityAttention, EmbeddingGradCAM, type=bool),
)

_SPECS = (
    ExplainerSpec("rise", RISE, "RISE: random masks weighted by the similarity (black box)", (
        _opt("n_masks", "n_masks", "--n-masks", "RISE masks per query", RISE, low=1, high=1_000_000,
             job_default=1000, why="the jobs' (demo/explain) default; the CLI lowers it again on a CPU"),
        _opt("grid", "grid", None, "RISE grid side", RISE, low=1),
        _opt("p", "p", None, "RISE probability that a grid cell is kept", RISE, type=float, low=0.0, high=1.0),
    ), shared=("batch_size", "fixed_reference", "seed", "show_progress")),
    ExplainerSpec("sliding", SlidingWindow, "sliding window: occlude one window at a time (black box)", (
        _opt("window", "window", "--window", "sliding window side in pixels (default H/4)", SlidingWindow,
             low=1, high=_MAX_SIDE),
        _opt("stride", "stride", "--stride", "sliding window stride (default window/4)", SlidingWindow,
             low=1, high=_MAX_SIDE),
    ), shared=("batch_size", "fixed_reference", "show_progress")),
    ExplainerSpec("lime", LIME, "LIME: a linear model over superpixels (black box)", (
        _opt("lime_samples", "n_samples", "--lime-samples", "LIME samples per query", LIME, low=1, high=1_000_000),
        _opt("lime_segments", "segments", "--lime-segments", "LIME superpixels", LIME, type=str,
             choices=("slic", "quickshift", "grid"), job_default="slic",
             why="SLIC with n_segments=50, the setting swept on the real-photo validation split "
                 "(the library keeps LIME's own quickshift)"),
    ), shared=("batch_size", "seed", "show_progress")),
    ExplainerSpec("mask", Mask, "Mask: the smallest deletion that destroys the match, optimized", (
        _opt("mask_iters", "n_iter", "--mask-iters", "Mask optimization steps", Mask, low=1, high=1_000_000,
             job_default=500, why="the jobs' default from before the 'real' preset (100 steps); not re-chosen"),
    ), shared=("fixed_reference", "seed", "show_progress")),
    ExplainerSpec("attention", SimilarityAttention, "similarity attention: gradient maps of a Siamese pair",
                  (_TARGET_LAYER,), shared=("show_progress",), fixed=MappingProxyType({"mode": "siamese"})),
    ExplainerSpec("gradcam", EmbeddingGradCAM, "EmbeddingGradCAM: Grad-CAM of the pair's similarity",
                  (_TARGET_LAYER,), shared=("show_progress",)),
)

#: name -> spec, in report order (black-box methods first, then the gradient methods)
EXPLAINERS: Mapping[str, ExplainerSpec] = MappingProxyType({s.name: s for s in _SPECS})


def method_names() -> tuple[str, ...]:
    """Every registered method, in report order."""
    return tuple(EXPLAINERS)


def get(name: str) -> ExplainerSpec:
    """The spec of ``name``; ValueError naming the known methods otherwise."""
    if not isinstance(name, str) or name not in EXPLAINERS:
        raise ValueError(f"method must be one of {', '.join(EXPLAINERS)}, got {name!r}")
    return EXPLAINERS[name]


#: the order of the options in the CLI help (the order `whymatch demo --help` had before the registry)
_CLI_ORDER = ("n_masks", "lime_samples", "lime_segments", "mask_iters", "target_layer", "window", "stride",
              "batch_size", "fixed_reference", "seed", "show_progress")


def cli_options() -> tuple[Option, ...]:
    """Every option with a CLI flag, once each, in help order (options of no method in ``_CLI_ORDER`` last)."""
    seen: dict[str, Option] = {}
    for o in (*(o for spec in EXPLAINERS.values() for o in spec.options), *SHARED_OPTIONS):
        if o.flag is not None:
            seen.setdefault(o.setting, o)
    rank = {s: i for i, s in enumerate(_CLI_ORDER)}
    return tuple(sorted(seen.values(), key=lambda o: rank.get(o.setting, len(rank))))


def setting_default(setting: str) -> object:
    """The job default of a JobSettings field that a registered option sets (see :meth:`Option.job_value`)."""
    for o in (*SHARED_OPTIONS, *(o for s in EXPLAINERS.values() for o in s.options)):
        if o.setting == setting:
            return o.job_value()
    raise ValueError(f"setting must be one of the registered options' settings, got {setting!r}")


def build(name: str, sim, settings: object = None, **overrides):
    """The explainer ``name`` for ``sim``, configured from ``settings`` (see :meth:`ExplainerSpec.build`)."""
    return get(name).build(sim, settings, **overrides)
