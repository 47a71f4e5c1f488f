"""pytest-benchmark: one group per compiled op, the fused whymatch op against its plain-PyTorch
baseline on the same inputs (benchmarks/cases.py holds both and the sizes).

    python -m pytest benchmarks --benchmark-only                  # time (realistic sizes, ~3 min on 2 cores)
    python -m pytest benchmarks --benchmark-disable               # a quick correctness pass (small sizes)
    python -m pytest benchmarks --benchmark-only --benchmark-autosave
    python -m pytest benchmarks --benchmark-only --benchmark-compare   # against the last saved run

Each test first checks that the fused op and the baseline agree (relative L2 error within the case's
tolerance). With --benchmark-disable the cases shrink (WHYMATCH_BENCH_SCALE, default 0.05 then,
1.0 otherwise) so that the pass takes seconds. The thread count is torch's (set it with
OMP_NUM_THREADS or WHYMATCH_BENCH_THREADS).
"""

from __future__ import annotations

import os

import pytest
import torch

import cases

VARIANTS = ("fused", "torch")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = os.environ.get("WHYMATCH_BENCH_THREADS")
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    yield
    torch.set_num_threads(old)


def _scale(config) -> float:
    env = os.environ.get("WHYMATCH_BENCH_SCALE")
    if env:
        return float(env)
    return 0.05 if config.getoption("benchmark_disable", False) else 1.0


_built: dict[tuple[str, float], cases.Case] = {}


def _case(name: str, config) -> cases.Case:
    key = (name, _scale(config))
    if key not in _built:
        _built.clear()  # keep one case's tensors alive at a time
        c = cases.make(name, key[1])
        c.check()
        _built[key] = c
    return _built[key]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("op", cases.NAMES)
def test_op(benchmark, request, op, variant):
    case = _case(op, request.config)
    benchmark.group = op
    benchmark.extra_info["size"] = case.size
    benchmark.extra_info["threads"] = torch.get_num_threads()
    fn = case.fused if variant == "fused" else case.torch
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
