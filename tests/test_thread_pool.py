"""The CPU kernels' one persistent thread pool (csrc/common/parallel.h, thread_pool_cpu.cpp):
every index runs exactly once, a chunk's exception reaches the caller, several Python threads may
call at once, a forked child does not deadlock, and the thread count follows the caller."""

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest
import torch

import whymatch.ops as ops
from whymatch.ops import _ext
from whymatch.ops import reference as ref

C = _ext.cpu_module()
pytestmark = pytest.mark.skipif(C is None, reason="the CPU module whymatch._C was not built")


def _rise_inputs(n=24, s=4, h=20, w=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    grids = (torch.rand(n, s, s, generator=g) > 0.5).float()
    cell_h, cell_w, _, _ = ref.rise_grid_geometry((h, w), s)
    shifts = torch.stack([torch.randint(0, cell_h, (n,), generator=g), torch.randint(0, cell_w, (n,), generator=g)], 1)
    image = torch.rand(3, h, w, generator=g)
    return grids, shifts, image


@pytest.mark.parametrize("n,threads,grain", [(0, 4, 1), (1, 4, 1), (7, 16, 3), (1000, 2, 1), (1001, 3, 7),
                                              (5, 1, 1), (64, 64, 1)])
def test_every_index_runs_exactly_once(n, threads, grain):
    hits = C._parallel_selftest(n, threads, grain)
    assert len(hits) == n and all(h == 1 for h in hits)


def test_a_chunk_exception_reaches_the_caller_and_the_pool_survives():
    with pytest.raises(ValueError, match="chunk failed at index 517"):
        C._parallel_selftest(1000, 4, 1, 517)
    with pytest.raises(ValueError, match="chunk failed at index 0"):
        C._parallel_selftest(1000, 4, 1, 0)
    assert all(h == 1 for h in C._parallel_selftest(1000, 4, 1))


def test_the_pool_is_persistent():
    C._parallel_selftest(4000, 3, 1)
    started, jobs = C.pool_stats()
    for _ in range(20):
        C._parallel_selftest(4000, 3, 1)
    started2, jobs2 = C.pool_stats()
    assert started2 == started >= 2  # no thread started per call
    assert jobs2 >= jobs + 1  # the calls ran on the pool (some may run inline if another test holds it)


def test_several_python_threads_at_once():
    grids, shifts, image = _rise_inputs(n=64, h=40, w=33)
    want = ref.rise_apply(grids, shifts, image, torch.zeros_like(image), torch.float32, False)
    errors: list[BaseException] = []

    def worker(i):
        try:
            for _ in range(10):
                hits = C._parallel_selftest(3000 + i, 4, 1)
                if not all(h == 1 for h in hits):
                    raise AssertionError(f"thread {i}: an index did not run exactly once")
                got = ops.rise_apply(grids, shifts, image, 0.0)
                torch.testing.assert_close(got, want)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish (deadlock?)"
    assert not errors, errors[0]


def _child(q):
    try:
        before = C.pool_stats()
        # torch's own OpenMP pool hangs in a forked child once the parent has used it (a libgomp
        # limitation): the child keeps torch on one thread and gives whymatch's pool four
        torch.set_num_threads(1)
        ops.set_num_threads(4)
        grids, shifts, image = _rise_inputs(n=64, h=40, w=33)
        got = ops.rise_apply(grids, shifts, image, 0.0)
        want = ref.rise_apply(grids, shifts, image, torch.zeros_like(image), torch.float32, False)
        hits = C._parallel_selftest(5000, 4, 1)
        q.put((before, bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5)), all(h == 1 for h in hits),
               C.pool_stats()[0]))
    except BaseException as exc:  # noqa: BLE001
        q.put(repr(exc))


def test_a_forked_child_gets_a_fresh_pool_and_does_not_deadlock():
    C._parallel_selftest(5000, 4, 1)  # the parent's pool threads exist
    assert C.pool_stats()[0] >= 1
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(120)
    if p.is_alive():
        p.kill()
        pytest.fail("the forked child deadlocked in the thread pool")
    assert p.exitcode == 0
    got = q.get(timeout=10)
    assert not isinstance(got, str), got
    before, rise_ok, hits_ok, started = got
    assert before == (0, 0) and rise_ok and hits_ok and started >= 1  # the child's own pool ran the calls


def test_the_thread_count_follows_the_caller():
    grids, shifts, image = _rise_inputs(n=256, h=64, w=64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert ops.get_num_threads() == 1
        jobs = C.pool_stats()[1]
        one = ops.rise_apply(grids, shifts, image, 0.0)
        assert C.pool_stats()[1] == jobs  # one thread: the call never touches the pool
        ops.set_num_threads(3)
        assert ops.get_num_threads() == 3
        three = ops.rise_apply(grids, shifts, image, 0.0)
        assert C.pool_stats()[1] == jobs + 1
        torch.testing.assert_close(one, three, rtol=0, atol=0)
    finally:
        ops.set_num_threads(None)
        torch.set_num_threads(old)
    with pytest.raises(ValueError, match="n must be >= 1"):
        ops.set_num_threads(0)
    with pytest.raises(TypeError, match="n must be an int"):
        ops.set_num_threads(2.0)
