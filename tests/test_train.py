"""Trainer: P x K sampling, exact resume, DDP with gloo on two CPU processes, the `whymatch train` command."""

from __future__ import annotations

import json

import pytest
import torch

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
def _ddp_body(rank, out):
    train, test = _data()
    tr = _trainer(f"{out}/run", train, test, epochs=1, loss="triplet", batches_per_epoch=4)
    tr.fit()
    return {"batches": tr.last_epoch_batches, "model": tr.model.state_dict(), "recall": tr.history[-1]["recall@1"]}


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    from helpers import run_two_gloo_ranks

    r0, r1 = run_two_gloo_ranks(_ddp_body, tmp_path)
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
    assert cli.main(["train", "mining", "--data", "shapesworld", "--out", "o", "--loss", "arcface"]) == 2


@pytest.mark.slow
def test_cli_train_mining_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m whymatch.cli train mining ...`: two gloo ranks, rank 0 writes."""
    from helpers import torchrun_cli

    out = tmp_path / "run"
    p = torchrun_cli("train", "mining", "--data", "shapesworld", "--image-size", "32", "--n-train", "180",
                     "--n-test", "120", "--batch-p", "3", "--batch-k", "2", "--batches-per-epoch", "2",
                     "--embedding-dim", "8", "--epochs", "1", "--out", out, "--quiet", "--device", "cpu")
    assert p.stdout.count("trained 1 epochs") == 1  # only rank 0 reports
    ck = torch.load(out / CHECKPOINT, weights_only=True)
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


# ------------------------------------------------------------------ parameter groups, step schedule, freezing
def _grouped_trainer(out, train, test, *, group_lr=None, freeze=1, **kw):
    """A tiny Trainer with the mining task's groups (backbone / head / loss) at their own rates."""
    from whymatch.train import mining_group_layout, task_param_groups

    torch.manual_seed(0)
    model = SimilarityModel(ShapesCNN(8, (4, 8, 8, 8)))
    sml = SimilarityMiningLoss("triplet", metric_loss=build_metric_loss("proxyanchor", 6, 8), gamma=1.0,
                               target_layers="layer4")
    lrs = {"backbone": 1e-4, "head": 1e-3, "loss": 1e-2} if group_lr is None else group_lr
    groups = task_param_groups(mining_group_layout("shapes"), {"model": model, "loss": sml}, lrs, lr=1e-3,
                               loss_lr=None, freeze_groups=("backbone",) if freeze else ())
    kw.setdefault("scheduler", "step")
    kw.setdefault("milestones", (2, 3))
    kw.setdefault("lr_decay", 0.5)
    kw.setdefault("freeze_epochs", freeze)
    kw.setdefault("freeze_groups", ("backbone",) if freeze else ())
    return Trainer(model, sml, train, out_dir=out, test_set=test, batch_p=3, batch_k=2, lr=1e-3, seed=7,
                   augment=random_flip, show_progress=False, param_groups=groups, **kw)


def test_step_schedule_warmup_and_freeze_lr_per_group_by_hand(tmp_path):
    torch.set_num_threads(1)
    train, test = _data()
    tr = _grouped_trainer(tmp_path / "a", train, test, epochs=4, batches_per_epoch=2, warmup_steps=3)
    assert tr.steps_per_epoch == 2 and tr.group_names == ("backbone", "head", "loss")
    base = {"backbone": 1e-4, "head": 1e-3, "loss": 1e-2}

    def by_hand(name, s):
        epoch = s // 2
        if name == "backbone" and epoch < 1:                        # frozen during epoch 0
            return 0.0
        warm = (s + 1) / 3 if s < 3 else 1.0                        # linear warm-up over steps 0, 1, 2
        decay = 0.5 ** sum(epoch >= m for m in (2, 3))              # x 0.5 from epoch 2 on, again from epoch 3
        return base[name] * warm * decay

    for s in range(8):
        got = tr.lr_at(s)
        for name in base:
            assert got[name] == pytest.approx(by_hand(name, s), rel=1e-12, abs=0), (name, s)
    assert tr.lr_at(5)["head"] == pytest.approx(5e-4) and tr.lr_at(7)["loss"] == pytest.approx(2.5e-3)
    # the optimizer follows the same numbers while training; the frozen group does not move in epoch 0
    backbone0 = {n: p.detach().clone() for n, p in tr.model.named_parameters() if not n.startswith("embedder.fc")}
    head0 = tr.model.embedder.fc.weight.detach().clone()
    for s, g in enumerate(tr.optimizer.param_groups):
        assert g["lr"] == pytest.approx(tr.lr_at(0)[tr.group_names[s]])
    tr.fit(stop_after=1)
    for n, p in tr.model.named_parameters():
        if n in backbone0:
            assert torch.equal(p, backbone0[n]), n
            assert p not in tr.optimizer.state or not tr.optimizer.state[p], n   # no AdamW moments yet
    assert not torch.equal(tr.model.embedder.fc.weight, head0)
    tr.fit()
    assert any(not torch.equal(p, backbone0[n]) for n, p in tr.model.named_parameters() if n in backbone0)
    for rec in tr.history:
        want = tr.lr_at(rec["step"])
        for name in base:
            assert rec[f"lr_{name}"] == pytest.approx(want[name]), (rec["epoch"], name)
    assert [round(r["lr_head"], 12) for r in tr.history] == [1e-3, 5e-4, 2.5e-4, 2.5e-4]
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["scheduler"] == "step" and cfg["milestones"] == [2, 3] and cfg["lr_decay"] == 0.5
    assert cfg["freeze_epochs"] == 1 and cfg["freeze_groups"] == ["backbone"] and cfg["warmup_total_steps"] == 3
    assert [(g["name"], g["lr"]) for g in cfg["param_groups"]] == list(base.items())


def test_param_groups_cover_every_parameter_exactly_once(tmp_path):
    from whymatch.train import AVSL_GROUPS, build_avsl_model, mining_group_layout, task_param_groups
    from whymatch.train.trainer import _Step, assign_param_groups
    from whymatch.avsl import AVSLLoss

    torch.set_num_threads(1)
    cases = []
    for backbone in ("shapes", "resnet18"):
        from whymatch.train import build_backbone

        model, _ = build_backbone(backbone, 8)
        cases.append((model, build_metric_loss("proxyanchor", 6, 8), mining_group_layout(backbone),
                      {"backbone", "head", "loss"}))
    avsl = build_avsl_model("shapes", 8, topk=4)
    cases.append((avsl, AVSLLoss(6, 3, 8), AVSL_GROUPS, {"backbone", "head", "coef_bias", "loss"}))
    cases.append((avsl, AVSLLoss(None, 3, 8, use_proxy=False, loss="margin"), AVSL_GROUPS,
                  {"backbone", "head", "coef_bias", "loss"}))   # the margin loss's betas are the loss group
    cases.append((avsl, AVSLLoss(None, 3, 8, use_proxy=False), AVSL_GROUPS,
                  {"backbone", "head", "coef_bias"}))           # no loss parameter: no loss group
    for model, loss, layout, names in cases:
        step = _Step(model, loss)
        groups = task_param_groups(layout, {"model": model, "loss": loss}, {"backbone": 1e-5}, lr=1e-3,
                                   loss_lr=None)
        out = assign_param_groups(step.named_parameters(), groups, lambda n: ("rest", 1.0))
        assert {g["name"] for g in out} == names                 # nothing left for the fallback group
        ids = [id(p) for g in out for p in g["params"]]
        trainable = [id(p) for p in step.parameters() if p.requires_grad]
        assert sorted(ids) == sorted(trainable) and len(set(ids)) == len(ids)
        lr = {g["name"]: g["lr"] for g in out}
        assert lr["backbone"] == 1e-5 and lr["head"] == 1e-3 and lr.get("loss", 0.1) == pytest.approx(0.1)
        for g in out:
            for n in g["param_names"]:
                best = max(groups, key=lambda q: q.match(n))
                assert best.name == g["name"] and best.match(n) >= 0, n
    by_name = {g["name"]: g["param_names"] for g in out}
    assert all(n.startswith("model.embedder.backbone.") for n in by_name["backbone"])
    assert sorted(by_name["coef_bias"]) == ["model.embedder.bias.0", "model.embedder.bias.1",
                                            "model.embedder.coef.0", "model.embedder.coef.1"]
    # a Trainer's optimizer holds every trainable parameter once, also with the default two groups
    train, test = _data()
    for tr in (_trainer(tmp_path / "d", train, test), _grouped_trainer(tmp_path / "g", train, test)):
        ids = [id(p) for g in tr.optimizer.param_groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in tr.step_module.parameters() if p.requires_grad)
        assert len(set(ids)) == len(ids)
    assert _trainer(tmp_path / "d", train, test).group_names == ("model", "loss")
    # the CLI's help lists the same groups as the task layouts
    assert cli._GROUPS_HELP["avsl"] == tuple(AVSL_GROUPS)
    assert cli._GROUPS_HELP["mining"] == tuple(mining_group_layout("shapes")) == tuple(mining_group_layout("resnet50"))


def test_param_group_and_schedule_errors(tmp_path):
    from whymatch.train import ParamGroup, assign_param_groups, task_param_groups

    train, test = _data()
    model = SimilarityModel(ShapesCNN(8, (4, 8, 8, 8)))
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match=r"the lr of param group 'head' must be in \[0, inf\], got -1"):
        ParamGroup("head", "embedder.fc", -1)
    with pytest.raises(ValueError, match="prefixes must be non-empty"):
        ParamGroup("head", (), 1e-3)
    with pytest.raises(ValueError, match="used twice"):
        assign_param_groups(named, [ParamGroup("a", "embedder", 1.0), ParamGroup("a", "embedder.fc", 1.0)],
                            lambda n: ("rest", 1.0))
    with pytest.raises(ValueError, match="prefix 'embedder.fc' is claimed by param groups 'a' and 'b'"):
        assign_param_groups(named, [ParamGroup("a", "embedder.fc", 1.0), ParamGroup("b", "embedder.fc.", 1.0)],
                            lambda n: ("rest", 1.0))
    with pytest.raises(ValueError, match="param group 'typo' .* matches no trainable parameter"):
        assign_param_groups(named, [ParamGroup("typo", "embedder.fcc", 1.0)], lambda n: ("rest", 1.0))
    with pytest.raises(ValueError, match="'rest' is taken"):
        assign_param_groups(named, [ParamGroup("rest", "embedder.fc", 1.0)], lambda n: ("rest", 1.0))
    with pytest.raises(ValueError, match="group_lr: unknown parameter group 'trunk'"):
        task_param_groups({"backbone": ("model",)}, {"model": model}, {"trunk": 1.0}, lr=1.0, loss_lr=None)
    bad = [(dict(scheduler="linear"), "scheduler must be one of"),
           (dict(milestones=(3, 2)), r"milestones must be strictly increasing, got \[3, 2\]"),
           (dict(milestones=(0, 2)), r"milestones must be epochs >= 1, got \[0, 2\]"),
           (dict(scheduler="cosine", milestones=(2,)), r"milestones \[2\] need scheduler='step'"),
           (dict(lr_decay=0.0), r"lr_decay must be in \(0, 1\], got 0"),
           (dict(lr_decay=1.5), r"lr_decay must be in \(0, 1\], got 1.5"),
           (dict(warmup_steps=2, warmup_epochs=1), "give warmup_steps or warmup_epochs, not both"),
           (dict(freeze=0, freeze_epochs=2), "freeze_epochs=2 needs freeze_groups"),
           (dict(freeze_groups=("trunk",)), "freeze_groups: no parameter group named 'trunk'")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            _grouped_trainer(tmp_path / "x", train, test, **kw)
    # resuming with other groups than the interrupted run: a clear error, not torch's
    _grouped_trainer(tmp_path / "r", train, test, epochs=2, batches_per_epoch=1).fit(stop_after=1)
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint.pt: .*param_groups \[\{\"name\": \"backbone\""):
        _trainer(tmp_path / "r", train, test, batches_per_epoch=1).fit(resume=True)


def test_resume_gives_identical_weights_under_step_schedule_and_freeze(tmp_path):
    torch.set_num_threads(1)
    train, test = _data()
    kw = dict(epochs=3, batches_per_epoch=2, milestones=(2,), warmup_epochs=1)
    straight = _grouped_trainer(tmp_path / "a", train, test, **kw)
    straight.fit()
    first = _grouped_trainer(tmp_path / "b", train, test, **kw)
    first.fit(stop_after=1)                      # checkpoint at the end of the frozen epoch
    resumed = _grouped_trainer(tmp_path / "b", train, test, **kw)
    resumed.fit(resume=True)
    assert resumed.epoch == 3
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(straight.loss.metric_loss.proxies, resumed.loss.metric_loss.proxies)
    for ga, gb in zip(straight.optimizer.param_groups, resumed.optimizer.param_groups):
        assert ga["lr"] == gb["lr"]
    assert [r["lr_backbone"] for r in straight.history] == [r["lr_backbone"] for r in resumed.history]
    assert straight.history[-1]["lr_head"] == pytest.approx(5e-4)


def test_cli_train_step_schedule_groups_and_errors(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "mining", "--data", "shapesworld", "--image-size", "32", "--n-train", "180", "--n-test", "120",
            "--batch-p", "3", "--batch-k", "2", "--batches-per-epoch", "2", "--embedding-dim", "8", "--out",
            str(out), "--quiet", "--loss", "proxyanchor", "--mode", "siamese", "--epochs", "2"]
    sched = ["--scheduler", "step", "--milestones", "1", "--lr-decay", "0.5", "--group-lr",
             "backbone=1e-4,head=2e-3", "--freeze-epochs", "1", "--warmup-epochs", "1"]
    assert cli.main(base + sched) == 0
    capsys.readouterr()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["scheduler"] == "step" and cfg["milestones"] == [1] and cfg["lr_decay"] == 0.5
    assert cfg["group_lr"] == {"backbone": 1e-4, "head": 2e-3} and cfg["freeze_groups"] == ["backbone"]
    assert [(g["name"], g["lr"]) for g in cfg["param_groups"]] == [("backbone", 1e-4), ("head", 2e-3),
                                                                    ("loss", 0.1)]
    recs = [json.loads(x) for x in (out / METRICS_LOG).read_text().splitlines()]
    assert recs[0]["lr_head"] == pytest.approx(1e-3) and recs[0]["lr_backbone"] == pytest.approx(5e-5)
    # bad values: argparse names the option and the value
    for opt, val, msg in [("--milestones", "2,1", "strictly increasing"), ("--milestones", "2,x", "comma-separated"),
                          ("--lr-decay", "0", "(0, 1]"), ("--lr-decay", "nan", "(0, 1]"),
                          ("--group-lr", "trunk=1e-4", "unknown group 'trunk'"),
                          ("--group-lr", "head=-1", "must be >= 0"), ("--group-lr", "head", "NAME=LR"),
                          ("--freeze-groups", "coef_bias", "comma-separated list of backbone, head, loss"),
                          ("--warmup-epochs", "-1", ">= 0"), ("--scheduler", "linear", "invalid choice")]:
        assert cli.main(base + [opt, val]) == 2
        err = capsys.readouterr().err
        assert opt in err and msg in err and (val in err or opt == "--scheduler"), err
    assert cli.main(base + ["--milestones", "1"]) == 2
    assert "--milestones 1 needs --scheduler step, got --scheduler cosine" in capsys.readouterr().err
    assert cli.main(base + ["--warmup-steps", "2", "--warmup-epochs", "1"]) == 2
    assert "--warmup-steps or --warmup-epochs, not both" in capsys.readouterr().err


def test_a_non_finite_loss_stops_training_by_name_and_keeps_the_checkpoint(tmp_path):
    train, test = _data()
    t = _trainer(tmp_path / "run", train, test, epochs=2, batches_per_epoch=2)
    t.fit(stop_after=1)
    before = (tmp_path / "run" / CHECKPOINT).read_bytes()
    t.model.embedder.fc.weight.data.fill_(float("nan"))  # the next step's loss is NaN
    with pytest.raises(FloatingPointError, match=r"training loss is not finite .* epoch 2, step 3"):
        t.fit()
    assert (tmp_path / "run" / CHECKPOINT).read_bytes() == before
