"""Animals with Attributes 2 (AwA2; Xian et al., TPAMI 2018) from a local folder.

AwA2 has 37,322 images of 50 animal classes and 85 binary attributes ("predicates")
given per CLASS: every image inherits its class's row of the predicate matrix. SANE
(Plummer et al., ECCV 2020) uses it for attribute explanations with the standard
40 / 10 class split of ``trainclasses.txt`` / ``testclasses.txt``.

Nothing is downloaded: extract the AwA2 archives (the base package with the text files
and the JPEG images) yourself and point :class:`AwA2` at the resulting
``Animals_with_Attributes2`` folder (or the folder that holds it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .. import _checks as V
from ._local import LocalImageDataset, check_root, find_base, parse_int, read_lines

__all__ = ["AwA2"]

_SPLITS = ("train", "test", "all")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class AwA2(LocalImageDataset):
    """Animals with Attributes 2: images with their class and the class's 85 binary attributes.

    ``ds[i]`` returns ``(image, label)``: image is the file as a PIL RGB image, resized
    to ``image_size`` when given, then ``transform(image)``, or with no transform
    (3, H, W) float32 in [0, 1]; label is the 0-based class index into ``class_names``
    (the class's id in classes.txt minus 1), the same in every split.

    Args:
        root: the ``Animals_with_Attributes2`` folder, or the folder that holds it.
        split: 'train' (the 40 classes of trainclasses.txt, about 30k images), 'test'
            (the 10 classes of testclasses.txt, about 7.9k images) or 'all' (all classes
            of classes.txt; no split file is read).
        transform: callable applied to the PIL RGB image; None gives (3, H, W) float32
            in [0, 1].
        image_size: None (keep each file's size), an int (square side) or (H, W): every
            image is resized to it (bilinear) before the transform. AwA2 images differ in
            size, so batching without a transform needs it.

    Layout (the file names of the AwA2 release)::

        <root>/Animals_with_Attributes2/
            classes.txt                      "<id>\\t<name>" per line, ids 1..C in order (C = 50)
            predicates.txt                   "<id>\\t<name>" per line, ids 1..P in order (P = 85)
            predicate-matrix-binary.txt      C lines of P space-separated 0/1 values,
                                             line k = class id k, column j = predicate id j+1
            predicate-matrix-continuous.txt  optional: the same shape, real values
            trainclasses.txt, testclasses.txt  one class name per line (40 / 10 names)
            JPEGImages/<class name>/<class name>_<number>.jpg

    Class names are folder names ('grizzly+bear'). The sizes C and P are read from
    classes.txt and predicates.txt, and the matrices must agree with them.
    Construction reads the text files and lists the split's image folders (files ending
    in .jpg, .jpeg or .png, sorted by name); images are opened when an item is loaded.
    Errors name the missing file or folder with its full path, and the file and line
    of a malformed entry.

    Attributes:
        root: the folder the files were read from.
        split: 'train', 'test' or 'all'.
        paths: list of Path, one per image; images are in class order, then by file name.
        class_names: tuple of the C class names, in classes.txt order.
        classes: tuple of the class indices of the split, in the order of its file.
        attribute_names: tuple of the P predicate names, in predicates.txt order.
        class_attributes: (C, P) bool predicate matrix.
        continuous_attributes: (C, P) float32 continuous predicate matrix, or None when
            predicate-matrix-continuous.txt is absent.
        labels: (N,) int64 class index of every image (a copy).
        attributes: (N, P) bool attributes of every image, its class's row (a copy).
    """

    name = "AwA2"
    CLASSES_FILE = "classes.txt"
    PREDICATES_FILE = "predicates.txt"
    BINARY_FILE = "predicate-matrix-binary.txt"
    CONTINUOUS_FILE = "predicate-matrix-continuous.txt"
    SPLIT_FILES = {"train": "trainclasses.txt", "test": "testclasses.txt"}
    IMAGE_DIR = "JPEGImages"

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None,
                 image_size: int | tuple[int, int] | None = None) -> None:
        V.choice("split", split, _SPLITS)
        self._given = check_root(self.name, root)
        base = find_base(self._given, "Animals_with_Attributes2", self.CLASSES_FILE)
        self._base = base
        class_names, class_lines = self._read_names(base / self.CLASSES_FILE, "class")
        predicate_names, _ = self._read_names(base / self.PREDICATES_FILE, "predicate")
        c, p = len(class_names), len(predicate_names)
        binary = self._read_matrix(base / self.BINARY_FILE, c, p, binary=True)
        cont_file = base / self.CONTINUOUS_FILE
        continuous = self._read_matrix(cont_file, c, p, binary=False) if cont_file.exists() else None
        index = {n: k for k, n in enumerate(class_names)}
        if split == "all":
            classes = tuple(range(c))
        else:
            classes = self._read_split(base / self.SPLIT_FILES[split], index)
        image_dir = base / self.IMAGE_DIR
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{self.name}: image folder {image_dir} not found; expected {self._layout()}")
        paths: list[Path] = []
        labels: list[int] = []
        for k in classes:
            files = self._list_images(image_dir / class_names[k], class_names[k], class_lines[k])
            paths.extend(files)
            labels.extend([k] * len(files))
        super().__init__(base, split, paths, labels, transform, image_size)
        self.class_names: tuple[str, ...] = class_names
        self.classes: tuple[int, ...] = classes
        self.attribute_names: tuple[str, ...] = predicate_names
        self._class_attributes = binary.bool()
        self._continuous = continuous

    # ---------------------------------------------------------------- attributes
    @property
    def class_attributes(self) -> Tensor:
        """(C, P) bool binary predicate matrix (a copy)."""
        return self._class_attributes.clone()

    @property
    def continuous_attributes(self) -> Tensor | None:
        """(C, P) float32 continuous predicate matrix (a copy), or None when its file is absent."""
        return None if self._continuous is None else self._continuous.clone()

    @property
    def attributes(self) -> Tensor:
        """(N, P) bool attributes of every image: its class's binary predicate row (a copy)."""
        return self._class_attributes[self._labels]

    @property
    def n_classes(self) -> int:
        """Number of classes of the split."""
        return len(self.classes)

    def __repr__(self) -> str:
        t = "" if self.transform is None else f", transform={self.transform!r}"
        s = "" if self.image_size is None else f", image_size={self.image_size}"
        return (f"AwA2(split={self.split!r}, n_images={len(self)}, n_classes={self.n_classes}, "
                f"n_attributes={len(self.attribute_names)}, root='{self.root}'{s}{t})")

    def _context(self, i: int) -> str:
        return f"item {i}, class {self.class_names[int(self._labels[i])]!r}"

    # ---------------------------------------------------------------- parsing
    def _layout(self) -> str:
        return (f"the AwA2 release extracted under {self._given} (Animals_with_Attributes2/classes.txt, "
                f"predicates.txt, predicate-matrix-binary.txt, trainclasses.txt, testclasses.txt, JPEGImages/)")

    def _read_names(self, path: Path, what: str) -> tuple[tuple[str, ...], list[int]]:
        """Names and line numbers of an "<id> <name>" file whose ids are 1, 2, ... in order."""
        names: list[str] = []
        lines: list[int] = []
        seen: dict[str, int] = {}
        for n, line in read_lines(self.name, path, self._layout()):
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{self.name}: {path} line {n}: expected '<{what} id> <{what} name>', got {line!r}")
            i = parse_int(self.name, path, n, parts[0], f"{what} id", line)
            if i != len(names) + 1:
                raise ValueError(f"{self.name}: {path} line {n}: {what} ids must be 1, 2, 3, ... in order; "
                                 f"expected {len(names) + 1}, got {i}")
            name = parts[1].strip()
            if name in seen:
                raise ValueError(f"{self.name}: {path} line {n}: {what} name {name!r} already listed on line "
                                 f"{seen[name]}")
            seen[name] = n
            names.append(name)
            lines.append(n)
        if not names:
            raise ValueError(f"{self.name}: {path} lists no {what}; expected {self._layout()}")
        return tuple(names), lines

    def _read_matrix(self, path: Path, c: int, p: int, *, binary: bool) -> Tensor:
        """The (c, p) matrix of a predicate-matrix file: float32, or 0/1 uint8 when ``binary``."""
        rows = read_lines(self.name, path, self._layout())
        if len(rows) != c:
            raise ValueError(f"{self.name}: {path} has {len(rows)} row(s), expected {c} (one per class of "
                             f"{self._base / self.CLASSES_FILE})")
        out: list[list[float]] = []
        for n, line in rows:
            values = line.split()
            if len(values) != p:
                raise ValueError(f"{self.name}: {path} line {n}: expected {p} values (one per predicate of "
                                 f"{self._base / self.PREDICATES_FILE}), got {len(values)}")
            row = []
            for j, v in enumerate(values):
                if binary and v not in ("0", "1"):
                    raise ValueError(f"{self.name}: {path} line {n}: value {j + 1} must be 0 or 1, got {v!r}")
                try:
                    row.append(float(v))
                except ValueError:
                    raise ValueError(f"{self.name}: {path} line {n}: value {j + 1} must be a number, "
                                     f"got {v!r}") from None
            out.append(row)
        return torch.tensor(out, dtype=torch.uint8 if binary else torch.float32).reshape(c, p)

    def _read_split(self, path: Path, index: dict[str, int]) -> tuple[int, ...]:
        """Class indices of a split file (one class name per line), in file order."""
        classes: list[int] = []
        seen: dict[str, int] = {}
        for n, line in read_lines(self.name, path, self._layout()):
            if line not in index:
                raise ValueError(f"{self.name}: {path} line {n}: class {line!r} is not listed in "
                                 f"{self._base / self.CLASSES_FILE}")
            if line in seen:
                raise ValueError(f"{self.name}: {path} line {n}: class {line!r} already listed on line {seen[line]}")
            seen[line] = n
            classes.append(index[line])
        if not classes:
            raise ValueError(f"{self.name}: {path} lists no classes; expected one class name per line")
        return tuple(classes)

    def _list_images(self, folder: Path, class_name: str, line: int) -> list[Path]:
        if not folder.is_dir():
            raise FileNotFoundError(f"{self.name}: image folder {folder} not found (class {class_name!r}, line "
                                    f"{line} of {self._base / self.CLASSES_FILE}); expected {self._layout()}")
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it if not e.name.startswith(".")
                           and e.name.lower().endswith(_IMAGE_SUFFIXES) and e.is_file())
        if not names:
            raise ValueError(f"{self.name}: image folder {folder} (class {class_name!r}) holds no images "
                             f"(files ending in {', '.join(_IMAGE_SUFFIXES)})")
        return [folder / n for n in names]
