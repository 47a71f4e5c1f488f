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
