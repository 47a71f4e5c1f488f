"""Files a user may receive (checkpoints, weights, run configs) never run code, and a malformed one is one line
naming the path: every loading path of the trainers (mining, AVSL, SANE: library and `--resume`), of
`explain-avsl --weights model|best|checkpoint` and of the attribute model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from whymatch import SimilarityModel, cli
from whymatch.attributes.losses import AttributeLoss
from whymatch.attributes.model import AttributeModel, attribute_model_state, build_attribute_model, \
    load_attribute_model
from whymatch.attributes.train import AttributeImages, AttributeTrainer
from whymatch.data import TEST_CLASSES, TRAIN_CLASSES, ShapesWorld
from whymatch.data.shapesworld import ATTRIBUTE_NAMES
from whymatch.io import FileFormatError
from whymatch.jobs import load_avsl_run
from whymatch.mining import SimilarityMiningLoss
from whymatch.models import ShapesCNN
from whymatch.train import CHECKPOINT, TensorImages, Trainer, build_avsl_model, build_metric_loss, random_flip

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 32


class _Touch:
    """Unpickling it creates ``marker`` (a stand-in for any code a crafted pickle would run)."""

    def __init__(self, marker: Path, how: str = "open") -> None:
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch '{self.marker}'",)
        return open, (self.marker, "w")


def _crafted(path: Path, marker: Path, shape: str) -> Path:
    """A checkpoint-like file whose pickle would create ``marker``: as the whole file, inside the model
    state, or inside the config of an otherwise plausible checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if shape == "whole":
        obj = _Touch(marker, "system")
    elif shape == "model":
        obj = {"format": 2, "epoch": 1, "model": {"w": _Touch(marker)}, "config": {}}
    else:
        obj = {"format": 2, "epoch": 1, "model": {}, "config": {"task": "avsl", "x": _Touch(marker)}}
    torch.save(obj, path)
    return path


def _one_line_naming(exc: BaseException, path: Path) -> str:
    msg = str(exc)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg
    assert isinstance(exc, (ValueError, FileNotFoundError)), type(exc)
    return msg


# ------------------------------------------------------------------ a finished mining run (library Trainer)
def _data():
    tr = ShapesWorld("train", 48, SIZE, seed=0, classes=TRAIN_CLASSES[:6])
    te = ShapesWorld("test", 20, SIZE, seed=0, classes=TEST_CLASSES[:4])
    return TensorImages(tr.images(dtype=torch.uint8), tr.labels), TensorImages(te.images(), te.labels)


def _trainer(out, train, test, **kw):
    torch.manual_seed(0)
    model = SimilarityModel(ShapesCNN(8, (4, 8, 8, 8)))
    loss = SimilarityMiningLoss("triplet", metric_loss=build_metric_loss("proxyanchor", 6, 8), gamma=1.0,
                                target_layers="layer4")
    kw = {"epochs": 2, "batches_per_epoch": 1, **kw}
    return Trainer(model, loss, train, out_dir=out, test_set=test, batch_p=3, batch_k=2, lr=1e-3, seed=7,
                   augment=random_flip, show_progress=False, **kw)


@pytest.fixture(scope="module")
def mining(tmp_path_factory):
    train, test = _data()
    out = tmp_path_factory.mktemp("mining") / "run"
    _trainer(out, train, test).fit(stop_after=1)
    return train, test, out, torch.load(out / CHECKPOINT, weights_only=True)


def test_every_checkpoint_entry_round_trips_under_weights_only(mining):
    _, _, _, state = mining
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "history", "config", "settings", "loss",
                "sampler", "classes"):
        assert key in state, key
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == state["global_step"] == 1


@pytest.mark.parametrize("shape", ["whole", "model", "config"])
def test_crafted_checkpoint_never_runs_on_trainer_resume(mining, tmp_path, shape):
    train, test, _, _ = mining
    marker = tmp_path / "PWNED"
    ckpt = _crafted(tmp_path / "run" / CHECKPOINT, marker, shape)
    with pytest.raises(FileFormatError) as exc:
        _trainer(tmp_path / "run", train, test).fit(resume=True)
    assert "refused" in _one_line_naming(exc.value, ckpt)
    assert not marker.exists()


def _mutations(state: dict) -> dict:
    """name -> (a function of a deep copy of a good checkpoint returning what to save)."""
    def put(**entries):
        def f(s):
            s.update(entries)
            return s
        return f

    def drop(key):
        def f(s):
            del s[key]
            return s
        return f

    def model(fn):
        def f(s):
            name = next(k for k, v in s["model"].items() if v.is_floating_point())
            s["model"][name] = fn(s["model"][name])
            return s
        return f

    def optim(fn):
        def f(s):
            first = next(iter(s["optimizer"]["state"].values()))
            first["exp_avg"] = fn(first["exp_avg"])
            return s
        return f

    return {
        "a list": lambda s: [1, 2, 3],
        "a tensor": lambda s: torch.zeros(3),
        "missing model": drop("model"),
        "missing settings": drop("settings"),
        "missing loss": drop("loss"),
        "format 1": put(format=1),
        "epoch 'x'": put(epoch="x"),
        "epoch -1": put(epoch=-1),
        "epoch True": put(epoch=True),
        "model 3": put(model=3),
        "model of lists": put(model={"w": [1.0]}),
        "model wrong shape": model(lambda t: torch.zeros(t.numel() + 1)),
        "model NaN": model(lambda t: torch.full_like(t, float("nan"))),
        "model extra key": lambda s: (s["model"].__setitem__("extra.weight", torch.zeros(1)), s)[1],
        "optimizer 3": put(optimizer=3),
        "optimizer state wrong shape": optim(lambda t: torch.zeros(t.numel() + 2)),
        "optimizer state Inf": optim(lambda t: torch.full_like(t, float("inf"))),
        "optimizer no groups": lambda s: (s["optimizer"].__setitem__("param_groups", []), s)[1],
        "scheduler junk": put(scheduler={"optimizer": 1}),
        "scheduler base_lrs str": lambda s: (s["scheduler"].__setitem__("base_lrs", "x"), s)[1],
        "rng wrong": put(rng={"torch": torch.zeros(3, dtype=torch.uint8)}),
        "rng float": put(rng={"torch": torch.zeros(5056)}),
        "history wrong length": put(history=[]),
        "history of ints": put(history=[1]),
        "config a list": put(config=[1]),
        "classes float": put(classes=torch.zeros(6)),
        "other classes": put(classes=torch.arange(6) + 100),
        "best_recall_at_1 str": put(best_recall_at_1="x"),
        "sampler junk": put(sampler={"seed": "x"}),
        "loss wrong shape": lambda s: (s["loss"].__setitem__(next(iter(s["loss"])), torch.zeros(2, 2)), s)[1],
    }


def _copy(state):
    import copy

    return copy.deepcopy(state)


@pytest.mark.parametrize("case", list(_mutations({})))
def test_malformed_checkpoint_is_one_named_line(mining, tmp_path, case):
    train, test, _, state = mining
    ckpt = tmp_path / "run" / CHECKPOINT
    ckpt.parent.mkdir()
    torch.save(_mutations(state)[case](_copy(state)), ckpt)
    trainer = _trainer(tmp_path / "run", train, test)
    with pytest.raises(ValueError) as exc:
        trainer.fit(resume=True)
    _one_line_naming(exc.value, ckpt)
    assert trainer.epoch == 0 and not (tmp_path / "run" / "config.json").exists()  # nothing loaded or written


@pytest.mark.parametrize("content", ["empty", "truncated", "garbage", "directory", "json"])
def test_unreadable_checkpoint_is_one_named_line(mining, tmp_path, content):
    train, test, out, _ = mining
    ckpt = tmp_path / "run" / CHECKPOINT
    ckpt.parent.mkdir()
    good = (out / CHECKPOINT).read_bytes()
    if content == "directory":
        ckpt.mkdir()
    else:
        ckpt.write_bytes({"empty": b"", "truncated": good[:len(good) // 2], "garbage": os.urandom(4096),
                          "json": b'{"epoch": 1}'}[content])
    with pytest.raises((ValueError, FileNotFoundError)) as exc:
        _trainer(tmp_path / "run", train, test).fit(resume=True)
    _one_line_naming(exc.value, ckpt)


# ------------------------------------------------------------------ CLI --resume of the three trainers
_MINING = ["train", "mining", "--data", "shapesworld", "--image-size", "32", "--n-train", "180", "--n-test", "60",
           "--batch-p", "3", "--batch-k", "2", "--batches-per-epoch", "1", "--embedding-dim", "8", "--quiet"]
_AVSL = ["train", "avsl", "--data", "shapesworld", "--image-size", "32", "--n-train", "180", "--n-test", "60",
         "--batch-p", "3", "--batch-k", "2", "--batches-per-epoch", "1", "--embedding-dim", "8", "--topk", "4",
         "--quiet"]
_SANE = ["train", "sane", "--data", "shapesworld", "--image-size", "32", "--n-train", "48", "--n-val", "32",
         "--batch-size", "16", "--lam", "0", "--quiet"]


@pytest.mark.parametrize("argv", [_MINING, _AVSL, _SANE], ids=["mining", "avsl", "sane"])
@pytest.mark.parametrize("shape", ["whole", "model"])
def test_crafted_checkpoint_never_runs_on_cli_resume(tmp_path, capsys, argv, shape):
    marker = tmp_path / "PWNED"
    ckpt = _crafted(tmp_path / "run" / CHECKPOINT, marker, shape)
    assert cli.main(argv + ["--out", str(tmp_path / "run"), "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not marker.exists()


def test_crafted_checkpoint_never_runs_on_sane_library_resume(tmp_path):
    ds = ShapesWorld("train", 16, SIZE, seed=0, classes=TRAIN_CLASSES[:4])
    attrs = torch.stack([ds.attributes(i, which="all") for i in range(16)])
    train = AttributeImages(ds.images(dtype=torch.uint8), attrs, ATTRIBUTE_NAMES, ds.labels)
    model = build_attribute_model("shapes", len(ATTRIBUTE_NAMES), attribute_names=ATTRIBUTE_NAMES)
    marker = tmp_path / "PWNED"
    ckpt = _crafted(tmp_path / "run" / CHECKPOINT, marker, "model")
    trainer = AttributeTrainer(model, AttributeLoss(0.0), train, out_dir=tmp_path / "run", epochs=1, batch_size=8,
                               show_progress=False)
    with pytest.raises(FileFormatError) as exc:
        trainer.fit(resume=True)
    _one_line_naming(exc.value, ckpt)
    assert not marker.exists()


# ------------------------------------------------------------------ explain-avsl and load_avsl_run
_AVSL_CFG = {"task": "avsl", "backbone": "shapes", "embedding_dim": 8, "topk": 4, "momentum": 0.5, "gamma": 10.0,
             "reliability": "map", "image_size": 32}


@pytest.fixture(scope="module")
def avsl_state():
    torch.manual_seed(0)
    return build_avsl_model("shapes", 8, topk=4)


def _avsl_run(root: Path, sim, cfg=None) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(_AVSL_CFG if cfg is None else cfg))
    torch.save(sim.embedder.state_dict(), root / "model.pt")
    torch.save({"model": sim.state_dict(), "epoch": 1}, root / "best.pt")
    torch.save({"model": sim.state_dict(), "epoch": 1, "format": 2}, root / "checkpoint.pt")
    return root


def _image(tmp_path: Path) -> str:
    from PIL import Image

    p = tmp_path / "q.png"
    Image.new("RGB", (40, 40), (120, 30, 200)).save(p)
    return str(p)


def test_hand_made_avsl_run_loads(tmp_path, avsl_state):
    run = _avsl_run(tmp_path / "run", avsl_state)
    for w in ("model", "best", "checkpoint"):
        avsl, size = load_avsl_run(run, w)
        assert size == 32 and torch.equal(avsl.edges_0, avsl_state.embedder.edges_0)


@pytest.mark.parametrize("weights", ["model", "best", "checkpoint"])
@pytest.mark.parametrize("shape", ["whole", "model"])
def test_crafted_avsl_weights_never_run(tmp_path, capsys, avsl_state, weights, shape):
    run = _avsl_run(tmp_path / "run", avsl_state)
    marker = tmp_path / "PWNED"
    target = run / {"model": "model.pt", "best": "best.pt", "checkpoint": "checkpoint.pt"}[weights]
    _crafted(target, marker, shape)
    with pytest.raises(FileFormatError) as exc:
        load_avsl_run(run, weights)
    _one_line_naming(exc.value, target)
    q = _image(tmp_path)
    assert cli.main(["explain-avsl", q, q, "--run", str(run), "--out", str(tmp_path / "rep"), "--weights",
                     weights]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and err.count("\n") == 1, err
    assert not marker.exists() and not (tmp_path / "rep").exists()


def _bad_weights(sim):
    emb = sim.embedder.state_dict()
    first = next(k for k, v in emb.items() if v.is_floating_point() and v.dim() > 1)
    return {
        "empty": b"",
        "garbage": os.urandom(2048),
        "a list": [1, 2],
        "model 3 (best)": {"model": 3},
        "no model (best)": {"epoch": 1},
        "wrong shape": {**emb, first: torch.zeros(3)},
        "missing key": {k: v for k, v in emb.items() if k != first},
        "NaN": {**emb, first: torch.full_like(emb[first], float("nan"))},
        "strings": {k: "x" for k in emb},
    }


@pytest.mark.parametrize("case", ["empty", "garbage", "a list", "model 3 (best)", "no model (best)", "wrong shape",
                                  "missing key", "NaN", "strings"])
def test_malformed_avsl_weights_are_one_named_line(tmp_path, avsl_state, case):
    run = _avsl_run(tmp_path / "run", avsl_state)
    weights = "best" if "(best)" in case else "model"
    target = run / f"{weights}.pt"
    bad = _bad_weights(avsl_state)[case]
    if isinstance(bad, bytes):
        target.write_bytes(bad)
    else:
        torch.save(bad, target)
    with pytest.raises(ValueError) as exc:
        load_avsl_run(run, weights)
    _one_line_naming(exc.value, target)


@pytest.mark.parametrize("case, key", [
    ("invalid json", None), ("a list", None), ("not utf-8", None), ("missing backbone", "backbone"),
    ("embedding_dim 'x'", "embedding_dim"), ("embedding_dim true", "embedding_dim"), ("topk 1.5", "topk"),
    ("momentum null", "momentum"), ("backbone vgg", "backbone"), ("image_size -3", "image_size"),
    ("image_size huge", "image_size"), ("reliability 3", "reliability"), ("topk 0", None), ("gamma NaN", None)])
def test_malformed_avsl_config_is_one_named_line(tmp_path, capsys, avsl_state, case, key):
    run = _avsl_run(tmp_path / "run", avsl_state)
    cfg_path = run / "config.json"
    cfg = dict(_AVSL_CFG)
    text = None
    if case == "invalid json":
        text = '{"task": "avsl", '
    elif case == "a list":
        text = "[1, 2]"
    elif case == "not utf-8":
        cfg_path.write_bytes(b"\xff\xfe{")
    elif case == "missing backbone":
        del cfg["backbone"]
    elif case == "gamma NaN":
        text = json.dumps(cfg).replace("10.0", "NaN")
    else:
        k, v = case.split(" ", 1)
        cfg[k] = {"'x'": "x", "true": True, "1.5": 1.5, "null": None, "vgg": "vgg", "-3": -3, "huge": 10 ** 9,
                  "3": 3, "0": 0}[v]
    if case != "not utf-8":
        cfg_path.write_text(text if text is not None else json.dumps(cfg))
    with pytest.raises(ValueError) as exc:
        load_avsl_run(run)
    msg = _one_line_naming(exc.value, cfg_path)
    if key is not None:
        assert repr(key) in msg, msg
    q = _image(tmp_path)
    assert cli.main(["explain-avsl", q, q, "--run", str(run), "--out", str(tmp_path / "rep")]) == 2
    assert str(cfg_path) in capsys.readouterr().err


def test_avsl_run_of_another_architecture_is_named(tmp_path, avsl_state):
    run = _avsl_run(tmp_path / "run", avsl_state, cfg={**_AVSL_CFG, "embedding_dim": 16})
    with pytest.raises(ValueError, match=r"model.pt: the weights does not match|model.pt: .*shape") as exc:
        load_avsl_run(run)
    _one_line_naming(exc.value, run / "model.pt")


# ------------------------------------------------------------------ attribute model files
@pytest.fixture(scope="module")
def attribute_blob():
    torch.manual_seed(0)
    model = build_attribute_model("shapes", 4, attribute_names=["a", "b", "c", "d"])
    assert isinstance(model, AttributeModel)
    return attribute_model_state(model)


@pytest.mark.parametrize("case", ["crafted", "empty", "not a dict", "config list", "n_attributes 'x'",
                                  "backbone vgg", "names mismatch", "state wrong shape", "state NaN", "names ints"])
def test_malformed_attribute_model_file_is_one_named_line(tmp_path, attribute_blob, case):
    import copy

    p = tmp_path / "model.pt"
    marker = tmp_path / "PWNED"
    blob = copy.deepcopy(attribute_blob)
    first = next(k for k, v in blob["state_dict"].items() if v.is_floating_point())
    if case == "crafted":
        blob["state_dict"][first] = _Touch(marker)
    elif case == "not a dict":
        blob = [blob]
    elif case == "config list":
        blob["config"] = [1]
    elif case == "n_attributes 'x'":
        blob["config"]["n_attributes"] = "x"
    elif case == "backbone vgg":
        blob["config"]["backbone"] = "vgg"
    elif case == "names mismatch":
        blob["attribute_names"] = ["a"]
    elif case == "state wrong shape":
        blob["state_dict"][first] = torch.zeros(1)
    elif case == "state NaN":
        blob["state_dict"][first] = torch.full_like(blob["state_dict"][first], float("nan"))
    elif case == "names ints":
        blob["attribute_names"] = [1, 2, 3, 4]
    if case == "empty":
        p.write_bytes(b"")
    else:
        torch.save(blob, p)
    with pytest.raises(ValueError) as exc:
        load_attribute_model(p)
    _one_line_naming(exc.value, p)
    assert not marker.exists()
    torch.save(attribute_blob, p)
    assert load_attribute_model(p).attribute_names == ("a", "b", "c", "d")
