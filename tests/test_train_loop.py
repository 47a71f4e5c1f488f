"""The one training loop (whymatch.train.loop.CheckpointedLoop) driven by a minimal trainer of its own: the
hooks are enough to train, resume exactly, keep best.pt by the validation score and refuse other settings."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from whymatch.train import CheckpointedLoop
from whymatch.train.distributed import default_device, dist_info


class TinyLoop(CheckpointedLoop):
    """A linear regression with dropout (so that resuming must restore the RNG), batches of 4."""

    def __init__(self, out_dir, *, epochs=3, lr=0.05, seed=0, scores=()):
        self.distributed, self.rank, self.world = dist_info()
        self.device = default_device("cpu")
        self.out_dir, self.epochs, self.seed, self.lr = out_dir, epochs, seed, lr
        self.num_workers, self.show_progress, self.config = 0, False, {"task": "tiny"}
        g = torch.Generator().manual_seed(123)
        x = torch.randn(24, 4, generator=g)
        self.train_set = TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]))
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Dropout(0.2), nn.Linear(4, 1))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: 0.5 ** e)
        self.setup_precision("none")
        self.epoch = self.global_step = 0
        self.history, self.best_score, self.scores = [], -math.inf, list(scores)

    def run_settings(self):
        return {"epochs": self.epochs, "lr": self.lr, "seed": self.seed}

    def state_dict(self):
        return {"format": 1, **self.loop_state(), "best": self.best_score, "config": self.config,
                "settings": self.run_settings()}

    def load_state_dict(self, state):
        self.check_loop_state(state, 1)
        self.restore_loop_state(state)
        self.best_score = state["best"]

    @property
    def train_module(self):
        return self.model

    def epoch_batches(self, epoch):
        return torch.randperm(len(self.train_set)).split(4)  # the loop seeded torch from (seed, epoch, rank)

    def train_step(self, batch, generator):
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x).squeeze(1), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.global_step += 1
        value = float(loss.detach())
        return {"loss": value}, {"loss": f"{value:.3g}"}

    def end_epoch(self):
        self.scheduler.step()

    def validation_set(self):
        return self.train_set if self.scores else None

    def validate(self):
        score = self.scores[self.epoch - 1]
        return {"score": score}, score

    def best_state(self, score):
        return {"model": self.model.state_dict(), "epoch": self.epoch, "score": score}


def _drop_times(history):
    return [{k: v for k, v in h.items() if not k.endswith("_time_s")} for h in history]


def test_fit_then_resume_equals_a_straight_run(tmp_path):
    straight = TinyLoop(tmp_path / "a")
    straight.fit()
    assert [h["epoch"] for h in straight.history] == [1, 2, 3] and straight.global_step == 18
    assert [h["lr"] for h in straight.history] == [0.05, 0.025, 0.0125]  # the rate each epoch ran at
    assert straight.history[-1]["loss"] < straight.history[0]["loss"]

    TinyLoop(tmp_path / "b").fit(stop_after=1)
    resumed = TinyLoop(tmp_path / "b")
    resumed.fit(resume=True)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert _drop_times(resumed.history) == _drop_times(straight.history)
    logged = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert _drop_times(logged) == _drop_times(straight.history)


def test_best_pt_holds_the_epoch_of_the_best_score(tmp_path):
    loop = TinyLoop(tmp_path, scores=(0.2, 0.7, 0.4))
    loop.fit()
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and best["score"] == 0.7 and loop.best_score == 0.7
    assert [h["score"] for h in loop.history] == [0.2, 0.7, 0.4]


def test_a_finished_run_is_kept_and_other_settings_are_refused(tmp_path):
    TinyLoop(tmp_path, epochs=2).fit(stop_after=1)
    with pytest.raises(ValueError):
        TinyLoop(tmp_path, epochs=2).fit()  # would overwrite the run
    with pytest.raises(ValueError, match="lr"):
        TinyLoop(tmp_path, epochs=2, lr=0.1).fit(resume=True)


def test_fit_says_up_front_how_long_the_run_will_take(tmp_path, capsys):
    loop = TinyLoop(tmp_path, epochs=3)
    loop.show_progress = True
    loop.fit()
    err = capsys.readouterr().err
    lines = [ln[ln.index("estimated"):] for ln in err.splitlines() if "estimated training time:" in ln]
    assert len(lines) == 1 and err.count("estimated training time:") == 1, err  # once per fit, not per epoch
    assert "for 3 epoch(s) of 6 batches" in lines[0] and "over the first 5" in lines[0]
    clock = loop._clock
    assert clock.batches == 18 and clock.epochs_left == 0 and clock.train_s > 0
    assert clock.remaining(6, 6) == 0.0  # nothing left once every epoch has run


def test_run_clock_counts_the_batches_and_validations_left():
    from whymatch.train.loop import _RunClock

    clock = _RunClock(epochs_left=2)
    clock.batches, clock.train_s = 4, 2.0  # 0.5 s per batch
    assert clock.remaining(10, 4) == pytest.approx(0.5 * (2 * 10 - 4))
    clock.eval_s = 3.0
    assert clock.remaining(10, 4) == pytest.approx(0.5 * 16 + 3.0 * 2)


def test_a_quiet_fit_prints_no_estimate(tmp_path, capsys):
    TinyLoop(tmp_path, epochs=1).fit()
    assert "estimated training time" not in capsys.readouterr().err
