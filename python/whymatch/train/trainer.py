"""The metric-learning trainer: P x K batches, parameter groups and schedules, Recall@K evaluation.

:class:`Trainer` runs the loop every whymatch trainer (similarity mining, AVSL, SANE) shares,
:class:`whymatch.train.loop.CheckpointedLoop`, with these guarantees:

- a checkpoint after every epoch, written atomically (temporary file + os.replace):
  model, loss (ProxyAnchor proxies and any other loss state), optimizer, scheduler,
  GradScaler, sampler state, epoch, global step, metrics history and the best Recall@1;
- a new run never overwrites a finished one (``fit(overwrite=True)`` replaces it on purpose), and
  ``fit(resume=True)`` refuses a checkpoint of other settings (see :class:`Trainer`); checkpoints
  are read with ``weights_only=True``, never running code from a file;
- ``fit(resume=True)`` continues exactly where the last checkpoint stopped: on the CPU
  with a fixed seed, 2 epochs straight and 1 epoch + resume + 1 epoch give identical
  weights (tests/test_train.py). Randomness is re-seeded at the start of every epoch
  from (seed, epoch, rank) (batches, augmentation, dropout), so nothing before the
  epoch matters;
- a tqdm progress bar, and ``metrics.jsonl`` (one JSON object per epoch), rewritten
  atomically from the checkpoint's history so that it never runs ahead of a checkpoint;
- AdamW with parameter groups of their own learning rates (:class:`ParamGroup`, by
  parameter-name prefix; every trainable parameter lands in exactly one group), a per-step
  schedule ('cosine', 'step' = multi-step decay at epoch milestones, or 'none', each with an
  optional linear warm-up) and optional freezing of named groups for the first epochs;
- on CUDA only: autocast (bf16 where supported, else fp16 with a GradScaler) and channels_last;
- DDP when torch.distributed is initialized (torchrun): each rank trains on its own
  P x K batches, gradients are averaged, rank 0 writes every file;
- evaluation of Recall@K on held-out classes with :class:`whymatch.evaluation.RetrievalEvaluator`
  (test set split across ranks, embeddings gathered, gallery search sharded).

The loss is any module called as ``loss(model, images, labels)`` that returns a
scalar tensor, a mapping with a ``'loss'`` entry, or an object with ``.total``
(and optionally ``.parts()`` -> dict of numbers to log), such as
:class:`whymatch.mining.SimilarityMiningLoss`. Its parameters are optimized with
the learning rate ``loss_lr`` unless a :class:`ParamGroup` claims them.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import _checks as V
from ..io import FileFormatError
from ..similarity import SimilarityModel
from . import checkpoint as C
from .distributed import all_gather_shares, default_device, dist_info, shares
from .loop import (BEST, CHECKPOINT, METRICS_LOG, CheckpointedLoop, _describe_module, _model_settings,
                   best_score_alias)
from .sampler import PKSampler

__all__ = ["Trainer", "ParamGroup", "assign_param_groups", "SCHEDULERS", "random_flip", "CHECKPOINT", "BEST",
           "METRICS_LOG"]

_FORMAT = 2  # 2: the trainer's own settings are stored beside the task config
#: The learning-rate schedules of :class:`Trainer` (all per optimizer step).
SCHEDULERS = ("cosine", "step", "none")


@dataclass(frozen=True)
class ParamGroup:
    """Parameters chosen by name, trained with their own learning rate (one AdamW parameter group).

    Names are those of ``{'model': model, 'loss': loss}``: ``'model.' + name`` for a parameter of
    the model (e.g. ``model.embedder.backbone.layer1.0.conv1.weight``) and ``'loss.' + name`` for one
    of the loss (e.g. ``loss.proxies.0``). A prefix is a module path: it matches the name itself and
    the names that continue it after a dot ('model.embedder.coef' matches 'model.embedder.coef.0',
    not 'model.embedder.coefficient'). A parameter belongs to the group of its longest matching
    prefix, so ``ParamGroup('backbone', ('model.embedder',), ...)`` together with
    ``ParamGroup('head', ('model.embedder.fc',), ...)`` means "the embedder except its fc layer".

    Attributes:
        name: the group's name (config.json, the ``lr_<name>`` entries of metrics.jsonl,
            ``Trainer(freeze_groups=...)``); 'model' and 'loss' name the groups of the
            parameters no ParamGroup claims.
        prefixes: one or more prefixes (a single string is accepted).
        lr: the group's learning rate (>= 0) before the schedule's factor.
    """

    name: str
    prefixes: tuple[str, ...]
    lr: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a ParamGroup's name must be a non-empty string, got {self.name!r}")
        prefixes = (self.prefixes,) if isinstance(self.prefixes, str) else tuple(self.prefixes)
        if not prefixes or any(not isinstance(q, str) or not q.strip(".") for q in prefixes):
            raise ValueError(f"param group {self.name!r}: prefixes must be non-empty strings, got {self.prefixes!r}")
        object.__setattr__(self, "prefixes", tuple(q.strip(".") for q in prefixes))
        object.__setattr__(self, "lr", V.real(f"the lr of param group {self.name!r}", self.lr, low=0))

    def match(self, name: str) -> int:
        """Length of the longest prefix matching ``name``, or -1 when none does."""
        best = -1
        for q in self.prefixes:
            if (name == q or name.startswith(q + ".")) and len(q) > best:
                best = len(q)
        return best


def assign_param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], groups: Sequence[ParamGroup],
                        fallback: Callable[[str], tuple[str, float]]) -> list[dict]:
    """Split parameters into AdamW groups: each to the ParamGroup of its longest matching prefix.

    Args:
        named_parameters: (name, parameter) pairs; those with ``requires_grad=False`` are left out.
        groups: the ParamGroups (distinct names, no prefix claimed twice, each must claim a parameter).
        fallback: ``fallback(name) -> (group name, lr)`` for a parameter no ParamGroup claims.
    Returns:
        ``[{'name', 'lr', 'params', 'param_names'}]``: the ParamGroups in their order, then the fallback
        groups in order of first appearance; no empty group. Every parameter is in exactly one group
        (a parameter shared under two names counts once, under its first name).
    """
    groups = list(groups)
    seen_names: set[str] = set()
    owner: dict[str, str] = {}
    for g in groups:
        if not isinstance(g, ParamGroup):
            raise TypeError(f"param_groups must hold ParamGroup objects, got {type(g).__name__}")
        if g.name in seen_names:
            raise ValueError(f"param group name {g.name!r} is used twice")
        seen_names.add(g.name)
        for q in g.prefixes:
            if q in owner:
                raise ValueError(f"prefix {q!r} is claimed by param groups {owner[q]!r} and {g.name!r}")
            owner[q] = g.name
    out: dict[str, dict] = {g.name: {"name": g.name, "lr": g.lr, "params": [], "param_names": []} for g in groups}
    fallback_names: list[str] = []
    seen: set[int] = set()
    for name, p in named_parameters:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        best, where = -1, None
        for g in groups:
            m = g.match(name)
            if m > best:
                best, where = m, g.name
        if where is None:
            where, lr = fallback(name)
            if where in seen_names:
                raise ValueError(f"param group name {where!r} is taken by the parameters no ParamGroup claims "
                                 f"(e.g. {name!r}); give the ParamGroup another name")
            if where not in out:
                out[where] = {"name": where, "lr": lr, "params": [], "param_names": []}
                fallback_names.append(where)
        out[where]["params"].append(p)
        out[where]["param_names"].append(name)
    for g in groups:
        if not out[g.name]["params"]:
            raise ValueError(f"param group {g.name!r} (prefixes {list(g.prefixes)}) matches no trainable parameter")
    return [out[g.name] for g in groups] + [out[n] for n in fallback_names]


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each image horizontally with probability 1/2 (the generator lives on the CPU)."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    if not bool(flip.any()):
        return images
    out = images.clone()
    idx = torch.nonzero(flip).flatten().to(images.device)
    out[idx] = images[idx].flip(-1)
    return out


class _Step(nn.Module):
    """Model + loss as one module, so DDP sees (and all-reduces) the loss's parameters too,
    and every forward of the embedder inside the loss happens inside one DDP forward."""

    def __init__(self, model: SimilarityModel, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images: Tensor, labels: Tensor):
        return self.loss(self.model, images, labels)


def _total_and_parts(out: object) -> tuple[Tensor, dict[str, float]]:
    if isinstance(out, Tensor):
        return out, {"loss": float(out.detach())}
    if isinstance(out, dict):
        if "loss" not in out:
            raise ValueError("a loss returning a dict must have a 'loss' entry")
        return out["loss"], {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in out.items()}
    total = getattr(out, "total", None)
    if not isinstance(total, Tensor):
        raise TypeError(f"the loss must return a tensor, a dict with 'loss', or an object with .total; "
                        f"got {type(out).__name__}")
    parts = out.parts() if hasattr(out, "parts") else {"loss": float(total.detach())}
    return total, parts


class Trainer(CheckpointedLoop):
    """Train a SimilarityModel with a metric loss on P x K batches; see the module docstring.

    Args:
        model: the SimilarityModel to train (moved to ``device``).
        loss: ``loss(model, images, labels)`` (module docstring); labels passed to it are
            contiguous class indices 0..n_classes-1 of the training set.
        train_set: a Dataset of (image (C, H, W) float in [0, 1] or uint8, label) with a
            ``.labels`` (N,) int tensor.
        out_dir: where checkpoint.pt, best.pt, metrics.jsonl and config.json go.
        test_set: optional held-out Dataset (same item format, ``.labels``) for Recall@K after each epoch.
        epochs: total epochs (the cosine schedule spans them).
        batch_p, batch_k: classes per batch and images per class (per rank).
        lr: AdamW learning rate of the model's parameters that no ParamGroup claims; loss_lr: of the
            loss's (default 100 x lr, the proxy learning rate of ProxyAnchor, Kim et al. 2020).
        weight_decay: AdamW weight decay (every group).
        param_groups: :class:`ParamGroup` s, each a set of parameters (by name prefix) with its own
            learning rate; what none claims forms the groups 'model' (at ``lr``) and 'loss' (at
            ``loss_lr``). Every trainable parameter is in exactly one group. The order and names of
            the groups must be the same when resuming.
        scheduler: the factor applied to every group's learning rate at each optimizer step:
            'cosine' (from 1 to 0 over the steps after the warm-up), 'step' (multiplied by
            ``lr_decay`` at each epoch of ``milestones``) or 'none' (constant).
        milestones: 'step' only: strictly increasing epochs (0-based epoch indices, >= 1); from the
            start of epoch m on, the factor has been multiplied by ``lr_decay`` once per milestone
            <= m (torch's MultiStepLR stepped once per epoch). Milestones >= ``epochs`` never act.
        lr_decay: 'step' only: the factor per milestone, in (0, 1].
        warmup_steps: linear warm-up: the factor of step s < warmup_steps is multiplied ('step') or
            replaced ('cosine', 'none') by (s + 1) / warmup_steps.
        warmup_epochs: the same warm-up given in epochs (warmup_epochs x steps per epoch steps);
            at most one of warmup_steps and warmup_epochs may be > 0.
        freeze_epochs, freeze_groups: the groups named in ``freeze_groups`` are not updated during
            the first ``freeze_epochs`` epochs: their factor is 0, and their gradients are dropped
            (set to None) after the backward, so that AdamW leaves their parameters, moments and
            step counts untouched (as if their optimizer were not stepped) and gradient clipping
            ignores them. Their gradients are still computed, so DDP sees every parameter used
            (no ``find_unused_parameters``); ``requires_grad`` is never toggled.
        device: 'cpu', 'cuda', 'cuda:1', ... (default: cuda:LOCAL_RANK when available, else cpu).
        seed: every random choice derives from it.
        amp: 'auto' (bf16 or fp16 autocast on CUDA, nothing on CPU), 'bf16', 'fp16' or 'none'.
        channels_last: 'auto' (on CUDA), True or False.
        augment: optional ``augment(images, generator) -> images`` on each training batch
            (e.g. :func:`random_flip`); the generator is seeded per epoch and rank.
        batches_per_epoch: global batches per epoch (default: train size // (P K)).
        eval_k: the K of Recall@K; eval_batch_size: images per embedding batch in evaluation.
        num_workers: DataLoader workers.
        grad_clip: optional max gradient norm.
        show_progress: tqdm bar on rank 0.
        config: extra JSON-able settings recorded in config.json and the checkpoint.

    Run directories and resuming (:mod:`whymatch.train.checkpoint`):

    - ``fit()`` refuses an ``out_dir`` that already holds a run (checkpoint.pt, best.pt, model.pt,
      metrics.jsonl or config.json) unless ``fit(overwrite=True)`` (which removes those files first),
      and an ``out_dir`` that is a file; an empty or unrelated directory is fine.
    - ``fit(resume=True)`` reads out_dir/checkpoint.pt with ``weights_only=True`` (never code) and
      checks every entry before loading anything. The checkpoint stores this trainer's settings
      (:meth:`run_settings`: batch P x K, learning rates and parameter groups, schedule, warm-up,
      freezing, seed, world size, steps per epoch, amp, grad_clip, augmentation, the model's class
      and architecture, the similarity, the loss's modules and settings) and ``config``; every
      difference from this trainer's is refused, naming the setting with the stored and the
      requested value, except for the settings meant to change on resume
      (:data:`~whymatch.train.checkpoint.RESUMABLE`): ``epochs``, ``device`` (and the autocast dtype
      that follows), ``channels_last``, ``num_workers``, ``show_progress``, ``eval_batch_size``,
      ``eval_k``, and the config entries ``out`` and ``root`` (a moved run directory or data set).
      A model or loss whose parameters differ in names or shapes (another backbone, embedding
      dimension or number of classes) is refused by name too, as are other training classes.
    """

    def __init__(self, model: SimilarityModel, loss: nn.Module, train_set: Dataset, *, out_dir: str | os.PathLike,
                 test_set: Dataset | None = None, epochs: int = 10, batch_p: int = 16, batch_k: int = 4,
                 lr: float = 1e-3, loss_lr: float | None = None, weight_decay: float = 1e-4,
                 param_groups: Sequence[ParamGroup] = (), scheduler: str = "cosine",
                 milestones: Sequence[int] = (), lr_decay: float = 0.1, warmup_steps: int = 0,
                 warmup_epochs: int = 0, freeze_epochs: int = 0, freeze_groups: Sequence[str] = (),
                 device: str | torch.device | None = None,
                 seed: int = 0, amp: str = "auto", channels_last: bool | str = "auto",
                 augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
                 batches_per_epoch: int | None = None, eval_k: Sequence[int] = (1, 2, 4, 8),
                 eval_batch_size: int = 256, num_workers: int = 0, grad_clip: float | None = None,
                 show_progress: bool = True, config: dict | None = None) -> None:
        if not isinstance(model, SimilarityModel):
            raise TypeError(f"model must be a whymatch.SimilarityModel, got {type(model).__name__}")
        if not isinstance(loss, nn.Module):
            raise TypeError(f"loss must be an nn.Module called as loss(model, images, labels), "
                            f"got {type(loss).__name__}")
        for name, ds in (("train_set", train_set), ("test_set", test_set)):
            if ds is not None and not isinstance(getattr(ds, "labels", None), Tensor):
                raise TypeError(f"{name} must have a .labels (N,) int tensor")
        self.distributed, self.rank, self.world = dist_info()
        self.device = default_device(device)
        self.out_dir = Path(out_dir)
        self.epochs = V.positive_int("epochs", epochs)
        warmup_steps = self._set_schedule(lr, loss_lr, weight_decay, scheduler, milestones, lr_decay, warmup_steps,
                                          warmup_epochs, freeze_epochs, freeze_groups)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self.amp = V.choice("amp", amp, ("auto", "bf16", "fp16", "none"))
        if channels_last not in ("auto", True, False):
            raise ValueError(f"channels_last must be 'auto', True or False, got {channels_last!r}")
        self.eval_k = tuple(eval_k)
        self.eval_batch_size = V.positive_int("eval_batch_size", eval_batch_size)
        self.num_workers = V.positive_int("num_workers", num_workers, minimum=0)
        self.grad_clip = None if grad_clip is None else V.real("grad_clip", grad_clip, low=0)
        self.show_progress = bool(show_progress)
        self.augment = augment
        self.train_set, self.test_set = train_set, test_set
        self.config = dict(config or {})

        # classes -> contiguous indices (ProxyAnchor and friends need 0..C-1)
        self.classes = torch.unique(train_set.labels.cpu())
        self.sampler = PKSampler(train_set.labels, batch_p, batch_k, seed=seed, batches_per_epoch=batches_per_epoch)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = self.steps_per_epoch * self.epochs
        self.warmup_steps = warmup_steps or self.warmup_epochs * self.steps_per_epoch

        cuda = self.device.type == "cuda"
        self.model = model.to(self.device)
        self.loss = loss.to(self.device)
        if cuda and (channels_last is True or channels_last == "auto"):
            self.model.channels_last = True
            self.model.to(memory_format=torch.channels_last)
        elif channels_last is True:
            self.model.channels_last = True
        self.model.autocast = self.setup_precision(self.amp)

        self._build_optimizer(param_groups)
        self.step_module = self.wrap_distributed(self.step_module)
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict] = []
        self.best_recall_at_1 = -math.inf
        self.last_epoch_batches: list[list[int]] = []

    def _set_schedule(self, lr, loss_lr, weight_decay, scheduler, milestones, lr_decay, warmup_steps, warmup_epochs,
                      freeze_epochs, freeze_groups) -> int:
        """Check and keep the learning rates, schedule, warm-up and freezing (the arguments of ``__init__``);
        returns the checked ``warmup_steps``."""
        self.lr = V.real("lr", lr, low=0)
        self.loss_lr = self.lr * 100 if loss_lr is None else V.real("loss_lr", loss_lr, low=0)
        self.weight_decay = V.real("weight_decay", weight_decay, low=0)
        self.scheduler_kind = V.choice("scheduler", scheduler, SCHEDULERS)
        self.milestones = self._check_milestones(milestones)
        if self.milestones and self.scheduler_kind != "step":
            raise ValueError(f"milestones {list(self.milestones)} need scheduler='step', got "
                             f"scheduler={self.scheduler_kind!r}")
        self.lr_decay = V.real("lr_decay", lr_decay, low=0, high=1, open_low=True)
        warmup_steps = V.positive_int("warmup_steps", warmup_steps, minimum=0)
        self.warmup_epochs = V.positive_int("warmup_epochs", warmup_epochs, minimum=0)
        if warmup_steps and self.warmup_epochs:
            raise ValueError(f"give warmup_steps or warmup_epochs, not both (got {warmup_steps} and "
                             f"{self.warmup_epochs})")
        self.freeze_epochs = V.positive_int("freeze_epochs", freeze_epochs, minimum=0)
        if isinstance(freeze_groups, str):
            freeze_groups = (freeze_groups,)
        self.freeze_groups = tuple(freeze_groups)
        if self.freeze_epochs and not self.freeze_groups:
            raise ValueError(f"freeze_epochs={self.freeze_epochs} needs freeze_groups (the names of the groups "
                             f"to freeze)")
        return warmup_steps

    def _build_optimizer(self, param_groups: Sequence[ParamGroup]) -> None:
        """The model + loss module (``step_module``), its parameter groups, AdamW and the per-step schedule."""
        self.step_module: nn.Module = _Step(self.model, self.loss)
        self.param_groups = tuple(param_groups)
        groups = assign_param_groups(
            self.step_module.named_parameters(), self.param_groups,
            lambda name: ("model", self.lr) if name.startswith("model.") else ("loss", self.loss_lr))
        self.group_names = tuple(g["name"] for g in groups)
        self.group_summary = [{"name": g["name"], "lr": g["lr"], "tensors": len(g["params"]),
                               "numel": sum(p.numel() for p in g["params"])} for g in groups]
        unknown = [n for n in self.freeze_groups if n not in self.group_names]
        if unknown:
            raise ValueError(f"freeze_groups: no parameter group named {', '.join(map(repr, unknown))} "
                             f"(groups: {', '.join(self.group_names)})")
        self._frozen_params = [p for g in groups if g["name"] in self.freeze_groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(
            [{"params": g["params"], "lr": g["lr"], "name": g["name"]} for g in groups], lr=self.lr,
            weight_decay=self.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, [(lambda step, i=i: self._lr_factor(step, i)) for i in range(len(groups))])

    # ------------------------------------------------------------ schedule
    @staticmethod
    def _check_milestones(milestones: Sequence[int]) -> tuple[int, ...]:
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable):
            raise TypeError(f"milestones must be a sequence of epochs, got {milestones!r}")
        ms = tuple(milestones)
        for m in ms:
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ValueError(f"milestones must be epochs >= 1, got {list(ms)}")
        if any(b <= a for a, b in zip(ms, ms[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {list(ms)}")
        return ms

    def _lr_factor(self, step: int, group: int = 0) -> float:
        """The factor of group ``group``'s learning rate at global step ``step`` (0-based)."""
        epoch = step // self.steps_per_epoch
        if epoch < self.freeze_epochs and self.group_names[group] in self.freeze_groups:
            return 0.0
        warm = (step + 1) / self.warmup_steps if self.warmup_steps and step < self.warmup_steps else None
        if self.scheduler_kind == "step":
            decay = self.lr_decay ** bisect.bisect_right(self.milestones, epoch)
            return decay if warm is None else warm * decay
        if warm is not None:
            return warm
        if self.scheduler_kind == "none":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1 + math.cos(math.pi * t))

    def lr_at(self, step: int) -> dict[str, float]:
        """The learning rate of every group (by name) at global step ``step``, as the scheduler sets it."""
        step = V.positive_int("step", step, minimum=0)
        return {name: base * self._lr_factor(step, i)
                for i, (name, base) in enumerate(zip(self.group_names, self.scheduler.base_lrs))}

    # ------------------------------------------------------------ state
    def run_settings(self) -> dict:
        """This trainer's settings (config.json, and the checkpoint's 'settings', compared on resume)."""
        aug = self.augment
        sim = self.model.similarity_fn
        return {"epochs": self.epochs, "batch_p": self.sampler.p, "batch_k": self.sampler.k, "lr": self.lr,
                "loss_lr": self.loss_lr, "weight_decay": self.weight_decay, "scheduler": self.scheduler_kind,
                "milestones": list(self.milestones), "lr_decay": self.lr_decay,
                "warmup_total_steps": self.warmup_steps, "freeze_epochs": self.freeze_epochs,
                "freeze_groups": list(self.freeze_groups), "param_groups": self.group_summary,
                "seed": self.seed, "world_size": self.world, "device": str(self.device),
                "autocast": str(self.model.autocast), "steps_per_epoch": self.steps_per_epoch,
                "amp": self.amp, "grad_clip": self.grad_clip, "eval_k": list(self.eval_k),
                "eval_batch_size": self.eval_batch_size, "num_workers": self.num_workers,
                "augment": None if aug is None else f"{getattr(aug, '__module__', '')}.{getattr(aug, '__qualname__', type(aug).__qualname__)}",
                **_model_settings(self.model.embedder),
                "similarity": sim if isinstance(sim, str) else getattr(sim, "__qualname__", type(sim).__qualname__),
                "loss_module": _describe_module(self.loss)}

    def state_dict(self) -> dict:
        return {
            "format": _FORMAT,
            **self.loop_state(),
            "loss": self.loss.state_dict(),
            "sampler": self.sampler.state_dict(),
            "best_recall_at_1": self.best_recall_at_1,
            "classes": self.classes,
            "config": self.config,
            "settings": self.run_settings(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` after checking every entry (:meth:`check_loop_state`): a checkpoint of
        another run (settings, classes, model) or a malformed one is refused, by name, before anything loads."""
        self.check_loop_state(state, _FORMAT)
        for key in ("loss", "sampler", "best_recall_at_1", "classes"):
            if key not in state:
                raise FileFormatError(f"lacks the entry {key!r}")
        classes = state["classes"]
        if not isinstance(classes, Tensor) or classes.dtype != self.classes.dtype or classes.dim() != 1:
            raise FileFormatError("entry 'classes' must be a 1-D int64 tensor")
        if not torch.equal(classes, self.classes):
            diff = [(a, b) for a, b in zip(classes.tolist(), self.classes.tolist()) if a != b][:1]
            where = f"class {diff[0][0]} in the checkpoint, {diff[0][1]} here" if diff else "another count"
            raise ValueError(f"the checkpoint was trained on other classes than this train_set ({classes.numel()} vs "
                             f"{self.classes.numel()} classes; {where})")
        C.check_tensors_match("the checkpoint's loss state", C.check_tensor_dict("entry 'loss'", state["loss"]),
                              self.loss.state_dict(), "another loss or number of classes")
        C.check_same_structure("entry 'sampler'", state["sampler"], self.sampler.state_dict())
        C.check_int("entry 'sampler' epoch", state["sampler"]["epoch"])
        C.check_number("entry 'best_recall_at_1'", state["best_recall_at_1"], allow_inf=True)
        saved = [g.get("name") for g in state["optimizer"]["param_groups"]]
        if len(saved) != len(self.group_names) or (all(saved) and tuple(saved) != self.group_names):
            raise ValueError(f"the checkpoint's parameter groups {saved} are not this run's {list(self.group_names)}: "
                             f"resume with the same param_groups (and freeze_groups) as the interrupted run")
        self.loss.load_state_dict(state["loss"])
        self.sampler.load_state_dict(state["sampler"])
        self.restore_loop_state(state)
        self.best_recall_at_1 = float(state["best_recall_at_1"])

    # ------------------------------------------------------------ one epoch
    def _to_input(self, images: Tensor) -> Tensor:
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return images

    def _map_labels(self, labels: Tensor) -> Tensor:
        labels = torch.as_tensor(labels).cpu()
        return torch.searchsorted(self.classes, labels).to(self.device)

    @property
    def train_module(self) -> nn.Module:
        return self.step_module

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        self.last_epoch_batches = list(iter(self.sampler))
        return self.last_epoch_batches

    def train_step(self, batch, generator: torch.Generator) -> tuple[dict[str, float], dict[str, str]]:
        images, labels = batch
        x = self._to_input(images)
        if self.augment is not None:
            x = self.augment(x, generator)
        y = self._map_labels(labels)
        out = self.step_module(x, y)
        total, parts = _total_and_parts(out)
        self.check_finite_loss(total, self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.epoch < self.freeze_epochs:  # frozen groups: no update, no AdamW state (see freeze_groups)
            for p in self._frozen_params:
                p.grad = None
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(list(self.model.parameters()) + list(self.loss.parameters()),
                                           self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.global_step += 1
        return parts, {k: f"{v:.4f}" for k, v in parts.items() if k != "n_tuples"}

    def lr_record(self, lr_before: list[float]) -> dict:
        """The rates the epoch's last step left (the schedule is per step): the first group's and each group's."""
        return {"lr": self.optimizer.param_groups[0]["lr"],
                **{f"lr_{n}": g["lr"] for n, g in zip(self.group_names, self.optimizer.param_groups)}}

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def embed(self, dataset: Dataset) -> tuple[Tensor, Tensor]:
        """Embeddings (N, D) float32 and labels (N,) of a data set, in eval mode, gathered over ranks."""
        parts = shares(len(dataset), self.world)
        mine = parts[self.rank]
        self.model.eval()
        loader = DataLoader(Subset(dataset, mine.tolist()), batch_size=self.eval_batch_size, shuffle=False,
                            num_workers=self.num_workers)
        embs, labs = [], []
        for images, labels in loader:
            embs.append(self.model(self._to_input(images)).float())
            labs.append(torch.as_tensor(labels))
        dim = embs[0].shape[1] if embs else None
        emb = torch.cat(embs) if embs else None
        lab = torch.cat(labs).to(self.device) if labs else torch.empty(0, dtype=torch.long, device=self.device)
        if not self.distributed:
            return emb, lab
        import torch.distributed as dist

        d = torch.tensor([0 if dim is None else dim], device=self.device)  # an empty share learns it from the others
        dist.all_reduce(d, op=dist.ReduceOp.MAX)
        if emb is None:
            emb = torch.empty(0, int(d), device=self.device)
        sizes = [len(p) for p in parts]
        return all_gather_shares(emb, sizes, 0.0), all_gather_shares(lab.long(), sizes, -1)

    def evaluate(self, dataset: Dataset | None = None) -> dict[str, float]:
        """Recall@K (``eval_k``) on a held-out set (default the test_set), keys 'recall@K'."""
        from ..evaluation import RetrievalEvaluator

        ds = self.test_set if dataset is None else dataset
        if ds is None:
            raise ValueError("evaluate() needs a data set: pass one or give the Trainer a test_set")
        emb, lab = self.embed(ds)
        ev = RetrievalEvaluator(self.eval_k, metrics=("recall",), backend="torch" if self.distributed else "auto")
        res = ev.get_accuracy(emb, lab, shard=self.distributed)
        return {k: v for k, v in res.items() if k.startswith("recall@")}

    # ------------------------------------------------------------ validation in the loop
    best_recall_at_1 = best_score_alias("The best Recall@1 so far (-inf before any evaluation);"
                                         " best.pt holds that epoch's model.")

    def validation_set(self) -> Dataset | None:
        return self.test_set

    def validate(self) -> tuple[dict, float]:
        entries = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.evaluate().items()}
        r1 = entries.get("recall@1")
        return entries, -math.inf if r1 is None else r1

    def best_state(self, score: float) -> dict:
        return {"model": self.model.state_dict(), "epoch": self.epoch, "recall@1": score, "config": self.config}
