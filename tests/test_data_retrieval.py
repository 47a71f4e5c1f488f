"""CUB200 / Cars196 / StanfordOnlineProducts loaders and the DML transforms, on tiny generated trees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from whymatch.data import (
    CUB200,
    SOP,
    Cars196,
    ResizeCrop,
    StanfordOnlineProducts,
    eval_transform,
    retrieval_dataset,
    train_transform,
)

from helpers import replace_line

CUB_CLASSES = (1, 2, 100, 101, 150, 200)
CARS_CLASSES = (1, 98, 99, 196)


def _write_image(path: Path, seed: int, mode: str = "RGB", size: tuple[int, int] = (18, 12)) -> None:
    """A small random image (w, h) = size in the given PIL mode, format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    img = rgb if mode == "RGB" else rgb.convert(mode)
    img.save(path)


# ------------------------------------------------------------------ fixture trees
def _make_cub(root: Path) -> Path:
    """CUB_200_2011 with 2 images per class in CUB_CLASSES; the first image of class 1 and 150 is grayscale."""
    base = root / "CUB_200_2011"
    images, labels = [], []
    i = 0
    for c in CUB_CLASSES:
        for k in range(2):
            i += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{k:04d}.{'png' if k else 'jpg'}"
            mode = "L" if (k == 0 and c in (1, 150)) else "RGB"
            _write_image(base / "images" / rel, seed=i, mode=mode)
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return base


def _make_cars(root: Path, records: list[tuple] | None = None) -> Path:
    """cars_annos.mat + car_ims/ with 2 images per class in CARS_CLASSES (one RGBA, one CMYK)."""
    import scipy.io

    dt = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"),
          ("relative_im_path", "O"), ("test", "O")]
    if records is None:
        records = []
        for j, c in enumerate(c for c in CARS_CLASSES for _ in range(2)):
            rel = f"car_ims/{j + 1:06d}.{'png' if j == 1 else 'jpg'}"
            _write_image(root / rel, seed=100 + j, mode={1: "RGBA", 2: "CMYK"}.get(j, "RGB"))
            records.append((j, j + 1, 10 + j, 11 + j, c, rel, j % 2))

    def num(v: int) -> np.ndarray:  # loadmat stores small integers as 1x1 uint8, larger ones as uint16
        return np.array([[v]], dtype=np.uint8 if v < 256 else np.uint16)

    ann = np.zeros((1, len(records)), dtype=dt)
    for j, (x1, y1, x2, y2, c, rel, test) in enumerate(records):
        ann[0, j] = (num(x1), num(y1), num(x2), num(y2), num(c), np.array([rel]), num(test))
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": np.array(["a", "b"])})
    return root


def _make_sop(root: Path) -> Path:
    """Stanford_Online_Products with train classes 1, 2 and test classes 11319, 11320."""
    base = root / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path"
    rows = {"train": [(1, 1, "bicycle"), (1, 1, "bicycle"), (2, 2, "chair"), (2, 2, "chair")],
            "test": [(11319, 1, "bicycle"), (11319, 1, "bicycle"), (11320, 3, "lamp")]}
    n = 0
    for split, entries in rows.items():
        lines = [header]
        for cls, sup, name in entries:
            n += 1
            rel = f"{name}_final/{cls}_{n}.JPG"
            _write_image(base / rel, seed=200 + n, mode="L" if n == 3 else "RGB")
            lines.append(f"{n} {cls} {sup} {rel}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return base


@pytest.fixture
def cub(tmp_path):
    _make_cub(tmp_path)
    return tmp_path


@pytest.fixture
def cars(tmp_path):
    return _make_cars(tmp_path)


@pytest.fixture
def sop(tmp_path):
    _make_sop(tmp_path)
    return tmp_path


# ------------------------------------------------------------------ CUB
def test_cub_split_membership_and_labels(cub):
    tr, te = CUB200(cub, "train"), CUB200(cub, split="test")
    assert len(tr) == 6 and len(te) == 6
    assert tr.classes == (1, 2, 100) and te.classes == (101, 150, 200)
    assert tr.n_classes == 3 and te.n_classes == 3
    assert tr.labels.dtype == torch.int64 and tr.labels.shape == (6,)
    assert tr.labels.tolist() == [1, 1, 2, 2, 100, 100]
    assert te.labels.tolist() == [101, 101, 150, 150, 200, 200]
    # labels are the files' ids: each path sits in its class folder
    for ds in (tr, te):
        for p, c in zip(ds.paths, ds.labels.tolist()):
            assert isinstance(p, Path) and p.parent.name.startswith(f"{c:03d}.")
    assert "CUB200" in repr(tr) and "'train'" in repr(tr) and "n_images=6" in repr(tr)


def test_cub_root_may_be_the_archive_folder(cub):
    ds = CUB200(cub / "CUB_200_2011", "test")
    assert ds.labels.tolist() == CUB200(cub, "test").labels.tolist()


def test_cub_items_are_rgb_float_tensors(cub):
    ds = CUB200(cub, "train")
    for i in range(len(ds)):
        x, y = ds[i]
        assert isinstance(y, int) and y == int(ds.labels[i])
        assert x.dtype == torch.float32 and x.shape == (3, 12, 18)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    gray, _ = ds[0]  # class 1, first image is grayscale
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    x, y = ds[-1]
    assert y == 100
    assert ds[torch.tensor(1)][1] == 1 and ds[np.int64(2)][1] == 2
    with pytest.raises(IndexError, match=r"index must be in \[-6, 6\), got 6"):
        ds[6]
    with pytest.raises(TypeError, match="index must be an int"):
        ds[1.0]


def test_cub_missing_files_are_named(cub):
    base = cub / "CUB_200_2011"
    (base / "image_class_labels.txt").rename(base / "x.txt")
    with pytest.raises(FileNotFoundError) as e:
        CUB200(cub, "train")
    assert str(base / "image_class_labels.txt") in str(e.value) and "CUB_200_2011/images.txt" in str(e.value)
    (base / "images.txt").unlink()
    with pytest.raises(FileNotFoundError, match="expected the CUB-200-2011 archive") as e:
        CUB200(cub, "train")
    assert str(base / "images.txt") in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        CUB200(cub / "nowhere", "train")
    assert str(cub / "nowhere") in str(e.value)


def test_cub_missing_image_folder_is_named(cub):
    folder = cub / "CUB_200_2011" / "images" / "150.Bird_150"
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    CUB200(cub, "train")  # the other split does not look at it
    with pytest.raises(FileNotFoundError) as e:
        CUB200(cub, "test")
    assert str(folder) in str(e.value)


@pytest.mark.parametrize("fname, line, text, match", [
    ("images.txt", 3, "3", r"line 3: expected 'image_id relative_path'"),
    ("images.txt", 2, "x 002.Bird_2/a.jpg", r"line 2: image_id must be an integer, got 'x'"),
    ("images.txt", 4, "1 002.Bird_2/a.jpg", r"line 4: image_id 1 already listed on line 1"),
    ("image_class_labels.txt", 5, "5 three", r"line 5: class_id must be an integer, got 'three'"),
    ("image_class_labels.txt", 2, "2 201", r"line 2: class_id must be in \[1, 200\], got 201"),
    ("image_class_labels.txt", 2, "2 1 1", r"line 2: expected 'image_id class_id'"),
    ("image_class_labels.txt", 2, "99 1", r"line 2: image_id 99 is not listed"),
])
def test_cub_malformed_lines_name_file_and_line(cub, fname, line, text, match):
    path = cub / "CUB_200_2011" / fname
    replace_line(path, line, text)
    with pytest.raises(ValueError, match=match) as e:
        CUB200(cub, "train")
    assert str(path) in str(e.value)


def test_cub_unlabelled_image(cub):
    path = cub / "CUB_200_2011" / "image_class_labels.txt"
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"images.txt line 12: image_id 12 has no class"):
        CUB200(cub, "test")


@pytest.mark.parametrize("cls", [CUB200, Cars196, StanfordOnlineProducts])
def test_bad_split(cub, cls):
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'test', got 'val'"):
        cls(cub, "val")


def test_lazy_loading_and_check_files(cub):
    ds = CUB200(cub, "test")
    gone = ds.paths[3]
    gone.unlink()
    ds2 = CUB200(cub, "test")  # construction reads only the index files
    assert len(ds2) == 6
    ds2[2]
    with pytest.raises(FileNotFoundError) as e:
        ds2[3]
    assert str(gone) in str(e.value)
    with pytest.raises(FileNotFoundError, match="1 image file") as e:
        CUB200(cub, "test", check_files=True)
    assert str(gone) in str(e.value)
    CUB200(cub, "train", check_files=True)


def test_unreadable_image_names_path(cub):
    ds = CUB200(cub, "train")
    ds.paths[2].write_bytes(b"not an image")
    with pytest.raises(OSError, match="cannot read image") as e:
        ds[2]
    assert str(ds.paths[2]) in str(e.value)


# ------------------------------------------------------------------ Cars196
def test_cars_splits_labels_bboxes(cars):
    tr, te = Cars196(cars, "train"), Cars196(cars, "test")
    assert tr.labels.tolist() == [1, 1, 98, 98] and te.labels.tolist() == [99, 99, 196, 196]
    assert tr.classes == (1, 98) and te.classes == (99, 196)
    assert [p.name for p in tr.paths] == ["000001.jpg", "000002.png", "000003.jpg", "000004.jpg"]
    assert tr.bboxes.tolist()[1] == [1, 2, 11, 12]
    assert te.bboxes.shape == (4, 4)
    for ds in (tr, te):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 12, 18) and x.dtype == torch.float32 and y == int(ds.labels[i])
            assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert "Cars196" in repr(te)


def test_cars_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected the Cars196 DML layout") as e:
        Cars196(tmp_path, "train")
    assert str(tmp_path / "cars_annos.mat") in str(e.value)
    (tmp_path / "cars_annos.mat").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read") as e:
        Cars196(tmp_path, "train")
    assert str(tmp_path / "cars_annos.mat") in str(e.value)
    import scipy.io

    scipy.io.savemat(tmp_path / "cars_annos.mat", {"other": np.zeros(3)})
    with pytest.raises(ValueError, match=r"no 'annotations' variable \(found \['other'\]\)"):
        Cars196(tmp_path, "train")
    _make_cars(tmp_path, records=[(0, 0, 1, 1, 1, "car_ims/a.jpg", 0), (0, 0, 1, 1, 197, "car_ims/b.jpg", 0)])
    with pytest.raises(ValueError, match=r"annotation 2 of 2: class must be an integer in \[1, 196\], got 197"):
        Cars196(tmp_path, "test")
    _make_cars(tmp_path, records=[(0, 0, 1, 1, 1, "car_ims/a.jpg", 0)])
    with pytest.raises(FileNotFoundError) as e:
        Cars196(tmp_path, "train")
    assert str(tmp_path / "car_ims") in str(e.value)
    with pytest.raises(ValueError, match="lists no images of the 'test' split"):
        Cars196(tmp_path, "test")


def test_cars_single_record_and_missing_fields(tmp_path):
    _write_image(tmp_path / "car_ims" / "a.jpg", seed=1)
    _make_cars(tmp_path, records=[(0, 0, 1, 1, 5, "car_ims/a.jpg", 0)])
    ds = Cars196(tmp_path, "train")
    assert ds.labels.tolist() == [5] and ds[0][0].shape == (3, 12, 18)
    import scipy.io

    ann = np.zeros((1, 1), dtype=[("relative_im_path", "O")])
    ann[0, 0] = (np.array(["car_ims/a.jpg"]),)
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": ann})
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['class'\]"):
        Cars196(tmp_path, "train")


# ------------------------------------------------------------------ SOP
def test_sop_splits_and_labels(sop):
    tr, te = StanfordOnlineProducts(sop, "train"), SOP(sop / "Stanford_Online_Products", "test")
    assert tr.labels.tolist() == [1, 1, 2, 2] and te.labels.tolist() == [11319, 11319, 11320]
    assert tr.super_labels.tolist() == [1, 1, 2, 2] and te.super_labels.tolist() == [1, 1, 3]
    assert tr.classes == (1, 2) and te.n_classes == 2
    assert tr.paths[0] == sop / "Stanford_Online_Products" / "bicycle_final" / "1_1.JPG"
    x, y = tr[2]  # grayscale file
    assert x.shape == (3, 12, 18) and y == 2 and torch.equal(x[0], x[2])
    assert "StanfordOnlineProducts" in repr(te)


def test_sop_errors(sop):
    base = sop / "Stanford_Online_Products"
    (base / "Ebay_test.txt").unlink()
    StanfordOnlineProducts(sop, "train")  # only the split's own file is read
    with pytest.raises(FileNotFoundError, match="Stanford Online Products archive") as e:
        SOP(sop, "test")
    assert str(base / "Ebay_test.txt") in str(e.value)
    path = base / "Ebay_train.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + ["7 x 1 chair_final/a.JPG"] + lines[4:]) + "\n")
    with pytest.raises(ValueError, match=r"Ebay_train.txt line 4: class_id must be an integer, got 'x'"):
        SOP(sop, "train")
    path.write_text("\n".join(lines[:2] + ["7 1 1"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"line 3: expected 'image_id class_id super_class_id path'"):
        SOP(sop, "train")
    path.write_text("\n".join(["image_id class path"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"line 1: expected the header"):
        SOP(sop, "train")


# ------------------------------------------------------------------ transforms
def _gradient_image(w: int, h: int) -> Image.Image:
    """Left-to-right ramp: a horizontal flip is visible."""
    ramp = np.tile(np.linspace(0, 255, w, dtype=np.float64)[None, :, None], (h, 1, 3)).astype(np.uint8)
    return Image.fromarray(ramp, "RGB")


@pytest.mark.parametrize("wh", [(18, 12), (12, 40), (300, 200), (7, 7)])
def test_transform_shapes(wh):
    img = _gradient_image(*wh)
    for t in (train_transform(32, 40), eval_transform(32, 40), train_transform()):
        x = t(img)
        assert x.shape == (3, t.size, t.size) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # tensors in [0, 1] are accepted too
    x = eval_transform(16, 20)(torch.rand(3, wh[1], wh[0]))
    assert x.shape == (3, 16, 16)


def test_train_transform_is_reproducible_with_a_generator():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8), "RGB")
    ta, tb = (train_transform(24, 32, torch.Generator().manual_seed(7)) for _ in range(2))
    outs_a = [ta(img) for _ in range(6)]
    outs_b = [tb(img) for _ in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))
    assert len({x.sum().item() for x in outs_a}) > 1  # crops differ between calls
    # the global RNG is used (and reproducible) without a generator
    torch.manual_seed(3)
    g1 = [train_transform(24, 32)(img) for _ in range(3)]
    torch.manual_seed(3)
    g2 = [train_transform(24, 32)(img) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(g1, g2))


def test_train_transform_flips_sometimes_and_eval_never():
    img = _gradient_image(16, 16)
    plain = eval_transform(16, 16)(img)
    assert bool((plain[0, 0, 1:] >= plain[0, 0, :-1]).all())  # increasing ramp, unflipped
    t = train_transform(16, 16, torch.Generator().manual_seed(0))
    outs = [t(img) for _ in range(40)]
    flips = sum(torch.equal(x, plain.flip(-1)) for x in outs)
    keeps = sum(torch.equal(x, plain) for x in outs)
    assert flips + keeps == 40 and 5 <= flips <= 35


def test_eval_transform_centre_crop():
    arr = np.zeros((10, 10, 3), dtype=np.uint8)
    arr[3:7, 3:7] = 255
    x = eval_transform(4, 10)(Image.fromarray(arr, "RGB"))
    assert torch.equal(x, torch.ones(3, 4, 4))


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="resize must be >= size"):
        train_transform(224, 200)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        train_transform(generator=3)
    with pytest.raises(TypeError, match="image must be a PIL.Image.Image or a"):
        eval_transform()(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match=r"shape \(3, H, W\)"):
        eval_transform()(torch.rand(1, 8, 8))
    assert "centre crop" in repr(eval_transform()) and "flip" in repr(train_transform())


# ------------------------------------------------------------------ factory
def test_factory(cub, tmp_path):
    _make_cars(tmp_path)
    _make_sop(tmp_path)
    for name, cls in (("cub", CUB200), ("CARS196", Cars196), ("sop", StanfordOnlineProducts)):
        ds = retrieval_dataset(name, tmp_path, "test", size=16, resize=20)
        assert type(ds) is cls and isinstance(ds.transform, ResizeCrop) and not ds.transform.train
        x, y = ds[0]
        assert x.shape == (3, 16, 16) and y == int(ds.labels[0])
    d1 = retrieval_dataset("cub", cub, "train", train=True, size=8, resize=12,
                           generator=torch.Generator().manual_seed(1))
    d2 = retrieval_dataset("cub", cub, "train", train=True, size=8, resize=12,
                           generator=torch.Generator().manual_seed(1))
    assert d1.transform.train
    assert all(torch.equal(d1[i][0], d2[i][0]) for i in range(len(d1)))
    loader = torch.utils.data.DataLoader(d1, batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 8, 8) and yb.tolist() == [1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"name must be one of 'cub', 'cars196', 'sop', got 'imagenet'"):
        retrieval_dataset("imagenet", cub, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        retrieval_dataset("cub", cub, "validation")
