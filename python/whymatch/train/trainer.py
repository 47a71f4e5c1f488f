"""A reusable metric-learning training loop with exact resume, DDP, mixed precision and Recall@K evaluation.

The guarantees every whymatch trainer (similarity mining, AVSL, SANE) gets from :class:`Trainer`:

- a checkpoint after every epoch, written atomically (temporary file + os.replace):
  model, loss (ProxyAnchor proxies and any other loss state), optimizer, scheduler,
  GradScaler, sampler state, epoch, global step, metrics history and the best Recall@1;
- ``fit(resume=True)`` continues exactly where the last checkpoint stopped: on the CPU
  with a fixed seed, 2 epochs straight and 1 epoch + resume + 1 epoch give identical
  weights (tests/test_train.py). Randomness is re-seeded at the start of every epoch
  from (seed, epoch, rank) (batches, augmentation, dropout), so nothing before the
  epoch matters;
- a tqdm progress bar, and ``metrics.jsonl`` (one JSON object per epoch), rewritten
  atomically from the checkpoint's history so that it never runs ahead of a checkpoint;
- AdamW; on CUDA only: autocast (bf16 where supported, else fp16 with a GradScaler)
  and channels_last;
- DDP when torch.distributed is initialized (torchrun): each rank trains on its own
  P x K batches, gradients are averaged, rank 0 writes every file;
- evaluation of Recall@K on held-out classes with :class:`whymatch.evaluation.RetrievalEvaluator`
  (test set split across ranks, embeddings gathered, gallery search sharded).

The loss is any module called as ``loss(model, images, labels)`` that returns a
scalar tensor, a mapping with a ``'loss'`` entry, or an object with ``.total``
(and optionally ``.parts()`` -> dict of numbers to log), such as
:class:`whymatch.mining.SimilarityMiningLoss`. Its parameters are optimized with
the learning rate ``loss_lr``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..io import atomic_torch_save, atomic_write_text
from ..ops import _validate as V
from ..similarity import SimilarityModel
from .sampler import PKSampler

__all__ = ["Trainer", "random_flip", "CHECKPOINT", "BEST", "METRICS_LOG"]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS_LOG = "metrics.jsonl"
_FORMAT = 1


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each image horizontally with probability 1/2 (the generator lives on the CPU)."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    if not bool(flip.any()):
        return images
    out = images.clone()
    idx = torch.nonzero(flip).flatten().to(images.device)
    out[idx] = images[idx].flip(-1)
    return out


def _seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


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


class CheckpointedLoop:
    """Checkpoint files of a training loop: the part the metric-learning and attribute trainers share.

    A subclass has ``out_dir``, ``rank``, ``device``, ``history``, ``model``, ``optimizer``,
    ``scheduler``, ``scaler``, ``epoch``, ``global_step`` and its own ``state_dict`` /
    ``load_state_dict``; the latter calls :meth:`restore_loop_state` for the shared entries.
    """

    def restore_loop_state(self, state: dict) -> None:
        """Load the model, optimizer, scheduler, grad scaler, counters, history and torch RNG of a checkpoint."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])

    def save_checkpoint(self) -> Path:
        """Write out_dir/checkpoint.pt (and metrics.jsonl) atomically; rank 0 only (other ranks no-op)."""
        path = self.out_dir / CHECKPOINT
        if self.rank == 0:
            atomic_torch_save(self.state_dict(), path)
            atomic_write_text(self.out_dir / METRICS_LOG, "".join(json.dumps(h) + "\n" for h in self.history))
        return path

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> None:
        """Resume from ``path`` (default out_dir/checkpoint.pt); FileNotFoundError names the path."""
        p = Path(path) if path is not None else self.out_dir / CHECKPOINT
        if not p.is_file():
            raise FileNotFoundError(f"no checkpoint to resume from at {p}")
        self.load_state_dict(torch.load(p, map_location=self.device, weights_only=False))


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
        lr: AdamW learning rate of the model; loss_lr: of the loss's parameters (default 100 x lr,
            the proxy learning rate of ProxyAnchor, Kim et al. 2020).
        weight_decay: AdamW weight decay (model and loss).
        scheduler: 'cosine' (per step, with ``warmup_steps`` linear warm-up) or 'none'.
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
    """

    def __init__(self, model: SimilarityModel, loss: nn.Module, train_set: Dataset, *, out_dir: str | os.PathLike,
                 test_set: Dataset | None = None, epochs: int = 10, batch_p: int = 16, batch_k: int = 4,
                 lr: float = 1e-3, loss_lr: float | None = None, weight_decay: float = 1e-4,
                 scheduler: str = "cosine", warmup_steps: int = 0, device: str | torch.device | None = None,
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
        import torch.distributed as dist

        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if device is None:
            if torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            else:
                device = "cpu"
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        self.epochs = V.positive_int("epochs", epochs)
        self.lr = V.real("lr", lr, low=0)
        self.loss_lr = self.lr * 100 if loss_lr is None else V.real("loss_lr", loss_lr, low=0)
        self.weight_decay = V.real("weight_decay", weight_decay, low=0)
        self.scheduler_kind = V.choice("scheduler", scheduler, ("cosine", "none"))
        self.warmup_steps = V.positive_int("warmup_steps", warmup_steps, minimum=0)
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

        cuda = self.device.type == "cuda"
        self.model = model.to(self.device)
        self.loss = loss.to(self.device)
        if cuda and (channels_last is True or channels_last == "auto"):
            self.model.channels_last = True
            self.model.to(memory_format=torch.channels_last)
        elif channels_last is True:
            self.model.channels_last = True
        amp_dtype = None
        if cuda and self.amp != "none":
            if self.amp == "bf16" or (self.amp == "auto" and torch.cuda.is_bf16_supported()):
                amp_dtype = torch.bfloat16
            else:
                amp_dtype = torch.float16
        self.model.autocast = amp_dtype
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.lr}]
        loss_params = [p for p in self.loss.parameters() if p.requires_grad]
        if loss_params:
            groups.append({"params": loss_params, "lr": self.loss_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

        self.step_module: nn.Module = _Step(self.model, self.loss)
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.step_module = DDP(self.step_module, device_ids=[self.device.index] if cuda else None)
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict] = []
        self.best_recall_at_1 = -math.inf
        self.last_epoch_batches: list[list[int]] = []

    # ------------------------------------------------------------ schedule
    def _lr_factor(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.scheduler_kind == "none":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1 + math.cos(math.pi * t))

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "history": self.history,
            "best_recall_at_1": self.best_recall_at_1,
            "classes": self.classes,
            "config": self.config,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != _FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r} is not {_FORMAT}")
        if not torch.equal(state["classes"], self.classes):
            raise ValueError("the checkpoint was trained on other classes than this train_set")
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

    def train_epoch(self) -> dict[str, float]:
        """One epoch (self.epoch); returns the mean of the loss parts over the epoch (all ranks)."""
        e = self.epoch
        torch.manual_seed(_seed_of(self.seed, e, self.rank, 1))
        gen = torch.Generator().manual_seed(_seed_of(self.seed, e, self.rank, 2))
        self.sampler.set_epoch(e)
        batches = list(iter(self.sampler))
        self.last_epoch_batches = batches
        loader = DataLoader(self.train_set, batch_sampler=batches, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda")
        self.step_module.train()
        sums: dict[str, float] = {}
        it = loader
        bar = None
        if self.show_progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(loader, desc=f"epoch {e + 1}/{self.epochs}", unit="batch", leave=False)
            it = bar
        for images, labels in it:
            x = self._to_input(images)
            if self.augment is not None:
                x = self.augment(x, gen)
            y = self._map_labels(labels)
            out = self.step_module(x, y)
            total, parts = _total_and_parts(out)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            if self.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(list(self.model.parameters()) + list(self.loss.parameters()),
                                               self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.global_step += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items() if k != "n_tuples"})
        if bar is not None:
            bar.close()
        if self.distributed:  # DDP broadcasts buffers at each forward; the last step's updates are local
            import torch.distributed as dist

            for buf in self.step_module.module.buffers():
                dist.broadcast(buf, 0)
        keys = sorted(sums)
        vals = torch.tensor([sums[k] for k in keys] + [float(len(batches))], dtype=torch.float64)
        if self.distributed:
            import torch.distributed as dist

            vals = vals.to(self.device)
            dist.all_reduce(vals)
            vals = vals.cpu()
        n = max(1.0, float(vals[-1]))
        return {k: float(v) / n for k, v in zip(keys, vals[:-1].tolist())}

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def embed(self, dataset: Dataset) -> tuple[Tensor, Tensor]:
        """Embeddings (N, D) float32 and labels (N,) of a data set, in eval mode, gathered over ranks."""
        n = len(dataset)
        parts = torch.tensor_split(torch.arange(n), self.world)
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

        if dim is None:  # an empty share: learn the dimension from the others
            d = torch.tensor([0], device=self.device)
        else:
            d = torch.tensor([dim], device=self.device)
        dist.all_reduce(d, op=dist.ReduceOp.MAX)
        dim = int(d)
        if emb is None:
            emb = torch.empty(0, dim, device=self.device)
        size = max(len(p) for p in parts)
        pad_e = torch.zeros(size, dim, device=self.device)
        pad_e[:emb.shape[0]] = emb
        pad_l = torch.full((size,), -1, dtype=torch.long, device=self.device)
        pad_l[:lab.shape[0]] = lab
        all_e = [torch.empty_like(pad_e) for _ in range(self.world)]
        all_l = [torch.empty_like(pad_l) for _ in range(self.world)]
        dist.all_gather(all_e, pad_e)
        dist.all_gather(all_l, pad_l)
        emb = torch.cat([e[:len(p)] for e, p in zip(all_e, parts)])
        lab = torch.cat([lab_[:len(p)] for lab_, p in zip(all_l, parts)])
        return emb, lab

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

    # ------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, *, stop_after: int | None = None) -> list[dict]:
        """Train until ``epochs`` (or ``stop_after`` more epochs in this call); returns the history.

        Args:
            resume: continue from out_dir/checkpoint.pt (an error when there is none).
            stop_after: return after this many epochs even if ``epochs`` is not reached
                (the next ``fit(resume=True)`` continues; used to test resuming).
        """
        if resume:
            self.load_checkpoint()
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg = {"epochs": self.epochs, "batch_p": self.sampler.p, "batch_k": self.sampler.k, "lr": self.lr,
                   "loss_lr": self.loss_lr, "weight_decay": self.weight_decay, "scheduler": self.scheduler_kind,
                   "seed": self.seed, "world_size": self.world, "device": str(self.device),
                   "autocast": str(self.model.autocast), "steps_per_epoch": self.steps_per_epoch, **self.config}
            atomic_write_text(self.out_dir / "config.json", json.dumps(cfg, indent=2, default=str) + "\n")
        done = 0
        while self.epoch < self.epochs and (stop_after is None or done < stop_after):
            t0 = time.perf_counter()
            means = self.train_epoch()
            t_train = time.perf_counter() - t0
            self.epoch += 1
            done += 1
            rec = {"epoch": self.epoch, "step": self.global_step, "lr": self.optimizer.param_groups[0]["lr"],
                   **means, "train_time_s": t_train}
            if self.test_set is not None:
                t1 = time.perf_counter()
                rec.update({k: (None if isinstance(v, float) and math.isnan(v) else v)
                            for k, v in self.evaluate().items()})
                rec["eval_time_s"] = time.perf_counter() - t1
                r1 = rec.get("recall@1")
                r1 = -math.inf if r1 is None else r1
                if r1 > self.best_recall_at_1:
                    self.best_recall_at_1 = r1
                    if self.rank == 0:
                        atomic_torch_save({"model": self.model.state_dict(), "epoch": self.epoch,
                                            "recall@1": r1, "config": self.config}, self.out_dir / BEST)
            self.history.append(rec)
            self.save_checkpoint()
            if self.rank == 0 and self.show_progress:
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}
                print(json.dumps(shown), flush=True)
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
        return self.history
