"""What the `whymatch train` commands (mining, avsl, sane) share: how the options of the config fields every
trainer has are parsed, the schedule checks, the torchrun group and the final line."""

from __future__ import annotations

from .checks import _check_train_run
from .option_types import (_count, _data_spec, _decay, _device, _float_in, _freeze_groups, _group_lr, _image_side,
                           _int_in, _milestones, _option_type, _out_path, _positive, _seed)


# parameter groups per `whymatch train` task, for the help (checked against the task's layout when parsing)
_GROUPS_HELP = {"mining": ("backbone", "head", "loss"), "avsl": ("backbone", "head", "coef_bias", "loss")}


def _check_schedule(cfg) -> None:
    """Errors of option combinations, named as options (single values are checked while parsing)."""
    if cfg.milestones and cfg.scheduler != "step":
        raise ValueError(f"--milestones {','.join(map(str, cfg.milestones))} needs --scheduler step, "
                         f"got --scheduler {cfg.scheduler}")
    if cfg.warmup_steps and cfg.warmup_epochs:
        raise ValueError(f"give --warmup-steps or --warmup-epochs, not both (got --warmup-steps {cfg.warmup_steps} "
                         f"and --warmup-epochs {cfg.warmup_epochs})")


def _recall_report(what: str):
    """The final line of a metric-learning run: Recall@1 of the last epoch and the best."""
    def report(trainer, cfg) -> str:
        last = trainer.history[-1] if trainer.history else {}
        r1, best = last.get("recall@1"), trainer.best_recall_at_1
        r1 = "not evaluated" if r1 is None else round(r1, 4)
        best = "none" if best == float("-inf") else f"{best:.4f}"
        return (f"trained {trainer.epoch} epochs; Recall@1{what} {r1} (best {best}); "
                f"wrote {cfg.out}/checkpoint.pt, model.pt, metrics.jsonl")
    return report


def _run_training(train_fn, cfg, what: str = "", report=None) -> int:
    """Join the torchrun group if there is one, train, leave it, and report on rank 0.

    ``report(trainer, cfg) -> str`` is the final line (default: Recall@1, ``what`` after its name).
    """
    _check_train_run(cfg)
    distributed = _init_distributed(cfg.device)
    try:
        trainer = train_fn(cfg)
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if trainer.rank == 0:
        print((report or _recall_report(what))(trainer, cfg))
    return 0


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


#: How each option of the run settings (every trainer's config has these fields) is parsed, in the help's order.
RUN_TYPES = {"flip": None, "num_workers": _int_in(0, 256), "resume": None, "overwrite": None, "seed": _seed,
             "device": _device, "show_progress": None}


def trainer_types(task: str) -> dict:
    """How each :class:`~whymatch.train.TrainConfig` option of `whymatch train TASK` (mining, avsl) is parsed, in
    the help's order."""
    return {"data": _data_spec("metric"), "backbone": None, "out": _out_path, "epochs": _int_in(1, 100_000),
            "batch_p": _int_in(2, 100_000), "batch_k": _int_in(2, 10_000), "lr": _float_in(0, 100, lo_open=True),
            "loss_lr": _float_in(0, 1e4, lo_open=True), "weight_decay": _float_in(0, 100),
            "embedding_dim": _int_in(1, 16384), "image_size": _image_side, "n_train": _positive,
            "n_test": _positive, "batches_per_epoch": _positive, **RUN_TYPES, "scheduler": None,
            "milestones": _option_type("--milestones", _milestones), "lr_decay": _option_type("--lr-decay", _decay),
            "warmup_steps": _option_type("--warmup-steps", _count),
            "warmup_epochs": _option_type("--warmup-epochs", _count),
            "group_lr": _option_type("--group-lr", _group_lr(task)),
            "freeze_epochs": _option_type("--freeze-epochs", _count),
            "freeze_groups": _option_type("--freeze-groups", _freeze_groups(task))}


def trainer_help_values(task: str) -> dict[str, str]:
    """What the TrainConfig help texts of `whymatch train TASK` fill in: the task's parameter groups."""
    return {"groups": ", ".join(_GROUPS_HELP[task])}
