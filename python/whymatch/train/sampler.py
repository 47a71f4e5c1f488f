"""Class-balanced P x K batches, reproducible from a seed and split across torch.distributed ranks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from .. import _checks as V
from .distributed import dist_info

__all__ = ["PKSampler"]


def _dist_info(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None or rank is None:
        _, my_rank, world = dist_info()
        num_replicas = world if num_replicas is None else num_replicas
        rank = my_rank if rank is None else rank
    V.positive_int("num_replicas", num_replicas)
    V.positive_int("rank", rank, minimum=0)
    if rank >= num_replicas:
        raise ValueError(f"rank must be < num_replicas ({num_replicas}), got {rank}")
    return num_replicas, rank


class PKSampler(Sampler[list[int]]):
    """A batch sampler: each batch holds P classes with K images each (P x K indices).

    Epoch e draws its batches from a generator seeded with (seed, e) alone, so an
    epoch is the same whatever happened before it (resuming is exact) and every
    rank draws the same global list of batches. Under torch.distributed, rank r
    takes batches r, r + world, r + 2 world, ... : each rank trains on its own
    full P x K batch (the miner and the metric loss see whole classes), the ranks
    see disjoint batches, and every rank gets the same number of batches (the
    remainder is dropped) so that DDP's all-reduces line up.

    Within a batch the P classes are distinct; the K images of a class are
    distinct when the class has at least K images (drawn with replacement otherwise).
    Classes with fewer than ``min_per_class`` images are never drawn.

    Args:
        labels: (N,) int labels of the data set (``dataset.labels``).
        p: classes per batch.
        k: images per class per batch.
        seed: seed of the draw.
        batches_per_epoch: global batches per epoch (all ranks together); default N // (P K).
        num_replicas, rank: default from the initialized process group (1 and 0 without one).
        min_per_class: classes with fewer images are left out (default 2: a positive must exist).
    """

    def __init__(self, labels: Tensor, p: int, k: int, *, seed: int = 0, batches_per_epoch: int | None = None,
                 num_replicas: int | None = None, rank: int | None = None, min_per_class: int = 2) -> None:
        labels = V.tensor("labels", torch.as_tensor(labels), ndim=1, nonempty=True)
        if labels.is_floating_point():
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        self.p = V.positive_int("p", p)
        self.k = V.positive_int("k", k)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self.num_replicas, self.rank = _dist_info(num_replicas, rank)
        y = labels.cpu().numpy()
        classes, inverse = np.unique(y, return_inverse=True)
        by_class = [np.flatnonzero(inverse == c) for c in range(len(classes))]
        self._by_class = [ix for ix in by_class if len(ix) >= min_per_class]
        if len(self._by_class) < self.p:
            raise ValueError(f"p must be <= the number of classes with at least {min_per_class} images "
                             f"({len(self._by_class)}), got {self.p}")
        n = len(y)
        nb = max(1, n // (self.p * self.k)) if batches_per_epoch is None else \
            V.positive_int("batches_per_epoch", batches_per_epoch)
        if nb < self.num_replicas:
            raise ValueError(f"batches_per_epoch ({nb}) must be >= the number of ranks ({self.num_replicas})")
        self.batches_per_epoch = nb
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches ``__iter__`` yields (call before each epoch)."""
        self.epoch = V.positive_int("epoch", epoch, minimum=0)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.batches_per_epoch // self.num_replicas

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every rank's batches of an epoch, in order (rank r takes entries r, r + world, ...)."""
        e = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, e, 0x9C5A])
        out = []
        n_used = len(self) * self.num_replicas
        for _ in range(n_used):
            chosen = rng.choice(len(self._by_class), size=self.p, replace=False)
            batch = []
            for c in chosen:
                ix = self._by_class[c]
                batch.extend(rng.choice(ix, size=self.k, replace=len(ix) < self.k).tolist())
            out.append(batch)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.global_batches()[self.rank::self.num_replicas]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "p": self.p, "k": self.k,
                "batches_per_epoch": self.batches_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "p", "k", "batches_per_epoch"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the checkpoint's sampler has {key}={state[key]}, this run {getattr(self, key)}; "
                                 "resume with the same settings")
        self.epoch = int(state["epoch"])
