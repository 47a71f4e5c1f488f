"""`whymatch train sane`: the SANE attribute model with saliency matching (Plummer et al. 2020)."""

from __future__ import annotations

from ..models.loading import factory as _factory
from .config_options import add_config_options, given_values
from .option_types import _MAX_FACTOR, _data_spec, _factory_spec, _float_in, _image_side, _int_in, _out_path, _positive
from .training import RUN_TYPES, _run_training

NAME = TASK = "sane"
HELP = "SANE attribute model with saliency matching (Plummer et al. 2020)"


def _sane_report(trainer, cfg) -> str:
    """The final line of `whymatch train sane`: validation mAP of the last epoch and the best."""
    last = trainer.history[-1] if trainer.history else {}
    m = last.get("map")
    best = "none" if trainer.best_map == float("-inf") else f"{trainer.best_map:.4f}"
    return (f"trained {trainer.epoch} epochs; attribute mAP {m if m is None else round(m, 4)} (best {best}); "
            f"wrote {cfg.out}/checkpoint.pt, model.pt, metrics.jsonl")


def cmd_train_sane(args) -> int:
    from ..attributes.train import SANEConfig, train_sane

    cfg = SANEConfig(**given_values(args, SANEConfig))
    if cfg.similarity is not None and cfg.lam > 0:
        _factory(cfg.similarity, "--similarity")  # importable, before any data is rendered (called later)
    return _run_training(train_sane, cfg, report=_sane_report)


def add_options(parser) -> None:
    """The options of `whymatch train sane`."""
    from ..attributes.train import SANEConfig

    types = {"data": _data_spec("sane"), "out": _out_path, "backbone": None, "epochs": _int_in(1, 100_000),
             "batch_size": _int_in(1, 65536), "lr": _float_in(0, 100, lo_open=True),
             "lr_decay": _float_in(0, 1, lo_open=True), "lam": _float_in(0, _MAX_FACTOR), "normalize": None,
             "temperature": _float_in(0, _MAX_FACTOR, lo_open=True), "k_maps": _int_in(1, 1000),
             "n_masks": _int_in(1, 1_000_000), "saliency_size": _int_in(4, 1024), "similarity": _factory_spec,
             "image_size": _image_side, "n_train": _positive, "n_val": _positive, **RUN_TYPES}
    add_config_options(parser, SANEConfig, types, required=("data", "out"))
