"""Fault injection for the checkpoint writer: the N-th write or rename of a training run fails; the previous
checkpoint, best.pt, metrics.jsonl and config.json are intact (or the complete new version), nothing half-written
or temporary is left, metrics.jsonl never runs ahead of the checkpoint, and a later resume ends with the weights
of an uninterrupted run."""

from __future__ import annotations

import json
import os

import pytest
import torch

import whymatch.io as wio
from whymatch import SimilarityModel
from whymatch.attributes.losses import AttributeLoss
from whymatch.attributes.model import build_attribute_model
from whymatch.attributes.train import AttributeImages, AttributeTrainer
from whymatch.data import TEST_CLASSES, TRAIN_CLASSES, ShapesWorld
from whymatch.data.shapesworld import ATTRIBUTE_NAMES
from whymatch.io import load_torch_file
from whymatch.mining import SimilarityMiningLoss
from whymatch.models import ShapesCNN
from whymatch.train import CHECKPOINT, TensorImages, Trainer, build_metric_loss, random_flip

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 32
FILES = ("checkpoint.pt", "best.pt", "metrics.jsonl", "config.json", "model.pt")


class _Fault(OSError):
    pass


def _fail_nth(monkeypatch, what: str, n: int) -> list:
    """Make the n-th os.replace (rename) or os.fsync (write) of whymatch.io's atomic writer raise."""
    import stat

    calls = []
    real = getattr(os, what)

    def faulty(*args, **kwargs):
        if what == "fsync" and not stat.S_ISREG(os.fstat(args[0]).st_mode):
            return real(*args, **kwargs)  # a directory's fsync after the rename: not a write of the file
        calls.append(args)
        if len(calls) == n:
            raise _Fault(f"injected failure of {what} #{n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(wio.os, what, faulty)
    return calls


def _snapshot(out):
    return {n: (out / n).read_bytes() for n in FILES if (out / n).exists()}


def _check_consistent(out, before: dict) -> None:
    """Every run file is its previous version or a complete new one; nothing temporary is left; the metrics
    never run ahead of the checkpoint."""
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    for name in FILES:
        p = out / name
        if not p.exists():
            assert name not in before, name
            continue
        if p.read_bytes() == before.get(name):
            continue
        if name.endswith(".pt"):
            load_torch_file(p, name)  # complete and loadable
        elif name == "config.json":
            json.loads(p.read_text())
        else:
            [json.loads(x) for x in p.read_text().splitlines()]
    ckpt = load_torch_file(out / CHECKPOINT, "checkpoint")
    n_metrics = len((out / "metrics.jsonl").read_text().splitlines())
    assert n_metrics <= ckpt["epoch"] and ckpt["epoch"] >= 1


# ------------------------------------------------------------------ mining Trainer
@pytest.fixture(scope="module")
def data():
    tr = ShapesWorld("train", 48, SIZE, seed=0, classes=TRAIN_CLASSES[:6])
    te = ShapesWorld("test", 20, SIZE, seed=0, classes=TEST_CLASSES[:4])
    return TensorImages(tr.images(dtype=torch.uint8), tr.labels), TensorImages(te.images(), te.labels)


def _trainer(out, data):
    torch.manual_seed(0)
    train, test = data
    model = SimilarityModel(ShapesCNN(8, (4, 8, 8, 8)))
    loss = SimilarityMiningLoss("triplet", metric_loss=build_metric_loss("proxyanchor", 6, 8), target_layers="layer4")
    return Trainer(model, loss, train, out_dir=out, test_set=test, epochs=3, batch_p=3, batch_k=2, lr=1e-3, seed=7,
                   augment=random_flip, batches_per_epoch=1, show_progress=False)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    t = _trainer(tmp_path_factory.mktemp("straight") / "run", data)
    t.fit()
    return {k: v.clone() for k, v in t.model.state_dict().items()}


# the resumed fit writes metrics.jsonl and config.json, then per epoch [best.pt], checkpoint.pt, metrics.jsonl
@pytest.mark.parametrize("what", ["replace", "fsync"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_failed_write_keeps_the_previous_run_and_resume_recovers(tmp_path, data, straight, monkeypatch, what, n):
    out = tmp_path / "run"
    _trainer(out, data).fit(stop_after=1)
    before = _snapshot(out)
    calls = _fail_nth(monkeypatch, what, n)
    with pytest.raises(_Fault):
        _trainer(out, data).fit(resume=True)
    assert len(calls) == n
    monkeypatch.undo()
    _check_consistent(out, before)
    resumed = _trainer(out, data)
    resumed.fit(resume=True)
    assert resumed.epoch == 3
    for name, w in resumed.model.state_dict().items():
        assert torch.equal(w, straight[name]), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]


def test_half_written_checkpoint_never_replaces_the_previous_one(tmp_path, data, monkeypatch):
    out = tmp_path / "run"
    _trainer(out, data).fit(stop_after=1)
    before = _snapshot(out)
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):  # a disk that fills up halfway through the file
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise _Fault("No space left on device")

    monkeypatch.setattr(wio.torch, "save", broken_save)
    with pytest.raises(_Fault):
        _trainer(out, data).fit(resume=True)
    monkeypatch.undo()
    assert (out / CHECKPOINT).read_bytes() == before[CHECKPOINT]
    _check_consistent(out, before)


# ------------------------------------------------------------------ SANE trainer
def _sane_trainer(out):
    ds = ShapesWorld("train", 16, SIZE, seed=0, classes=TRAIN_CLASSES[:4])
    attrs = torch.stack([ds.attributes(i, which="all") for i in range(16)])
    train = AttributeImages(ds.images(dtype=torch.uint8), attrs, ATTRIBUTE_NAMES, ds.labels)
    torch.manual_seed(0)
    model = build_attribute_model("shapes", len(ATTRIBUTE_NAMES), attribute_names=ATTRIBUTE_NAMES)
    return AttributeTrainer(model, AttributeLoss(0.0), train, out_dir=out, val_set=train, epochs=2, batch_size=8,
                            lr=1e-3, show_progress=False)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_sane_failed_write_keeps_the_previous_run_and_resume_recovers(tmp_path, monkeypatch, n):
    ref = _sane_trainer(tmp_path / "ref")
    ref.fit()
    out = tmp_path / "run"
    _sane_trainer(out).fit(stop_after=1)
    before = _snapshot(out)
    _fail_nth(monkeypatch, "replace", n)
    with pytest.raises(_Fault):
        _sane_trainer(out).fit(resume=True)
    monkeypatch.undo()
    _check_consistent(out, before)
    resumed = _sane_trainer(out)
    resumed.fit(resume=True)
    for name, w in resumed.model.state_dict().items():
        assert torch.equal(w, ref.model.state_dict()[name]), name
