"""Image loading and output that is never left half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["load_image", "pil_to_tensor", "atomic_output_dir", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "atomic_torch_save", "load_torch_file", "read_json_file", "FileFormatError"]


def pil_to_tensor(image: Image.Image) -> Tensor:
    """A PIL image as a float32 RGB tensor in [0, 1].

    Args:
        image: any PIL image; grayscale, palette, CMYK and alpha images are converted
            to RGB (alpha is dropped).

    Returns:
        (3, H, W) float32 in [0, 1].
    """
    from PIL import Image  # noqa: F811 (the runtime import; the one above is for annotations)

    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().float().div_(255.0)


def load_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> Tensor:
    """Read an image file as (3, H, W) float32 in [0, 1] (grey and RGBA become RGB).

    Args:
        path: the file. A missing file raises FileNotFoundError, a file that is
            not a readable image ValueError; both name the path.
        size: optional (H, W) to resize to (bilinear).
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if size is not None:
                im = im.resize((int(size[1]), int(size[0])), Image.BILINEAR)
            return pil_to_tensor(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{p} is not a readable image: {exc}") from exc


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; on success its files move into ``out_dir``.

    On an exception the temporary directory is removed and ``out_dir`` is left as it was.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        out.mkdir(parents=True, exist_ok=True)
        for item in sorted(tmp.iterdir()):
            dest = out / item.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(item, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    """The process's umask (Linux: read, not set; elsewhere set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write a file through a temporary file in the same folder, fsync and an atomic rename.

    ``write(f)`` fills the open binary file; if it raises, nothing is left behind and any
    previous file at ``path`` stays as it was. The file gets the permissions a plain ``open``
    would give it (0666 less the umask), or those of the file it replaces; the temporary file's
    own 0600 never shows.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = p.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically (see :func:`atomic_write`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`): a checkpoint is never half-written."""
    atomic_write(path, lambda f: torch.save(obj, f))


# ------------------------------------------------------------------ reading files a user may have received
class FileFormatError(ValueError):
    """A file that exists but cannot be used: refused (it would run code), truncated, or of the wrong layout.

    The message is one line that names the path and the reason.
    """


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch's run to a paragraph)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    return line.split(". ")[0].rstrip(".")


def _refusal_reason(exc: BaseException) -> str:
    """One line from torch's weights_only refusal: the global it would have imported, when it names one."""
    text = str(exc)
    for line in text.splitlines():
        if "GLOBAL" in line or "Unsupported operand" in line or "Unsupported class" in line:
            return line.strip().rstrip(".")
    return _first_line(exc)


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint", *, map_location: object = "cpu",
                    required_keys: tuple[str, ...] | None = None) -> object:
    """``torch.load`` a file that may come from anyone: tensors and plain containers only, never code.

    The file is read with ``weights_only=True`` (no object is unpickled beyond tensors, numbers,
    strings and plain containers), so a crafted pickle cannot run code. Every failure is one line
    naming the path.

    Args:
        path: the file.
        what: what the file is, for messages ('checkpoint', 'AVSL weights', ...).
        map_location: as for ``torch.load``.
        required_keys: when given, the file must hold a dict with these keys.

    Raises:
        FileNotFoundError: the file does not exist (or is not a file).
        FileFormatError: refused (it holds other objects: a crafted or foreign file), truncated,
            empty, not a torch file, or without the required keys.
    """
    import pickle

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}" + (" (a directory)" if p.is_dir() else ""))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the weights_only unpickler's pickle-protocol notice
            obj = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):
            raise FileFormatError(f"refused to load {what} {p}: it holds objects other than tensors and plain "
                                  f"containers, which could run code ({_refusal_reason(exc)})") from None
        raise FileFormatError(f"cannot load {what} {p}: corrupted or not a torch file "
                              f"({_refusal_reason(exc)})") from None
    except EOFError:
        raise FileFormatError(f"cannot load {what} {p}: the file is empty or truncated") from None
    except (RuntimeError, ValueError, OSError, AttributeError, ImportError, IndexError, KeyError,
            TypeError, UnicodeDecodeError, MemoryError) as exc:
        raise FileFormatError(f"cannot load {what} {p}: corrupted or not a torch file ({_first_line(exc)})") from None
    if required_keys is not None:
        if not isinstance(obj, dict):
            raise FileFormatError(f"{what} {p} must hold a dict, got {type(obj).__name__}")
        missing = [k for k in required_keys if k not in obj]
        if missing:
            raise FileFormatError(f"{what} {p} lacks the entries {', '.join(map(repr, missing))}")
    return obj


def read_json_file(path: str | os.PathLike, what: str = "file", *,
                   required_keys: tuple[str, ...] | None = None) -> object:
    """Read a JSON file; with ``required_keys``, it must be an object holding those keys.

    Raises:
        FileNotFoundError: the file does not exist.
        FileFormatError: not UTF-8, not JSON, not an object, or without a required key (one line, naming the path).
    """
    import json

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}" + (" (a directory)" if p.is_dir() else ""))
    try:
        obj = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FileFormatError(f"cannot read {what} {p}: not valid JSON ({_first_line(exc)})") from None
    if required_keys is not None:
        if not isinstance(obj, dict):
            raise FileFormatError(f"{what} {p} must hold a JSON object, got {type(obj).__name__}")
        missing = [k for k in required_keys if k not in obj]
        if missing:
            raise FileFormatError(f"{what} {p} lacks the keys {', '.join(map(repr, missing))}")
    return obj
