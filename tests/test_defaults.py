"""Fast defaults of `whymatch demo` / `whymatch explain` on a CPU, the up-front time estimate and the job
progress bar (issue 15)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from whymatch import cli, jobs
from whymatch.ops import devices


def _png(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture()
def on_cpu(monkeypatch):
    """--device auto resolves to the CPU, whatever this machine has."""
    monkeypatch.setattr(devices, "cuda_status", lambda: devices.CudaStatus(False, "no_driver", "no GPU (test)"))


def test_default_method_sets():
    assert jobs.default_methods("demo", "cpu") == jobs.DEMO_METHODS
    assert jobs.default_methods("explain", "cpu") == jobs.CPU_EXPLAIN_METHODS
    assert jobs.default_methods("demo", "cuda:0") == jobs.METHODS == jobs.default_methods("explain", "cuda")
    # the fast sets leave out the two methods that cost hundreds of passes per reference
    for fast in (jobs.DEMO_METHODS, jobs.CPU_EXPLAIN_METHODS):
        assert "mask" not in fast and "lime" not in fast and set(fast) < set(jobs.METHODS)


def test_demo_defaults_and_method_all(monkeypatch, tmp_path, on_cpu):
    seen = {}

    def fake_run_demo(out, **kw):
        seen.update(kw)
        return [{"method": "rise"}], tmp_path / "index.html"

    monkeypatch.setattr(jobs, "run_demo", fake_run_demo)
    assert cli.main(["demo", "--out", str(tmp_path / "d")]) == 0
    assert seen["methods"] == jobs.DEMO_METHODS and seen["progress"] is True
    assert seen["settings"].n_steps == jobs.CPU_SCORE_STEPS
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--method", "all", "--quiet"]) == 0
    assert seen["methods"] == jobs.METHODS and seen["progress"] is False
    assert seen["settings"].n_steps == jobs.JobSettings().n_steps  # the old defaults, whole


def test_explain_says_which_cpu_settings_it_chose(tmp_path, capsys, on_cpu):
    q, r = _png(tmp_path / "q.png", 0), _png(tmp_path / "r.png", 1)
    base = ["explain", q, r, r, "--model", "toy_models:tiny_cnn", "--size", "32"]
    assert cli.main([*base, "--out", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    chosen = next(line for line in text.splitlines() if line.startswith("settings for a CPU"))
    assert "rise, attention, gradcam" in chosen and "--n-masks 500" in chosen and "--batch-size 50" in chosen
    assert f"{jobs.CPU_SCORE_STEPS} insertion/deletion steps" in chosen
    assert "estimated time" in text and "rise ~" in text
    assert "lime" not in text and "mask ~" not in text
    # options given win, and are not reported as chosen
    assert cli.main([*base, "--out", str(tmp_path / "b"), "--n-masks", "64", "--method", "rise", "--quiet"]) == 0
    text = capsys.readouterr().out
    chosen = next(line for line in text.splitlines() if line.startswith("settings for a CPU"))
    assert "--n-masks" not in chosen and "--batch-size 50" in chosen and "estimated time" not in text


def test_estimate_counts_the_passes_of_each_method():
    from whymatch.similarity import SimilarityModel

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    sim = SimilarityModel(net.eval())
    s = jobs.JobSettings(n_masks=400, lime_samples=300, mask_iters=10)
    size = (32, 32)
    assert jobs.method_passes("rise", sim, s, size, 3) == 400 + 3
    assert jobs.method_passes("lime", sim, s, size, 3) == 300 + 3
    assert jobs.method_passes("mask", sim, s, size, 3) == 3 * 10 * 3
    assert jobs.method_passes("sliding", sim, s, size, 3) > 3
    est = jobs.estimate_job(sim, torch.rand(3, *size), 3, ["rise", "attention"], s, n_queries=2)
    assert est.per_image > 0
    assert est.per_method["rise"] == pytest.approx(403 * est.per_image)
    assert est.total == pytest.approx((sum(est.per_method.values()) + est.scoring) * 2 + est.checks)
    assert est.checks == pytest.approx(((3 + 1) + (3 + 1 + 3)) * est.per_image * 2)
    assert "rise ~" in est.describe() and "2 queries" in est.describe()


def test_the_job_bar_counts_estimated_seconds(monkeypatch):
    from whymatch.similarity import SimilarityModel

    bars = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.n, self.closed = total, 0.0, False
            bars.append(self)

        def update(self, v):
            self.n += v

        def set_postfix_str(self, text):
            pass

        def close(self):
            self.closed = True

    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    sim = SimilarityModel(net.eval())
    s = jobs.JobSettings(n_masks=16, batch_size=16, n_steps=4)
    q, refs = torch.rand(3, 16, 16), torch.rand(2, 3, 16, 16)
    est = jobs.estimate_job(sim, q, 2, ["rise", "gradcam"], s, n_queries=2)
    jobs.explain_sets(sim, [("a", q, refs, None), ("b", q, refs, None)], ["rise", "gradcam"], s, estimate=est)
    (bar,) = bars
    assert bar.closed and bar.total == pytest.approx(est.total) and bar.n == pytest.approx(bar.total)


def test_cli_keeps_freed_memory_unless_the_user_tuned_glibc(monkeypatch):
    import platform

    from whymatch import cli

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert cli.keep_freed_memory()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not cli.keep_freed_memory()
