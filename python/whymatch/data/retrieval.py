"""Loaders for the deep-metric-learning retrieval benchmarks: CUB-200-2011, Cars196, SOP.

All three read the standard public layouts from a local path; nothing is ever
downloaded. Construction reads only the index files (and checks that the image
folders exist); images are opened when an item is loaded.

Split protocol (zero-shot, as in the DML literature): train and test classes are
disjoint.

    CUB200                  train = classes 1-100,  test = classes 101-200
    Cars196                 train = classes 1-98,   test = classes 99-196
    StanfordOnlineProducts  train = Ebay_train.txt (11,318 classes),
                            test  = Ebay_test.txt  (11,316 classes)

Labels are the ORIGINAL class ids of the files, so train and test ids never collide.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .. import _checks as V
from ._local import LocalImageDataset, check_root, find_base, parse_int, read_lines
from .transforms import eval_transform, train_transform

__all__ = ["RetrievalDataset", "CUB200", "Cars196", "StanfordOnlineProducts", "SOP", "retrieval_dataset",
           "RETRIEVAL_DATASETS"]

_SPLITS = ("train", "test")


class RetrievalDataset(LocalImageDataset):
    """Base class: a list of image paths with integer class labels, loaded lazily.

    ``ds[i]`` returns ``(image, label)``: image is ``transform(PIL RGB image)`` or, with
    no transform, (3, H, W) float32 in [0, 1]; label is the original class id (int).

    Attributes:
        root: the folder the index files were read from.
        split: 'train' or 'test'.
        paths: list of Path, one per image.
        classes: sorted tuple of the class ids present.
        transform: callable applied to the PIL RGB image, or None.
    """

    name = "RetrievalDataset"

    def __init__(self, root: Path, split: str, paths: Sequence[Path], labels: Sequence[int], index_file: Path,
                 transform: Callable[[Image.Image], Any] | None, check_files: bool) -> None:
        super().__init__(root, split, paths, list(labels), transform, None)
        self._index_file = index_file
        if not self.paths:
            raise ValueError(f"{self.name}: {index_file} lists no images of the {split!r} split")
        self.classes: tuple[int, ...] = tuple(sorted(set(int(c) for c in self._labels.tolist())))
        for folder in sorted(set(p.parent for p in self.paths)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{self.name}: image folder {folder} not found (listed in {index_file}); "
                                        f"expected {self._layout()}")
        if check_files:
            missing = [p for p in self.paths if not p.is_file()]
            if missing:
                shown = ", ".join(str(p) for p in missing[:3])
                raise FileNotFoundError(f"{self.name}: {len(missing)} image file(s) listed in {index_file} are "
                                        f"missing, e.g. {shown}")

    # ---------------------------------------------------------------- to override
    def _layout(self) -> str:
        return "the standard layout"

    def _context(self, i: int) -> str:
        return f"item {i}, listed in {self._index_file}"

    # ---------------------------------------------------------------- basics
    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        t = "" if self.transform is None else f", transform={self.transform!r}"
        return (f"{self.name}(split={self.split!r}, n_images={len(self)}, n_classes={self.n_classes}, "
                f"root='{self.root}'{t})")


# -------------------------------------------------------------------- CUB-200-2011
class CUB200(RetrievalDataset):
    """CUB-200-2011 birds (11,788 images, 200 classes) for zero-shot retrieval.

    Args:
        root: folder holding the extracted archive ``CUB_200_2011/``, or that folder itself.
        split: 'train' (classes 1-100, 5,864 images) or 'test' (classes 101-200,
            5,924 images); all images of those classes (train_test_split.txt is ignored,
            as in the DML protocol).
        transform: callable applied to the PIL RGB image; None gives (3, H, W) float32
            in [0, 1].
        check_files: also check at construction that every listed image exists.

    Layout::

        <root>/CUB_200_2011/images.txt             "image_id relative_path" per line
        <root>/CUB_200_2011/image_class_labels.txt "image_id class_id" per line, class 1-200
        <root>/CUB_200_2011/images/<class_dir>/<file>.jpg
    """

    name = "CUB200"
    N_CLASSES = 200

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None, *,
                 check_files: bool = False) -> None:
        V.choice("split", split, _SPLITS)
        self._given = check_root(self.name, root)
        base = find_base(self._given, "CUB_200_2011", "images.txt")
        images_file, labels_file = base / "images.txt", base / "image_class_labels.txt"
        paths: dict[int, tuple[int, str]] = {}
        for n, line in read_lines(self.name, images_file, self._layout()):
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{self.name}: {images_file} line {n}: expected 'image_id relative_path', "
                                 f"got {line!r}")
            i = parse_int(self.name, images_file, n, parts[0], "image_id", line)
            if i in paths:
                raise ValueError(f"{self.name}: {images_file} line {n}: image_id {i} already listed on line "
                                 f"{paths[i][0]}")
            paths[i] = (n, parts[1].strip())
        labels: dict[int, int] = {}
        for n, line in read_lines(self.name, labels_file, self._layout()):
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{self.name}: {labels_file} line {n}: expected 'image_id class_id', got {line!r}")
            i = parse_int(self.name, labels_file, n, parts[0], "image_id", line)
            c = parse_int(self.name, labels_file, n, parts[1], "class_id", line)
            if not 1 <= c <= self.N_CLASSES:
                raise ValueError(f"{self.name}: {labels_file} line {n}: class_id must be in [1, {self.N_CLASSES}], "
                                 f"got {c}")
            if i not in paths:
                raise ValueError(f"{self.name}: {labels_file} line {n}: image_id {i} is not listed in {images_file}")
            if i in labels:
                raise ValueError(f"{self.name}: {labels_file} line {n}: image_id {i} is labelled twice")
            labels[i] = c
        unlabelled = [i for i in paths if i not in labels]
        if unlabelled:
            raise ValueError(f"{self.name}: {images_file} line {paths[unlabelled[0]][0]}: image_id {unlabelled[0]} "
                             f"has no class in {labels_file} ({len(unlabelled)} image(s) without a class)")
        half = self.N_CLASSES // 2
        keep = [i for i in paths if (labels[i] <= half) == (split == "train")]
        super().__init__(base, split, [base / "images" / paths[i][1] for i in keep], [labels[i] for i in keep],
                         images_file, transform, check_files)

    def _layout(self) -> str:
        return (f"the CUB-200-2011 archive extracted under {self._given} "
                f"(CUB_200_2011/images.txt, image_class_labels.txt, images/)")


# -------------------------------------------------------------------- Cars196
def _mat_scalar(v: Any) -> Any:
    """The single value inside a loadmat field (which may be wrapped in 0-d / 1x1 arrays)."""
    while isinstance(v, np.ndarray):
        if v.size != 1:
            raise ValueError(f"expected a single value, got an array of shape {v.shape}")
        v = v.reshape(-1)[0]
    return v.item() if isinstance(v, np.generic) else v


class Cars196(RetrievalDataset):
    """Stanford Cars (16,185 images, 196 classes) for zero-shot retrieval, the DML layout.

    Args:
        root: folder holding ``cars_annos.mat`` and ``car_ims/``.
        split: 'train' (classes 1-98, 8,054 images) or 'test' (classes 99-196,
            8,131 images); the official ``test`` flag of the annotations is ignored.
        transform: callable applied to the PIL RGB image; None gives (3, H, W) float32
            in [0, 1].
        check_files: also check at construction that every listed image exists.

    Layout::

        <root>/cars_annos.mat   struct array 'annotations' with fields relative_im_path
                                ('car_ims/000001.jpg'), class (1-196), test, and
                                bbox_x1, bbox_y1, bbox_x2, bbox_y2
        <root>/car_ims/*.jpg

    Attributes (besides the base class's):
        bboxes: (N, 4) int64 (x1, y1, x2, y2) boxes when the annotations have the
            bbox_* fields, else None.
    """

    name = "Cars196"
    N_CLASSES = 196
    _BBOX = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None, *,
                 check_files: bool = False) -> None:
        V.choice("split", split, _SPLITS)
        self._given = base = check_root(self.name, root)
        mat = base / "cars_annos.mat"
        if not mat.is_file():
            raise FileNotFoundError(f"{self.name}: {mat} not found; expected {self._layout()}")
        import scipy.io

        try:
            data = scipy.io.loadmat(str(mat))
        except Exception as e:  # scipy raises several types for a corrupt file
            raise ValueError(f"{self.name}: cannot read {mat} as a MATLAB file: {e}") from e
        if "annotations" not in data:
            keys = sorted(k for k in data if not k.startswith("__"))
            raise ValueError(f"{self.name}: {mat} has no 'annotations' variable (found {keys}); "
                             f"expected {self._layout()}")
        ann = np.asarray(data["annotations"]).reshape(-1)
        fields = ann.dtype.names or ()
        need = [f for f in ("relative_im_path", "class") if f not in fields]
        if need:
            raise ValueError(f"{self.name}: {mat}: 'annotations' lacks field(s) {need} (found {list(fields)}); "
                             f"expected {self._layout()}")
        has_bbox = all(f in fields for f in self._BBOX)
        paths, labels, boxes = [], [], []
        for k, rec in enumerate(ann, start=1):
            try:
                rel = _mat_scalar(rec["relative_im_path"])
                if not isinstance(rel, str) or not rel.strip():
                    raise ValueError(f"relative_im_path must be a non-empty string, got {rel!r}")
                c = _mat_scalar(rec["class"])
                if isinstance(c, float) and c.is_integer():
                    c = int(c)
                if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= self.N_CLASSES:
                    raise ValueError(f"class must be an integer in [1, {self.N_CLASSES}], got {c!r}")
                box = [int(_mat_scalar(rec[f])) for f in self._BBOX] if has_bbox else None
            except (ValueError, TypeError) as e:
                raise ValueError(f"{self.name}: {mat}: annotation {k} of {len(ann)}: {e}") from None
            if (c <= self.N_CLASSES // 2) == (split == "train"):
                paths.append(base / rel.strip())
                labels.append(c)
                boxes.append(box)
        self.bboxes: Tensor | None = torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4) if has_bbox else None
        super().__init__(base, split, paths, labels, mat, transform, check_files)

    def _layout(self) -> str:
        return f"the Cars196 DML layout under {self._given} (cars_annos.mat, car_ims/)"


# -------------------------------------------------------------------- SOP
class StanfordOnlineProducts(RetrievalDataset):
    """Stanford Online Products (120,053 images, 22,634 classes) for zero-shot retrieval.

    Args:
        root: folder holding ``Stanford_Online_Products/``, or that folder itself.
        split: 'train' (Ebay_train.txt: 59,551 images, 11,318 classes) or 'test'
            (Ebay_test.txt: 60,502 images, 11,316 classes). Only that split's file is read.
        transform: callable applied to the PIL RGB image; None gives (3, H, W) float32
            in [0, 1].
        check_files: also check at construction that every listed image exists.

    Layout::

        <root>/Stanford_Online_Products/Ebay_train.txt, Ebay_test.txt
            header "image_id class_id super_class_id path", then one line per image
        <root>/Stanford_Online_Products/<super_class>_final/<file>.JPG

    Attributes (besides the base class's):
        super_labels: (N,) int64 super-class ids (1-12).
    """

    name = "StanfordOnlineProducts"
    _HEADER = ("image_id", "class_id", "super_class_id", "path")

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None, *,
                 check_files: bool = False) -> None:
        V.choice("split", split, _SPLITS)
        self._given = check_root(self.name, root)
        base = find_base(self._given, "Stanford_Online_Products", f"Ebay_{split}.txt")
        index = base / f"Ebay_{split}.txt"
        lines = read_lines(self.name, index, self._layout())
        if lines and lines[0][1].split()[0] == "image_id":
            if tuple(lines[0][1].split()) != self._HEADER:
                raise ValueError(f"{self.name}: {index} line {lines[0][0]}: expected the header "
                                 f"{' '.join(self._HEADER)!r}, got {lines[0][1]!r}")
            lines = lines[1:]
        paths, labels, supers = [], [], []
        for n, line in lines:
            parts = line.split(maxsplit=3)
            if len(parts) != 4:
                raise ValueError(f"{self.name}: {index} line {n}: expected 'image_id class_id super_class_id path', "
                                 f"got {line!r}")
            parse_int(self.name, index, n, parts[0], "image_id", line)
            labels.append(parse_int(self.name, index, n, parts[1], "class_id", line))
            supers.append(parse_int(self.name, index, n, parts[2], "super_class_id", line))
            paths.append(base / parts[3].strip())
        self.super_labels = torch.tensor(supers, dtype=torch.int64)
        super().__init__(base, split, paths, labels, index, transform, check_files)

    def _layout(self) -> str:
        return (f"the Stanford Online Products archive extracted under {self._given} "
                f"(Stanford_Online_Products/Ebay_train.txt, Ebay_test.txt, <super_class>_final/)")


SOP = StanfordOnlineProducts

# -------------------------------------------------------------------- factory
RETRIEVAL_DATASETS: dict[str, type[RetrievalDataset]] = {"cub": CUB200, "cars196": Cars196, "sop": SOP}
_ALIASES = {"cub200": "cub", "cub-200-2011": "cub", "cars": "cars196", "stanford_online_products": "sop"}


def retrieval_dataset(name: str, root: str | Path, split: str, *, train: bool = False, size: int = 224,
                      resize: int = 256, generator: torch.Generator | None = None,
                      check_files: bool = False) -> RetrievalDataset:
    """A retrieval benchmark with the standard DML transform.

    Args:
        name: 'cub', 'cars196' or 'sop' (case-insensitive; 'cub200', 'cars' and
            'stanford_online_products' are accepted too).
        root: local folder of the data set (see each class for the layout).
        split: 'train' or 'test' (disjoint classes; see the module docstring).
        train: True: :func:`train_transform` (random crop + flip); False:
            :func:`eval_transform` (centre crop). Independent of ``split``.
        size: crop side in pixels.
        resize: shorter side before cropping.
        generator: torch.Generator for the train transform's randomness (ignored
            when train=False).
        check_files: check at construction that every listed image exists.

    Returns:
        The data set; ``ds[i]`` is ((3, size, size) float32 in [0, 1], class id).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in RETRIEVAL_DATASETS:
        raise ValueError(f"name must be one of {', '.join(repr(k) for k in RETRIEVAL_DATASETS)}, got {name!r}")
    V.choice("split", split, _SPLITS)
    transform = train_transform(size, resize, generator) if train else eval_transform(size, resize)
    return RETRIEVAL_DATASETS[key](root, split, transform, check_files=check_files)
