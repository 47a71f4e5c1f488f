"""Run directories and checkpoints that a user may have received: what is refused, and why.

Every trainer (similarity mining, AVSL, SANE) goes through these checks:

- :func:`check_run_dir`: a new run never overwrites a finished one (a directory holding any of
  :data:`RUN_FILES`) unless asked to (``overwrite=True``, ``--overwrite``); ``--out`` must not be
  an existing file; ``overwrite`` and ``resume`` exclude each other. It runs before any data is
  loaded or any model built.
- :func:`check_resume_config` / :func:`setting_differences`: a resumed run has the settings of the
  interrupted one except those in :data:`RESUMABLE`; every other difference is refused by name,
  with the stored and the requested value.
- the ``check_*`` functions: a checkpoint is read with ``weights_only=True``
  (:func:`whymatch.io.load_torch_file`, never code) and every entry is checked for its type,
  its shapes against this run's model, optimizer, scheduler and grad scaler, and finite weights,
  before anything is loaded: a malformed file gives one line naming the path and the entry,
  never a KeyError / TypeError from inside torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .. import _checks as V
from ..io import FileFormatError, check_tensor_dict, check_tensors_match, load_torch_file

__all__ = ["RUN_FILES", "RESUMABLE", "check_run_dir", "clear_run_files", "setting_differences",
           "check_resume_config", "resume_mismatch", "check_int", "check_number", "check_tensor_dict",
           "check_tensors_match", "check_same_structure", "check_optimizer_state", "check_rng_state",
           "check_history"]

#: The files that make a directory a training run (a new run refuses to overwrite them).
RUN_FILES = ("checkpoint.pt", "best.pt", "model.pt", "metrics.jsonl", "config.json")

#: Settings that may differ when a run is resumed: more (or fewer) epochs, where and how fast it
#: runs (device and the autocast dtype that follows from it, channels_last, DataLoader workers,
#: the progress display, the evaluation batch size and the K of Recall@K), and where the run
#: directory, a local data set and SANE's saliency cache now live ('out', 'root', 'saliency_cache';
#: the cache's content is compared by its fingerprint). Every other setting must be the stored one.
RESUMABLE = frozenset({"epochs", "device", "autocast", "channels_last", "num_workers", "show_progress", "quiet",
                       "eval_batch_size", "eval_k", "out", "root", "saliency_cache"})

_ABSENT = object()


# ------------------------------------------------------------------ run directories
def check_run_dir(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path:
    """Refuse a run that would destroy another: call before loading data or building a model.

    Raises:
        ValueError: ``resume`` and ``overwrite`` together; ``out_dir`` is an existing file; or, without
            ``resume`` / ``overwrite``, ``out_dir`` already holds a run (any of :data:`RUN_FILES`).
        FileNotFoundError: ``resume`` without ``out_dir``/checkpoint.pt.
    """
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise TypeError(f"out_dir must be a non-empty path, got {out_dir!r}")
    out = Path(out_dir)
    if resume and overwrite:
        raise ValueError(f"resume and overwrite exclude each other (--resume continues the run in {out}, "
                         f"--overwrite replaces it): give one")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} is an existing file, not a directory")
    if resume:
        ckpt = out / RUN_FILES[0]
        if not ckpt.is_file():
            raise FileNotFoundError(f"no checkpoint to resume from at {ckpt}")
        return out
    if not overwrite:
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found:
            raise ValueError(f"out_dir {out} already holds a training run ({', '.join(found)}): continue it with "
                             f"--resume (resume=True), write to another directory, or replace it with --overwrite "
                             f"(overwrite=True)")
    return out


def clear_run_files(out_dir: str | os.PathLike) -> None:
    """Remove a previous run's files (``overwrite``), so that none of them is mistaken for the new run's."""
    out = Path(out_dir)
    for name in RUN_FILES:
        p = out / name
        if p.is_file() or p.is_symlink():
            p.unlink()


# ------------------------------------------------------------------ settings on resume
def _plain(value: object) -> object:
    """A JSON-comparable copy (tuples as lists, other objects as their str)."""
    return json.loads(json.dumps(value, default=str))


def _show(value: object) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def setting_differences(stored: Mapping, requested: Mapping, *, allowed: frozenset = RESUMABLE) -> list[str]:
    """Each setting (key) whose value differs between the stored run and this request, outside ``allowed``,
    as 'KEY STORED (checkpoint) != REQUESTED (now)'."""
    diffs = []
    for key in sorted(set(stored) | set(requested), key=str):
        if key in allowed:
            continue
        a, b = stored.get(key, _ABSENT), requested.get(key, _ABSENT)
        a = a if a is _ABSENT else _plain(a)
        b = b if b is _ABSENT else _plain(b)
        if a != b:
            diffs.append(f"{key} {_show(a)} in the checkpoint, {_show(b)} now")
    return diffs


def resume_mismatch(path: str | os.PathLike, diffs: Sequence[str]) -> ValueError:
    """The error of a resume whose settings differ from the stored run's (one line)."""
    return ValueError(f"cannot resume from {path}: the run was started with other settings ({'; '.join(diffs)}); "
                      f"resume with the stored settings (only {', '.join(sorted(RESUMABLE))} may change), or start "
                      f"a new run in another directory")


def check_resume_config(checkpoint: str | os.PathLike, config: Mapping) -> dict:
    """Compare the task configuration stored in a checkpoint with this request's; returns the checkpoint.

    Called by the ``train_*`` functions before any data is loaded, so that a resume with changed
    settings fails at once.

    Raises:
        FileNotFoundError / FileFormatError: no checkpoint, or not a checkpoint (named).
        ValueError: a setting outside :data:`RESUMABLE` differs (each named, stored and requested).
    """
    state = load_torch_file(checkpoint, "checkpoint", required_keys=("config",))
    if not isinstance(state["config"], dict):
        raise FileFormatError(f"checkpoint {checkpoint}: entry 'config' must be a dict, "
                              f"got {type(state['config']).__name__}")
    diffs = setting_differences(state["config"], dict(config))
    if diffs:
        raise resume_mismatch(checkpoint, diffs)
    return state


# ------------------------------------------------------------------ entries of a checkpoint
def _entry(check, *args: object):
    """A generic argument check of :mod:`whymatch._checks` applied to a checkpoint entry: the same message,
    raised as a FileFormatError (the value came from a file, not from the caller)."""
    try:
        return check(*args)
    except (TypeError, ValueError) as exc:
        raise FileFormatError(str(exc)) from None


def check_int(what: str, value: object, minimum: int = 0) -> int:
    return _entry(V.positive_int, what, value, minimum)


def check_number(what: str, value: object, *, allow_inf: bool = False) -> float:
    if allow_inf and isinstance(value, float) and math.isinf(value):
        return float(value)
    return _entry(V.real, what, value)


def _kind(v: object) -> str:
    if v is None:
        return "None"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "str"
    if isinstance(v, (list, tuple)):
        return "list"
    if isinstance(v, dict):
        return "dict"
    if isinstance(v, Tensor):
        return "tensor"
    return type(v).__name__


def check_same_structure(what: str, saved: object, mine: object, *, loose: Sequence[str] = ()) -> None:
    """``saved`` has the layout of ``mine`` (this run's own state): the same dict keys, list lengths and kinds
    of values (numbers, strings, booleans, None, tensors of the same shape). Keys in ``loose`` are only
    required to be present."""
    if _kind(saved) != _kind(mine):
        raise FileFormatError(f"{what} must be a {_kind(mine)}, got {_kind(saved)}")
    if isinstance(mine, dict):
        if set(saved) != set(mine):
            diff = sorted(map(str, set(saved) ^ set(mine)))
            raise FileFormatError(f"{what} must have the entries {sorted(map(str, mine))}, differs in {diff}")
        for k in mine:
            if k not in loose:
                check_same_structure(f"{what}[{k!r}]", saved[k], mine[k], loose=loose)
    elif isinstance(mine, (list, tuple)):
        if len(saved) != len(mine):
            raise FileFormatError(f"{what} must have {len(mine)} entries, got {len(saved)}")
        for i, (a, b) in enumerate(zip(saved, mine)):
            check_same_structure(f"{what}[{i}]", a, b, loose=loose)
    elif isinstance(mine, Tensor):
        if tuple(saved.shape) != tuple(mine.shape):
            raise FileFormatError(f"{what} must have shape {tuple(mine.shape)}, got {tuple(saved.shape)}")
    elif isinstance(mine, float) and isinstance(saved, (int, float)) and math.isnan(float(saved)) \
            and not math.isnan(mine):
        raise FileFormatError(f"{what} must be a number, got NaN")


def check_optimizer_state(what: str, saved: object, optimizer: torch.optim.Optimizer) -> None:
    """An optimizer state dict fits this optimizer: its groups (keys, parameter counts) and, per parameter,
    tensors that are scalars or of the parameter's shape, all finite."""
    mine = optimizer.state_dict()
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        raise FileFormatError(f"{what} must be an optimizer state dict (entries 'state' and 'param_groups')")
    groups, state = saved["param_groups"], saved["state"]
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise FileFormatError(f"{what}: 'param_groups' must be a list and 'state' a dict")
    if len(groups) != len(mine["param_groups"]):
        raise ValueError(f"{what} has {len(groups)} parameter groups, this run {len(mine['param_groups'])}: resume "
                         f"with the same param_groups (and freeze_groups) as the interrupted run")
    shapes: dict[int, tuple[int, ...]] = {}
    for i, (g, m) in enumerate(zip(groups, mine["param_groups"])):
        check_same_structure(f"{what} group {i}", g, m, loose=("params",))
        params = g["params"]
        if not isinstance(params, list) or any(isinstance(p, bool) or not isinstance(p, int) for p in params):
            raise FileFormatError(f"{what} group {i}: 'params' must be a list of ints")
        if len(params) != len(m["params"]):
            raise ValueError(f"{what} group {i} has {len(params)} parameters, this run {len(m['params'])} (another "
                             f"model or parameter groups)")
        live = optimizer.param_groups[i]["params"]
        for pid, p in zip(params, live):
            shapes[pid] = tuple(p.shape)
        for k, v in g.items():
            if k != "params" and isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
                raise FileFormatError(f"{what} group {i}: {k!r} must be finite, got {v}")
    if len(shapes) != sum(len(g["params"]) for g in groups):
        raise FileFormatError(f"{what}: a parameter id appears twice in 'param_groups'")
    for pid, entry in state.items():
        if pid not in shapes:
            raise FileFormatError(f"{what}: state of unknown parameter id {pid!r}")
        if not isinstance(entry, dict):
            raise FileFormatError(f"{what}: state of parameter {pid} must be a dict, got {type(entry).__name__}")
        for k, v in entry.items():
            if not isinstance(v, Tensor):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise FileFormatError(f"{what}: state {k!r} of parameter {pid} must be a tensor or number")
                continue
            if v.numel() != 1 and tuple(v.shape) != shapes[pid]:
                raise ValueError(f"{what}: state {k!r} of parameter {pid} has shape {tuple(v.shape)}, the "
                                 f"parameter {shapes[pid]}")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise FileFormatError(f"{what}: state {k!r} of parameter {pid} holds non-finite values")


def check_rng_state(what: str, value: object) -> None:
    """{'torch': the CPU generator's state (uint8, the size of torch.get_rng_state()), 'cuda': ...}."""
    if not isinstance(value, dict) or "torch" not in value:
        raise FileFormatError(f"{what} must be a dict with a 'torch' entry")
    t = value["torch"]
    ref = torch.get_rng_state()
    if not isinstance(t, Tensor) or t.dtype != torch.uint8 or tuple(t.shape) != tuple(ref.shape):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise FileFormatError(f"{what}['torch'] must be a uint8 tensor of shape {tuple(ref.shape)}, got {got}")


def check_history(what: str, value: object, epoch: int) -> list[dict]:
    """One JSON object per finished epoch."""
    if not isinstance(value, list) or any(not isinstance(h, dict) for h in value):
        raise FileFormatError(f"{what} must be a list of dicts (one per epoch)")
    if len(value) != epoch:
        raise FileFormatError(f"{what} has {len(value)} epochs, the checkpoint's epoch is {epoch}")
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise FileFormatError(f"{what} must hold plain JSON values ({exc})") from None
    return value
