"""argparse types of the `whymatch` options: each checks its value while parsing and names the range and the value
(argparse adds the option)."""

from __future__ import annotations

import argparse
from pathlib import Path


# Bounds that keep a mistyped value from reaching an allocator: beyond them an option only allocates.
MAX_IMAGE_SIDE = 4096


MIN_IMAGE_SIDE = 8


_MAX_COUNT = 10_000_000


_MAX_FACTOR = 1e6  # weights, margins, sharpness: beyond it float32 arithmetic overflows long before it means anything


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi] (the message names the range and the value; argparse the option)."""
    def convert(text: str) -> int:
        want = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        try:
            v = int(text.strip(), 10)
        except (ValueError, AttributeError):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return v
    convert.__name__ = "int"
    return convert


def _float_in(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite number in the given (half-)open or closed range."""
    import math

    def num(v: float) -> str:
        return str(int(v)) if v == int(v) and abs(v) < 1e16 else f"{v:g}"

    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {num(lo)}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {num(hi)}")
    want = "a finite number" + (" " + " and ".join(parts) if parts else "")

    def convert(text: str) -> float:
        try:
            v = float(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        ok = math.isfinite(v)
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return v
    convert.__name__ = "float"
    return convert


_image_side = _int_in(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE)


_seed = _int_in(0, 2**32 - 1)


_positive = _int_in(1, _MAX_COUNT)


def _option_type(option: str, convert):
    """An argparse type whose errors name the option and the value."""
    def parse(text: str):
        try:
            return convert(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"{exc} (got {option} {text!r})") from None
    parse.__name__ = option
    return parse


def _milestones(text: str) -> tuple[int, ...]:
    try:
        ms = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError("must be comma-separated epochs, e.g. 20,40") from None
    if any(m < 1 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:])):
        raise ValueError("must be strictly increasing epochs >= 1")
    return ms


def _decay(text: str) -> float:
    import math

    v = float(text)
    if not (math.isfinite(v) and 0 < v <= 1):
        raise ValueError("must be a factor in (0, 1]")
    return v


def _count(text: str) -> int:
    v = int(text)
    if v < 0:
        raise ValueError("must be an integer >= 0")
    return v


def _group_names(task: str) -> tuple[str, ...]:
    if task == "avsl":
        from ..train import AVSL_GROUPS

        return tuple(AVSL_GROUPS)
    from ..train import mining_group_layout

    return tuple(mining_group_layout("shapes"))


def _group_lr(task: str):
    def convert(text: str) -> dict[str, float]:
        import math

        names = _group_names(task)
        out: dict[str, float] = {}
        for item in (t.strip() for t in text.split(",") if t.strip()):
            name, eq, value = item.partition("=")
            name = name.strip()
            if not eq:
                raise ValueError(f"must be NAME=LR pairs separated by commas, e.g. {names[0]}=1e-5")
            if name not in names:
                raise ValueError(f"unknown group {name!r}; the groups are {', '.join(names)}")
            try:
                lr = float(value)
            except ValueError:
                raise ValueError(f"the lr of {name!r} must be a number, got {value!r}") from None
            if not (math.isfinite(lr) and 0 <= lr <= 1e4):
                raise ValueError(f"the lr of {name!r} must be >= 0 and <= 10000, got {value!r}")
            out[name] = lr
        return out
    return convert


def _freeze_groups(task: str):
    def convert(text: str) -> tuple[str, ...]:
        names = _group_names(task)
        got = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [n for n in got if n not in names]
        if bad or not got:
            raise ValueError(f"must be a comma-separated list of {', '.join(names)}")
        return got
    return convert


def _device(text: str) -> str:
    """An argparse type: 'cpu', 'cuda' or 'cuda:N' that this machine has."""
    import torch

    try:
        dev = torch.device(text.strip())
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asks for CUDA, but no CUDA device is available "
                                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise argparse.ArgumentTypeError(f"{text!r} asks for CUDA device {dev.index}, but {n} "
                                             f"{'is' if n == 1 else 'are'} visible")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return str(dev)


def _run_device(text: str) -> str:
    """An argparse type for --device of demo / explain / search-explain: auto, cpu, cuda or cuda:N that can run
    here (auto: CUDA when the compiled CUDA kernels and a device are available)."""
    from ..ops.devices import resolve_device

    try:
        resolve_device(text, "--device")
    except ValueError as exc:
        msg = str(exc)
        raise argparse.ArgumentTypeError(msg[len("--device "):] if msg.startswith("--device ") else msg) from None
    return text.strip().lower()


def _factory_spec(text: str) -> str:
    """An argparse type: 'package.module:factory' (imported later, when the command runs)."""
    mod, colon, fn = text.partition(":")
    if not colon or not fn.isidentifier() or not all(p.isidentifier() for p in mod.split(".")):
        raise argparse.ArgumentTypeError(f"must look like 'package.module:factory', got {text!r}")
    return text


def _out_path(text: str) -> str:
    """An argparse type for --out: a non-empty path without NUL characters (the directory is checked when the
    command starts, before any work)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a directory path, got {text!r}")
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"must not contain a NUL character, got {text!r}")
    return text


def _data_spec(task: str, generated: str = "shapesworld"):
    """An argparse type for --data of ``task`` ('metric' or 'sane'): the generated set's name, or NAME:PATH of an
    existing local folder."""
    def convert(text: str) -> str:
        if task == "sane":
            from ..attributes.train import SANE_DATASETS as names
        else:
            from ..train.tasks import DATASETS as names
        name, colon, root = text.partition(":")
        if name not in names:
            others = ", ".join(n + ":PATH" for n in names if n != generated)
            raise argparse.ArgumentTypeError(f"must be {generated} or one of {others}, got {text!r}")
        if name == generated:
            if colon:
                raise argparse.ArgumentTypeError(f"{generated} is generated and takes no path, got {text!r}")
            return text
        if not root:
            raise argparse.ArgumentTypeError(f"{name} needs the path of its local copy: {name}:/path/to/{name}, "
                                             f"got {text!r}")
        p = Path(root)
        try:
            if not p.exists():
                raise argparse.ArgumentTypeError(f"data root not found: {root} (got {text!r})")
            if not p.is_dir():
                raise argparse.ArgumentTypeError(f"data root {root} is not a directory (got {text!r})")
        except (OSError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"cannot read data root {root!r}: {exc}") from None
        return text
    convert.__name__ = "data"
    return convert


def _level_weights(text: str) -> tuple[float, ...]:
    """An argparse type for --level-weights: comma-separated finite numbers >= 0 (the count is checked with the
    model's levels)."""
    import math

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and 0 <= v <= _MAX_FACTOR for v in values):
        raise argparse.ArgumentTypeError(f"must be numbers in [0, {int(_MAX_FACTOR)}], got {text!r}")
    return tuple(values)
