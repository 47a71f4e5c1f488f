"""`whymatch explain-avsl`: load a `whymatch train avsl` run and explain a query against references."""

from __future__ import annotations

import json

import pytest
import torch

from whymatch import cli
from whymatch.jobs import load_avsl_run


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("avsl") / "run"
    args = ["train", "avsl", "--data", "shapesworld", "--image-size", "32", "--n-train", "180", "--n-test", "60",
            "--batch-p", "3", "--batch-k", "2", "--batches-per-epoch", "2", "--embedding-dim", "8", "--topk", "4",
            "--epochs", "1", "--out", str(out), "--quiet", "--device", "cpu"]
    assert cli.main(args) == 0
    return out


def _images(tmp_path, n):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        arr = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        p = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    return paths


def test_load_avsl_run_weights_agree(run_dir):
    a, size = load_avsl_run(run_dir, "model")
    b, _ = load_avsl_run(run_dir, "checkpoint")
    assert size == 32 and not a.training
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ea, eb = a.encode(x), b.encode(x)
    torch.testing.assert_close(a.distance(ea, ea), b.distance(eb, eb), rtol=0, atol=0)
    assert torch.equal(a.edges_0, b.edges_0) and bool(a.edges_0.abs().sum() > 0)  # trained edges came along


def test_cli_explain_avsl_writes_the_report(run_dir, tmp_path, capsys):
    q, r1, r2 = _images(tmp_path, 3)
    out = tmp_path / "report"
    assert cli.main(["explain-avsl", q, r1, r2, "--run", str(run_dir), "--out", str(out), "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert "img1.png" in printed and "img2.png" in printed and "level2_top_node" in printed
    html = (out / "index.html").read_text()
    assert "img0.png vs img1.png" in html and "img0.png vs img2.png" in html
    # the reported distance is the model's overall distance of the pair
    from whymatch.io import load_image
    from whymatch.jobs import run_avsl_explain

    rows, _ = run_avsl_explain(run_dir, q, [r1], tmp_path / "again", top=2)
    avsl, _ = load_avsl_run(run_dir)
    e = avsl.encode(torch.stack([load_image(q, size=(32, 32)), load_image(r1, size=(32, 32))]))
    want = float(avsl.distance(e.select(torch.tensor([0])), e.select(torch.tensor([1]))).detach()[0, 0])
    assert rows[0]["distance"] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_cli_explain_avsl_errors(run_dir, tmp_path, capsys):
    q, r = _images(tmp_path, 2)
    out = tmp_path / "never"
    assert cli.main(["explain-avsl", q, r, "--run", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert cli.main(["explain-avsl", q, str(tmp_path / "missing.png"), "--run", str(run_dir), "--out", str(out)]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert cli.main(["explain-avsl", q, r, "--run", str(run_dir), "--out", str(out), "--top", "9"]) == 2
    assert "top must be <=" in capsys.readouterr().err
    assert not out.exists()
    other = tmp_path / "mining"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"task": "mining"}))
    torch.save({}, other / "model.pt")
    assert cli.main(["explain-avsl", q, r, "--run", str(other), "--out", str(out)]) == 2
    assert "not 'avsl'" in capsys.readouterr().err
