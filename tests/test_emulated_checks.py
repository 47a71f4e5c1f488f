"""The emulation's own checks (tests/cuda_emulation/), on planted bugs (tests/cuda_emulation/selftest.cu),
with both back ends: fibers and OS threads. What the emulated kernel tests rely on to find a bug."""
from __future__ import annotations

import ctypes
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_emulation import build as emu_build  # noqa: E402
from helpers import emulated_marks, emulated_module_path  # noqa: E402

pytestmark = emulated_marks()

CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_INVALID_CONFIGURATION = 1, 9


@pytest.fixture(scope="module", params=["fiber", "threads"])
def lib(request):
    return ctypes.CDLL(str(emu_build.build_selftest(request.param))), request.param


@pytest.fixture(scope="module")
def fiber_lib():
    return ctypes.CDLL(str(emu_build.build_selftest("fiber"))), "fiber"


def run(lib, case, n=256, schedule="forward", monkeypatch=None):
    lib, _ = lib
    out = (ctypes.c_float * n)(*([-123.0] * n))
    err = ctypes.create_string_buffer(2048)
    if monkeypatch is not None:
        monkeypatch.setenv("WHYMATCH_EMU_SCHEDULE", schedule)
    rc = lib.wm_emu_selftest(case.encode(), out, err, len(err))
    return rc, list(out), err.value.decode()


def test_a_correct_kernel_runs(lib):
    rc, out, err = run(lib, "ok")
    assert (rc, err) == (0, "")
    assert out[:100] == [float(i) for i in range(100)] and out[100] == -123.0


@pytest.mark.parametrize("case", ["grid_y_over_limit", "block_over_limit"])
def test_launch_limits(lib, case):
    rc, out, _ = run(lib, case)
    assert rc == CUDA_ERROR_INVALID_CONFIGURATION


def test_dynamic_shared_memory_above_48k_needs_the_optin(lib):
    assert run(lib, "big_dynamic_without_optin")[0] == CUDA_ERROR_INVALID_VALUE
    rc, out, err = run(lib, "big_dynamic_with_optin")
    assert (rc, err) == (0, "") and out[:32] == [2.0] * 32


def test_static_shared_memory_is_poisoned(lib):
    rc, out, _ = run(lib, "static_read_before_write")
    assert rc == 0 and out[0] == 1.0 and all(math.isnan(v) for v in out[1:64])


def test_static_shared_memory_is_poisoned_between_blocks(lib):
    rc, out, _ = run(lib, "static_stale_between_blocks")
    assert rc == 0 and out[:32] == [7.0] * 32 and all(math.isnan(v) for v in out[32:64])


def test_dynamic_shared_memory_is_poisoned(lib):
    rc, out, _ = run(lib, "dynamic_read_before_write")
    assert rc == 0 and all(math.isnan(v) for v in out[:32])


def test_write_past_dynamic_shared_memory(lib):
    rc, _, err = run(lib, "dynamic_overflow")
    assert rc == -1 and "past the end" in err and "dynamic shared memory" in err


def test_write_past_a_static_shared_array(lib):
    rc, _, err = run(lib, "static_overflow")
    assert rc == -1 and "past the end of __shared__ small" in err


def test_full_mask_in_a_partial_warp(lib):
    rc, _, err = run(lib, "full_mask_partial_warp")
    assert rc == -1 and "does not exist" in err and "partial warp" in err


def test_shuffle_naming_an_exited_lane(lib):
    rc, _, err = run(lib, "shuffle_with_exited_lane")
    assert rc == -1 and ("exited" in err or "deadlock" in err)


def test_warp_reduction(lib):
    rc, out, err = run(lib, "warp_sum")
    assert (rc, err) == (0, "")
    assert out[:32] == [float(sum(range(32)))] * 32 and out[32:64] == [float(sum(range(32, 64)))] * 32


def test_deadlock(lib, monkeypatch):
    monkeypatch.setenv("WHYMATCH_EMU_TIMEOUT_S", "2")  # the OS-thread back end waits that long
    rc, _, err = run(lib, "divergent_barrier")
    assert rc == -1 and "deadlock" in err


def test_schedules_expose_a_missing_barrier(fiber_lib, monkeypatch):
    lib = fiber_lib  # the schedules are the fiber back end's (OS threads interleave by chance)
    outs = {s: run(lib, "racy_reverse", schedule=s, monkeypatch=monkeypatch)[1][:64] for s in ("forward", "reverse")}
    assert [str(v) for v in outs["forward"]] != [str(v) for v in outs["reverse"]]
    fixed = {s: run(lib, "correct_reverse", schedule=s, monkeypatch=monkeypatch)[1][:64]
             for s in ("forward", "reverse", "random:3")}
    assert all(v == [float(63 - i) for i in range(64)] for v in fixed.values())


def test_bad_schedule_is_refused(fiber_lib, monkeypatch):
    lib = fiber_lib
    rc, _, err = run(lib, "ok", schedule="sideways", monkeypatch=monkeypatch)
    assert rc == -1 and "WHYMATCH_EMU_SCHEDULE" in err
