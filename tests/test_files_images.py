"""Image files: every PIL mode by its real range (16-bit no longer clipped to white), EXIF orientation,
frames, decompression bombs, broken files and bad size arguments."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from whymatch.io import check_image_size, load_image, pil_to_rgb, pil_to_tensor


def _ramp16(h=12, w=10) -> np.ndarray:
    return np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)


def _grey(t: torch.Tensor) -> torch.Tensor:
    assert t.shape[0] == 3 and t.dtype == torch.float32
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])
    return t[0]


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "PPM"])
def test_16_bit_grey_files_keep_their_range(tmp_path, fmt):
    arr = _ramp16()
    path = tmp_path / f"g.{fmt.lower()}"
    Image.fromarray(arr).save(path, fmt)
    with Image.open(path) as im:
        mode = im.mode                                      # I;16 (PNG, TIFF) or I (16-bit PGM)
    assert mode in ("I;16", "I")
    g = _grey(load_image(path))
    torch.testing.assert_close(g, torch.from_numpy(arr.astype(np.float32) / 65535), rtol=0, atol=1e-7)
    assert float((g == 1).float().mean()) < 0.01                # the old defect: 99.6% white
    small = _grey(load_image(path, size=(6, 5)))
    assert small.shape == (6, 5) and 0.4 < float(small.mean()) < 0.6 and float(small.max()) <= 1


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_16_bit_modes_of_every_byte_order(mode):
    arr = _ramp16()
    raw = arr.astype(">u2" if mode == "I;16B" else "<u2" if mode in ("I;16", "I;16L") else "=u2").tobytes()
    im = Image.frombytes(mode, (arr.shape[1], arr.shape[0]), raw)
    want = torch.from_numpy(arr.astype(np.float32) / 65535)
    torch.testing.assert_close(_grey(pil_to_tensor(im)), want, rtol=0, atol=1e-7)
    rgb = pil_to_rgb(im)
    assert rgb.mode == "RGB" and np.abs(np.asarray(rgb)[..., 0] / 255.0 - want.numpy()).max() <= 0.5 / 255 + 1e-6


def test_32_bit_int_and_float_modes():
    ok = Image.fromarray(_ramp16().astype(np.int32))            # mode I with 16-bit values
    assert ok.mode == "I"
    torch.testing.assert_close(_grey(pil_to_tensor(ok)), torch.from_numpy(_ramp16() / 65535.0).float())
    for bad, rng in ((np.full((3, 3), 70000, np.int32), r"\[70000, 70000\]"), (np.full((3, 3), -1, np.int32), r"\[-1")):
        with pytest.raises(ValueError, match=f"mode 'I' .* must hold 16-bit values in \\[0, 65535\\], got values in {rng}"):
            pil_to_tensor(Image.fromarray(bad))
    f = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    torch.testing.assert_close(_grey(pil_to_tensor(Image.fromarray(f, "F"))), torch.from_numpy(f))
    for bad, pattern in ((f * 2, r"values in \[0, 1\], got values in \[0, 2\]"), (f - 0.5, r"got values in \[-0.5"),
                         (np.where(f > 0.5, np.nan, f).astype(np.float32), "must be finite, got 6 NaN"),
                         (np.full((2, 2), np.inf, np.float32), "must be finite")):
        with pytest.raises(ValueError, match=pattern):
            pil_to_tensor(Image.fromarray(bad, "F"))


EIGHT_BIT = {
    "1": 1, "L": 200, "P": 3, "LA": (200, 7), "PA": (3, 9), "RGB": (10, 200, 30), "RGBA": (10, 200, 30, 0),
    "RGBX": (10, 200, 30, 0), "CMYK": (0, 255, 255, 0), "YCbCr": (76, 85, 255), "LAB": (136, 208, 195),
    "HSV": (85, 255, 255), "RGBa": (100, 0, 0, 128),
}


@pytest.mark.parametrize("mode", sorted(EIGHT_BIT))
def test_8_bit_modes_match_pil_conversion(mode):
    im = Image.new(mode, (5, 4), EIGHT_BIT[mode])
    if mode in ("P", "PA"):
        im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 40, 90, 250] * 64)
    t = pil_to_tensor(im)
    want = np.asarray(im.convert("RGBA" if mode in ("P", "PA") else "RGB"))[..., :3] / 255.0
    assert t.shape == (3, 4, 5) and t.dtype == torch.float32
    torch.testing.assert_close(t.permute(1, 2, 0), torch.from_numpy(want).float())
    assert 0 <= float(t.min()) and float(t.max()) <= 1


def test_palette_with_transparency_and_colour_conversions(tmp_path, recwarn):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.info["transparency"] = b"\x00\xff" + b"\xff" * 254      # the bytes form PIL warns about
    t = pil_to_tensor(im)
    assert torch.equal(t[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # the palette colour, alpha dropped
    assert not [w for w in recwarn if "Transparency" in str(w.message)]
    red = pil_to_tensor(Image.new("CMYK", (1, 1), (0, 255, 255, 0)))[:, 0, 0]
    assert red[0] > 0.95 and red[1] < 0.05 and red[2] < 0.05
    lab_red = pil_to_tensor(Image.new("LAB", (1, 1), (136, 208, 195)))[:, 0, 0]  # not a raw copy of L, a, b
    assert lab_red[0] > 0.9 and lab_red[1] < 0.1


def test_exif_orientation_and_frames(tmp_path):
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    exif = Image.Exif()
    exif[0x0112] = 6                                             # rotate 90 degrees clockwise to display
    Image.fromarray(arr, "L").save(tmp_path / "o.png", exif=exif.tobytes())
    t = _grey(load_image(tmp_path / "o.png"))
    assert t.shape == (3, 2)
    torch.testing.assert_close(t, torch.from_numpy(np.rot90(arr, -1).copy() / 255.0).float())
    frames = [Image.new("L", (4, 4), v) for v in (10, 200, 90)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with Image.open(tmp_path / "a.gif") as im:
        assert im.n_frames == 3
    first = load_image(tmp_path / "a.gif")
    assert abs(float(first.mean()) - 10 / 255) < 2 / 255       # the first frame


def test_decompression_bombs_are_refused_by_name(tmp_path, monkeypatch):
    Image.new("L", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)       # 1,600 pixels: above the limit (PIL warns)
    with pytest.warns(Image.DecompressionBombWarning), \
            pytest.raises(ValueError, match=r"big.png is too large to decode safely .*1,600 pixels, limit 1,000"):
        load_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)        # above twice the limit (PIL raises)
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"size \(20, 20\) is 400 pixels, above the limit of 100"):
        load_image(tmp_path / "big.png", size=20)


def test_broken_files_and_paths(tmp_path):
    Image.fromarray(_ramp16(64, 64)).save(tmp_path / "g.png")
    data = (tmp_path / "g.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "header.png").write_bytes(data[:40])
    for name in ("trunc.png", "empty.png", "text.png", "header.png"):
        with pytest.raises(ValueError, match=f"{name} is not a readable image") as info:
            load_image(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"image file not found: .* \(a directory\)"):
        load_image(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="image path must be a str or os.PathLike"):
        load_image(3)
    with pytest.raises(ValueError, match="image must not be empty, got 0 x 3"):
        pil_to_tensor(Image.new("RGB", (0, 3)))
    with pytest.raises(TypeError, match="image must be a PIL.Image.Image, got ndarray"):
        pil_to_tensor(np.zeros((2, 2, 3)))


@pytest.mark.parametrize("size, error, pattern", [
    (0, ValueError, "size must be >= 1 on each side, got 0"), (-3, ValueError, ">= 1"),
    ((4, 0), ValueError, r"got \(4, 0\)"), (2.0, TypeError, "int or an"), ((4, 4.0), TypeError, "int or an"),
    (True, TypeError, "int or an"), ((4,), TypeError, "int or an"), ("8", TypeError, "int or an"),
    (30000, ValueError, "900,000,000 pixels, above the limit"), ((10**9, 10**9), ValueError, "above the limit"),
])
def test_bad_sizes_are_refused_before_reading(tmp_path, size, error, pattern):
    with pytest.raises(error, match=pattern):
        load_image(tmp_path / "missing.png", size=size)          # the size is checked first
    with pytest.raises(error, match=pattern):
        check_image_size(size)


def test_good_sizes_and_8_bit_unchanged(tmp_path):
    arr = (np.arange(7 * 9 * 3) % 256).astype(np.uint8).reshape(7, 9, 3)
    Image.fromarray(arr).save(tmp_path / "c.png")
    t = load_image(tmp_path / "c.png")
    assert torch.equal(t, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    assert load_image(tmp_path / "c.png", size=4).shape == (3, 4, 4)
    assert load_image(tmp_path / "c.png", size=(np.int64(3), 5)).shape == (3, 3, 5)
    want = np.asarray(Image.fromarray(arr).resize((5, 3), Image.BILINEAR)) / 255.0
    torch.testing.assert_close(load_image(tmp_path / "c.png", size=(3, 5)).permute(1, 2, 0),
                               torch.from_numpy(want).float())
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    (tmp_path / "c.jpg").write_bytes(buf.getvalue())
    assert load_image(tmp_path / "c.jpg").shape == (3, 7, 9)
