"""Task wiring for AVSL: :func:`train_avsl` (what ``whymatch train avsl`` runs).

The model is a :class:`whymatch.SimilarityModel` wrapping :class:`whymatch.avsl.AVSL`, the loss
:class:`whymatch.avsl.AVSLLoss`; :class:`AVSLTrainer` is the shared :class:`Trainer` (resume,
DDP, mixed precision, progress, metrics.jsonl) with Recall@K computed on AVSL's own overall
distance instead of a cosine over one embedding.

Parameter groups (:data:`AVSL_GROUPS`, ``--group-lr NAME=LR``): 'backbone' (the trunk, the
published 'trunk'), 'head' (the 1x1 embedding convs, the published 'embedder'), 'coef_bias'
(the reliability parameters of the overall distance) and 'loss' (the proxies, or the margin
loss's betas); the published code trains coef, bias and the proxies together as its
'collector' at one learning rate. :meth:`AVSLConfig.from_recipe` ('published',
``--recipe published``) sets the published runs' optimization recipe, see
:func:`published_avsl_recipe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .. import _checks as V
from ..similarity import SimilarityModel
from .tasks import BACKBONES, DATASETS, TrainConfig, build_data, prepare_run, run_task, task_config
from .trainer import Trainer

__all__ = ["AVSLConfig", "AVSLTrainer", "build_avsl_model", "train_avsl", "avsl_recall_at_k", "AVSL_GROUPS",
           "AVSL_RECIPES", "published_avsl_recipe"]

#: The parameter groups of ``whymatch train avsl`` by name prefix (see :class:`whymatch.train.ParamGroup`):
#: the published code's trunk / embedder / collector, with its collector split into coef_bias and loss.
AVSL_GROUPS = {
    "backbone": ("model.embedder.backbone",),
    "head": ("model.embedder.convs",),
    "coef_bias": ("model.embedder.coef", "model.embedder.bias"),
    "loss": ("loss",),
}
AVSL_RECIPES = ("published",)

# The ProxyAnchor-AVSL ResNet-50 runs of zbr17/AVSL, examples/samples_avsl.sh (one command per data set):
# --lr_trunk, --lr_embedder, --lr_collector, --gamma (StepLR factor), --step (StepLR step_size, epochs),
# --loss0_weight/--loss1_weight/--loss2_weight (level losses, low to high).
_PUBLISHED = {
    "cub": dict(lr_trunk=1e-5, lr_embedder=5.5e-4, lr_collector=1.1e-4, gamma=0.5, step=10,
                level_weights=(0.5, 1.0, 0.5)),
    "cars196": dict(lr_trunk=0.00025230934618157737, lr_embedder=0.00016294139202611374,
                    lr_collector=0.09918213648327627, gamma=0.5, step=5, level_weights=(1.0, 4.0, 4.0)),
    "sop": dict(lr_trunk=6e-4, lr_embedder=6e-4, lr_collector=0.06, gamma=0.25, step=15,
                level_weights=(1.0, 4.0, 4.0), neg_margin=2.4),
}
# Shared by the three commands (and gedml 0.2.2's BaseManager.run / BaseTrainer, which run them):
# --warm_up 5 --warm_up_list embedder collector, 61 epochs (run()'s total_epochs default), --batch_size 180,
# --wd 0.0001 (AdamW), --embeddings_dim 512, --topk_corr 128, --avsl_m 0.5, --prob_gamma 10.
_PUBLISHED_FREEZE_EPOCHS = 5
_PUBLISHED_EPOCHS = 61


def published_avsl_recipe(data: str, *, epochs: int | None = None, freeze_epochs: int | None = None,
                          scheduler: str | None = None) -> dict:
    """The AVSLConfig fields of the published training recipe for a data set ('cub', 'cars196', 'sop',
    'shapesworld', or a spec such as 'cub:/data/CUB_200_2011').

    What the published code does (zbr17/AVSL examples/samples_avsl.sh, examples/config/args.csv and
    links/link_avsl_proxyanchor.yaml, run by gedml 0.2.2's BaseManager.run and BaseTrainer) and how
    it maps here:

    - three AdamW optimizers, weight decay 1e-4: trunk (ResNet-50) at ``--lr_trunk``, embedder (the
      1x1 convs) at ``--lr_embedder``, collector (coef, bias and the proxies) at ``--lr_collector``
      -> group_lr backbone / head / coef_bias and loss (CUB 1e-5 / 5.5e-4 / 1.1e-4; Cars196
      2.523e-4 / 1.629e-4 / 9.918e-2; SOP 6e-4 / 6e-4 / 6e-2);
    - warm-up: during the first 5 epochs only the embedder and collector optimizers step (the
      trunk's gets no step() at all, its gradients are still computed) -> freeze_epochs 5,
      freeze_groups ('backbone',); there is no linear learning-rate warm-up -> warmup 0;
    - StepLR per optimizer (factor ``--gamma``, every ``--step`` epochs), stepped at the end of
      each epoch but not during the warm-up epochs -> scheduler 'step', milestones = 5 + step,
      5 + 2 step, ... below ``epochs`` (CUB 15, 25, 35, 45, 55; Cars196 10, 15, ..., 60; SOP 20,
      35, 50), lr_decay = gamma (0.5, 0.5, 0.25);
    - 61 epochs (0..60), batches of 180, 512 nodes per level, top-k 128, edge momentum 0.5, sigmoid
      sharpness 10, ProxyAnchor with proxies, level-loss weights 0.5/1/0.5 (CUB), 1/4/4 (Cars196, SOP).

    Deliberate differences: batches are P x K = 90 x 2 (ShapesWorld: 60 x 3) from whymatch's
    class-balanced sampler, where the published link config leaves the sampler out (uniformly
    shuffled batches of 180); the backbone is whymatch's randomly initialized ResNet-50 (published:
    ImageNet weights, batch-norm frozen for CUB and Cars196); no early stopping (published: patience
    15 evaluations, or stop below 0.6 x the best Recall@1); no gradient clipping (the published
    per-module clip at norm 10 is built on a ``.parameters()`` generator, which the first call
    exhausts, so it clips only the first batch). Reproduced: SOP's level losses use a ProxyAnchor
    negative margin of 2.4 and the overall distance's loss 2.2 (neg_margin / overall_neg_margin).

    ShapesWorld is not in the published code: it gets CUB's recipe (the published configs' default
    data set) on the 'shapes' backbone, with 60 x 3 batches (ShapesWorld has 60 training classes).

    Args:
        data: the data set (name or spec).
        epochs: the run's epochs when not the published 61 (the milestones stop below it).
        freeze_epochs: the run's frozen epochs when not the published 5 (the milestones count
            from its end, as the published StepLR does).
        scheduler: the run's scheduler when not 'step' (then no milestones).
    """
    name = data.partition(":")[0] if isinstance(data, str) else data
    V.choice("data", name, DATASETS)
    pub = _PUBLISHED["cub" if name == "shapesworld" else name]
    epochs = _PUBLISHED_EPOCHS if epochs is None else V.positive_int("epochs", epochs)
    freeze = _PUBLISHED_FREEZE_EPOCHS if freeze_epochs is None else V.positive_int("freeze_epochs", freeze_epochs,
                                                                                   minimum=0)
    step = pub["step"]
    milestones = tuple(range(freeze + step, epochs, step)) if scheduler in (None, "step") else ()
    shapes = name == "shapesworld"
    return dict(
        backbone="shapes" if shapes else "resnet50", embedding_dim=512, topk=128, momentum=0.5, gamma=10.0,
        loss="proxyanchor", use_proxy=True, level_weights=pub["level_weights"],
        neg_margin=pub.get("neg_margin", 2.2), overall_neg_margin=2.2,
        epochs=epochs, batch_p=60 if shapes else 90, batch_k=3 if shapes else 2, weight_decay=1e-4,
        lr=pub["lr_embedder"], loss_lr=pub["lr_collector"],
        group_lr={"backbone": pub["lr_trunk"], "head": pub["lr_embedder"], "coef_bias": pub["lr_collector"],
                  "loss": pub["lr_collector"]},
        scheduler="step" if scheduler is None else scheduler, milestones=milestones, lr_decay=pub["gamma"],
        warmup_steps=0, warmup_epochs=0, freeze_epochs=freeze, freeze_groups=("backbone",),
    )


class _Normalized(nn.Module):
    """A ResNet trunk that takes images in [0, 1] (ImageNet mean/std inside)."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def build_avsl_model(backbone: str = "shapes", dim: int = 64, *, topk: int = 128, momentum: float = 0.5,
                     gamma: float = 10.0, reliability: str = "map") -> SimilarityModel:
    """A randomly initialized AVSL model on layer2/3/4 of a whymatch backbone, as a SimilarityModel.

    'shapes': :class:`whymatch.models.ShapesCNN` (its linear head removed: AVSL does not use it);
    'resnet18' / 'resnet50': whymatch's ResNets (no downloaded weights). Inputs in [0, 1].
    """
    from ..avsl import AVSL

    V.choice("backbone", backbone, BACKBONES)
    if backbone == "shapes":
        from ..models import ShapesCNN

        net: nn.Module = ShapesCNN(8)
        net.fc = nn.Identity()
        levels = ("layer2", "layer3", "layer4")
    else:
        from ..models.resnet import resnet18, resnet50

        net = _Normalized(resnet18(embedding=True) if backbone == "resnet18" else resnet50(embedding=True))
        levels = ("trunk.layer2", "trunk.layer3", "trunk.layer4")
    avsl = AVSL(net, levels, dim=dim, topk=topk, momentum=momentum, gamma=gamma, reliability=reliability)
    return SimilarityModel(avsl, "cosine")


@torch.no_grad()
def avsl_recall_at_k(avsl, images: Dataset, ks=(1, 2, 4, 8), *, batch_size: int = 256, device=None,
                     chunk: int | None = None) -> dict[str, float]:
    """Recall@K of each item of a data set against the rest, by the AVSL overall distance (eval mode).

    Ranking goes through the retrieval kernel (:func:`whymatch.ops.avsl_topk`, the item itself
    excluded): memory O(n max(ks)), never the (n, n) distance matrix the published evaluator fills.
    ``chunk``: queries per kernel call (default: all at once); each chunk asks for one more
    neighbour and drops the query itself, which gives the same ranking. Returns {'recall@K': float}.
    """
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    if chunk is not None:
        chunk = V.positive_int("chunk", chunk)
    was = avsl.training
    avsl.eval()
    try:
        embs, rels, labs = None, None, []
        for x, y in DataLoader(images, batch_size=batch_size, shuffle=False):
            x = x.to(device) if device is not None else x
            if x.dtype == torch.uint8:
                x = x.float().div_(255.0)
            enc = avsl.encode(x)
            if embs is None:
                embs, rels = [[] for _ in enc.embeddings], [[] for _ in enc.embeddings]
            for lv in range(len(enc.embeddings)):
                embs[lv].append(enc.embeddings[lv].float())
                rels[lv].append(enc.reliabilities[lv])
            labs.append(torch.as_tensor(y))
    finally:
        avsl.train(was)
    from ..avsl import AVSLEncoding

    gallery = AVSLEncoding([torch.cat(e) for e in embs], [torch.cat(r) for r in rels])
    labels = torch.cat(labs).to(gallery.embeddings[0].device)
    n = labels.shape[0]
    if n < 2:
        raise ValueError(f"Recall@K needs at least 2 items, got {n}")
    kmax = min(max(int(k) for k in ks), n - 1)
    if chunk is None or chunk >= n:
        _, idx = avsl.topk(gallery, gallery, kmax, exclude_self=True)
    else:
        parts = []
        for s in range(0, n, chunk):
            sl = torch.arange(s, min(n, s + chunk), device=labels.device)
            _, nb = avsl.topk(gallery.select(sl), gallery, kmax + 1)
            # drop the query itself; where it is not among the kmax + 1 (ties at its distance, 0),
            # the first kmax are already the answer
            keep = nb != sl[:, None]
            keep[keep.all(dim=1), -1] = False
            parts.append(nb[keep].view(-1, kmax))
        idx = torch.cat(parts)
    match = labels[idx] == labels[:, None]
    return {f"recall@{k}": float(match[:, :k].any(dim=1).float().mean()) for k in ks}


class AVSLTrainer(Trainer):
    """:class:`Trainer` whose evaluation ranks by AVSL's overall distance (every rank computes it)."""

    def evaluate(self, dataset: Dataset | None = None) -> dict[str, float]:
        ds = self.test_set if dataset is None else dataset
        if ds is None:
            raise ValueError("evaluate() needs a data set: pass one or give the Trainer a test_set")
        with self.model._autocast_ctx(self.device):
            return avsl_recall_at_k(self.model.embedder, ds, self.eval_k, batch_size=self.eval_batch_size,
                                    device=self.device)


@dataclass
class AVSLConfig(TrainConfig):
    """Settings of ``whymatch train avsl``: :class:`~whymatch.train.tasks.TrainConfig` plus AVSL's.

    ``group_lr`` / ``freeze_groups`` name groups of :data:`AVSL_GROUPS`. ``recipe`` records the
    recipe a config was built from by :meth:`from_recipe` (train_avsl does not apply it).
    """

    topk: int = field(default=128, metadata=dict(help="lower-level nodes per upper node (default %(default)s)"))
    momentum: float = field(default=0.5, metadata=dict(help="edge momentum (default %(default)s)"))
    gamma: float = field(default=10.0, metadata=dict(help="reliability sigmoid sharpness (default %(default)s)"))
    reliability: str = field(default="map", metadata=dict(
        help="CAM minimum over the whole map, or over the last axis as published (default %(default)s)",
        choices=("map", "published")))
    loss: str = field(default="proxyanchor", metadata=dict(
        help="distance-matrix loss per level and on the overall distance (default %(default)s)",
        choices=("proxyanchor", "margin")))
    use_proxy: bool = field(default=True, metadata=dict(
        option="--no-proxy", help="in-batch anchors instead of one proxy per class"))
    level_weights: tuple[float, ...] | None = field(default=None, metadata=dict(
        help="comma-separated loss weight per level, low to high (default 1,0.2,1)"))
    neg_margin: float = field(default=2.2, metadata=dict(
        help="ProxyAnchor negative margin of the level losses (default %(default)s; published SOP: 2.4)"))
    overall_neg_margin: float | None = field(default=None, metadata=dict(
        help="ProxyAnchor negative margin of the overall distance's loss (default: --neg-margin)"))
    stop_after: int | None = None
    recipe: str | None = field(default=None, metadata=dict(
        help="published: the published runs' settings for --data (cub, cars196, sop; shapesworld gets CUB's): "
             "per-group lrs, weight decay, 5 epochs with the backbone frozen, step decay, 61 epochs, batches of "
             "180 (90 x 2), ResNet-50, 512 nodes, level weights; options given explicitly win",
        choices=AVSL_RECIPES))

    @classmethod
    def from_recipe(cls, recipe: str, **overrides) -> AVSLConfig:
        """A config with a recipe's values (:func:`published_avsl_recipe` for ``data``) where
        ``overrides`` gives none.

        ``group_lr`` entries override the recipe's per group. An explicit ``lr`` replaces the
        recipe's learning rates of the model's groups (backbone, head, coef_bias) not named in
        ``group_lr``, an explicit ``loss_lr`` that of the 'loss' group. The milestones follow an
        overridden ``epochs`` / ``freeze_epochs`` (and vanish with another ``scheduler``).
        """
        V.choice("recipe", recipe, AVSL_RECIPES)
        known = {f.name for f in fields(cls)}
        bad = sorted(k for k in overrides if k not in known)
        if bad:
            raise TypeError(f"AVSLConfig has no field {', '.join(map(repr, bad))}")
        values = published_avsl_recipe(overrides.get("data", cls.data), epochs=overrides.get("epochs"),
                                       freeze_epochs=overrides.get("freeze_epochs"),
                                       scheduler=overrides.get("scheduler"))
        group_lr = dict(values.pop("group_lr"))
        if "lr" in overrides:
            for name in ("backbone", "head", "coef_bias"):
                group_lr.pop(name, None)
        if "loss_lr" in overrides:
            group_lr.pop("loss", None)
        group_lr.update(overrides.pop("group_lr", None) or {})
        values.update(overrides)
        values.update(group_lr=group_lr, recipe=recipe)
        return cls(**values)


def train_avsl(cfg: AVSLConfig) -> AVSLTrainer:
    """Train an AVSL model with :class:`whymatch.avsl.AVSLLoss`; returns the trainer.

    Writes cfg.out/{checkpoint.pt, best.pt, metrics.jsonl, config.json} and, at the end,
    model.pt (the AVSL module's state dict, edges included) on rank 0. Without ``group_lr`` /
    freezing, coef and bias train at ``lr`` with the network and the proxies (and margin betas)
    at ``loss_lr``; with them, the groups of :data:`AVSL_GROUPS` each at their own rate.
    """
    from ..avsl import AVSLLoss

    if cfg.recipe is not None:
        V.choice("recipe", cfg.recipe, AVSL_RECIPES)
    config = task_config(cfg, exclude=("stop_after",))
    config["task"] = "avsl"
    if cfg.recipe == "published":
        config["recipe_source"] = "zbr17/AVSL examples/samples_avsl.sh (ProxyAnchor-AVSL, ResNet-50)"
    prepare_run(cfg, config)
    train, test, info = build_data(cfg.data, image_size=cfg.image_size, n_train=cfg.n_train, n_test=cfg.n_test,
                                   seed=cfg.seed, show_progress=cfg.show_progress)
    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_avsl_model(cfg.backbone, cfg.embedding_dim, topk=cfg.topk, momentum=cfg.momentum, gamma=cfg.gamma,
                             reliability=cfg.reliability)
    n_classes = int(torch.unique(train.labels).numel())
    loss = AVSLLoss(n_classes, len(model.embedder.levels), cfg.embedding_dim, loss=cfg.loss,
                    weights=cfg.level_weights, use_proxy=cfg.use_proxy, neg_margin=cfg.neg_margin,
                    overall_neg_margin=cfg.overall_neg_margin)
    return run_task(AVSLTrainer, cfg, model, loss, train, test, AVSL_GROUPS, config, stop_after=cfg.stop_after)
