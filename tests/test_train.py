"""Trainer: P x K sampling, exact resume, DDP with gloo on two CPU processes, the `whymatch train` command."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from whymatch import SimilarityModel, cli
from whymatch.data import TEST_CLASSES, TRAIN_CLASSES, ShapesWorld
from whymatch.mining import SimilarityMiningLoss
from whymatch.models import ShapesCNN
from whymatch.train import CHECKPOINT, METRICS_LOG, PKSampler, TensorImages, Trainer, build_metric_loss, random_flip

SIZE = 32


def _data():
    tr = ShapesWorld("train", 48, SIZE, seed=0, classes=TRAIN_CLASSES[:6])
    te = ShapesWorld("test", 20, SIZE, seed=0, classes=TEST_CLASSES[:4])
    return (TensorImages(tr.images(dtype=torch.uint8), tr.labels), TensorImages(te.images(), te.labels))


def _trainer(out, train, test, *, epochs=2, loss="proxyanchor", gamma=1.0, **kw):
    torch.manual_seed(0)
    model = SimilarityModel(ShapesCNN(8, (4, 8, 8, 8)))
    metric = build_metric_loss(loss, 6, 8)
    sml = SimilarityMiningLoss("triplet", metric_loss=metric, gamma=gamma, target_layers="layer4")
    return Trainer(model, sml, train, out_dir=out, test_set=test, epochs=epochs, batch_p=3, batch_k=2, lr=1e-3,
                   seed=7, augment=random_flip, show_progress=False, **kw)


# ------------------------------------------------------------------ sampler
def test_pk_sampler_batches():
    labels = torch.arange(10).repeat_interleave(5)
    s = PKSampler(labels, 4, 3, seed=1)
    assert len(s) == 50 // 12
    for batch in s:
        y = labels[batch]
        assert len(batch) == 12 and len(set(batch)) == 12
        assert sorted(torch.bincount(y, minlength=10)[y.unique()].tolist()) == [3] * 4
    first = list(s)
    assert list(s) == first                       # same epoch, same batches
    s.set_epoch(1)
    assert list(s) != first
    again = PKSampler(labels, 4, 3, seed=1)
    again.set_epoch(1)
    assert list(again) == list(s)


def test_pk_sampler_ranks_are_disjoint_shards():
    labels = torch.arange(8).repeat_interleave(6)
    r0 = list(PKSampler(labels, 2, 3, seed=0, num_replicas=2, rank=0))
    r1 = list(PKSampler(labels, 2, 3, seed=0, num_replicas=2, rank=1))
    whole = PKSampler(labels, 2, 3, seed=0, num_replicas=2, rank=0).global_batches()
    assert len(r0) == len(r1) == 4 and r0 != r1
    assert r0 == whole[0::2] and r1 == whole[1::2]


def test_pk_sampler_bad_arguments():
    labels = torch.arange(3).repeat_interleave(2)
    with pytest.raises(ValueError, match="p must be <="):
        PKSampler(labels, 4, 2)
    with pytest.raises(ValueError, match="labels must be integers"):
        PKSampler(labels.float(), 2, 2)
    with pytest.raises(ValueError, match="rank must be <"):
        PKSampler(labels, 2, 2, num_replicas=2, rank=2)
    s = PKSampler(labels, 2, 2, seed=0)
    state = s.state_dict()
    with pytest.raises(ValueError, match="seed"):
        PKSampler(labels, 2, 2, seed=1).load_state_dict(state)


# ------------------------------------------------------------------ trainer
def test_resume_gives_identical_weights(tmp_path):
    train, test = _data()
    straight = _trainer(tmp_path / "a", train, test, batches_per_epoch=3)
    straight.fit()
    first = _trainer(tmp_path / "b", train, test, batches_per_epoch=3)
    first.fit(stop_after=1)
    assert first.epoch == 1 and (tmp_path / "b" / CHECKPOINT).is_file()
    resumed = _trainer(tmp_path / "b", train, test, batches_per_epoch=3)
    resumed.fit(resume=True)
    assert resumed.epoch == 2
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(straight.loss.metric_loss.proxies, resumed.loss.metric_loss.proxies)  # proxies trained
    assert not torch.equal(resumed.loss.metric_loss.proxies, _trainer(tmp_path / "c", train, test)
                           .loss.metric_loss.proxies)
    lines = (tmp_path / "b" / METRICS_LOG).read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    rec = json.loads(lines[-1])
    for key in ("loss", "metric_loss", "mining_loss", "recall@1", "lr"):
        assert key in rec
    assert rec["loss"] == pytest.approx(straight.history[-1]["loss"])
    assert resumed.best_recall_at_1 == straight.best_recall_at_1
    assert (tmp_path / "b" / "best.pt").is_file()


def test_resume_without_checkpoint_names_the_path(tmp_path):
    train, test = _data()
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        _trainer(tmp_path / "none", train, test).fit(resume=True)


def test_trainer_bad_arguments(tmp_path):
    train, test = _data()
    model = SimilarityModel(ShapesCNN(8, (4, 8, 8, 8)))
    with pytest.raises(TypeError, match="model must be a whymatch.SimilarityModel"):
        Trainer(model.embedder, SimilarityMiningLoss(), train, out_dir=tmp_path)
    with pytest.raises(TypeError, match="train_set must have a .labels"):
        Trainer(model, SimilarityMiningLoss(), [(torch.zeros(3, 8, 8), 0)], out_dir=tmp_path)
    with pytest.raises(ValueError, match="amp"):
        Trainer(model, SimilarityMiningLoss(), train, out_dir=tmp_path, amp="fp8", batch_p=3, batch_k=2)


# ------------------------------------------------------------------ DDP, gloo, 2 CPU processes
def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train, test = _data()
        tr = _trainer(f"{out}/run", train, test, epochs=1, loss="triplet", batches_per_epoch=4)
        tr.fit()
        torch.save({"batches": tr.last_epoch_batches, "model": tr.model.state_dict(),
                    "recall": tr.history[-1]["recall@1"]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert len(r0["batches"]) == len(r1["batches"]) == 2
    assert not set(map(tuple, r0["batches"])) & set(map(tuple, r1["batches"]))  # different shards
    for (name, a), (_, b) in zip(r0["model"].items(), r1["model"].items()):
        assert torch.equal(a, b), name
    assert r0["recall"] == r1["recall"]
    assert (tmp_path / "run" / CHECKPOINT).is_file()
    # the weights moved away from the initialization
    torch.manual_seed(0)
    init = SimilarityModel(ShapesCNN(8, (4, 8, 8, 8)))
    assert not torch.equal(init.state_dict()["embedder.fc.weight"], r0["model"]["embedder.fc.weight"])


# ------------------------------------------------------------------ CLI
def test_cli_train_mining_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "mining", "--data", "shapesworld", "--image-size", "32", "--n-train", "180", "--n-test", "120",
            "--batch-p", "3", "--batch-k", "2", "--batches-per-epoch", "3", "--embedding-dim", "8", "--out",
            str(out), "--quiet", "--loss", "contrastive", "--mode", "siamese"]
    assert cli.main(base + ["--epochs", "1"]) == 0
    assert "trained 1 epochs" in capsys.readouterr().out
    assert cli.main(base + ["--epochs", "2", "--resume"]) == 0
    assert "trained 2 epochs" in capsys.readouterr().out
    lines = (out / METRICS_LOG).read_text().splitlines()
    assert len(lines) == 2 and (out / "model.pt").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mode"] == "siamese" and cfg["loss"] == "contrastive"


def test_cli_train_errors(tmp_path, capsys):
    assert cli.main(["train", "mining", "--data", "imagenet", "--out", str(tmp_path / "o")]) == 2
    assert "data" in capsys.readouterr().err
    assert cli.main(["train", "mining", "--data", "cub", "--out", str(tmp_path / "o")]) == 2
    assert "cub:/path" in capsys.readouterr().err
    assert cli.main(["train", "mining", "--data", f"cub:{tmp_path}/missing", "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "mining", "--data", "shapesworld", "--out", "o", "--loss", "arcface"])


@pytest.mark.slow
def test_cli_train_mining_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m whymatch.cli train mining ...`: two gloo ranks, rank 0 writes."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "whymatch.cli", "train", "mining", "--data", "shapesworld", "--image-size", "32",
           "--n-train", "180", "--n-test", "120", "--batch-p", "3", "--batch-k", "2", "--batches-per-epoch", "2",
           "--embedding-dim", "8", "--epochs", "1", "--out", str(out), "--quiet", "--device", "cpu"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("trained 1 epochs") == 1  # only rank 0 reports
    ck = torch.load(out / CHECKPOINT, weights_only=False)
    assert ck["epoch"] == 1
    assert len((out / METRICS_LOG).read_text().splitlines()) == 1
    assert json.loads((out / "config.json").read_text())["world_size"] == 2


def test_cli_train_mining_on_a_cub_layout(tmp_path, capsys):
    """The loader wiring end to end: a tiny CUB-200-2011 tree, ResNet-18, one epoch, Recall@K on the test classes."""
    from test_data_retrieval import _make_cub

    root = _make_cub(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "mining", "--data", f"cub:{root}", "--backbone", "resnet18", "--image-size", "32",
            "--batch-p", "2", "--batch-k", "2", "--batches-per-epoch", "1", "--embedding-dim", "8", "--epochs", "1",
            "--out", str(out), "--quiet", "--loss", "contrastive", "--mode", "siamese"]
    assert cli.main(args) == 0
    assert "trained 1 epochs" in capsys.readouterr().out
    log = json.loads((out / METRICS_LOG).read_text().splitlines()[0])
    assert 0.0 <= log["recall@1"] <= 1.0
    assert json.loads((out / "config.json").read_text())["data"] == "cub"
