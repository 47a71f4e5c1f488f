"""`whymatch explain` on a CPU (issue 15): start-up without torch._dynamo, the per-phase timing line, the cheap
up-front estimate, and RISE's batch loop (one reused input buffer, no per-batch temporaries)."""

from __future__ import annotations

import subprocess
import sys

import torch

from whymatch import ops
from whymatch.ops import _lazy_dynamo


def test_first_op_call_does_not_import_dynamo():
    # a fresh interpreter: this test process may have imported torch._dynamo already (torch.compile tests)
    code = ("import sys, torch, whymatch.ops as o\n"
            "g = (torch.rand(3, 4, 4) < 0.5).float(); s = torch.zeros(3, 2, dtype=torch.long)\n"
            "x = o.rise_apply(g, s, torch.rand(3, 16, 16), 0.0)\n"
            "sal = o.rise_saliency(g, s, torch.rand(3, 2), (16, 16))\n"
            "a = torch.rand(1, 1, 4, 4, requires_grad=True)\n"
            "o.soft_mask(torch.rand(1, 3, 8, 8), a, 2.0, 0.5).sum().backward()\n"
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'clean', a.grad is not None)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["clean", "True"]


def test_deferred_kernels_still_work_under_torch_compile():
    assert _lazy_dynamo.defer_dynamo_import() >= 12  # every whymatch kernel, already deferred at import
    g = (torch.rand(5, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    s = torch.randint(0, 4, (5, 2), generator=torch.Generator().manual_seed(1))
    img = torch.rand(3, 16, 16)
    base = torch.zeros(3, 16, 16)

    def f(g, s, i, b):
        return torch.ops.whymatch.rise_apply(g, s, i, b, torch.float32, False) * 2

    eager = f(g, s, img, base)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(g, s, img, base)
    assert torch.equal(eager, compiled)
    assert "torch._dynamo" in sys.modules
    assert torch.equal(ops.rise_apply(g, s, img, base) * 2, eager)  # eager again, through torch's own disable


# ------------------------------------------------------------------ the per-phase line and its reader

def _png(path, seed):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    return str(path)


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "explain_cpu.py"
    spec = importlib.util.spec_from_file_location("explain_cpu_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    return mod


def test_explain_prints_where_its_time_went(tmp_path, capsys, monkeypatch):
    from whymatch import cli
    from whymatch.ops import devices

    monkeypatch.setattr(devices, "cuda_status", lambda: devices.CudaStatus(False, "no_driver", "no GPU (test)"))
    q, r = _png(tmp_path / "q.png", 0), _png(tmp_path / "r.png", 1)
    argv = ["explain", q, r, r, "--model", "toy_models:tiny_cnn", "--size", "32", "--n-masks", "32",
            "--out", str(tmp_path / "a")]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("time: "))
    phases, total = _bench_module().parse_phases(text)
    assert list(phases)[1:] == ["model and images", "estimate", "checks", "rise", "attention", "gradcam",
                                "scoring", "report"]
    assert list(phases)[0] == "start-up (interpreter and imports)"  # Linux: from /proc/self/stat
    assert all(v >= 0 for v in phases.values()) and total is not None
    # the phases are disjoint parts of the command's wall time (printed to 0.1 s)
    assert sum(phases.values()) <= total + 0.05 * len(phases), line
    # the estimate counts the checks as well as the methods and the scoring
    est = next(ln for ln in text.splitlines() if "estimated time:" in ln)
    assert "checks ~" in est and "rise ~" in est and "scoring ~" in est
    # --quiet: no estimate, so no estimate phase
    assert cli.main([*argv[:-1], str(tmp_path / "b"), "--quiet"]) == 0
    phases, _ = _bench_module().parse_phases(capsys.readouterr().out)
    assert "estimate" not in phases and "rise" in phases


# ------------------------------------------------------------------ RISE's batch loop

class _ViewNet(torch.nn.Module):
    """Returns a view of its input as the embedding (the case where RISE must copy before reusing its buffer)."""

    def forward(self, x):
        return x[:, 0, 0, :6]


def _rise_by_hand(sim, q, refs, n, batch, seed):
    """RISE's scores the way the code did before the reused buffer: a fresh rise_apply batch per step."""
    from whymatch.saliency import RISE

    ex = RISE(sim, n_masks=n, batch_size=batch, seed=seed)
    grids, shifts = ex.generate_masks(tuple(q.shape[1:]), n, _common_generator(seed), q.device)
    base = torch.zeros_like(q)
    embs = []
    with torch.no_grad():
        for i in range(0, n, batch):
            x = ops.rise_apply(grids[i:i + batch], shifts[i:i + batch], q, base,
                               channels_last=sim.channels_last)
            embs.append(sim(x))
        return grids, shifts, sim.pairwise(torch.cat(embs), sim.embed(refs))


def _common_generator(seed):
    from whymatch.saliency import _common

    return _common.generator(seed)


def test_reused_buffer_gives_the_maps_of_fresh_batches_bit_for_bit():
    from whymatch import SimilarityModel
    from whymatch.saliency import RISE

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten()).eval()
    q, refs = torch.rand(3, 24, 20), torch.rand(3, 3, 24, 20)
    for sim in (SimilarityModel(net), SimilarityModel(net, channels_last=True), SimilarityModel(_ViewNet())):
        # 70 masks in batches of 16: four full batches and a short last one that reuses a slice of the buffer
        maps = RISE(sim, n_masks=70, batch_size=16, seed=3, normalize="rise").attribute(q, refs)
        grids, shifts, scores = _rise_by_hand(sim, q, refs, 70, 16, 3)
        want = ops.rise_saliency(grids, shifts, scores, (24, 20)) / (70 * 0.5)
        assert torch.equal(maps, want)


def test_search_explain_says_up_front_how_long_it_will_take(tmp_path, capsys):
    from whymatch import cli

    gal = tmp_path / "gallery"
    gal.mkdir()
    for i in range(5):
        _png(gal / f"im{i}.png", i)
    index = tmp_path / "g.faiss"
    argv = ["search-explain", str(gal / "im2.png"), "--gallery", str(gal), "--index", str(index), "-k", "3",
            "--model", "toy_models:tiny_cnn", "--size", "32", "--n-masks", "32", "--device", "cpu"]
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    est = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("estimated time:"))
    assert "embed 5 gallery images" in est and "explain 3 results with rise" in est and "ms per image" in est
    assert cli.main([*argv, "--out", str(tmp_path / "b")]) == 0  # the saved index is reused: nothing to embed
    est = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("estimated time:"))
    assert "embed 0 gallery images" in est and "(index reused)" in est
    assert cli.main([*argv, "--out", str(tmp_path / "c"), "--quiet"]) == 0
    assert "estimated time" not in capsys.readouterr().out


def test_checks_run_on_one_thread_and_the_count_is_restored(monkeypatch):
    from whymatch import SimilarityModel, jobs
    from whymatch.saliency import RISE

    seen = []
    orig = RISE.check

    def spy(self, *a, **kw):
        seen.append(torch.get_num_threads())
        return orig(self, *a, **kw)

    monkeypatch.setattr(RISE, "check", spy)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        s = jobs.JobSettings(n_masks=16, batch_size=16, n_steps=2)
        jobs.explain_sets(SimilarityModel(net), [("a", torch.rand(3, 16, 16), torch.rand(2, 3, 16, 16), None)],
                          ["rise"], s)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
