"""Resume refuses changed settings (each named, stored and requested value), and a new run never overwrites a
finished one without --overwrite: library Trainer / AttributeTrainer and the three `whymatch train` commands."""

from __future__ import annotations

import json

import pytest
import torch

from whymatch import SimilarityModel, cli
from whymatch.attributes.losses import AttributeLoss
from whymatch.attributes.model import build_attribute_model
from whymatch.attributes.train import AttributeImages, AttributeTrainer
from whymatch.data import TEST_CLASSES, TRAIN_CLASSES, ShapesWorld
from whymatch.data.shapesworld import ATTRIBUTE_NAMES
from whymatch.mining import SimilarityMiningLoss
from whymatch.models import ShapesCNN
from whymatch.train import CHECKPOINT, RESUMABLE, TensorImages, Trainer, build_metric_loss, random_flip

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 32
RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.jsonl", "config.json")


@pytest.fixture(scope="module")
def data():
    tr = ShapesWorld("train", 48, SIZE, seed=0, classes=TRAIN_CLASSES[:6])
    te = ShapesWorld("test", 20, SIZE, seed=0, classes=TEST_CLASSES[:4])
    return TensorImages(tr.images(dtype=torch.uint8), tr.labels), TensorImages(te.images(), te.labels)


def _trainer(out, data, *, dim=8, gamma=1.0, mode="triplet", **kw):
    torch.manual_seed(0)
    train, test = data
    model = SimilarityModel(ShapesCNN(dim, (4, 8, 8, 8)))
    loss = SimilarityMiningLoss(mode, metric_loss=build_metric_loss("proxyanchor", 6, dim), gamma=gamma,
                                target_layers="layer4")
    kw = {"epochs": 2, "batches_per_epoch": 1, "lr": 1e-3, "show_progress": False, "augment": random_flip, **kw}
    return Trainer(model, loss, train, out_dir=out, test_set=test, batch_p=3, batch_k=2, seed=7, **kw)


def _snapshot(out):
    return {n: (out / n).read_bytes() for n in RUN_FILES if (out / n).exists()}


# ------------------------------------------------------------------ library: changed settings
@pytest.mark.parametrize("change, named", [
    (dict(lr=0.5), ["lr 0.001 in the checkpoint, 0.5 now"]),
    (dict(gamma=7.0), ["loss_module"]),
    (dict(mode="siamese"), ["loss_module"]),
    (dict(dim=16), ["model_architecture"]),
    (dict(batches_per_epoch=2), ["steps_per_epoch 1 in the checkpoint, 2 now"]),
    (dict(scheduler="none"), ['scheduler "cosine" in the checkpoint, "none" now']),
    (dict(weight_decay=0.1, seed=3), ["weight_decay", "seed 7"]),
    (dict(config={"note": "x"}), ['note (absent) in the checkpoint, "x" now']),
    (dict(augment=None), ["augment"]),
    (dict(grad_clip=1.0), ["grad_clip null in the checkpoint, 1.0 now"]),
])
def test_library_resume_refuses_every_changed_setting(tmp_path, data, change, named):
    _trainer(tmp_path, data).fit(stop_after=1)
    before = _snapshot(tmp_path)
    kw = dict(change)
    if "seed" in kw:  # the Trainer's own seed argument
        seed = kw.pop("seed")
        trainer = _trainer(tmp_path, data, **kw)
        trainer.seed = seed
    else:
        trainer = _trainer(tmp_path, data, **kw)
    with pytest.raises(ValueError) as exc:
        trainer.fit(resume=True)
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path / CHECKPOINT) in msg and "cannot resume" in msg, msg
    for n in named:
        assert n in msg, msg
    assert trainer.epoch == 0 and _snapshot(tmp_path) == before  # nothing loaded, nothing written


def test_library_resume_accepts_the_resumable_settings_and_is_exact(tmp_path, data):
    straight = _trainer(tmp_path / "a", data, epochs=3)
    straight.fit()
    _trainer(tmp_path / "b", data, epochs=3, show_progress=True).fit(stop_after=1)
    # other progress display / evaluation batch / K of Recall@K / device spelling: allowed, and exact
    resumed = _trainer(tmp_path / "b", data, epochs=3, eval_batch_size=7, eval_k=(1, 2), device="cpu")
    resumed.fit(resume=True)
    assert {"epochs", "device", "num_workers", "show_progress", "out", "root"} <= RESUMABLE
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    # more epochs: allowed (the cosine schedule then spans them), config.json says so
    more = _trainer(tmp_path / "b", data, epochs=4)
    more.fit(resume=True)
    assert more.epoch == 4
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["epochs"] == 4 and cfg["lr"] == 1e-3


# ------------------------------------------------------------------ library: overwriting a run
def test_library_new_run_refuses_an_existing_run_unless_overwrite(tmp_path, data):
    out = tmp_path / "run"
    first = _trainer(out, data)
    first.fit()
    first.fit()  # the same trainer again: its own run (nothing to do, no refusal)
    before = _snapshot(out)
    assert set(before) == set(RUN_FILES)
    with pytest.raises(ValueError, match="already holds a training run") as exc:
        _trainer(out, data).fit()
    assert str(out) in str(exc.value) and "\n" not in str(exc.value)
    assert _snapshot(out) == before
    with pytest.raises(ValueError, match="exclude each other"):
        _trainer(out, data).fit(resume=True, overwrite=True)
    assert _snapshot(out) == before
    # overwrite: the old run's files go first (a run without a test set leaves no stale best.pt)
    train, _ = data
    torch.manual_seed(0)
    t = Trainer(SimilarityModel(ShapesCNN(8, (4, 8, 8, 8))),
                SimilarityMiningLoss("triplet", metric_loss=build_metric_loss("proxyanchor", 6, 8),
                                     target_layers="layer4"),
                train, out_dir=out, epochs=1, batch_p=3, batch_k=2, batches_per_epoch=1, show_progress=False)
    t.fit(overwrite=True)
    assert not (out / "best.pt").exists() and (out / CHECKPOINT).read_bytes() != before[CHECKPOINT]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("content", ["empty", "unrelated"])
def test_library_new_run_in_an_empty_or_unrelated_directory(tmp_path, data, content):
    out = tmp_path / "run"
    out.mkdir()
    if content == "unrelated":
        (out / "notes.txt").write_text("mine")
    _trainer(out, data, epochs=1).fit()
    assert (out / CHECKPOINT).is_file() and (content == "empty" or (out / "notes.txt").read_text() == "mine")


def test_library_out_dir_that_is_a_file(tmp_path, data):
    f = tmp_path / "file"
    f.write_text("x")
    for kw in (dict(), dict(resume=True), dict(overwrite=True)):
        with pytest.raises(ValueError, match="is an existing file"):
            _trainer(f, data).fit(**kw)
    assert f.read_text() == "x"


# ------------------------------------------------------------------ SANE library trainer
def _sane_trainer(out, **kw):
    ds = ShapesWorld("train", 16, SIZE, seed=0, classes=TRAIN_CLASSES[:4])
    attrs = torch.stack([ds.attributes(i, which="all") for i in range(16)])
    train = AttributeImages(ds.images(dtype=torch.uint8), attrs, ATTRIBUTE_NAMES, ds.labels)
    torch.manual_seed(0)
    model = build_attribute_model("shapes", len(ATTRIBUTE_NAMES), attribute_names=ATTRIBUTE_NAMES)
    kw = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "show_progress": False, **kw}
    return AttributeTrainer(model, AttributeLoss(0.0), train, out_dir=out, **kw)


def test_sane_library_resume_and_overwrite(tmp_path):
    _sane_trainer(tmp_path).fit(stop_after=1)
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint.pt: .*lr 0.001 in the checkpoint, 0.1 now"):
        _sane_trainer(tmp_path, lr=0.1).fit(resume=True)
    with pytest.raises(ValueError, match=r"lr_decay 0.985 in the checkpoint, 0.5 now"):
        _sane_trainer(tmp_path, lr_decay=0.5).fit(resume=True)
    with pytest.raises(ValueError, match="already holds a training run"):
        _sane_trainer(tmp_path).fit()
    t = _sane_trainer(tmp_path, epochs=3)
    t.fit(resume=True)
    assert t.epoch == 3
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)  # everything the SANE trainer saves
    assert state["settings"]["lr"] == 1e-3 and len(state["history"]) == 3


# ------------------------------------------------------------------ the three commands
_MINING = ["train", "mining", "--data", "shapesworld", "--image-size", "32", "--n-train", "180", "--n-test", "60",
           "--batch-p", "3", "--batch-k", "2", "--batches-per-epoch", "1", "--embedding-dim", "8", "--quiet"]
_AVSL = ["train", "avsl", "--data", "shapesworld", "--image-size", "32", "--n-train", "180", "--n-test", "60",
         "--batch-p", "3", "--batch-k", "2", "--batches-per-epoch", "1", "--embedding-dim", "8", "--topk", "4",
         "--quiet"]
_SANE = ["train", "sane", "--data", "shapesworld", "--image-size", "32", "--n-train", "48", "--n-val", "32",
         "--batch-size", "16", "--lam", "0", "--quiet"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """One finished epoch of each command (the same directories serve every check below, which never writes)."""
    root = tmp_path_factory.mktemp("cli")
    runs = {}
    for name, argv in (("mining", _MINING), ("avsl", _AVSL), ("sane", _SANE)):
        out = root / name
        assert cli.main(argv + ["--out", str(out), "--epochs", "1"]) == 0
        runs[name] = (argv, out)
    return runs


@pytest.mark.parametrize("task, extra, named", [
    ("mining", ["--loss", "contrastive"], ['loss "triplet" in the checkpoint, "contrastive" now']),
    ("mining", ["--lr", "0.5", "--gamma", "7", "--mode", "siamese"],
     ["lr 0.001 in the checkpoint, 0.5 now", "gamma 1.0 in the checkpoint, 7.0 now",
      'mode "triplet" in the checkpoint, "siamese" now']),
    ("mining", ["--backbone", "resnet18"], ['backbone "shapes" in the checkpoint, "resnet18" now']),
    ("mining", ["--embedding-dim", "16"], ["embedding_dim 8 in the checkpoint, 16 now"]),
    ("mining", ["--no-flip", "--seed", "3"], ["flip true in the checkpoint, false now", "seed 0"]),
    ("mining", ["--scheduler", "step", "--milestones", "1"], ["scheduler", "milestones"]),
    ("avsl", ["--topk", "2"], ["topk 4 in the checkpoint, 2 now"]),
    ("avsl", ["--reliability", "published", "--neg-margin", "2.4"], ["reliability", "neg_margin"]),
    ("avsl", ["--n-train", "120"], ["n_train 180 in the checkpoint, 120 now"]),
    ("sane", ["--lr", "0.1"], ["lr 0.0005 in the checkpoint, 0.1 now"]),
    ("sane", ["--lam", "0.1"], ["lam 0.0 in the checkpoint, 0.1 now"]),
    ("sane", ["--batch-size", "8"], ["batch_size 16 in the checkpoint, 8 now"]),
])
def test_cli_resume_refuses_changed_settings(cli_runs, capsys, task, extra, named):
    argv, out = cli_runs[task]
    before = _snapshot(out)
    assert cli.main(argv + ["--out", str(out), "--epochs", "2", "--resume"] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"whymatch train: error:") or err.startswith("whymatch "), err
    assert err.count("\n") == 1 and str(out / CHECKPOINT) in err, err
    for n in named:
        assert n in err, err
    assert _snapshot(out) == before  # config.json still says what the run used


@pytest.mark.parametrize("task", ["mining", "avsl", "sane"])
def test_cli_refuses_overwriting_a_run_and_resume_with_overwrite(cli_runs, capsys, task):
    argv, out = cli_runs[task]
    before = _snapshot(out)
    assert cli.main(argv + ["--out", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and err.count("\n") == 1, err
    assert cli.main(argv + ["--out", str(out), "--epochs", "2", "--resume", "--overwrite"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_cli_overwrite_replaces_and_resume_continues(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_MINING + ["--out", str(out), "--epochs", "1"]) == 0
    first = (out / CHECKPOINT).read_bytes()
    assert cli.main(_MINING + ["--out", str(out), "--epochs", "1", "--overwrite", "--lr", "0.01"]) == 0
    assert (out / CHECKPOINT).read_bytes() != first
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01
    # resuming the replaced run with its own settings and more epochs (and another device spelling) works
    assert cli.main(_MINING + ["--out", str(out), "--epochs", "2", "--lr", "0.01", "--resume", "--device",
                               "cpu"]) == 0
    assert "trained 2 epochs" in capsys.readouterr().out
    with pytest.raises(ValueError, match="is an existing file"):
        from whymatch.train import MiningConfig, train_mining

        (tmp_path / "f").write_text("x")
        train_mining(MiningConfig(out=str(tmp_path / "f"), n_train=60, n_test=20, image_size=32))
