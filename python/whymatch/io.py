"""Image loading and output that is never left half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["load_image", "pil_to_tensor", "atomic_output_dir", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "atomic_torch_save"]


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
