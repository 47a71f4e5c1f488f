"""Polyvore Outfits (Vasileva et al., "Learning Type-Aware Embeddings for Fashion Compatibility",
ECCV 2018) from a local folder: the fashion items of a split's outfits, with their types.

SANE (Plummer et al., ECCV 2020) explains an outfit-compatibility similarity model on
these items with attributes. The official release has no attribute annotations (SANE
made its own), so whymatch reads them, when present, from a file in a format of its
own (see :class:`PolyvoreOutfits`).

Nothing is downloaded: extract the Polyvore Outfits release yourself and point
:class:`PolyvoreOutfits` at the resulting ``polyvore_outfits`` folder (or the folder
that holds it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
import torch
from torch import Tensor

from .. import _checks as V
from ._local import LocalImageDataset, check_root, find_base, read_json

__all__ = ["PolyvoreOutfits", "DEFAULT_ATTRIBUTES_FILE"]

_SPLITS = ("train", "valid", "test")
_VERSIONS = ("disjoint", "nondisjoint")
DEFAULT_ATTRIBUTES_FILE = "polyvore_item_attributes.json"


def _item_id(v: object) -> str | None:
    """An item id as a non-empty string (ints are accepted and converted), else None."""
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, str) and v.strip():
        return v.strip()
    return None


class PolyvoreOutfits(LocalImageDataset):
    """The unique items of the outfits of one Polyvore Outfits split, labelled with their TYPE.

    ``ds[i]`` returns ``(image, label)``: image is ``<root>/images/<item_id>.jpg`` as a
    PIL RGB image, resized to ``image_size`` when given, then ``transform(image)``, or
    with no transform (3, H, W) float32 in [0, 1]; label is the item's type index, an
    index into ``type_names`` (its ``semantic_category``: 'tops', 'shoes', ...). The
    "label" is the item type, not an outfit or a class of identical items.

    Args:
        root: the ``polyvore_outfits`` folder, or the folder that holds it.
        split: 'train', 'valid' or 'test'.
        version: 'disjoint' (no item is shared between the splits' outfits) or
            'nondisjoint' (the larger version where train and test may share items).
        transform: callable applied to the PIL RGB image; None gives (3, H, W) float32
            in [0, 1].
        image_size: None (keep each file's size), an int (square side) or (H, W): every
            image is resized to it (bilinear) before the transform.
        attributes_file: file of attribute annotations, a name under the data folder or
            a path; None reads none. The default name ``polyvore_item_attributes.json``
            may be absent (then ``attributes`` is None and ``attribute_names`` empty);
            any other file given must exist.
        check_files: also check at construction that every item's image exists. Off by
            default: the train split has over 100k items, and stating every file is slow
            on network file systems; a missing image is named when its item is loaded.

    Layout (the file names of the release)::

        <root>/polyvore_outfits/
            polyvore_item_metadata.json   {item_id: {"semantic_category": str, ...}} for
                                          every item ("category_id", "title", ... are not read)
            images/<item_id>.jpg
            disjoint/train.json, valid.json, test.json
            nondisjoint/train.json, valid.json, test.json
                [{"set_id": str, "items": [{"item_id": str, "index": int}, ...]}, ...]
            polyvore_item_attributes.json   optional, whymatch's own format (below)

    Attribute file (whymatch's format; NOT part of the official release): a JSON object
    mapping an item id to the list of its attribute names, for example
    ``{"211990161": ["floral", "sleeveless"], "154249722": []}``. Attribute names are
    the sorted union of all names in the file, so every split has the same columns.
    Items that the file does not list get an all-False row and ``has_attributes`` False.

    Items are numbered in the order of their first appearance in the split file; an
    item that appears in several outfits is one item. Type indices are the sorted
    ``semantic_category`` values of the whole metadata file, so they agree across splits
    and versions. Construction reads the JSON files and checks that ``images/`` exists;
    errors name the missing file with its full path, and the file and the JSON position
    (line and column, outfit, item id) of a malformed entry.

    Attributes:
        root: the folder the files were read from.
        split, version: as given.
        item_ids: list of str, one per item.
        paths: list of Path, one per item: ``<root>/images/<item_id>.jpg``.
        type_names: tuple of the type names (semantic categories), sorted.
        types: (N,) int64 type index of every item (a copy); attribute insertion and
            deletion draw replacement items of the same type from it.
        labels: the same as ``types``.
        outfits: list of outfits of the split, each a list of item positions (indices
            of this data set) in the order of the file.
        set_ids: list of str, the ``set_id`` of every outfit.
        attribute_names: tuple of str; empty without an attribute file.
        attributes: (N, A) bool attributes of every item (a copy), or None without an
            attribute file.
        has_attributes: (N,) bool, True for the items the attribute file lists, or None.
    """

    name = "PolyvoreOutfits"
    METADATA_FILE = "polyvore_item_metadata.json"
    IMAGE_DIR = "images"

    def __init__(self, root: str | Path, split: str = "train", version: str = "disjoint",
                 transform: Callable | None = None, image_size: int | tuple[int, int] | None = None,
                 attributes_file: str | Path | None = DEFAULT_ATTRIBUTES_FILE, *, check_files: bool = False) -> None:
        V.choice("split", split, _SPLITS)
        V.choice("version", version, _VERSIONS)
        if attributes_file is not None and not isinstance(attributes_file, (str, Path)):
            raise TypeError(f"attributes_file must be a str, a pathlib.Path or None, got "
                            f"{type(attributes_file).__name__}")
        self._given = check_root(self.name, root)
        base = find_base(self._given, "polyvore_outfits", self.METADATA_FILE)
        self.version = version
        meta_file = base / self.METADATA_FILE
        categories = self._read_metadata(meta_file)
        self.type_names: tuple[str, ...] = tuple(sorted(set(categories.values())))
        type_index = {t: k for k, t in enumerate(self.type_names)}

        split_file = base / version / f"{split}.json"
        self._split_file = split_file
        item_ids, self.outfits, self.set_ids = self._read_outfits(split_file, categories, meta_file)
        image_dir = base / self.IMAGE_DIR
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{self.name}: image folder {image_dir} not found; expected {self._layout()}")
        paths = [image_dir / f"{i}.jpg" for i in item_ids]
        if check_files:
            missing = [p for p in paths if not p.is_file()]
            if missing:
                shown = ", ".join(str(p) for p in missing[:3])
                raise FileNotFoundError(f"{self.name}: {len(missing)} image file(s) of the items of {split_file} "
                                        f"are missing, e.g. {shown}")
        super().__init__(base, split, paths, [type_index[categories[i]] for i in item_ids], transform, image_size)
        self.item_ids: list[str] = item_ids

        self.attributes_file: Path | None = None
        self.attribute_names: tuple[str, ...] = ()
        self._attributes: Tensor | None = None
        self._has_attributes: Tensor | None = None
        if attributes_file is not None:
            path = Path(attributes_file).expanduser()
            path = path if path.is_absolute() else base / path
            if path.exists() or str(attributes_file) != DEFAULT_ATTRIBUTES_FILE:
                self._read_attributes(path)

    # ---------------------------------------------------------------- accessors
    @property
    def types(self) -> Tensor:
        """(N,) int64 type index of every item, into ``type_names`` (a copy)."""
        return self._labels.clone()

    @property
    def attributes(self) -> Tensor | None:
        """(N, A) bool attributes of every item (a copy), or None without an attribute file."""
        return None if self._attributes is None else self._attributes.clone()

    @property
    def has_attributes(self) -> Tensor | None:
        """(N,) bool: the item is listed in the attribute file (a copy); None without one."""
        return None if self._has_attributes is None else self._has_attributes.clone()

    @property
    def n_types(self) -> int:
        return len(self.type_names)

    def __repr__(self) -> str:
        a = f", n_attributes={len(self.attribute_names)}" if self._attributes is not None else ""
        s = "" if self.image_size is None else f", image_size={self.image_size}"
        t = "" if self.transform is None else f", transform={self.transform!r}"
        return (f"PolyvoreOutfits(split={self.split!r}, version={self.version!r}, n_items={len(self)}, "
                f"n_outfits={len(self.outfits)}, n_types={self.n_types}{a}, root='{self.root}'{s}{t})")

    def _context(self, i: int) -> str:
        return f"item {i}, item_id {self.item_ids[i]!r}, listed in {self._split_file}"

    # ---------------------------------------------------------------- parsing
    def _layout(self) -> str:
        return (f"the Polyvore Outfits release extracted under {self._given} (polyvore_outfits/"
                f"{self.METADATA_FILE}, images/, disjoint/ and nondisjoint/ with train.json, valid.json, test.json)")

    def _read_metadata(self, path: Path) -> dict[str, str]:
        """item_id -> semantic_category of every item of the metadata file."""
        meta = read_json(self.name, path, self._layout())
        if not isinstance(meta, dict):
            raise ValueError(f"{self.name}: {path} must hold a JSON object mapping item ids to item records, "
                             f"got a {type(meta).__name__}")
        out: dict[str, str] = {}
        for key, rec in meta.items():
            if not isinstance(rec, dict):
                raise ValueError(f"{self.name}: {path}: item {key!r} must be a JSON object, got {rec!r}")
            cat = rec.get("semantic_category")
            if not isinstance(cat, str) or not cat.strip():
                raise ValueError(f"{self.name}: {path}: item {key!r}: 'semantic_category' must be a non-empty "
                                 f"string, got {cat!r}")
            out[key.strip()] = cat.strip()
        if not out:
            raise ValueError(f"{self.name}: {path} lists no items")
        return out

    def _read_outfits(self, path: Path, categories: dict[str, str],
                      meta_file: Path) -> tuple[list[str], list[list[int]], list[str]]:
        """(unique item ids in order of first appearance, outfits as item positions, set ids)."""
        data = read_json(self.name, path, self._layout())
        if not isinstance(data, list):
            raise ValueError(f"{self.name}: {path} must hold a JSON list of outfits, got a {type(data).__name__}")
        position: dict[str, int] = {}
        item_ids: list[str] = []
        outfits: list[list[int]] = []
        set_ids: list[str] = []
        for k, outfit in enumerate(data):
            where = f"{self.name}: {path}: outfit {k}"
            if not isinstance(outfit, dict):
                raise ValueError(f"{where} must be a JSON object with 'set_id' and 'items', got {outfit!r:.80}")
            set_id = _item_id(outfit.get("set_id"))
            if set_id is None:
                raise ValueError(f"{where}: 'set_id' must be a non-empty string, got {outfit.get('set_id')!r}")
            where = f"{where} (set_id {set_id!r})"
            items = outfit.get("items")
            if not isinstance(items, list) or not items:
                raise ValueError(f"{where}: 'items' must be a non-empty list, got {items!r:.80}")
            members: list[int] = []
            for j, item in enumerate(items):
                iid = _item_id(item.get("item_id")) if isinstance(item, dict) else None
                if iid is None:
                    raise ValueError(f"{where}: item {j} must be an object with a non-empty 'item_id', "
                                     f"got {item!r:.80}")
                if iid not in position:
                    if iid not in categories:
                        raise ValueError(f"{where}: item_id {iid!r} is not listed in {meta_file}")
                    position[iid] = len(item_ids)
                    item_ids.append(iid)
                members.append(position[iid])
            outfits.append(members)
            set_ids.append(set_id)
        if not outfits:
            raise ValueError(f"{self.name}: {path} lists no outfits")
        return item_ids, outfits, set_ids

    def _read_attributes(self, path: Path) -> None:
        layout = (f"whymatch's attribute file: a JSON object mapping item ids to lists of attribute names, "
                  f"at {path}")
        data = read_json(self.name, path, layout)
        if not isinstance(data, dict):
            raise ValueError(f"{self.name}: {path} must hold a JSON object mapping item ids to lists of attribute "
                             f"names, got a {type(data).__name__}")
        per_item: dict[str, list[str]] = {}
        for key, names in data.items():
            if not isinstance(names, list) or not all(isinstance(a, str) and a.strip() for a in names):
                raise ValueError(f"{self.name}: {path}: item {key!r}: expected a list of non-empty attribute "
                                 f"names, got {names!r:.80}")
            per_item[key.strip()] = [a.strip() for a in names]
        self.attribute_names = tuple(sorted({a for names in per_item.values() for a in names}))
        column = {a: j for j, a in enumerate(self.attribute_names)}
        rows: list[int] = []
        cols: list[int] = []
        listed: list[bool] = []
        for i, iid in enumerate(self.item_ids):
            names = per_item.get(iid)
            listed.append(names is not None)
            for a in names or ():
                rows.append(i)
                cols.append(column[a])
        attrs = torch.zeros(len(self.item_ids), len(self.attribute_names), dtype=torch.bool)
        attrs[torch.tensor(rows, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64)] = True
        has = torch.tensor(listed, dtype=torch.bool)
        self.attributes_file = path
        self._attributes = attrs
        self._has_attributes = has
