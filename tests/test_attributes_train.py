"""SANE attribute training: learning, exact resume, best.pt, DDP (gloo, two CPU processes), `whymatch train sane`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from whymatch import SimilarityModel, cli
from whymatch.attributes.cache import MANIFEST, SaliencyCache
from whymatch.attributes.losses import AttributeLoss
from whymatch.attributes.model import AttributeModel, load_attribute_model
from whymatch.attributes.train import AttributeImages, AttributeTrainer
from whymatch.data import TEST_CLASSES, TRAIN_CLASSES, ShapesWorld
from whymatch.data.shapesworld import ATTRIBUTE_NAMES
from whymatch.models import ShapesCNN
from whymatch.saliency import RISE
from whymatch.train import BEST, CHECKPOINT, METRICS_LOG

SIZE = 32


pytestmark = pytest.mark.usefixtures("single_thread")



class _Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = ShapesCNN(8, (8, 16, 16, 16))
        self.net.fc = nn.Identity()

    def forward(self, x):
        return self.net.feature_maps(x)


def _data(n_train=64, n_val=48):
    out = []
    for split, n, cls in (("train", n_train, TRAIN_CLASSES[:8]), ("test", n_val, TEST_CLASSES[:8])):
        ds = ShapesWorld(split, n, SIZE, seed=0, classes=cls)
        attrs = torch.stack([ds.attributes(i, which="all") for i in range(n)])
        out.append(AttributeImages(ds.images(dtype=torch.uint8), attrs, ATTRIBUTE_NAMES, ds.labels))
    return out


def _cache(train, path):
    torch.manual_seed(0)
    sim = SimilarityModel(ShapesCNN(8, (4, 8, 8, 8))).eval()
    return SaliencyCache.build(sim, train, path, k=2, labels=train.labels, size=8, n_masks=8, batch_size=8)


def _trainer(out, train, val, cache, *, epochs=2, lam=5e-3, **kw):
    torch.manual_seed(0)
    model = AttributeModel(_Trunk(), len(ATTRIBUTE_NAMES), attribute_names=ATTRIBUTE_NAMES)
    kw.setdefault("flip", True)
    return AttributeTrainer(model, AttributeLoss(lam, temperature=0.05), train, out_dir=out, val_set=val, cache=cache,
                            epochs=epochs, batch_size=16, lr=2e-3, seed=3, show_progress=False, **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    train, val = _data()
    cache = _cache(train, tmp_path_factory.mktemp("cache") / "saliency")
    return train, val, cache


# ------------------------------------------------------------------ trainer
def test_trainer_learns(tmp_path, data):
    train, val, cache = data
    tr = _trainer(tmp_path / "run", train, val, cache, epochs=5)
    hist = tr.fit()
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, 5]
    assert hist[-1]["total"] < hist[0]["total"] and hist[-1]["huber"] < hist[0]["huber"]
    assert hist[-1]["matching"] > 0
    assert hist[-1]["map"] > hist[0]["map"] + 0.02                            # about 0.53 -> 0.58
    assert hist[1]["lr"] == pytest.approx(2e-3 * 0.985)                       # lr * 0.985^epoch
    lines = [json.loads(x) for x in (tmp_path / "run" / METRICS_LOG).read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3, 4, 5] and "map_logits" in lines[0]


def test_resume_gives_identical_weights(tmp_path, data):
    train, val, cache = data
    straight = _trainer(tmp_path / "a", train, val, cache)
    straight.fit()
    first = _trainer(tmp_path / "b", train, val, cache)
    first.fit(stop_after=1)
    assert first.epoch == 1 and (tmp_path / "b" / CHECKPOINT).is_file()
    resumed = _trainer(tmp_path / "b", train, val, cache)
    resumed.fit(resume=True)
    assert resumed.epoch == 2
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    assert resumed.history == [{**h, "train_time_s": r["train_time_s"], "eval_time_s": r["eval_time_s"]}
                               for h, r in zip(straight.history, resumed.history)]
    with pytest.raises(ValueError, match="batch_size"):
        AttributeTrainer(_trainer(tmp_path / "c", train, val, cache).model, AttributeLoss(), train,
                         out_dir=tmp_path / "b", batch_size=8, seed=3).fit(resume=True)


def test_best_pt_is_kept_by_validation_map(tmp_path, data, monkeypatch):
    train, val, cache = data
    tr = _trainer(tmp_path / "run", train, val, None, epochs=3, lam=0.0)
    maps = iter([0.5, 0.7, 0.6])
    monkeypatch.setattr(tr, "evaluate", lambda: {"map": next(maps), "map_logits": 0.0, "ap": {}})
    tr.fit()
    best = torch.load(tmp_path / "run" / BEST, weights_only=True)
    assert best["epoch"] == 2 and best["map"] == 0.7 and tr.best_map == 0.7
    assert [h["map"] for h in tr.history] == [0.5, 0.7, 0.6]


def test_trainer_bad_arguments(tmp_path, data):
    train, val, cache = data
    model = AttributeModel(_Trunk(), 18)
    with pytest.raises(TypeError, match="model must be a whymatch.attributes.AttributeModel"):
        AttributeTrainer(model.trunk, AttributeLoss(), train, out_dir=tmp_path)
    with pytest.raises(TypeError, match="loss must be a whymatch.attributes.AttributeLoss"):
        AttributeTrainer(model, nn.MSELoss(), train, out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"cache must have one row per train_set item \(48\), got 64"):
        AttributeTrainer(model, AttributeLoss(), val, out_dir=tmp_path, cache=cache)
    with pytest.raises(ValueError, match="lr_decay must be in"):
        AttributeTrainer(model, AttributeLoss(), train, out_dir=tmp_path, lr_decay=1.5)
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        AttributeTrainer(model, AttributeLoss(), train, out_dir=tmp_path / "none").fit(resume=True)


# ------------------------------------------------------------------ DDP, gloo, 2 CPU processes
def _ddp_body(rank, out):
    train, val = _data()
    cache = _cache(train, f"{out}/saliency")        # rows split across the ranks
    tr = _trainer(f"{out}/run", train, val, cache, epochs=1)
    tr.fit()
    return {"indices": tr.last_epoch_indices, "model": tr.model.state_dict(), "map": tr.history[-1]["map"],
            "steps": tr.global_step}


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    from helpers import run_two_gloo_ranks

    r0, r1 = run_two_gloo_ranks(_ddp_body, tmp_path)
    assert r0["steps"] == r1["steps"] == 2                                    # 64 / 2 ranks / 16
    assert not set(r0["indices"].tolist()) & set(r1["indices"].tolist())    # disjoint shards
    assert len(set(r0["indices"].tolist()) | set(r1["indices"].tolist())) == 64
    for (name, a), (_, b) in zip(r0["model"].items(), r1["model"].items()):
        assert torch.equal(a, b), name
    assert r0["map"] == r1["map"]
    torch.manual_seed(0)
    init = AttributeModel(_Trunk(), 18)
    assert not torch.equal(init.state_dict()["conv.weight"], r0["model"]["conv.weight"])
    # the cache both ranks filled equals a single-process build
    train, _ = _data()
    single = _cache(train, tmp_path / "single")
    shared = SaliencyCache.open(tmp_path / "saliency")
    assert shared.manifest["world_size"] == 2
    assert torch.equal(shared.references, single.references)
    np.testing.assert_array_equal(np.asarray(shared.maps), np.asarray(single.maps))


# ------------------------------------------------------------------ CLI
_CLI = ["train", "sane", "--data", "shapesworld", "--image-size", "32", "--n-train", "48", "--n-val", "32",
        "--batch-size", "16", "--n-masks", "8", "--k-maps", "2", "--saliency-size", "8", "--quiet"]


def test_cli_train_sane_and_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli.main(_CLI + ["--out", str(out), "--epochs", "1"]) == 0
    text = capsys.readouterr().out
    assert "trained 1 epochs; attribute mAP" in text and "Recall" not in text
    assert (out / "saliency" / MANIFEST).is_file()
    calls = []
    orig = RISE.attribute
    monkeypatch.setattr(RISE, "attribute", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    assert cli.main(_CLI + ["--out", str(out), "--epochs", "2", "--resume"]) == 0
    assert "trained 2 epochs" in capsys.readouterr().out
    assert calls == []                                   # the saliency maps were reused
    assert len((out / METRICS_LOG).read_text().splitlines()) == 2
    model = load_attribute_model(out / "model.pt")
    assert model.attribute_names == ATTRIBUTE_NAMES
    assert load_attribute_model(out / BEST).n_attributes == 18
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lam"] == 5e-3 and cfg["k_maps"] == 2 and cfg["data"] == "shapesworld"


def test_cli_train_sane_without_matching_builds_no_cache(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_CLI + ["--out", str(out), "--epochs", "1", "--lam", "0"]) == 0
    assert "attribute mAP" in capsys.readouterr().out
    assert not (out / "saliency").exists()


def test_cli_train_sane_errors(tmp_path, capsys):
    o = str(tmp_path / "o")
    assert cli.main(["train", "sane", "--data", "imagenet", "--out", o]) == 2
    assert "argument --data: must be shapesworld or one of" in capsys.readouterr().err
    assert cli.main(["train", "sane", "--data", "awa2", "--out", o]) == 2
    assert "awa2:/path" in capsys.readouterr().err
    assert cli.main(["train", "sane", "--data", f"polyvore:{tmp_path}/missing", "--out", o]) == 2
    assert "missing" in capsys.readouterr().err
    assert cli.main(["train", "sane", "--data", "shapesworld", "--out", o, "--lam", "-1"]) == 2
    assert "argument --lam: must be a finite number >= 0" in capsys.readouterr().err
    assert cli.main(["train", "sane", "--data", "shapesworld", "--out", o, "--backbone", "vgg"]) == 2


@pytest.mark.slow
def test_cli_train_sane_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m whymatch.cli train sane ...`: two gloo ranks, rank 0 writes and reports."""
    from helpers import torchrun_cli

    out = tmp_path / "run"
    p = torchrun_cli(*_CLI, "--epochs", "1", "--out", out, "--device", "cpu")
    assert p.stdout.count("trained 1 epochs; attribute mAP") == 1    # only rank 0 reports
    ck = torch.load(out / CHECKPOINT, weights_only=True)
    assert ck["epoch"] == 1 and ck["global_step"] == 2                  # 48 images / 2 ranks / 16
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert json.loads((out / "saliency" / MANIFEST).read_text())["world_size"] == 2
    assert (out / "model.pt").is_file()
