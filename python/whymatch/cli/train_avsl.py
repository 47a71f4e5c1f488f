"""`whymatch train avsl`: attributable visual similarity learning (Zhang et al. 2022)."""

from __future__ import annotations

from .config_options import add_config_options, given_values
from .option_types import _MAX_FACTOR, _float_in, _int_in, _level_weights
from .training import _check_schedule, _run_training, trainer_help_values, trainer_types

NAME = TASK = "avsl"
HELP = "attributable visual similarity learning (Zhang et al. 2022)"


def cmd_train_avsl(args) -> int:
    from ..train import AVSLConfig, train_avsl

    values = given_values(args, AVSLConfig)  # the options given; the config's defaults fill the rest
    recipe = values.pop("recipe", None)
    # --recipe: the recipe's values, except for the options given on the command line
    cfg = AVSLConfig(**values) if recipe is None else AVSLConfig.from_recipe(recipe, **values)
    _check_schedule(cfg)
    return _run_training(train_avsl, cfg, " (AVSL distance)")


def add_options(parser) -> None:
    """The options of `whymatch train avsl`."""
    from ..train import AVSLConfig

    # --embedding-dim: the nodes per level
    margin = _float_in(-_MAX_FACTOR, _MAX_FACTOR)
    types = {**trainer_types(TASK), "recipe": None, "loss": None, "use_proxy": None,
             "level_weights": _level_weights, "neg_margin": margin, "overall_neg_margin": margin,
             "topk": _int_in(1, 16384), "momentum": _float_in(0, 1),
             "gamma": _float_in(0, _MAX_FACTOR, lo_open=True), "reliability": None}
    add_config_options(parser, AVSLConfig, types, required=("data", "out"), help_values=trainer_help_values(TASK))
