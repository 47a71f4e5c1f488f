"""Building blocks the `whymatch train ...` commands share: backbones, data sets, metric losses.

Task wiring for similarity mining: :func:`train_mining` (what ``whymatch train mining`` runs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .. import _checks as V
from ..similarity import SimilarityModel
from .trainer import SCHEDULERS

__all__ = ["BACKBONES", "METRIC_LOSSES", "DATASETS", "TensorImages", "build_backbone", "build_data",
           "data_info", "task_config", "prepare_run", "build_metric_loss", "TrainConfig", "MiningConfig", "train_mining", "mining_group_layout",
           "task_param_groups", "schedule_kwargs"]

BACKBONES = ("shapes", "resnet18", "resnet50")
METRIC_LOSSES = ("contrastive", "triplet", "margin", "proxyanchor")
DATASETS = ("shapesworld", "cub", "cars196", "sop")
#: Field metadata (CLI help, switch name) of the run settings every trainer's config has (TrainConfig, SANEConfig).
RUN_OPTIONS = {
    "flip": dict(option="--no-flip", help="no random horizontal flips"),
    "num_workers": dict(help=None),
    "resume": dict(help="continue from OUT/checkpoint.pt"),
    "overwrite": dict(help="replace the run already in OUT (refused without it; not with --resume)"),
    "seed": dict(help=None),
    "device": dict(help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)"),
    "show_progress": dict(option="--quiet", help="no progress bar or per-epoch lines"),
}


class TensorImages(Dataset):
    """Images held in one tensor (uint8 or float) with their labels; items (image, int label)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images (N, C, H, W) and labels (N,) must match, got {tuple(images.shape)} and "
                             f"{tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


class _Embedder(nn.Module):
    """A ResNet trunk with a linear embedding head (the metric-learning standard, e.g. ProxyAnchor)."""

    def __init__(self, trunk: nn.Module, feature_dim: int, dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.embed = nn.Linear(feature_dim, dim)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.trunk((x - self.mean.to(x.dtype)) / self.std.to(x.dtype)))


def build_backbone(name: str, embedding_dim: int = 128) -> tuple[SimilarityModel, str]:
    """A randomly initialized SimilarityModel (cosine) and the name of its attention layer.

    'shapes': :class:`whymatch.models.ShapesCNN` (for ShapesWorld); 'resnet18' / 'resnet50':
    whymatch's own ResNets (no weights are downloaded) + a linear embedding. Inputs in [0, 1].
    """
    V.choice("backbone", name, BACKBONES)
    dim = V.positive_int("embedding_dim", embedding_dim)
    if name == "shapes":
        from ..models import ShapesCNN

        return SimilarityModel(ShapesCNN(dim), "cosine"), "layer4"
    from ..models.resnet import resnet18, resnet50

    trunk = resnet18(embedding=True) if name == "resnet18" else resnet50(embedding=True)
    return SimilarityModel(_Embedder(trunk, trunk.feature_dim, dim), "cosine"), "trunk.layer4"


def build_data(spec: str, *, image_size: int | None = None, n_train: int = 9000, n_test: int = 3000,
               seed: int = 0, show_progress: bool = False) -> tuple[Dataset, Dataset, dict]:
    """(train set, test set, info) from 'shapesworld' or 'cub:PATH' / 'cars196:PATH' / 'sop:PATH'.

    ShapesWorld: the train classes for training, the (disjoint) test classes for Recall@K,
    rendered once into uint8 tensors. The others: ``whymatch.data.retrieval_dataset``
    (train split with augmentation, test split without).
    """
    info = data_info(spec, image_size=image_size, n_train=n_train, n_test=n_test, seed=seed)
    name, _, root = spec.partition(":")
    if name == "shapesworld":
        from ..data import ShapesWorld

        size = info["image_size"]
        tr = ShapesWorld("train", n_train, size, seed=seed)
        te = ShapesWorld("test", n_test, size, seed=seed)
        train = TensorImages(tr.images(dtype=torch.uint8, show_progress=show_progress), tr.labels)
        test = TensorImages(te.images(dtype=torch.uint8, show_progress=show_progress), te.labels)
        return train, test, info
    if not Path(root).exists():
        raise FileNotFoundError(f"data root not found: {root}")
    try:
        from ..data import retrieval_dataset
    except ImportError as exc:
        raise ImportError(f"data {name!r} needs whymatch.data.retrieval_dataset, which this install lacks") from exc
    size = info["image_size"]
    resize = max(size, round(size * 256 / 224))
    # crops and flips draw from the global RNG, which the Trainer re-seeds from (seed, epoch, rank) at
    # every epoch (and DataLoader workers derive their seeds from it): an interrupted run resumes exactly
    train = retrieval_dataset(name, root, "train", train=True, size=size, resize=resize)
    test = retrieval_dataset(name, root, "test", train=False, size=size, resize=resize)
    return train, test, info


def data_info(spec: str, *, image_size: int | None = None, n_train: int = 9000, n_test: int = 3000,
              seed: int = 0) -> dict:
    """What :func:`build_data` records about its data (config.json), without reading or rendering any:
    'shapesworld' {data, image_size (default 96), n_train, n_test, seed}; the others {data, root,
    image_size (default 224)}."""
    if not isinstance(spec, str):
        raise TypeError(f"data must be a string, got {type(spec).__name__}")
    name, _, root = spec.partition(":")
    V.choice("data", name, DATASETS)
    if name == "shapesworld":
        return {"data": "shapesworld", "image_size": image_size or 96, "n_train": n_train, "n_test": n_test,
                "seed": seed}
    if not root:
        raise ValueError(f"data {name!r} needs a path: --data {name}:/path/to/{name}")
    return {"data": name, "root": str(root), "image_size": image_size or 224}


def task_config(cfg: TrainConfig, exclude: Sequence[str] = ()) -> dict:
    """The configuration a ``train_*`` function records (config.json, the checkpoint's 'config'): the
    config's fields less how it runs (resume, overwrite, show_progress, extra, ``exclude``), then what
    :func:`data_info` says of its data, then ``cfg.extra``. Known before any data is read, so that
    ``--resume`` with other settings is refused at once."""
    drop = {"resume", "overwrite", "show_progress", "extra", *exclude}
    config = {k: v for k, v in asdict(cfg).items() if k not in drop}
    config.update(data_info(cfg.data, image_size=cfg.image_size, n_train=cfg.n_train, n_test=cfg.n_test,
                            seed=cfg.seed))
    config.update(cfg.extra)
    return config


def prepare_run(cfg: TrainConfig, config: Mapping) -> None:
    """Before any data is read: refuse an out directory holding another run (unless ``cfg.overwrite``),
    ``resume`` with ``overwrite``, and a resume whose configuration differs from the stored one."""
    from .checkpoint import check_resume_config, check_run_dir
    from .trainer import CHECKPOINT

    if not isinstance(cfg.resume, bool) or not isinstance(cfg.overwrite, bool):
        raise TypeError(f"resume and overwrite must be bools, got {cfg.resume!r} and {cfg.overwrite!r}")
    out = check_run_dir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
    if cfg.resume:
        check_resume_config(out / CHECKPOINT, config)


def build_metric_loss(name: str, n_classes: int, embedding_dim: int) -> nn.Module:
    """A pytorch-metric-learning loss: contrastive, triplet (margin 0.1), margin, or proxyanchor."""
    from pytorch_metric_learning import losses

    V.choice("loss", name, METRIC_LOSSES)
    if name == "contrastive":
        return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)
    if name == "triplet":
        return losses.TripletMarginLoss(margin=0.1)
    if name == "margin":
        return losses.MarginLoss(margin=0.2, nu=0.0, beta=1.2)
    return losses.ProxyAnchorLoss(num_classes=n_classes, embedding_size=embedding_dim, margin=0.1, alpha=32)


def task_param_groups(layout: Mapping[str, Sequence[str]], modules: Mapping[str, nn.Module],
                      group_lr: Mapping[str, float], *, lr: float, loss_lr: float | None,
                      freeze_groups: Sequence[str] = ()):
    """The :class:`~whymatch.train.trainer.ParamGroup` s of a task, for ``Trainer(param_groups=...)``.

    ``layout`` names a task's groups and their parameter-name prefixes (over
    ``{'model': model, 'loss': loss}``, see ParamGroup), e.g. :data:`whymatch.train.avsl_task.AVSL_GROUPS`.
    With neither ``group_lr`` nor ``freeze_groups`` this returns no group (the Trainer's two
    default groups 'model' and 'loss'). Otherwise every group of the layout is split off, at its
    ``group_lr`` entry or else at ``lr`` (``loss_lr``, default 100 x lr, for a group whose prefixes
    all lie in the loss); a group that claims no trainable parameter of this model (e.g. 'loss'
    without proxies) is left out.

    Raises:
        ValueError: a name in ``group_lr`` or ``freeze_groups`` that the layout does not have, or a
            bad learning rate (both named).
    """
    from .trainer import ParamGroup

    known = ", ".join(layout)
    for what, names in (("group_lr", list(group_lr)), ("freeze_groups", list(freeze_groups))):
        bad = [n for n in names if n not in layout]
        if bad:
            raise ValueError(f"{what}: unknown parameter group {', '.join(map(repr, bad))} (this task's groups: "
                             f"{known})")
    if not group_lr and not freeze_groups:
        return []
    loss_default = lr * 100 if loss_lr is None else loss_lr
    groups = []
    for name, prefixes in layout.items():
        in_loss = all(q == "loss" or q.startswith("loss.") for q in prefixes)
        groups.append(ParamGroup(name, tuple(prefixes), group_lr.get(name, loss_default if in_loss else lr)))
    claimed = set()
    for root, module in modules.items():
        for n, prm in module.named_parameters():
            if prm.requires_grad:
                best = max(groups, key=lambda g: g.match(f"{root}.{n}"))
                if best.match(f"{root}.{n}") >= 0:
                    claimed.add(best.name)
    return [g for g in groups if g.name in claimed]


def schedule_kwargs(cfg: TrainConfig, layout: Mapping[str, Sequence[str]], model: nn.Module,
                    loss: nn.Module) -> dict:
    """The Trainer arguments of a config's parameter groups, schedule, warm-up and freezing."""
    freeze = tuple(cfg.freeze_groups) if cfg.freeze_epochs else ()
    groups = task_param_groups(layout, {"model": model, "loss": loss}, dict(cfg.group_lr), lr=cfg.lr,
                               loss_lr=cfg.loss_lr, freeze_groups=freeze)
    return dict(param_groups=groups, scheduler=cfg.scheduler, milestones=tuple(cfg.milestones),
                lr_decay=cfg.lr_decay, warmup_steps=cfg.warmup_steps, warmup_epochs=cfg.warmup_epochs,
                freeze_epochs=cfg.freeze_epochs, freeze_groups=freeze)


def run_task(trainer_cls: type, cfg: TrainConfig, model: SimilarityModel, loss: nn.Module, train: Dataset,
             test: Dataset | None, layout: Mapping[str, Sequence[str]], config: Mapping, *,
             stop_after: int | None = None):
    """Build ``trainer_cls`` (a :class:`~whymatch.train.trainer.Trainer`) from the config, ``fit`` it (resuming
    and overwriting as ``cfg`` says) and write out/model.pt (the embedder's state dict) on rank 0; returns
    the trainer. The one way every metric-learning task (mining, AVSL) runs."""
    from ..io import atomic_torch_save
    from .trainer import random_flip

    trainer = trainer_cls(model, loss, train, out_dir=cfg.out, test_set=test, epochs=cfg.epochs, batch_p=cfg.batch_p,
                          batch_k=cfg.batch_k, lr=cfg.lr, loss_lr=cfg.loss_lr, weight_decay=cfg.weight_decay,
                          **schedule_kwargs(cfg, layout, model, loss), device=cfg.device, seed=cfg.seed,
                          augment=random_flip if cfg.flip else None, batches_per_epoch=cfg.batches_per_epoch,
                          num_workers=cfg.num_workers, show_progress=cfg.show_progress, config=dict(config))
    trainer.fit(resume=cfg.resume, overwrite=cfg.overwrite, stop_after=stop_after)
    if trainer.rank == 0:
        atomic_torch_save(model.embedder.state_dict(), Path(cfg.out) / "model.pt")
    return trainer


def mining_group_layout(backbone: str) -> dict[str, tuple[str, ...]]:
    """The parameter groups of ``whymatch train mining``: 'backbone' (the trunk), 'head' (the
    linear embedding) and 'loss' (e.g. ProxyAnchor's proxies), by name prefix."""
    V.choice("backbone", backbone, BACKBONES)
    if backbone == "shapes":  # ShapesCNN: everything but its final linear layer is the trunk
        return {"backbone": ("model.embedder",), "head": ("model.embedder.fc",), "loss": ("loss",)}
    return {"backbone": ("model.embedder.trunk",), "head": ("model.embedder.embed",), "loss": ("loss",)}


@dataclass
class TrainConfig:
    """Settings every ``whymatch train ...`` command shares (the CLI's options, same names).

    The optimization settings map to :class:`~whymatch.train.Trainer`'s arguments of the same
    names: ``scheduler`` ('cosine', 'step' or 'none'), ``milestones`` (epochs, 'step' only),
    ``lr_decay`` (factor per milestone), ``warmup_steps`` / ``warmup_epochs`` (linear warm-up),
    ``group_lr`` (learning rate per named parameter group of the task, e.g. {'backbone': 1e-5};
    see :func:`task_param_groups`) and ``freeze_epochs`` / ``freeze_groups`` (groups not updated
    during the first epochs; ``freeze_groups`` only acts with ``freeze_epochs`` > 0).

    ``overwrite`` replaces a run already in ``out`` (refused otherwise); ``resume`` continues it with
    the stored settings (only those of :data:`whymatch.train.checkpoint.RESUMABLE` may change).

    The metadata of a field that is a CLI option holds its ``help`` (``%(default)s``: the field's default;
    ``{groups}``: the task's parameter groups), its ``choices`` and, for a switch that turns a True field
    off, its ``option`` (e.g. ``--no-flip``); ``whymatch.cli`` generates the options from them.
    """

    data: str = field(default="shapesworld", metadata=dict(help="shapesworld, or cub:PATH, cars196:PATH, sop:PATH "
                                                                 "(local copies)"))
    backbone: str = field(default="shapes", metadata=dict(help="randomly initialized embedder (default %(default)s)",
                                                          choices=BACKBONES))
    out: str = field(default="whymatch-train", metadata=dict(help="output directory (checkpoints, metrics.jsonl, "
                                                                  "model.pt)"))
    epochs: int = field(default=8, metadata=dict(help=None))
    batch_p: int = field(default=16, metadata=dict(help="classes per batch (default %(default)s)"))
    batch_k: int = field(default=4, metadata=dict(help="images per class per batch (default %(default)s)"))
    lr: float = field(default=1e-3, metadata=dict(help="AdamW learning rate (default %(default)s)"))
    loss_lr: float | None = field(default=None, metadata=dict(
        help="learning rate of the loss's parameters, e.g. proxies (default 100 x --lr)"))
    weight_decay: float = field(default=1e-4, metadata=dict(help=None))
    embedding_dim: int = field(default=64, metadata=dict(help=None))
    image_size: int | None = field(default=None, metadata=dict(help="default 96 (shapesworld) or 224"))
    n_train: int = field(default=9000, metadata=dict(help="shapesworld: training images"))
    n_test: int = field(default=3000, metadata=dict(help="shapesworld: test images (held-out classes)"))
    seed: int = field(default=0, metadata=RUN_OPTIONS["seed"])
    device: str | None = field(default=None, metadata=RUN_OPTIONS["device"])
    resume: bool = field(default=False, metadata=RUN_OPTIONS["resume"])
    overwrite: bool = field(default=False, metadata=RUN_OPTIONS["overwrite"])
    flip: bool = field(default=True, metadata=RUN_OPTIONS["flip"])
    warmup_steps: int = field(default=0, metadata=dict(
        help="linear learning-rate warm-up over this many steps (default 0)"))
    batches_per_epoch: int | None = field(default=None, metadata=dict(help="default: train size / (P K)"))
    num_workers: int = field(default=0, metadata=RUN_OPTIONS["num_workers"])
    show_progress: bool = field(default=True, metadata=RUN_OPTIONS["show_progress"])
    scheduler: str = field(default="cosine", metadata=dict(
        help="per-step learning-rate factor: cosine decay to 0, step (x --lr-decay at each of --milestones) or "
             "none (default %(default)s)", choices=SCHEDULERS))
    milestones: tuple[int, ...] = field(default=(), metadata=dict(
        help="--scheduler step: comma-separated epochs (0-based) at which the lr is multiplied by --lr-decay, "
             "e.g. 20,40"))
    lr_decay: float = field(default=0.1, metadata=dict(
        help="--scheduler step: factor per milestone, in (0, 1] (default %(default)s)"))
    warmup_epochs: int = field(default=0, metadata=dict(
        help="the same warm-up in epochs (not both); the published AVSL code's 'warm up' is --freeze-epochs"))
    group_lr: dict = field(default_factory=dict, metadata=dict(
        help="learning rates of parameter groups, NAME=LR,... with NAME in {groups}; the others take --lr "
             "(--loss-lr for 'loss')"))
    freeze_epochs: int = field(default=0, metadata=dict(
        help="do not update --freeze-groups during the first this many epochs (default 0)"))
    freeze_groups: tuple[str, ...] = field(default=("backbone",), metadata=dict(
        help="comma-separated groups to freeze, of {groups} (default backbone)"))
    extra: dict = field(default_factory=dict)


@dataclass
class MiningConfig(TrainConfig):
    """Settings of ``whymatch train mining``: :class:`TrainConfig` plus the loss's."""

    loss: str = field(default="triplet", metadata=dict(
        help="metric loss L_ml from pytorch-metric-learning (default %(default)s)", choices=METRIC_LOSSES))
    mode: str = field(default="triplet", metadata=dict(
        help="tuple form of the attention and of L_sm (default %(default)s)",
        choices=("siamese", "triplet", "quadruplet")))
    gamma: float = field(default=1.0, metadata=dict(help="weight of L_sm (default %(default)s)"))
    alpha: float = field(default=10.0, metadata=dict(help="soft-mask sharpness (default %(default)s)"))
    beta: float = field(default=0.5, metadata=dict(help="soft-mask threshold (default %(default)s)"))
    mining: bool = field(default=True, metadata=dict(option="--no-mining",
                                                     help="train with L_ml alone (the baseline)"))


def train_mining(cfg: MiningConfig):
    """Train a model with L_ml (+ gamma L_sm unless ``cfg.mining`` is False); returns the Trainer.

    Writes cfg.out/{checkpoint.pt, best.pt, metrics.jsonl, config.json} and, at the end,
    model.pt (the embedder's state dict) on rank 0.
    """
    from ..mining import SimilarityMiningLoss
    from .trainer import Trainer

    config = task_config(cfg)
    prepare_run(cfg, config)
    train, test, info = build_data(cfg.data, image_size=cfg.image_size, n_train=cfg.n_train, n_test=cfg.n_test,
                                   seed=cfg.seed, show_progress=cfg.show_progress)
    torch.manual_seed(cfg.seed)  # the initial weights
    model, layer = build_backbone(cfg.backbone, cfg.embedding_dim)
    n_classes = int(torch.unique(train.labels).numel())
    metric = build_metric_loss(cfg.loss, n_classes, cfg.embedding_dim)
    loss = SimilarityMiningLoss(cfg.mode, cfg.alpha, cfg.beta, metric, cfg.gamma if cfg.mining else 0.0,
                                target_layers=layer)
    return run_task(Trainer, cfg, model, loss, train, test, mining_group_layout(cfg.backbone), config)
