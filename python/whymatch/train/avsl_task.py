"""Task wiring for AVSL: :func:`train_avsl` (what ``whymatch train avsl`` runs).

The model is a :class:`whymatch.SimilarityModel` wrapping :class:`whymatch.avsl.AVSL`, the loss
:class:`whymatch.avsl.AVSLLoss`; :class:`AVSLTrainer` is the shared :class:`Trainer` (resume,
DDP, mixed precision, progress, metrics.jsonl) with Recall@K computed on AVSL's own overall
distance instead of a cosine over one embedding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..ops import _validate as V
from ..similarity import SimilarityModel
from .tasks import BACKBONES, TrainConfig, build_data
from .trainer import Trainer

__all__ = ["AVSLConfig", "AVSLTrainer", "build_avsl_model", "train_avsl", "avsl_recall_at_k"]


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
    """Settings of ``whymatch train avsl``: :class:`~whymatch.train.tasks.TrainConfig` plus AVSL's."""

    topk: int = 128
    momentum: float = 0.5
    gamma: float = 10.0
    reliability: str = "map"
    loss: str = "proxyanchor"
    use_proxy: bool = True
    level_weights: tuple[float, ...] | None = None
    stop_after: int | None = None


def train_avsl(cfg: AVSLConfig) -> AVSLTrainer:
    """Train an AVSL model with :class:`whymatch.avsl.AVSLLoss`; returns the trainer.

    Writes cfg.out/{checkpoint.pt, best.pt, metrics.jsonl, config.json} and, at the end,
    model.pt (the AVSL module's state dict, edges included) on rank 0. coef and bias train
    at ``lr`` with the network, the proxies (and margin betas) at ``loss_lr``.
    """
    from ..avsl import AVSLLoss
    from ..io import atomic_torch_save
    from .trainer import random_flip

    train, test, info = build_data(cfg.data, image_size=cfg.image_size, n_train=cfg.n_train, n_test=cfg.n_test,
                                   seed=cfg.seed, show_progress=cfg.show_progress)
    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_avsl_model(cfg.backbone, cfg.embedding_dim, topk=cfg.topk, momentum=cfg.momentum, gamma=cfg.gamma,
                             reliability=cfg.reliability)
    n_classes = int(torch.unique(train.labels).numel())
    loss = AVSLLoss(n_classes, len(model.embedder.levels), cfg.embedding_dim, loss=cfg.loss,
                    weights=cfg.level_weights, use_proxy=cfg.use_proxy)
    config = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "show_progress", "stop_after", "extra")}
    config.update(info)
    config.update(cfg.extra)
    config["task"] = "avsl"
    trainer = AVSLTrainer(model, loss, train, out_dir=cfg.out, test_set=test, epochs=cfg.epochs, batch_p=cfg.batch_p,
                          batch_k=cfg.batch_k, lr=cfg.lr, loss_lr=cfg.loss_lr, weight_decay=cfg.weight_decay,
                          warmup_steps=cfg.warmup_steps, device=cfg.device, seed=cfg.seed,
                          augment=random_flip if cfg.flip else None, batches_per_epoch=cfg.batches_per_epoch,
                          num_workers=cfg.num_workers, show_progress=cfg.show_progress, config=config)
    trainer.fit(resume=cfg.resume, stop_after=cfg.stop_after)
    if trainer.rank == 0:
        atomic_torch_save(model.embedder.state_dict(), Path(cfg.out) / "model.pt")
    return trainer
