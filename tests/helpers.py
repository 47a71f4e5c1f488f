"""Test helpers: the device list (overridable, no GPU query at import time) and tolerances."""

from __future__ import annotations

import os

import pytest
import torch


def _cuda_visible() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def devices() -> list:
    """Parameters for a device fixture: 'cpu' always, 'cuda' marked and skipped when no GPU is visible.

    WHYMATCH_TEST_DEVICES=cpu,cuda overrides the list.
    """
    names = os.environ.get("WHYMATCH_TEST_DEVICES", "cpu,cuda").split(",")
    out = []
    for n in (n.strip() for n in names if n.strip()):
        if n == "cuda":
            out.append(pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
                "not __import__('torch').cuda.is_available()", reason="no CUDA device visible")]))
        else:
            out.append(n)
    return out


# Elementwise tolerances against the float32 reference. The kernels compute the
# same float32 arithmetic and round once, so fp16/bf16 outputs may differ from the
# reference's rounding by at most one unit in the last place: 2^-11 and 2^-8
# relative for values in [0, 1].
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


def torchrun_cli(*cli_args, timeout: int = 240):
    """Run ``torchrun --standalone --nproc_per_node 2 -m whymatch.cli ARGS`` (two gloo ranks, one thread
    each) and return the finished process; fails the test with the ranks' stderr when it does not exit 0."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "whymatch.cli", *map(str, cli_args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _gloo_rank(rank, world, port, body, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(body(rank, out), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_two_gloo_ranks(body, out) -> list:
    """Run ``body(rank, out) -> dict`` in two spawned processes joined in a gloo group (one torch thread
    each); ``body`` must be a module-level function. Returns the two ranks' dicts, rank 0 first."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_rank, args=(2, port, body, str(out)), nprocs=2, join=True)
    return [torch.load(os.path.join(str(out), f"rank{r}.pt"), weights_only=False) for r in range(2)]


def replace_line(path, line: int, text: str) -> None:
    """Replace line ``line`` (1-based) of a text file with ``text`` (for malformed-file tests)."""
    from pathlib import Path

    lines = Path(path).read_text().splitlines()
    lines[line - 1] = text
    Path(path).write_text("\n".join(lines) + "\n")


class InjectedFault(OSError):
    """The error a fault-injection test plants (an OSError, as a failing disk would raise)."""


def fail_nth_call(monkeypatch, owner, name: str, fail_at: int) -> list:
    """Make ``owner.name`` raise :class:`InjectedFault` on its ``fail_at``-th call (0: never); returns the list
    that counts the calls (its length), so a test can first count the calls of a clean run."""
    orig = getattr(owner, name)
    seen: list = []

    def wrapped(*a, **kw):
        seen.append(1)
        if len(seen) == fail_at:
            raise InjectedFault(f"injected fault in {name} call {fail_at}")
        return orig(*a, **kw)

    monkeypatch.setattr(owner, name, wrapped)
    return seen


def count_calls(monkeypatch, owner, name: str) -> list:
    """Count the calls of ``owner.name`` (a method too): the returned list grows by one per call."""
    return fail_nth_call(monkeypatch, owner, name, 0)


def emulated_marks() -> list:
    """Marks of a test module that runs the host-emulated CUDA kernels: ``emulated``, and skipped (saying
    why) only where the CUDA headers the emulation compiles against are absent."""
    from cuda_emulation import build as emu_build

    return [pytest.mark.emulated,
            pytest.mark.skipif(not emu_build.headers_present(),
                               reason=f"the CUDA headers are absent ({emu_build.cuda_include()}/cuda_runtime.h): "
                                      "the emulation compiles the kernels against them; set CUDA_HOME")]


def emulated_module_path():
    """The emulated ``_C_cuda`` to test: WHYMATCH_EMU_MODULE (a module built elsewhere, e.g. by
    tools/cuda_mutants.py or tools/cuda_asan.sh), else the fiber build of this checkout (cached)."""
    from pathlib import Path

    from cuda_emulation import build as emu_build

    given = os.environ.get("WHYMATCH_EMU_MODULE")
    return Path(given) if given else emu_build.build("fiber")


def emu_stats(mod) -> tuple[int, int, int]:
    """The emulated module's launch counters (wm_emu_stats: three counts, see tests/cuda_emulation)."""
    import ctypes

    out = (ctypes.c_ulonglong * 3)()
    ctypes.CDLL(mod.__emulation_path__).wm_emu_stats(out)
    return tuple(out)


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, for bit-for-bit comparison across schedules."""
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def random_avsl_inputs(sizes, q: int, g: int, gen: torch.Generator, link_topk: int = 4):
    """Random AVSL distance inputs for levels of ``sizes`` nodes: (query and gallery embeddings, their
    reliabilities, the link* matrices between levels, coefficients, biases), in the ops' argument order."""
    from whymatch.ops import reference as ref

    qs = [torch.randn(q, r, generator=gen) for r in sizes]
    gs = [torch.randn(g, r, generator=gen) for r in sizes]
    rq = [torch.rand(q, r, generator=gen) for r in sizes]
    rg = [torch.rand(g, r, generator=gen) for r in sizes]
    links = [ref.avsl_link_star(torch.randn(a, b, generator=gen), link_topk) for a, b in zip(sizes[:-1], sizes[1:])]
    coef = [1 + 0.1 * torch.randn(r, generator=gen) for r in sizes]
    bias = [0.1 * torch.randn(r, generator=gen) for r in sizes]
    return qs, gs, rq, rg, links, coef, bias
