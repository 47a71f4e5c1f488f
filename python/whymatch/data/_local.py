"""Helpers shared by the loaders that read a public data set from a local folder.

Every error names the data set, the file (and the line, or the JSON key) and what was
expected. Nothing here downloads anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ..io import pil_to_rgb
from .transforms import pil_to_tensor

__all__ = ["LocalImageDataset", "check_root", "find_base", "read_lines", "parse_int", "read_json", "check_index",
           "open_rgb", "image_size_arg"]


def check_root(name: str, root: str | Path) -> Path:
    """``root`` as a Path; TypeError for a wrong type, FileNotFoundError naming it when it is not a folder."""
    if not isinstance(root, (str, Path)):
        raise TypeError(f"root must be a str or pathlib.Path, got {type(root).__name__}")
    r = Path(root).expanduser()
    if not r.is_dir():
        raise FileNotFoundError(f"{name}: root folder {r} not found")
    return r


def find_base(root: Path, subdir: str, marker: str) -> Path:
    """``root/subdir`` when it holds ``marker``, else ``root`` when it does, else ``root/subdir``."""
    if (root / subdir / marker).is_file():
        return root / subdir
    if (root / marker).is_file():
        return root
    return root / subdir


def read_lines(name: str, path: Path, layout: str) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of each non-blank line of ``path``."""
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} not found; expected {layout}")
    try:
        with open(path, encoding="utf-8") as f:
            return [(n, s.strip()) for n, s in enumerate(f, start=1) if s.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: {path} is not a UTF-8 text file ({e}); expected {layout}") from None


def parse_int(name: str, path: Path, lineno: int, text: str, field: str, line: str) -> int:
    """``int(text)``, or a ValueError naming the file, the line and the field."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}: {path} line {lineno}: {field} must be an integer, got {text!r} "
                         f"in {line!r}") from None


def read_json(name: str, path: Path, layout: str) -> Any:
    """The parsed JSON of ``path``; a syntax error names the file, the line and the column."""
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} not found; expected {layout}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: {path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: {path} is not a UTF-8 JSON file ({e}); expected {layout}") from None


def check_index(index: object, n: int) -> int:
    """A dataset index (int, numpy integer or one-element integer tensor) as an int in [0, n)."""
    if isinstance(index, Tensor) and index.numel() == 1 and not index.is_floating_point():
        index = int(index)
    if isinstance(index, np.integer):
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    if not -n <= index < n:
        raise IndexError(f"index must be in [-{n}, {n}), got {index}")
    return index % n


def open_rgb(name: str, path: Path, context: str) -> Image.Image:
    """The image file ``path`` as a PIL RGB image.

    FileNotFoundError ("<name>: image <path> (<context>) not found") when it is absent,
    OSError ("<name>: cannot read image <path> (<context>): ...") when it is not an image.
    """
    try:
        with Image.open(path) as im:
            return pil_to_rgb(im)  # 16-bit / float modes by their range, not clipped to white
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: image {path} ({context}) not found") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise OSError(f"{name}: cannot read image {path} ({context}): {e}") from e


def image_size_arg(image_size: object) -> tuple[int, int] | None:
    """``image_size`` (None, an int side, or an (H, W) pair of ints) as None or (H, W)."""
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        pair: Sequence[object] = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        pair = image_size
    else:
        raise TypeError(f"image_size must be None, an int or an (H, W) pair of ints, got {image_size!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"image_size must be None, an int or an (H, W) pair of ints, got {image_size!r}")
    if min(pair) < 1:  # type: ignore[type-var]
        raise ValueError(f"image_size must be >= 1, got {image_size!r}")
    return int(pair[0]), int(pair[1])  # type: ignore[arg-type]


class LocalImageDataset(Dataset):
    """Base class: image paths with integer labels, read lazily from a local folder.

    ``ds[i]`` returns ``(image, label)``: the file as a PIL RGB image, resized to
    ``image_size`` when one is given (bilinear), then ``transform(image)``, or with no
    transform (3, H, W) float32 in [0, 1]; label is ``int(ds.labels[i])``.

    Subclasses set ``name`` and may override ``_context(i)`` (what an error says about item i).
    """

    name = "LocalImageDataset"

    def __init__(self, root: Path, split: str, paths: Sequence[Path], labels: Sequence[int] | Tensor,
                 transform: Callable[[Image.Image], Any] | None, image_size: object) -> None:
        super().__init__()
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        self.root = root
        self.split = split
        self.transform = transform
        self.image_size: tuple[int, int] | None = image_size_arg(image_size)
        self.paths: list[Path] = list(paths)
        self._labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if self._labels.numel() != len(self.paths):
            raise ValueError(f"{self.name}: {len(self.paths)} paths but {self._labels.numel()} labels")

    def _context(self, i: int) -> str:
        return f"item {i}"

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labels(self) -> Tensor:
        """(N,) int64 label of every item (known without opening any image); a copy."""
        return self._labels.clone()

    def load_image(self, index: int) -> Image.Image:
        """The file of item ``index`` as a PIL RGB image, as stored (no resize, no transform).

        Raises FileNotFoundError naming the path when the file is absent, OSError naming it
        when it is not a readable image.
        """
        i = check_index(index, len(self))
        return open_rgb(self.name, self.paths[i], self._context(i))

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """(image, label) of item ``index``; see the class docstring."""
        i = check_index(index, len(self))
        image = self.load_image(i)
        if self.image_size is not None:
            h, w = self.image_size
            image = image.resize((w, h), Image.BILINEAR)
        out = pil_to_tensor(image) if self.transform is None else self.transform(image)
        return out, int(self._labels[i])
