"""The training loop every whymatch trainer runs (similarity mining, AVSL, SANE attributes).

:class:`CheckpointedLoop` holds the loop and its checkpoint files; a trainer supplies its batches,
one optimizer step and its validation (the hooks below), and gets:

- ``fit(resume=..., overwrite=..., stop_after=...)``: epochs until ``epochs``, a checkpoint after every
  epoch written atomically, ``metrics.jsonl`` rewritten from the checkpoint's history (never ahead of a
  checkpoint), ``best.pt`` at each new best validation score, a JSON line per epoch on rank 0;
- exact resume: randomness is re-seeded at the start of every epoch from (seed, epoch, rank), and a
  checkpoint of other settings is refused by name (:mod:`whymatch.train.checkpoint`);
- one epoch (:meth:`CheckpointedLoop.train_epoch`): this rank's batches through ``train_step`` under a
  tqdm bar, the loss checked finite on every rank, the mean of each logged part over all ranks;
- precision (autocast dtype and GradScaler) and DDP wrapping (:mod:`whymatch.train.distributed`).

A trainer sets, in its ``__init__``: ``out_dir``, ``rank``, ``distributed``, ``world``, ``device``,
``seed``, ``epochs``, ``num_workers``, ``show_progress``, ``config``, ``train_set``, ``history``,
``model``, ``optimizer``, ``scheduler``, ``scaler`` (:meth:`CheckpointedLoop.setup_precision`),
``epoch``, ``global_step``, ``best_score``; and defines ``state_dict`` / ``load_state_dict`` (the latter
calls :meth:`CheckpointedLoop.restore_loop_state`), ``run_settings``, ``train_module``,
``epoch_batches``, ``train_step``, ``validation_set``, ``validate`` and ``best_state``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..io import FileFormatError, atomic_torch_save, atomic_write_text, load_torch_file
from . import checkpoint as C
from .distributed import all_reduce_sum, barrier, broadcast_buffers

__all__ = ["CheckpointedLoop", "CHECKPOINT", "BEST", "METRICS_LOG"]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS_LOG = "metrics.jsonl"


def _seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def _describe_module(module: nn.Module) -> list[str]:
    """Each submodule's class and settings ('name: Class(extra_repr)'), independent of the device: what
    makes two modules of the same state dict layout behave differently (a loss's margins, a mode)."""
    out = []
    for name, m in module.named_modules():
        if isinstance(m, (nn.ParameterList, nn.ParameterDict)):
            continue
        out.append(f"{name or '.'}: {type(m).__module__}.{type(m).__qualname__}({m.extra_repr()})")
    return out


def _model_settings(model: nn.Module) -> dict:
    """The model's class and a digest of its architecture (every submodule's class and settings)."""
    import hashlib

    digest = hashlib.sha256("\n".join(_describe_module(model)).encode()).hexdigest()[:16]
    return {"model_class": f"{type(model).__module__}.{type(model).__qualname__}", "model_architecture": digest}


def _format_seconds(t: float) -> str:
    t = max(0.0, float(t))
    if t < 90:
        return f"{t:.0f} s"
    if t < 5400:
        return f"{t / 60:.1f} min"
    return f"{t / 3600:.1f} h"


class _RunClock:
    """The whole run's time: seconds per batch so far times the batches left, plus the validation time
    per epoch once one validation has run. Feeds the up-front estimate and the run ETA on the bar."""

    #: batches timed before the up-front estimate is printed (fewer when an epoch is shorter)
    warmup = 5

    def __init__(self, epochs_left: int) -> None:
        self.epochs_left = epochs_left  # epochs still to train, the current one included
        self.batches = 0
        self.train_s = 0.0
        self.eval_s: float | None = None
        self.announced = False

    def remaining(self, per_epoch: int, done_in_epoch: int) -> float:
        left = max(0, self.epochs_left * per_epoch - done_in_epoch)
        rate = self.train_s / max(1, self.batches)
        return left * rate + (self.eval_s or 0.0) * self.epochs_left


def best_score_alias(doc: str) -> property:
    """``best_score`` under a trainer's own name (``best_recall_at_1``, ``best_map``), read and written."""
    return property(lambda self: self.best_score, lambda self, value: setattr(self, "best_score", value), doc=doc)


class CheckpointedLoop:
    """The training loop and its checkpoint files, shared by the metric-learning, AVSL and attribute
    trainers (see the module docstring for what a subclass sets and defines).
    """

    def setup_precision(self, amp: str) -> torch.dtype | None:
        """The autocast dtype for ``amp`` ('auto': bf16 on CUDA where supported, else fp16; 'bf16',
        'fp16'; 'none', and always on the CPU: None), and ``self.scaler`` (a GradScaler, enabled for fp16)."""
        dtype = None
        if self.device.type == "cuda" and amp != "none":
            bf16 = amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported())
            dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        return dtype

    def wrap_distributed(self, module: nn.Module) -> nn.Module:
        """``module`` under DistributedDataParallel when torch.distributed is initialized (``self.distributed``)."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def loop_state(self) -> dict:
        """The checkpoint entries every loop has (what :meth:`restore_loop_state` loads)."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "history": self.history,
        }

    def run_settings(self) -> dict:
        """The loop's own settings (JSON-able): written to config.json and stored in the checkpoint as
        'settings', compared on resume (see :data:`whymatch.train.checkpoint.RESUMABLE`)."""
        raise NotImplementedError

    def check_loop_state(self, state: dict, checkpoint_format: int) -> None:
        """Check every entry of a checkpoint before anything is loaded (see :mod:`whymatch.train.checkpoint`).

        Raises:
            FileFormatError: an entry is missing or of the wrong type / layout / value.
            ValueError: the stored settings or model differ from this run's (each difference named).
        """
        if not isinstance(state, dict):
            raise FileFormatError(f"must hold a dict, got {type(state).__name__}")
        if state.get("format") != checkpoint_format:
            raise FileFormatError(f"checkpoint format {state.get('format')!r} is not {checkpoint_format} (written by "
                                  f"another whymatch version, or not a whymatch checkpoint)")
        required = ("epoch", "global_step", "model", "optimizer", "scheduler", "scaler", "rng", "history", "config",
                    "settings")
        missing = [k for k in required if k not in state]
        if missing:
            raise FileFormatError(f"lacks the entries {', '.join(map(repr, missing))}")
        for key in ("config", "settings"):
            if not isinstance(state[key], dict):
                raise FileFormatError(f"entry {key!r} must be a dict, got {type(state[key]).__name__}")
        diffs = C.setting_differences(state["settings"], self.run_settings()) + \
            C.setting_differences(state["config"], self.config)
        if diffs:
            raise C.resume_mismatch("the checkpoint", diffs)
        epoch = C.check_int("entry 'epoch'", state["epoch"])
        C.check_int("entry 'global_step'", state["global_step"])
        C.check_tensors_match("the checkpoint's model", C.check_tensor_dict("entry 'model'", state["model"]),
                              self.model.state_dict(), "a changed backbone, embedding dim or architecture")
        C.check_optimizer_state("entry 'optimizer'", state["optimizer"], self.optimizer)
        C.check_same_structure("entry 'scheduler'", state["scheduler"], self.scheduler.state_dict())
        C.check_same_structure("entry 'scaler'", state["scaler"], self.scaler.state_dict())
        C.check_rng_state("entry 'rng'", state["rng"])
        C.check_history("entry 'history'", state["history"], epoch)

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

    def check_finite_loss(self, total: Tensor, epoch: int) -> None:
        """Stop, naming the step, when the loss is NaN or infinite on any rank (an update would turn every
        weight into NaN and training would go on silently). Under DDP the ranks agree first, so all of them
        raise together instead of some waiting in the gradient all-reduce. Costs no extra sync: the loss
        parts are read on the host at every step anyway."""
        bad = not math.isfinite(float(total.detach()))
        if self.distributed:
            import torch.distributed as dist

            flag = torch.tensor([1.0 if bad else 0.0], device=total.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item() > 0)
        if bad:
            raise FloatingPointError(f"the training loss is not finite (NaN or Inf) at epoch {epoch + 1}, step "
                                     f"{self.global_step + 1} (on some rank): lower the learning rate or check the "
                                     f"data and the model; the last checkpoint ({self.out_dir / CHECKPOINT}) is "
                                     f"intact")

    def save_checkpoint(self) -> Path:
        """Write out_dir/checkpoint.pt (and metrics.jsonl) atomically; rank 0 only (other ranks no-op)."""
        path = self.out_dir / CHECKPOINT
        if self.rank == 0:
            atomic_torch_save(self.state_dict(), path)
            atomic_write_text(self.out_dir / METRICS_LOG, "".join(json.dumps(h) + "\n" for h in self.history))
        return path

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> None:
        """Resume from ``path`` (default out_dir/checkpoint.pt).

        The file is read with ``weights_only=True`` (tensors and plain containers, never code) and
        checked entry by entry before anything is loaded (:meth:`check_loop_state`).

        Raises:
            FileNotFoundError: no file at the path.
            FileFormatError: refused, truncated, empty, not a checkpoint, or an entry of the wrong type or layout.
            ValueError: the run's settings or model differ from the checkpoint's (named).
            Every message is one line naming the path.
        """
        p = Path(path) if path is not None else self.out_dir / CHECKPOINT
        if not p.is_file():
            raise FileNotFoundError(f"no checkpoint to resume from at {p}" + (" (a directory)" if p.is_dir() else ""))
        state = load_torch_file(p, "checkpoint", map_location="cpu")
        try:
            self.load_state_dict(state)
        except FileFormatError as exc:
            raise FileFormatError(f"checkpoint {p}: {exc}") from None
        except ValueError as exc:
            msg = str(exc).replace("cannot resume from the checkpoint", f"cannot resume from {p}")
            raise ValueError(msg if str(p) in msg else f"checkpoint {p}: {msg}") from None
        except (RuntimeError, KeyError, TypeError, IndexError, AttributeError) as exc:
            from ..io import _first_line

            raise FileFormatError(f"cannot resume from checkpoint {p}: {_first_line(exc)}") from None

    def start_run(self, resume: bool, overwrite: bool) -> None:
        """The start of ``fit``: refuse to overwrite another run, load the checkpoint when resuming, and
        (rank 0) write config.json and, after a resume, metrics.jsonl from the checkpoint's history."""
        if not isinstance(resume, bool) or not isinstance(overwrite, bool):
            raise TypeError(f"resume and overwrite must be bools, got {resume!r} and {overwrite!r}")
        own = getattr(self, "_own_run", False)  # this object wrote the files: fit() again continues it
        if resume or not own:
            C.check_run_dir(self.out_dir, resume=resume, overwrite=overwrite)
        if resume:
            self.load_checkpoint()
        barrier()  # every rank has looked at out_dir before rank 0 writes to it
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if overwrite and not own:
                C.clear_run_files(self.out_dir)
            if resume:
                atomic_write_text(self.out_dir / METRICS_LOG, "".join(json.dumps(h) + "\n" for h in self.history))
            cfg = {**self.run_settings(), **self.config}
            atomic_write_text(self.out_dir / "config.json", json.dumps(cfg, indent=2, default=str) + "\n")
        self._own_run = True

    # ------------------------------------------------------------ the hooks of a trainer
    #: digits of the floats in the JSON line printed after each epoch
    log_digits = 4

    @property
    def train_module(self) -> nn.Module:
        """The module that trains (under DDP when distributed): put in train mode at each epoch, its
        buffers broadcast from rank 0 at the end of each epoch."""
        raise NotImplementedError

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` (lists of indices into ``train_set``)."""
        raise NotImplementedError

    def train_step(self, batch: object, generator: torch.Generator) -> tuple[dict[str, float], dict[str, str]]:
        """One optimizer step on one batch of the loader; returns (the loss parts to average over the epoch,
        the parts shown on the progress bar). ``generator``: the epoch's CPU generator (augmentation)."""
        raise NotImplementedError

    def end_epoch(self) -> None:
        """Called after the last step of an epoch (a per-epoch schedule steps here)."""

    def lr_record(self, lr_before: list[float]) -> dict:
        """The learning-rate entries of an epoch's record; ``lr_before``: each group's rate before the epoch."""
        return {"lr": lr_before[0]}

    def validation_set(self) -> Dataset | None:
        """The held-out set evaluated after every epoch (None: no validation, no best.pt)."""
        raise NotImplementedError

    def validate(self) -> tuple[dict, float]:
        """(the entries of the epoch's record, the score best.pt is chosen by: higher is better)."""
        raise NotImplementedError

    def best_state(self, score: float) -> dict:
        """What best.pt holds when the epoch just finished has the best score so far."""
        raise NotImplementedError

    # ------------------------------------------------------------ one epoch
    def _progress(self, loader: Iterable, epoch: int):
        """(iterable, bar): the loader under a tqdm bar on rank 0 when show_progress, else (loader, None)."""
        if not (self.show_progress and self.rank == 0):
            return loader, None
        from tqdm.auto import tqdm

        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch", leave=False)
        return bar, bar

    def train_epoch(self) -> dict[str, float]:
        """One epoch (self.epoch); returns the mean of each loss part over the epoch's batches (all ranks).

        Randomness is seeded from (seed, epoch, rank) alone, so an epoch is the same whatever came before
        it (resuming is exact)."""
        e = self.epoch
        torch.manual_seed(_seed_of(self.seed, e, self.rank, 1))
        gen = torch.Generator().manual_seed(_seed_of(self.seed, e, self.rank, 2))
        batches = self.epoch_batches(e)
        loader = DataLoader(self.train_set, batch_sampler=batches, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda")
        self.train_module.train()
        sums: dict[str, float] = {}
        it, bar = self._progress(loader, e)
        clock = getattr(self, "_clock", None)
        per_epoch, done_in_epoch = len(batches), 0
        t_batch = time.perf_counter()
        for batch in it:
            parts, shown = self.train_step(batch, gen)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            done_in_epoch += 1
            if clock is not None:
                now = time.perf_counter()
                clock.train_s += now - t_batch
                clock.batches += 1
                t_batch = now
                self._announce(clock, per_epoch, done_in_epoch)
                if bar is not None:
                    shown = {**shown, "run ETA": _format_seconds(clock.remaining(per_epoch, done_in_epoch))}
            if bar is not None:
                bar.set_postfix(shown)
        if bar is not None:
            bar.close()
        self.end_epoch()
        if self.distributed:  # DDP broadcasts buffers at each forward; the last step's updates are local
            broadcast_buffers(getattr(self.train_module, "module", self.train_module))
        keys = sorted(sums)
        vals = torch.tensor([sums[k] for k in keys] + [float(len(batches))], dtype=torch.float64)
        if self.distributed:
            vals = all_reduce_sum(vals, self.device)
        n = max(1.0, float(vals[-1]))
        return {k: float(v) / n for k, v in zip(keys, vals[:-1].tolist())}

    def _announce(self, clock: _RunClock, per_epoch: int, done_in_epoch: int) -> None:
        """Once per fit, after the first few batches: how long the whole run will take (stderr, rank 0)."""
        if clock.announced or clock.batches < min(clock.warmup, per_epoch):
            return
        clock.announced = True
        if not (self.show_progress and self.rank == 0):
            return
        import sys

        from tqdm.auto import tqdm

        rate = clock.train_s / clock.batches
        tqdm.write(f"estimated training time: {_format_seconds(clock.remaining(per_epoch, done_in_epoch))} for "
              f"{clock.epochs_left} epoch(s) of {per_epoch} batches ({rate:.3g} s per batch over the first "
              f"{clock.batches}; validation not counted until it has run once)", file=sys.stderr)

    # ------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, *, overwrite: bool = False, stop_after: int | None = None) -> list[dict]:
        """Train until ``epochs`` (or ``stop_after`` more epochs in this call); returns the history.

        Args:
            resume: continue from out_dir/checkpoint.pt (an error when there is none, when it is not a
                whymatch checkpoint, or when this trainer's settings differ from the stored ones outside
                :data:`~whymatch.train.checkpoint.RESUMABLE`, each named).
            overwrite: replace the run already in out_dir (its checkpoint.pt, best.pt, model.pt,
                metrics.jsonl and config.json); without it such a directory is refused. Not with ``resume``.
            stop_after: return after this many epochs even if ``epochs`` is not reached
                (the next ``fit(resume=True)`` continues; used to test resuming).
        """
        self.start_run(resume, overwrite)
        done = 0
        left = self.epochs - self.epoch
        self._clock = _RunClock(left if stop_after is None else min(left, stop_after))
        while self.epoch < self.epochs and (stop_after is None or done < stop_after):
            lr_before = [g["lr"] for g in self.optimizer.param_groups]
            t0 = time.perf_counter()
            means = self.train_epoch()
            t_train = time.perf_counter() - t0
            self.epoch += 1
            done += 1
            self._clock.epochs_left -= 1
            rec = {"epoch": self.epoch, "step": self.global_step, **self.lr_record(lr_before), **means,
                   "train_time_s": t_train}
            if self.validation_set() is not None:
                t1 = time.perf_counter()
                entries, score = self.validate()
                rec.update(entries)
                rec["eval_time_s"] = time.perf_counter() - t1
                self._clock.eval_s = rec["eval_time_s"]
                if score > self.best_score:
                    self.best_score = score
                    if self.rank == 0:
                        atomic_torch_save(self.best_state(score), self.out_dir / BEST)
            self.history.append(rec)
            self.save_checkpoint()
            if self.rank == 0 and self.show_progress:
                shown = {k: round(v, self.log_digits) if isinstance(v, float) else v for k, v in rec.items()}
                print(json.dumps(shown), flush=True)
        barrier()
        return self.history
