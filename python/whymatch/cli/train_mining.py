"""`whymatch train mining`: a metric loss plus similarity mining (Zheng et al.)."""

from __future__ import annotations

from .config_options import add_config_options, given_values
from .option_types import _MAX_FACTOR, _float_in
from .training import _check_schedule, _run_training, trainer_help_values, trainer_types

NAME = TASK = "mining"
HELP = "metric loss + similarity mining (Zheng et al.)"


def cmd_train_mining(args) -> int:
    from ..train import MiningConfig, train_mining

    cfg = MiningConfig(**given_values(args, MiningConfig))
    _check_schedule(cfg)
    return _run_training(train_mining, cfg, "")


def add_options(parser) -> None:
    """The options of `whymatch train mining`."""
    from ..train import MiningConfig

    types = {**trainer_types(TASK), "loss": None, "mode": None, "gamma": _float_in(0, _MAX_FACTOR),
             "alpha": _float_in(0, _MAX_FACTOR, lo_open=True), "beta": _float_in(-_MAX_FACTOR, _MAX_FACTOR),
             "mining": None}
    add_config_options(parser, MiningConfig, types, required=("data", "out"), help_values=trainer_help_values(TASK))
