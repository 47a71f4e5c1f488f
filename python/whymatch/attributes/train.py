"""Training SANE's attribute model with saliency supervision: ``whymatch train sane``.

Plummer et al., "Why do These Match?" (ECCV 2020), section 3.2: an attribute classifier
(:class:`~whymatch.attributes.model.AttributeModel`) trained with L = L_attr + lambda L_match
(:class:`~whymatch.attributes.losses.AttributeLoss`, Eqs. 1-3), where L_match pulls the
activation map of the closest ground-truth attribute towards the saliency map of each of the
image's matches. The saliency maps (RISE, against the image's K most similar images of its
class under the similarity model being explained) are computed once into a
:class:`~whymatch.attributes.cache.SaliencyCache` under ``out/saliency``.

Published schedule: Adam, learning rate 5e-4 decayed as lr * 0.985^epoch, lambda 5e-3.

:class:`AttributeTrainer` runs the loop of :class:`whymatch.train.loop.CheckpointedLoop` (as
:class:`whymatch.train.Trainer` does), with its guarantees:
an atomic checkpoint after every epoch with everything needed to resume exactly (on the CPU,
2 epochs straight == 1 epoch + resume + 1 epoch, bit for bit: randomness is re-seeded from
(seed, epoch, rank) at every epoch), best.pt kept by validation mAP, metrics.jsonl, a tqdm bar
on rank 0, DDP under torchrun (each rank a disjoint shard of every epoch's permutation, as
DistributedSampler does), and autocast only on CUDA.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..io import FileFormatError, atomic_torch_save
from .. import _checks as V
from ..train import checkpoint as C
from ..train.distributed import all_gather_shares, default_device, dist_info, shares
from ..train.loop import CheckpointedLoop, _describe_module, _model_settings, _seed_of, best_score_alias
from ..train.tasks import RUN_OPTIONS
from .cache import SaliencyCache
from .losses import AttributeLoss
from .model import ATTRIBUTE_BACKBONES, AttributeModel, attribute_model_state, build_attribute_model

__all__ = ["SANEConfig", "AttributeImages", "AttributeTrainer", "build_sane_data", "train_sane", "SANE_DATASETS",
           "MODEL_FILE", "SALIENCY_DIR"]

SANE_DATASETS = ("shapesworld", "awa2", "polyvore")
MODEL_FILE = "model.pt"
SALIENCY_DIR = "saliency"
_FORMAT = 2  # 2: the trainer's own settings are stored beside the task config


@dataclass
class SANEConfig:
    """Settings of ``whymatch train sane`` (the CLI's options, same names).

    Attributes:
        data: 'shapesworld' (generated), 'awa2:PATH' or 'polyvore:PATH' (local copies, read by
            ``whymatch.data.awa2.AwA2`` / ``whymatch.data.polyvore.PolyvoreOutfits``).
        backbone: trunk of the attribute model: 'shapes', 'resnet18' or 'resnet50' (SANE's).
        out: output directory (checkpoint.pt, best.pt, model.pt, metrics.jsonl, config.json, saliency/).
        epochs, batch_size: per rank batch size.
        lr, lr_decay: Adam learning rate and its per-epoch factor (SANE: 5e-4, 0.985).
        lam: lambda of Eq. 3 (SANE: 5e-3); 0 trains the classifier alone and builds no saliency maps.
        normalize, distance, temperature: of the matching term (see AttributeLoss); the
            temperature applies to the saliency maps, which are in similarity units.
        k_maps: K, saliency maps per training image (its K most similar images of its class).
        n_masks, rise_grid, rise_p, rise_batch_size: RISE settings of the saliency cache.
        saliency_size: side of the stored saliency maps.
        similarity: the similarity model explained: None = the shipped ShapesWorld model
            (shapesworld only), or 'package.module:factory' returning a SimilarityModel.
        image_size: ShapesWorld image side (default 96, the shipped similarity model's).
        n_train, n_val: ShapesWorld images (48 train-split classes for training, ``FIT_CLASSES``;
            the other 12 train-split classes, ``VALIDATION_CLASSES``, for validation and best.pt:
            the test-split classes are never seen).
        labels: ShapesWorld attribute labels: 'all' (image-level, the union over every object,
            distractors included: what a data set without per-object labels, AwA2 or Polyvore,
            always gets) or 'key' (the key object's attributes only: key-object-aware supervision).
        mu: weight of the per-object localization term (ShapesWorld only: each present
            attribute's map is pulled towards the masks of the objects that have it, see
            :func:`~whymatch.attributes.losses.localization_loss`); 0 is SANE as published.
        flip: random horizontal flips of image and saliency maps together.
        seed, device, resume, overwrite, show_progress, num_workers, eval_batch_size: as for the other
            trainers (a new run refuses an ``out`` holding another unless ``overwrite``; a resumed run
            refuses any other setting than those of :data:`whymatch.train.checkpoint.RESUMABLE`).

    The fields that are options of ``whymatch train sane`` carry their CLI help and choices in their
    metadata (see :class:`whymatch.train.TrainConfig`).
    """

    data: str = field(default="shapesworld", metadata=dict(
        help="shapesworld, or awa2:PATH, polyvore:PATH (local copies)"))
    backbone: str = field(default="shapes", metadata=dict(
        help="randomly initialized trunk (default %(default)s; SANE: resnet50)", choices=ATTRIBUTE_BACKBONES))
    out: str = field(default="whymatch-sane", metadata=dict(
        help="output directory (checkpoints, metrics.jsonl, model.pt, saliency/)"))
    epochs: int = field(default=20, metadata=dict(help=None))
    batch_size: int = field(default=64, metadata=dict(help="images per batch per rank (default %(default)s)"))
    lr: float = field(default=5e-4, metadata=dict(help="Adam learning rate (default %(default)s)"))
    lr_decay: float = field(default=0.985, metadata=dict(help="per-epoch lr factor (default %(default)s)"))
    lam: float = field(default=5e-3, metadata=dict(
        help="weight of the saliency matching term; 0: no saliency maps (default %(default)s)"))
    normalize: str = field(default="softmax", metadata=dict(
        help="spatial normalization of the maps in the matching term (default %(default)s)",
        choices=("softmax", "l1")))
    distance: str = "squared"
    temperature: float = field(default=0.05, metadata=dict(
        help="softmax temperature of the saliency maps (default %(default)s)"))
    k_maps: int = field(default=5, metadata=dict(help="saliency maps per training image (default %(default)s)"))
    n_masks: int = field(default=500, metadata=dict(help="RISE masks per saliency map (default %(default)s)"))
    rise_grid: int = 8
    rise_p: float = 0.5
    rise_batch_size: int = 250
    saliency_size: int = field(default=48, metadata=dict(help="side of the cached maps (default %(default)s)"))
    similarity: str | None = field(default=None, metadata=dict(
        help="'package.module:factory' of the similarity model to explain (default: the shipped ShapesWorld "
             "model; needed for awa2 / polyvore unless --lam 0)"))
    image_size: int | None = field(default=None, metadata=dict(help="shapesworld image side (default 96)"))
    n_train: int = field(default=3000, metadata=dict(help="shapesworld: training images"))
    n_val: int = field(default=1000, metadata=dict(help="shapesworld: validation images (held-out classes)"))
    labels: str = "all"
    mu: float = 0.0
    flip: bool = field(default=True, metadata=RUN_OPTIONS["flip"])
    seed: int = field(default=0, metadata=RUN_OPTIONS["seed"])
    device: str | None = field(default=None, metadata=RUN_OPTIONS["device"])
    resume: bool = field(default=False, metadata=RUN_OPTIONS["resume"])
    overwrite: bool = field(default=False, metadata=RUN_OPTIONS["overwrite"])
    show_progress: bool = field(default=True, metadata=RUN_OPTIONS["show_progress"])
    num_workers: int = field(default=0, metadata=RUN_OPTIONS["num_workers"])
    eval_batch_size: int = 256


# ------------------------------------------------------------------ data
class AttributeImages(Dataset):
    """Images with binary attribute labels; items (image (3, H, W) float in [0, 1], attributes (A,) bool, index).

    Args:
        images: (N, 3, H, W) uint8 or float tensor, or a Dataset whose items are an image or
            (image, label, ...).
        attributes: (N, A) bool.
        attribute_names: A names.
        labels: optional (N,) int class labels (references of the saliency cache share them).
        attribute_masks: optional (N, A, m, m) uint8 or float, where each attribute is in each image
            (per-object supervision, see :func:`~whymatch.attributes.losses.localization_loss`);
            items then carry it as a fourth element (float32).
    """

    def __init__(self, images: Tensor | Dataset, attributes: Tensor, attribute_names: Sequence[str],
                 labels: Tensor | None = None, attribute_masks: Tensor | None = None) -> None:
        attributes = V.tensor("attributes", attributes, ndim=2)
        n = len(images)
        if attributes.shape[0] != n:
            raise ValueError(f"attributes must have one row per image ({n}), got {attributes.shape[0]}")
        if len(attribute_names) != attributes.shape[1]:
            raise ValueError(f"attribute_names must hold {attributes.shape[1]} names (attributes' columns), "
                             f"got {len(attribute_names)}")
        if labels is not None:
            labels = V.tensor("labels", torch.as_tensor(labels), ndim=1)
            if labels.shape[0] != n:
                raise ValueError(f"labels must have one entry per image ({n}), got {labels.shape[0]}")
            labels = labels.long()
        if attribute_masks is not None:
            attribute_masks = V.tensor("attribute_masks", attribute_masks, ndim=4)
            if tuple(attribute_masks.shape[:2]) != tuple(attributes.shape):
                raise ValueError(f"attribute_masks must have shape ({n}, {attributes.shape[1]}, m, m), "
                                 f"got {tuple(attribute_masks.shape)}")
        self.attribute_masks = attribute_masks
        self.images = images
        self.attributes = attributes.bool()
        self.attribute_names = tuple(attribute_names)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i]
        if isinstance(x, (tuple, list)):
            x = x[0]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.attribute_masks is not None:
            return x, self.attributes[i], int(i), self.attribute_masks[i].float()
        return x, self.attributes[i], int(i)


def build_sane_data(cfg: SANEConfig) -> tuple[AttributeImages, AttributeImages, dict]:
    """(train set, validation set, info) for ``cfg.data``.

    ShapesWorld: attributes = ``ShapesWorld.attributes(i, which='all')`` (18, every object),
    images rendered once into uint8 tensors; training on ``FIT_CLASSES`` (48 train-split classes),
    validation (and so best.pt) on ``VALIDATION_CLASSES`` (the 12 held-out train-split classes), never on
    the (disjoint) test-split classes. AwA2 / Polyvore Outfits: the 'train' and 'test' splits
    of the loaders in ``whymatch.data.awa2`` / ``whymatch.data.polyvore``.
    """
    info = sane_data_info(cfg)
    name, _, root = cfg.data.partition(":")
    if name == "shapesworld":
        from ..data import ShapesWorld
        from ..data.shapesworld import ATTRIBUTE_NAMES

        size = cfg.image_size or 96
        out = []
        from ..data.shapesworld import FIT_CLASSES, VALIDATION_CLASSES

        # the two sets draw from different seeds: same-split samples of one seed share their layouts
        for classes, n, sd in ((FIT_CLASSES, cfg.n_train, cfg.seed), (VALIDATION_CLASSES, cfg.n_val, cfg.seed + 1)):
            ds = ShapesWorld("train", n, size, seed=sd, classes=classes)
            which = V.choice("labels", cfg.labels, ("all", "key"))
            attrs = torch.stack([ds.attributes(i, which=which) for i in range(len(ds))])
            imgs = ds.images(dtype=torch.uint8, show_progress=cfg.show_progress)
            masks = shapesworld_attribute_masks(ds, which) if cfg.mu > 0 else None
            out.append(AttributeImages(imgs, attrs, ATTRIBUTE_NAMES, ds.labels, masks))
        return out[0], out[1], info
    if not Path(root).exists():
        raise FileNotFoundError(f"data root not found: {root}")
    module, cls_name = ("awa2", "AwA2") if name == "awa2" else ("polyvore", "PolyvoreOutfits")
    try:
        import importlib

        cls = getattr(importlib.import_module(f"whymatch.data.{module}"), cls_name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"data {name!r} needs whymatch.data.{module}.{cls_name}, which this install lacks "
                          f"({exc})") from exc
    out = []
    for split in ("train", "test"):
        ds = cls(root, split)
        out.append(AttributeImages(ds, torch.as_tensor(ds.attributes), list(ds.attribute_names),
                                   getattr(ds, "labels", None)))
    return out[0], out[1], info


def shapesworld_attribute_masks(ds, which: str = "all", size: int = 24) -> Tensor:
    """(N, A, size, size) uint8 attribute footprints (255 = covered) of every ShapesWorld sample,
    for the per-object localization term (``ShapesWorld.attribute_masks``)."""
    return torch.stack([(ds.attribute_masks(i, which, size) * 255).round().to(torch.uint8)
                        for i in range(len(ds))])


def sane_data_info(cfg: SANEConfig) -> dict:
    """What :func:`build_sane_data` records about ``cfg.data`` (config.json), without reading any data."""
    if not isinstance(cfg.data, str):
        raise TypeError(f"data must be a string, got {type(cfg.data).__name__}")
    name, _, root = cfg.data.partition(":")
    V.choice("data", name, SANE_DATASETS)
    if name == "shapesworld":
        return {"data": "shapesworld", "image_size": cfg.image_size or 96, "n_train": cfg.n_train,
                "n_val": cfg.n_val, "attributes": "all objects"}
    if not root:
        raise ValueError(f"data {name!r} needs a path: --data {name}:/path/to/{name}")
    return {"data": name, "root": str(root)}


def _load_similarity(cfg: SANEConfig, device: torch.device):
    """The SimilarityModel whose saliency supervises the attribute maps."""
    if cfg.similarity is None:
        if not cfg.data.startswith("shapesworld"):
            raise ValueError(f"similarity must name the model to explain for data {cfg.data!r} "
                             "('package.module:factory'), or lam must be 0 (no saliency matching)")
        from ..models import load_default_model

        sim = load_default_model(device)
    else:
        from ..models.loading import load_user_model

        sim = load_user_model(cfg.similarity).to(device)
    if device.type == "cpu" and sim.autocast is None:
        sim.channels_last = True  # 1.5x faster CPU convolutions for the RISE passes
        sim.embedder.to(memory_format=torch.channels_last)
    return sim.eval()


# ------------------------------------------------------------------ trainer
class AttributeTrainer(CheckpointedLoop):
    """Train an :class:`AttributeModel` with :class:`AttributeLoss` (and cached saliency maps).

    Args:
        model: the attribute model (moved to ``device``).
        loss: the AttributeLoss.
        train_set: items (image, attributes (A,) bool, index), e.g. :class:`AttributeImages`.
        out_dir: where checkpoint.pt, best.pt, metrics.jsonl and config.json go.
        val_set: optional, same items; validation mAP after every epoch (best.pt by it).
        cache: optional :class:`SaliencyCache` over ``train_set`` (row i = item i); without it
            the loss gets no saliency (lambda has no effect).
        epochs: total epochs.
        batch_size: images per batch per rank.
        lr: Adam learning rate; lr_decay: per-epoch factor (lr * lr_decay^epoch).
        device: default cuda:LOCAL_RANK when available, else cpu.
        seed: every random choice derives from it (permutations, flips).
        amp: 'auto' (bf16 or fp16 autocast on CUDA, nothing on CPU), 'bf16', 'fp16' or 'none'.
        flip: random horizontal flips of images and their saliency maps.
        num_workers: DataLoader workers; eval_batch_size: images per validation batch.
        show_progress: tqdm bar and a JSON line per epoch on rank 0.
        config: extra JSON-able settings recorded in config.json and the checkpoints.
    """

    def __init__(self, model: AttributeModel, loss: AttributeLoss, train_set: Dataset, *,
                 out_dir: str | os.PathLike, val_set: Dataset | None = None, cache: SaliencyCache | None = None,
                 epochs: int = 20, batch_size: int = 64, lr: float = 5e-4, lr_decay: float = 0.985,
                 device: str | torch.device | None = None, seed: int = 0, amp: str = "auto", flip: bool = False,
                 num_workers: int = 0, eval_batch_size: int = 256, show_progress: bool = True,
                 config: dict | None = None) -> None:
        if not isinstance(model, AttributeModel):
            raise TypeError(f"model must be a whymatch.attributes.AttributeModel, got {type(model).__name__}")
        if not isinstance(loss, AttributeLoss):
            raise TypeError(f"loss must be a whymatch.attributes.AttributeLoss, got {type(loss).__name__}")
        if len(train_set) == 0:
            raise ValueError("train_set must not be empty")
        if cache is not None:
            if not isinstance(cache, SaliencyCache):
                raise TypeError(f"cache must be a SaliencyCache, got {type(cache).__name__}")
            if len(cache) != len(train_set):
                raise ValueError(f"cache must have one row per train_set item ({len(train_set)}), got {len(cache)}")
        self.distributed, self.rank, self.world = dist_info()
        self.device = default_device(device)
        self.out_dir = Path(out_dir)
        self.epochs = V.positive_int("epochs", epochs)
        self.batch_size = V.positive_int("batch_size", batch_size)
        self.lr = V.real("lr", lr, low=0.0, open_low=True)
        self.lr_decay = V.real("lr_decay", lr_decay, low=0.0, high=1.0, open_low=True)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self.amp = V.choice("amp", amp, ("auto", "bf16", "fp16", "none"))
        self.flip = bool(flip)
        self.num_workers = V.positive_int("num_workers", num_workers, minimum=0)
        self.eval_batch_size = V.positive_int("eval_batch_size", eval_batch_size)
        self.show_progress = bool(show_progress)
        self.train_set, self.val_set, self.cache = train_set, val_set, cache
        self.config = dict(config or {})
        per_rank = len(train_set) // self.world
        if per_rank == 0:
            raise ValueError(f"train_set ({len(train_set)} items) must have at least one item per rank ({self.world})")
        self.steps_per_epoch = math.ceil(per_rank / self.batch_size)

        self.model = model.to(self.device)
        self.loss = loss.to(self.device)
        self.amp_dtype = self.setup_precision(self.amp)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=self.lr)
        decay = self.lr_decay
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: decay ** e)
        self.net: nn.Module = self.wrap_distributed(self.model)
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict] = []
        self.best_score = -math.inf  # the best validation mAP (best_map)
        self.last_epoch_indices: Tensor = torch.empty(0, dtype=torch.long)

    # ------------------------------------------------------------ state
    def run_settings(self) -> dict:
        """This trainer's settings (config.json, and the checkpoint's 'settings', compared on resume: only
        those of :data:`whymatch.train.checkpoint.RESUMABLE` may change)."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "lr_decay": self.lr_decay,
                "loss": repr(self.loss), "seed": self.seed, "world_size": self.world, "device": str(self.device),
                "autocast": str(self.amp_dtype), "steps_per_epoch": self.steps_per_epoch,
                "n_train": len(self.train_set), "saliency_cache": str(self.cache.path) if self.cache else None,
                "saliency_fingerprint": self.cache.fingerprint if self.cache else None, "amp": self.amp,
                "flip": self.flip, "num_workers": self.num_workers, "eval_batch_size": self.eval_batch_size,
                "attribute_names": list(self.model.attribute_names), **_model_settings(self.model),
                "loss_module": _describe_module(self.loss)}

    def state_dict(self) -> dict:
        return {
            "format": _FORMAT,
            **self.loop_state(),
            "best_map": self.best_map,
            "n_train": len(self.train_set),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "attribute_names": list(self.model.attribute_names),
            "config": self.config,
            "settings": self.run_settings(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` after checking every entry: a checkpoint of another run (settings,
        attributes, model) or a malformed one is refused, by name, before anything loads."""
        self.check_loop_state(state, _FORMAT)
        for key, mine in (("n_train", len(self.train_set)), ("seed", self.seed), ("batch_size", self.batch_size),
                          ("attribute_names", list(self.model.attribute_names))):
            if key not in state:
                raise FileFormatError(f"lacks the entry {key!r}")
            if C._plain(state[key]) != mine:
                raise ValueError(f"the checkpoint has {key}={state[key]!r}, this run {mine!r}; "
                                 "resume with the same settings")
        if "best_map" not in state:
            raise FileFormatError("lacks the entry 'best_map'")
        best = C.check_number("entry 'best_map'", state["best_map"], allow_inf=True)
        self.restore_loop_state(state)
        self.best_map = best

    def model_state(self, **extra: object) -> dict:
        """The model as a loadable file's content (:func:`attribute_model_state` when it can be rebuilt)."""
        if self.model.config:
            return attribute_model_state(self.model, **extra)
        return {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "attribute_names": list(self.model.attribute_names), **extra}

    # ------------------------------------------------------------ one epoch
    def epoch_indices(self, epoch: int) -> list[Tensor]:
        """This rank's batches (index tensors) of an epoch: a permutation seeded by (seed, epoch),
        rank r taking positions r, r + world, ... (N // world of them), cut into batch_size pieces."""
        g = torch.Generator().manual_seed(_seed_of(self.seed, epoch, 0x5A3E))
        perm = torch.randperm(len(self.train_set), generator=g)
        mine = perm[self.rank::self.world][:len(self.train_set) // self.world]
        return list(torch.split(mine, self.batch_size))

    def _autocast(self):
        if self.amp_dtype is not None:
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    log_digits = 5

    @property
    def train_module(self) -> nn.Module:
        return self.net

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        batches = self.epoch_indices(epoch)
        self.last_epoch_indices = torch.cat(batches)
        return [b.tolist() for b in batches]

    def train_step(self, batch, generator: torch.Generator) -> tuple[dict[str, float], dict[str, str]]:
        images, attrs, index, *more = batch
        x = images.to(self.device, non_blocking=True)
        am = more[0].to(self.device, non_blocking=True) if more else None
        y = attrs.to(self.device, non_blocking=True)
        sal = valid = None
        if self.cache is not None:
            sal, valid = self.cache.batch(index)
            sal, valid = sal.to(self.device, non_blocking=True), valid.to(self.device)
        if self.flip:
            f = (torch.rand(x.shape[0], generator=generator) < 0.5).to(self.device)
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
            if sal is not None:
                sal = torch.where(f[:, None, None, None], sal.flip(-1), sal)
            if am is not None:
                am = torch.where(f[:, None, None, None], am.flip(-1), am)
        with self._autocast():
            out = self.net(x)
        parts = self.loss(out, y, sal, valid, am)
        self.check_finite_loss(parts["total"], self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(parts["total"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.global_step += 1
        return ({k: float(parts[k].detach()) for k in ("total", "huber", "matching", "localization")},
                {k: f"{float(v.detach()):.3g}" for k, v in parts.items()})

    def end_epoch(self) -> None:
        self.scheduler.step()  # lr * lr_decay^epoch

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, dataset: Dataset) -> tuple[Tensor, Tensor, Tensor]:
        """(confidences (N, A), logits (N, A) float32, attributes (N, A) bool) of a data set, eval
        mode, on the CPU; under torch.distributed each rank embeds a share and all get everything."""
        parts = shares(len(dataset), self.world)
        mine = parts[self.rank]
        self.model.eval()
        a = self.model.n_attributes
        conf, logit, lab = [], [], []
        loader = DataLoader(Subset(dataset, mine.tolist()), batch_size=self.eval_batch_size, shuffle=False,
                            num_workers=self.num_workers)
        for images, attrs, *_ in loader:
            with self._autocast():
                out = self.model(images.to(self.device))
            conf.append(out.confidences.float())
            logit.append(out.logits.float())
            lab.append(attrs.to(self.device))
        c = torch.cat(conf) if conf else torch.empty(0, a, device=self.device)
        lg = torch.cat(logit) if logit else torch.empty(0, a, device=self.device)
        lb = torch.cat(lab).bool() if lab else torch.empty(0, a, dtype=torch.bool, device=self.device)
        if self.distributed:
            full = all_gather_shares(torch.cat([c, lg, lb.float()], dim=1), [len(p) for p in parts], 0.0)
            c, lg, lb = full[:, :a], full[:, a:2 * a], full[:, 2 * a:] > 0.5
        return c.cpu(), lg.cpu(), lb.cpu()

    def evaluate(self, dataset: Dataset | None = None) -> dict:
        """Validation attribute mAP: 'map' (ranked by confidences), 'map_logits', and 'ap' per attribute name."""
        from ..metrics.attributes import mean_average_precision

        ds = self.val_set if dataset is None else dataset
        if ds is None:
            raise ValueError("evaluate() needs a data set: pass one or give the trainer a val_set")
        conf, logits, lab = self.predict(ds)
        m, ap = mean_average_precision(conf, lab)
        m_logits, _ = mean_average_precision(logits, lab)
        names = self.model.attribute_names
        return {"map": m, "map_logits": m_logits,
                "ap": {n: (None if math.isnan(v) else v) for n, v in zip(names, ap.tolist())}}

    # ------------------------------------------------------------ validation in the loop
    best_map = best_score_alias("The best validation mAP so far (-inf before any validation);"
                                 " best.pt holds that epoch's model.")

    def validation_set(self) -> Dataset | None:
        return self.val_set

    def validate(self) -> tuple[dict, float]:
        ev = self.evaluate()
        self._best_ap = ev["ap"]
        return {"map": ev["map"], "map_logits": ev["map_logits"]}, -math.inf if math.isnan(ev["map"]) else ev["map"]

    def best_state(self, score: float) -> dict:
        return self.model_state(epoch=self.epoch, map=score, ap=self._best_ap, train=self.config)


# ------------------------------------------------------------------ task
def train_sane(cfg: SANEConfig) -> AttributeTrainer:
    """Train SANE's attribute model as ``cfg`` says; returns the trainer.

    Builds the data (:func:`build_sane_data`), a fresh model (``torch.manual_seed(cfg.seed)``),
    the saliency cache under ``cfg.out/saliency`` when ``cfg.lam > 0`` (reused by a later run
    with the same settings), trains, and writes ``cfg.out/model.pt`` (loadable with
    :func:`whymatch.attributes.model.load_attribute_model`) on rank 0.
    """
    if not isinstance(cfg, SANEConfig):
        raise TypeError(f"cfg must be a SANEConfig, got {type(cfg).__name__}")
    V.choice("backbone", cfg.backbone, ATTRIBUTE_BACKBONES)
    V.real("lam", cfg.lam, low=0.0)
    V.real("mu", cfg.mu, low=0.0)
    if cfg.data.partition(":")[0] != "shapesworld" and (cfg.mu > 0 or cfg.labels != "all"):
        raise ValueError(f"labels='key' and mu > 0 need per-object labels (data 'shapesworld'), got data "
                         f"{cfg.data!r} with labels={cfg.labels!r}, mu={cfg.mu}")
    loss = AttributeLoss(cfg.lam, cfg.normalize, distance=cfg.distance, temperature=cfg.temperature, mu=cfg.mu)
    config = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "overwrite", "show_progress")}
    config.update(sane_data_info(cfg))
    if not isinstance(cfg.resume, bool) or not isinstance(cfg.overwrite, bool):
        raise TypeError(f"resume and overwrite must be bools, got {cfg.resume!r} and {cfg.overwrite!r}")
    out = C.check_run_dir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)  # before any data or RISE work
    if cfg.resume:
        C.check_resume_config(out / "checkpoint.pt", config)
    train, val, info = build_sane_data(cfg)
    _, rank, _ = dist_info()
    device = default_device(cfg.device)
    cache = None
    if cfg.lam > 0:
        sim = _load_similarity(cfg, device)
        cache = SaliencyCache.build(sim, train, Path(cfg.out) / SALIENCY_DIR, k=cfg.k_maps, labels=train.labels,
                                    size=cfg.saliency_size, n_masks=cfg.n_masks, grid=cfg.rise_grid, p=cfg.rise_p,
                                    batch_size=cfg.rise_batch_size, seed=cfg.seed,
                                    show_progress=cfg.show_progress and rank == 0)
        del sim
    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_attribute_model(cfg.backbone, len(train.attribute_names), attribute_names=train.attribute_names)
    trainer = AttributeTrainer(model, loss, train, out_dir=cfg.out, val_set=val, cache=cache, epochs=cfg.epochs,
                               batch_size=cfg.batch_size, lr=cfg.lr, lr_decay=cfg.lr_decay, device=device,
                               seed=cfg.seed, flip=cfg.flip, num_workers=cfg.num_workers,
                               eval_batch_size=cfg.eval_batch_size, show_progress=cfg.show_progress, config=config)
    trainer.fit(resume=cfg.resume, overwrite=cfg.overwrite)
    if trainer.rank == 0:
        last = trainer.history[-1] if trainer.history else {}
        atomic_torch_save(trainer.model_state(epoch=trainer.epoch, map=last.get("map"), train=config),
                          Path(cfg.out) / MODEL_FILE)
    return trainer
