"""Overlays, image loading, atomic output and the HTML report."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from whymatch.io import atomic_output_dir, load_image
from whymatch.viz import colorize, format_table, overlay, write_report


def test_colorize_and_overlay():
    s = torch.rand(10, 12)
    c = colorize(s)
    assert c.shape == (10, 12, 3) and c.dtype == np.uint8
    assert colorize(torch.zeros(4, 4)).shape == (4, 4, 3)  # constant map: no NaN warnings, valid colours
    signed = colorize(torch.tensor([[-1.0, 0.0, 1.0]]), signed=True)
    assert tuple(signed[0, 1]) == (255, 255, 255)
    img = overlay(torch.rand(3, 20, 24), torch.rand(5, 6))
    assert img.size == (24, 20)


def test_load_image_modes_and_errors(tmp_path):
    Image.fromarray(np.full((6, 5), 128, np.uint8), "L").save(tmp_path / "g.png")
    Image.fromarray(np.zeros((6, 5, 4), np.uint8), "RGBA").save(tmp_path / "a.png")
    g = load_image(tmp_path / "g.png")
    assert g.shape == (3, 6, 5) and abs(g.mean().item() - 128 / 255) < 1e-6
    assert load_image(tmp_path / "a.png", size=(8, 9)).shape == (3, 8, 9)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png is not a readable image"):
        load_image(tmp_path / "text.png")


def test_atomic_output_dir_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.html").write_text("x")
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        (tmp / "done.html").write_text("ok")
    assert (out / "done.html").read_text() == "ok" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_report(tmp_path):
    q, r = torch.rand(3, 16, 16), torch.rand(3, 16, 16)
    key = torch.zeros(16, 16, dtype=torch.bool)
    key[4:8, 4:8] = True
    pairs = [{"name": "<script>alert(1)</script>", "query": q, "references": [r, r],
              "maps": {"rise": torch.rand(2, 16, 16), "sliding": torch.rand(2, 16, 16)},
              "metrics": {"rise": [{"pointing": True}, {"pointing": False}]}, "key_mask": key}]
    index = write_report(tmp_path / "rep", pairs, [{"method": "rise", "auc": 0.5}])
    text = index.read_text()
    assert "<script>alert" not in text and "&lt;script&gt;" in text
    import re
    for src in re.findall(r"src='([^']+)'", text):
        assert (index.parent / src).is_file()
    assert "p0_ref1_sliding.png" in text


def test_format_table():
    t = format_table([{"method": "rise", "auc": 0.51234}, {"method": "chance", "extra": True}])
    lines = t.splitlines()
    assert lines[0].startswith("| method") and "0.512" in t and "yes" in t and len(lines) == 4


def test_atomic_torch_save_keeps_the_old_file_on_error(tmp_path):
    from whymatch.io import atomic_torch_save

    path = tmp_path / "ck.pt"
    atomic_torch_save({"a": torch.ones(2)}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left


def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path):
    import os
    import stat

    from whymatch.io import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "b.txt", "w") as f:
            f.write("x")
        mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
        assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.txt") == 0o640
        os.chmod(tmp_path / "a.txt", 0o604)  # replacing a file keeps its mode
        atomic_write_text(tmp_path / "a.txt", "y")
        assert mode(tmp_path / "a.txt") == 0o604 and (tmp_path / "a.txt").read_text() == "y"
    finally:
        os.umask(old)
