"""AwA2 and PolyvoreOutfits loaders (SANE attribute data sets), on tiny generated trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from whymatch.data import DEFAULT_ATTRIBUTES_FILE, AwA2, PolyvoreOutfits, eval_transform

from helpers import replace_line


def _write_image(path: Path, seed: int, mode: str = "RGB", size: tuple[int, int] = (18, 12)) -> None:
    """A small random image (w, h) = size in the given PIL mode, format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    (rgb if mode == "RGB" else rgb.convert(mode)).save(path)


# ------------------------------------------------------------------ AwA2 fixture
AWA_CLASSES = ("antelope", "grizzly+bear", "killer+whale", "beaver")
AWA_PREDICATES = ("black", "white", "blue", "brown", "gray")
AWA_BINARY = [[0, 1, 0, 1, 0],
              [1, 0, 0, 1, 0],
              [1, 1, 1, 0, 0],
              [0, 0, 0, 1, 1]]
AWA_TRAIN = ("grizzly+bear", "antelope")  # not in classes.txt order: the split keeps its file's order
AWA_TEST = ("killer+whale", "beaver")


def _make_awa2(root: Path) -> Path:
    """Animals_with_Attributes2 with 4 classes, 5 predicates, 2 images per class (a PNG, a grayscale JPEG)."""
    base = root / "Animals_with_Attributes2"
    base.mkdir(parents=True)
    # the release right-aligns the ids and separates them from the name with a tab
    (base / "classes.txt").write_text("".join(f"{k + 1:>7d}\t{n}\n" for k, n in enumerate(AWA_CLASSES)))
    (base / "predicates.txt").write_text("".join(f"{k + 1:>7d}\t{n}\n" for k, n in enumerate(AWA_PREDICATES)))
    (base / "predicate-matrix-binary.txt").write_text("".join(" ".join(map(str, r)) + "\n" for r in AWA_BINARY))
    cont = [[12.5 * v + k + j / 10 for j, v in enumerate(r)] for k, r in enumerate(AWA_BINARY)]
    (base / "predicate-matrix-continuous.txt").write_text("".join("  ".join(f"{v:.2f}" for v in r) + "\n"
                                                                  for r in cont))
    (base / "trainclasses.txt").write_text("\n".join(AWA_TRAIN) + "\n")
    (base / "testclasses.txt").write_text("\n".join(AWA_TEST) + "\n")
    for k, n in enumerate(AWA_CLASSES):
        _write_image(base / "JPEGImages" / n / f"{n}_10002.jpg", seed=10 * k + 2, mode="L" if k == 1 else "RGB")
        _write_image(base / "JPEGImages" / n / f"{n}_10001.png", seed=10 * k + 1)
    (base / "JPEGImages" / "antelope" / "notes.txt").write_text("not an image")
    return base


@pytest.fixture
def awa(tmp_path):
    _make_awa2(tmp_path)
    return tmp_path


def test_awa2_splits_labels_attributes(awa):
    tr, te, al = AwA2(awa), AwA2(awa, "test"), AwA2(awa, split="all")
    assert (len(tr), len(te), len(al)) == (4, 4, 8)
    assert tr.class_names == AWA_CLASSES and tr.attribute_names == AWA_PREDICATES
    assert tr.classes == (1, 0) and te.classes == (2, 3) and al.classes == (0, 1, 2, 3)
    assert tr.n_classes == 2
    assert tr.labels.dtype == torch.int64 and tr.labels.tolist() == [1, 1, 0, 0]
    assert te.labels.tolist() == [2, 2, 3, 3] and al.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # images in class order, then by file name; the text file is skipped
    assert [p.name for p in tr.paths] == ["grizzly+bear_10001.png", "grizzly+bear_10002.jpg",
                                          "antelope_10001.png", "antelope_10002.jpg"]
    assert all(p.parent.name == tr.class_names[c] for p, c in zip(al.paths, al.labels.tolist()))
    cls = tr.class_attributes
    assert cls.dtype == torch.bool and cls.tolist() == [[bool(v) for v in r] for r in AWA_BINARY]
    for ds in (tr, te, al):
        a = ds.attributes
        assert a.dtype == torch.bool and a.shape == (len(ds), 5)
        assert torch.equal(a, cls[ds.labels])  # every image gets its class's row
    cont = tr.continuous_attributes
    assert cont.dtype == torch.float32 and cont.shape == (4, 5)
    assert cont[2, 3].item() == pytest.approx(2.3) and cont[0, 1].item() == pytest.approx(12.6)
    # copies: editing them leaves the data set alone
    tr.attributes[:] = False
    tr.labels[:] = 0
    tr.class_attributes[:] = False
    assert tr.labels.tolist() == [1, 1, 0, 0] and bool(tr.attributes.any())
    r = repr(tr)
    assert "AwA2" in r and "'train'" in r and "n_images=4" in r and "n_attributes=5" in r


def test_awa2_items(awa):
    ds = AwA2(awa, "train")
    for i in range(len(ds)):
        x, y = ds[i]
        assert isinstance(y, int) and y == int(ds.labels[i])
        assert x.dtype == torch.float32 and x.shape == (3, 12, 18)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    gray, _ = ds[1]  # grizzly+bear_10002.jpg is grayscale
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert ds[-1][1] == 0 and ds[torch.tensor(0)][1] == 1 and ds[np.int64(2)][1] == 0
    assert ds.load_image(0).size == (18, 12)
    with pytest.raises(IndexError, match=r"index must be in \[-4, 4\), got 4"):
        ds[4]
    with pytest.raises(TypeError, match="index must be an int"):
        ds["0"]


def test_awa2_root_may_be_the_release_folder(awa):
    a, b = AwA2(awa, "test"), AwA2(awa / "Animals_with_Attributes2", "test")
    assert a.paths == b.paths and a.root == b.root == awa / "Animals_with_Attributes2"


def test_awa2_without_continuous_matrix(awa):
    (awa / "Animals_with_Attributes2" / "predicate-matrix-continuous.txt").unlink()
    ds = AwA2(awa, "all")
    assert ds.continuous_attributes is None and ds.class_attributes.shape == (4, 5)


def test_awa2_transform_and_image_size(awa):
    ds = AwA2(awa, "test", image_size=(8, 10))
    x, y = ds[0]
    assert x.shape == (3, 8, 10) and y == 2 and ds.image_size == (8, 10)
    assert "image_size=(8, 10)" in repr(ds)
    assert AwA2(awa, "test", image_size=7)[1][0].shape == (3, 7, 7)
    t = AwA2(awa, "test", transform=eval_transform(6, 8))
    assert t[0][0].shape == (3, 6, 6) and "transform=" in repr(t)
    # image_size first, then the transform sees the resized PIL image
    seen = []
    ds2 = AwA2(awa, "test", transform=lambda im: seen.append(im.size) or torch.zeros(1), image_size=(5, 9))
    assert ds2[0][0].shape == (1,) and seen == [(9, 5)]
    loader = torch.utils.data.DataLoader(AwA2(awa, "all", image_size=16), batch_size=8)
    xb, yb = next(iter(loader))
    assert xb.shape == (8, 3, 16, 16) and yb.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("image_size, err, match", [
    (0, ValueError, r"image_size must be >= 1, got 0"),
    ((4, -1), ValueError, r"image_size must be >= 1"),
    ((4, 4, 4), TypeError, r"image_size must be None, an int or an \(H, W\) pair"),
    (4.0, TypeError, r"image_size must be None, an int"),
    ((4, True), TypeError, r"image_size must be None"),
])
def test_awa2_bad_image_size(awa, image_size, err, match):
    with pytest.raises(err, match=match):
        AwA2(awa, "test", image_size=image_size)


def test_awa2_bad_arguments(awa):
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'test', 'all', got 'val'"):
        AwA2(awa, "val")
    with pytest.raises(TypeError, match="transform must be callable or None, got int"):
        AwA2(awa, "test", transform=3)
    with pytest.raises(TypeError, match="root must be a str or pathlib.Path"):
        AwA2(3)
    with pytest.raises(FileNotFoundError) as e:
        AwA2(awa / "nowhere")
    assert str(awa / "nowhere") in str(e.value)


@pytest.mark.parametrize("fname, splits", [
    ("classes.txt", ("train", "test", "all")),
    ("predicates.txt", ("train", "test", "all")),
    ("predicate-matrix-binary.txt", ("train", "test", "all")),
    ("trainclasses.txt", ("train",)),
    ("testclasses.txt", ("test",)),
])
def test_awa2_missing_files_are_named(awa, fname, splits):
    base = awa / "Animals_with_Attributes2"
    (base / fname).unlink()
    for split in ("train", "test", "all"):
        if split in splits:
            with pytest.raises(FileNotFoundError, match="expected the AwA2 release") as e:
                AwA2(awa, split)
            assert str(base / fname) in str(e.value)
        else:
            AwA2(awa, split)  # only the files a split needs are read


def test_awa2_missing_image_folders_are_named(awa):
    base = awa / "Animals_with_Attributes2"
    folder = base / "JPEGImages" / "beaver"
    for f in folder.iterdir():
        f.unlink()
    with pytest.raises(ValueError, match="holds no images") as e:
        AwA2(awa, "test")
    assert str(folder) in str(e.value)
    folder.rmdir()
    AwA2(awa, "train")  # the other split does not look at it
    with pytest.raises(FileNotFoundError, match=r"class 'beaver', line 4 of") as e:
        AwA2(awa, "test")
    assert str(folder) in str(e.value) and str(base / "classes.txt") in str(e.value)
    (base / "JPEGImages").rename(base / "images")
    with pytest.raises(FileNotFoundError, match="image folder") as e:
        AwA2(awa, "all")
    assert str(base / "JPEGImages") in str(e.value)


@pytest.mark.parametrize("fname, line, text, match", [
    ("classes.txt", 2, "2", r"line 2: expected '<class id> <class name>', got '2'"),
    ("classes.txt", 3, "x\tkiller+whale", r"line 3: class id must be an integer, got 'x'"),
    ("classes.txt", 3, "4\tkiller+whale", r"line 3: class ids must be 1, 2, 3, ... in order; expected 3, got 4"),
    ("classes.txt", 4, "4\tantelope", r"line 4: class name 'antelope' already listed on line 1"),
    ("predicates.txt", 5, "5", r"line 5: expected '<predicate id> <predicate name>'"),
    ("predicate-matrix-binary.txt", 2, "1 0 0 1", r"line 2: expected 5 values \(one per predicate of .*predicates"),
    ("predicate-matrix-binary.txt", 3, "1 1 2 0 0", r"line 3: value 3 must be 0 or 1, got '2'"),
    ("predicate-matrix-binary.txt", 3, "1 1 0.5 0 0", r"line 3: value 3 must be 0 or 1, got '0.5'"),
    ("predicate-matrix-continuous.txt", 4, "1 2 x 4 5", r"line 4: value 3 must be a number, got 'x'"),
    ("predicate-matrix-continuous.txt", 1, "1 2 3 4", r"line 1: expected 5 values"),
    ("trainclasses.txt", 2, "zebra", r"line 2: class 'zebra' is not listed in .*classes.txt"),
    ("trainclasses.txt", 2, "grizzly+bear", r"line 2: class 'grizzly\+bear' already listed on line 1"),
])
def test_awa2_malformed_lines_name_file_and_line(awa, fname, line, text, match):
    path = awa / "Animals_with_Attributes2" / fname
    replace_line(path, line, text)
    with pytest.raises(ValueError, match=match) as e:
        AwA2(awa, "train")
    assert str(path) in str(e.value)


def test_awa2_matrix_rows_must_match_classes(awa):
    base = awa / "Animals_with_Attributes2"
    path = base / "predicate-matrix-binary.txt"
    path.write_text("\n".join(path.read_text().splitlines()[:3]) + "\n")
    with pytest.raises(ValueError, match=r"has 3 row\(s\), expected 4 \(one per class of") as e:
        AwA2(awa, "all")
    assert str(path) in str(e.value) and str(base / "classes.txt") in str(e.value)
    (base / "trainclasses.txt").write_text("\n\n")
    path.write_text("")
    (base / "classes.txt").write_text("")
    with pytest.raises(ValueError, match="lists no class"):
        AwA2(awa, "train")


def test_awa2_empty_split_file(awa):
    (awa / "Animals_with_Attributes2" / "testclasses.txt").write_text("\n")
    with pytest.raises(ValueError, match="testclasses.txt lists no classes"):
        AwA2(awa, "test")


def test_awa2_lazy_loading_names_missing_and_unreadable_images(awa):
    ds = AwA2(awa, "train")
    ds.paths[2].unlink()
    with pytest.raises(FileNotFoundError, match=r"\(item 2, class 'antelope'\) not found") as e:
        ds[2]
    assert str(ds.paths[2]) in str(e.value)
    ds.paths[3].write_bytes(b"not an image")
    with pytest.raises(OSError, match="cannot read image") as e:
        ds[3]
    assert str(ds.paths[3]) in str(e.value)
    ds[0]


# ------------------------------------------------------------------ Polyvore fixture
POLY_META = {
    "100": {"semantic_category": "tops", "category_id": "11", "title": "striped tee"},
    "101": {"semantic_category": "bottoms", "category_id": "27"},
    "102": {"semantic_category": "shoes"},
    "103": {"semantic_category": "bags"},
    "104": {"semantic_category": "tops"},
    "105": {"semantic_category": "shoes"},
    "106": {"semantic_category": "bottoms"},
    "107": {"semantic_category": "hats"},  # in no split: its type still gets an index
}
POLY_TYPES = ("bags", "bottoms", "hats", "shoes", "tops")


def _outfit(set_id: str, *items: str) -> dict:
    return {"set_id": set_id, "items": [{"item_id": i, "index": k + 1} for k, i in enumerate(items)]}


POLY_SPLITS = {
    "disjoint": {"train": [_outfit("s1", "100", "101", "102"), _outfit("s2", "100", "103")],
                 "valid": [_outfit("s3", "106", "105")],
                 "test": [_outfit("s4", "104", "105"), _outfit("s5", "106", "104", "105")]},
    "nondisjoint": {"train": [_outfit("n1", "104", "100", "101"), _outfit("n2", "102", "100")],
                    "valid": [_outfit("n3", "103", "100")],
                    "test": [_outfit("n4", "100", "105")]},
}
POLY_ATTRS = {"100": ["striped", "red"], "101": [], "103": ["leather", "red"], "999": ["floral"]}


def _make_polyvore(root: Path, attributes: bool = False) -> Path:
    """polyvore_outfits with 8 items, both versions, every split; one image is a PNG saved as .jpg."""
    base = root / "polyvore_outfits"
    base.mkdir(parents=True)
    (base / "polyvore_item_metadata.json").write_text(json.dumps(POLY_META, indent=1))
    for version, splits in POLY_SPLITS.items():
        (base / version).mkdir()
        for split, outfits in splits.items():
            (base / version / f"{split}.json").write_text(json.dumps(outfits, indent=4))
    for k, iid in enumerate(POLY_META):
        _write_image(base / "images" / f"{iid}.jpg", seed=300 + k, mode="L" if iid == "101" else "RGB",
                     size=(10 + k, 14))
    if attributes:
        (base / DEFAULT_ATTRIBUTES_FILE).write_text(json.dumps(POLY_ATTRS))
    return base


@pytest.fixture
def poly(tmp_path):
    _make_polyvore(tmp_path)
    return tmp_path


def test_polyvore_items_outfits_types(poly):
    ds = PolyvoreOutfits(poly)  # train, disjoint
    assert ds.split == "train" and ds.version == "disjoint"
    assert ds.item_ids == ["100", "101", "102", "103"]  # "100" is in two outfits: one item
    assert ds.outfits == [[0, 1, 2], [0, 3]] and ds.set_ids == ["s1", "s2"]
    assert ds.type_names == POLY_TYPES and ds.n_types == 5
    assert ds.types.dtype == torch.int64 and ds.types.tolist() == [4, 1, 3, 0]
    assert torch.equal(ds.labels, ds.types)
    assert [ds.type_names[t] for t in ds.types.tolist()] == ["tops", "bottoms", "shoes", "bags"]
    assert ds.paths == [poly / "polyvore_outfits" / "images" / f"{i}.jpg" for i in ds.item_ids]
    assert ds.attributes is None and ds.has_attributes is None and ds.attribute_names == ()
    assert ds.attributes_file is None
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 14, 10 + i) and y == int(ds.types[i])
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    gray, _ = ds[1]
    assert torch.equal(gray[0], gray[2])
    r = repr(ds)
    assert "PolyvoreOutfits" in r and "n_items=4" in r and "n_outfits=2" in r and "n_attributes" not in r


def test_polyvore_splits_and_versions(poly):
    te = PolyvoreOutfits(poly, "test")
    assert te.item_ids == ["104", "105", "106"] and te.outfits == [[0, 1], [2, 0, 1]]
    assert te.types.tolist() == [4, 3, 1]
    va = PolyvoreOutfits(poly / "polyvore_outfits", "valid")
    assert va.item_ids == ["106", "105"] and va.set_ids == ["s3"]
    nd = PolyvoreOutfits(poly, "train", version="nondisjoint")
    assert nd.version == "nondisjoint" and nd.item_ids == ["104", "100", "101", "102"]
    assert nd.outfits == [[0, 1, 2], [3, 1]] and nd.set_ids == ["n1", "n2"]
    ndt = PolyvoreOutfits(poly, "test", "nondisjoint")
    assert set(ndt.item_ids) & set(nd.item_ids) == {"100"}  # nondisjoint: shared items
    dis = PolyvoreOutfits(poly, "train")
    assert not set(dis.item_ids) & set(te.item_ids)
    # type indices agree across splits and versions
    for ds in (te, va, nd, ndt):
        assert ds.type_names == POLY_TYPES
    assert int(nd.types[1]) == int(dis.types[0]) == POLY_TYPES.index("tops")


def test_polyvore_with_attributes(poly):
    base = poly / "polyvore_outfits"
    (base / DEFAULT_ATTRIBUTES_FILE).write_text(json.dumps(POLY_ATTRS))
    ds = PolyvoreOutfits(poly, "train")
    # the sorted union of the whole file, so every split has the same columns
    assert ds.attribute_names == ("floral", "leather", "red", "striped")
    a = ds.attributes
    assert a.dtype == torch.bool and a.shape == (4, 4)
    assert a.tolist() == [[False, False, True, True],   # 100
                          [False, False, False, False],  # 101: listed, no attribute
                          [False, False, False, False],  # 102: not listed
                          [False, True, True, False]]    # 103
    assert ds.has_attributes.tolist() == [True, True, False, True]
    assert ds.attributes_file == base / DEFAULT_ATTRIBUTES_FILE and "n_attributes=4" in repr(ds)
    te = PolyvoreOutfits(poly, "test")
    assert te.attribute_names == ds.attribute_names and not bool(te.attributes.any())
    assert te.has_attributes.tolist() == [False, False, False]
    ds.attributes[:] = True
    assert not bool(ds.attributes[1].any())  # a copy
    # None: the file is not read
    off = PolyvoreOutfits(poly, "train", attributes_file=None)
    assert off.attributes is None and off.attribute_names == ()
    # another name, under the data folder or as a path
    (base / DEFAULT_ATTRIBUTES_FILE).rename(base / "mine.json")
    assert PolyvoreOutfits(poly).attributes is None  # the default name may be absent
    assert PolyvoreOutfits(poly, attributes_file="mine.json").attribute_names == ds.attribute_names
    assert PolyvoreOutfits(poly, attributes_file=base / "mine.json").has_attributes.sum() == 3
    with pytest.raises(FileNotFoundError) as e:
        PolyvoreOutfits(poly, attributes_file="other.json")  # any other name must exist
    assert str(base / "other.json") in str(e.value)
    (base / "mine.json").write_text(json.dumps({"100": []}))
    empty = PolyvoreOutfits(poly, attributes_file="mine.json")
    assert empty.attribute_names == () and empty.attributes.shape == (4, 0)
    with pytest.raises(TypeError, match="attributes_file must be a str"):
        PolyvoreOutfits(poly, attributes_file=3)


@pytest.mark.parametrize("rel, kwargs", [
    ("polyvore_item_metadata.json", {}),
    ("disjoint/train.json", {}),
    ("nondisjoint/test.json", {"split": "test", "version": "nondisjoint"}),
])
def test_polyvore_missing_files_are_named(poly, rel, kwargs):
    base = poly / "polyvore_outfits"
    (base / rel).unlink()
    with pytest.raises(FileNotFoundError, match="expected the Polyvore Outfits release") as e:
        PolyvoreOutfits(poly, **kwargs)
    assert str(base / rel) in str(e.value)


def test_polyvore_only_the_split_file_is_read(poly):
    base = poly / "polyvore_outfits"
    (base / "disjoint" / "test.json").unlink()
    (base / "nondisjoint" / "train.json").unlink()
    PolyvoreOutfits(poly, "train", "disjoint")
    PolyvoreOutfits(poly, "test", "nondisjoint")


def test_polyvore_missing_images(poly):
    base = poly / "polyvore_outfits"
    (base / "images" / "102.jpg").unlink()
    ds = PolyvoreOutfits(poly)  # construction does not stat each image
    ds[1]
    with pytest.raises(FileNotFoundError, match=r"\(item 2, item_id '102', listed in .*train.json\) not found") as e:
        ds[2]
    assert str(base / "images" / "102.jpg") in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\)") as e:
        PolyvoreOutfits(poly, check_files=True)
    assert str(base / "images" / "102.jpg") in str(e.value)
    PolyvoreOutfits(poly, "test", check_files=True)
    (base / "images" / "100.jpg").write_bytes(b"garbage")
    with pytest.raises(OSError, match="cannot read image") as e:
        ds[0]
    assert str(base / "images" / "100.jpg") in str(e.value)
    (base / "images").rename(base / "pictures")
    with pytest.raises(FileNotFoundError, match="image folder") as e:
        PolyvoreOutfits(poly, "test")
    assert str(base / "images") in str(e.value)


def test_polyvore_transform_and_image_size(poly):
    ds = PolyvoreOutfits(poly, "test", image_size=(6, 9))
    assert ds[0][0].shape == (3, 6, 9) and "image_size=(6, 9)" in repr(ds)
    t = PolyvoreOutfits(poly, "test", transform=eval_transform(8, 10))
    assert t[2][0].shape == (3, 8, 8) and t[2][1] == POLY_TYPES.index("bottoms")
    loader = torch.utils.data.DataLoader(PolyvoreOutfits(poly, "train", image_size=12), batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 12, 12) and yb.tolist() == [4, 1, 3, 0]


def test_polyvore_bad_arguments(poly):
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'valid', 'test', got 'val'"):
        PolyvoreOutfits(poly, "val")
    with pytest.raises(ValueError, match=r"version must be one of 'disjoint', 'nondisjoint', got 'joint'"):
        PolyvoreOutfits(poly, version="joint")
    with pytest.raises(FileNotFoundError) as e:
        PolyvoreOutfits(poly / "nowhere")
    assert str(poly / "nowhere") in str(e.value)


def _rewrite(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


@pytest.mark.parametrize("rel, edit, match", [
    ("disjoint/train.json", lambda d: d[1].pop("set_id"), r"outfit 1: 'set_id' must be a non-empty string"),
    ("disjoint/train.json", lambda d: d[0]["items"][2].pop("item_id"),
     r"outfit 0 \(set_id 's1'\): item 2 must be an object with a non-empty 'item_id'"),
    ("disjoint/train.json", lambda d: d[0]["items"].__setitem__(1, "101"), r"outfit 0 \(set_id 's1'\): item 1"),
    ("disjoint/train.json", lambda d: d[1]["items"].clear(), r"outfit 1 \(set_id 's2'\): 'items' must be a non-emp"),
    ("disjoint/train.json", lambda d: d.append(["100"]), r"outfit 2 must be a JSON object"),
    ("disjoint/train.json", lambda d: d[1]["items"][1].__setitem__("item_id", "555"),
     r"outfit 1 \(set_id 's2'\): item_id '555' is not listed in .*polyvore_item_metadata.json"),
    ("disjoint/train.json", lambda d: d.clear(), r"lists no outfits"),
    ("polyvore_item_metadata.json", lambda d: d["107"].pop("semantic_category"),
     r"item '107': 'semantic_category' must be a non-empty string, got None"),
    ("polyvore_item_metadata.json", lambda d: d.__setitem__("108", ["tops"]), r"item '108' must be a JSON object"),
])
def test_polyvore_malformed_entries_name_file_and_key(poly, rel, edit, match):
    path = poly / "polyvore_outfits" / rel
    _rewrite(path, edit)
    with pytest.raises(ValueError, match=match) as e:
        PolyvoreOutfits(poly)
    assert str(path) in str(e.value)


def test_polyvore_malformed_json_names_line(poly):
    path = poly / "polyvore_outfits" / "disjoint" / "train.json"
    lines = path.read_text().splitlines()
    assert lines[2].endswith('"set_id": "s1",')
    lines[2] = lines[2].rstrip(",")  # drop the comma on line 3: the parser stops on line 4
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train.json line 4 column \d+: not valid JSON") as e:
        PolyvoreOutfits(poly)
    assert str(path) in str(e.value)
    path.write_text(json.dumps({"s1": []}))
    with pytest.raises(ValueError, match="must hold a JSON list of outfits, got a dict"):
        PolyvoreOutfits(poly)
    meta = poly / "polyvore_outfits" / "polyvore_item_metadata.json"
    meta.write_text("[]")
    with pytest.raises(ValueError, match="must hold a JSON object mapping item ids") as e:
        PolyvoreOutfits(poly)
    assert str(meta) in str(e.value)


@pytest.mark.parametrize("content, match", [
    ('{"100": "red"}', r"item '100': expected a list of non-empty attribute names, got 'red'"),
    ('{"100": ["red", ""]}', r"item '100': expected a list of non-empty attribute names"),
    ('["red"]', r"must hold a JSON object mapping item ids to lists of attribute names, got a list"),
    ('{"100": ["red"],\n "101": [}', r"line 2 column \d+: not valid JSON"),
])
def test_polyvore_malformed_attribute_file(poly, content, match):
    path = poly / "polyvore_outfits" / DEFAULT_ATTRIBUTES_FILE
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        PolyvoreOutfits(poly)
    assert str(path) in str(e.value)
