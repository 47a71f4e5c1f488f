"""The benchmark cases (benchmarks/cases.py: what contention_cpu.py and the pytest-benchmark groups
time) stay correct: every fused op agrees with its plain-PyTorch baseline, at a small size. The
timing itself runs only under `python -m pytest benchmarks --benchmark-only`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import cases  # noqa: E402


@pytest.mark.parametrize("name", cases.NAMES)
def test_fused_and_baseline_agree(name):
    c = cases.make(name, 0.02)
    assert c.check() <= c.tol
    for fn in c.extra.values():
        fn()


def test_make_refuses_unknown_names_and_scales():
    with pytest.raises(ValueError, match="name must be one of"):
        cases.make("nope")
    with pytest.raises(ValueError, match="scale must be > 0"):
        cases.make("rise_apply", 0)


def test_gpu_rise_checks_pass_in_its_cpu_dry_run(tmp_path):
    """benchmarks/gpu_rise.py --dry-run runs every section on the CPU at toy sizes: each correctness check the
    GPU run makes (the end-to-end RISE map against the plain pipeline's included) must pass here first; its
    exit status is 1 when one fails (the e2e check did, unnoticed until the first GPU run)."""
    import json
    import subprocess
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_rise.py"
    proc = subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_rise.json").read_text())
    assert res["all_checks_ok"] and res["e2e"]["check"]["ok"]
    assert res["e2e"]["check"]["rel_err_vs_pytorch_pipeline"] < 1e-2
