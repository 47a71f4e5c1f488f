"""whymatch.memory: freed memory kept in glibc's heap while CPU batches run, given back after.

What glibc does is read back with mallinfo2 in a fresh process: a 64 MiB block comes from the heap
(``arena`` grows) while a scope keeps freed memory, from its own mmap (``hblkhd``) otherwise, and the
heap shrinks again when the last scope ends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import whymatch.memory as M

glibc = pytest.mark.skipif(not M.reuse_enabled(), reason="needs glibc, no MALLOC_*_THRESHOLD_ in the environment")

_PRELUDE = textwrap.dedent("""
    import ctypes, threading
    import whymatch.memory as M

    class MI2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    lib = ctypes.CDLL("libc.so.6")
    lib.mallinfo2.restype = MI2
    lib.malloc.restype, lib.malloc.argtypes, lib.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    MIB = 1 << 20

    def where():
        '''Where a 64 MiB block comes from now: 'heap' or 'mmap'; freed at once.'''
        before = lib.mallinfo2().hblkhd
        p = lib.malloc(64 * MIB)
        mapped = lib.mallinfo2().hblkhd - before >= 64 * MIB
        lib.free(p)
        return "mmap" if mapped else "heap"

    def heap_mib():
        return lib.mallinfo2().arena // MIB
""")


def _run(body: str, **env) -> list[str]:
    full = dict(os.environ, **env)
    for k in [k for k, v in env.items() if v is None]:
        full.pop(k)
    p = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                       env=full, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.split()


@glibc
def test_a_scope_keeps_freed_blocks_in_the_heap_and_gives_them_back_after():
    out = _run("""
        print(where())
        with M.reusing() as changed:
            print(changed, where())
            p = lib.malloc(200 * MIB); lib.free(p)  # freed inside: stays in the heap while the scope runs
            print(heap_mib() >= 200)
        print(heap_mib() < 100, where())  # trimmed, and glibc's own 32 MiB ceiling again
    """)
    assert out == ["mmap", "True", "heap", "True", "True", "mmap"]


@glibc
def test_nested_and_concurrent_scopes_restore_only_when_the_last_one_ends():
    out = _run("""
        inside, release = threading.Event(), threading.Event()
        def other():
            with M.reusing():
                inside.set(); release.wait(30)
        t = threading.Thread(target=other); t.start(); inside.wait(30)
        with M.reusing():
            with M.reusing():
                pass
            print(where())          # the inner scope ended: still kept
        print(where())              # this thread's scopes ended, the other thread's runs
        release.set(); t.join()
        print(where())              # the last one ended
    """)
    assert out == ["heap", "heap", "mmap"]


@glibc
@pytest.mark.parametrize("how", ["set_reuse", "env_off", "glibc_env", "inactive"])
def test_a_scope_changes_nothing_when_turned_off_or_the_user_tuned_glibc(how):
    env = {"WHYMATCH_REUSE_MEMORY": "0"} if how == "env_off" else {}
    if how == "glibc_env":
        env["MALLOC_TRIM_THRESHOLD_"] = str(128 << 10)
    out = _run(f"""
        if {how!r} == "set_reuse":
            M.set_reuse(False)
        with M.reusing(active={how != "inactive"}) as changed:
            print(changed, where())
    """, **env)
    assert out == ["False", "mmap"]


@glibc
def test_keep_freed_memory_is_process_wide_and_scopes_leave_it_alone():
    out = _run("""
        print(M.keep_freed_memory())
        with M.reusing() as changed:
            print(changed)
        print(where(), heap_mib() >= 0)
    """)
    assert out == ["True", "False", "heap", "True"]


def test_set_reuse_needs_a_bool():
    with pytest.raises(TypeError, match="enabled must be a bool, got str"):
        M.set_reuse("no")  # type: ignore[arg-type]


class _Pool(torch.nn.Module):
    """A tiny embedder: 2 x 2 average pooling, flattened."""

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def test_explainers_and_the_causal_metric_run_their_cpu_batches_in_a_scope(monkeypatch):
    """RISE (the batch loop of every explainer, Explainer._batches) and insertion / deletion."""
    import whymatch
    from whymatch.metrics import causal
    from whymatch.saliency import RISE, base

    seen = []
    real = M.reusing

    def recording(active=True):
        seen.append(active)
        return real(active)

    monkeypatch.setattr(base, "reusing", recording)
    monkeypatch.setattr(causal, "reusing", recording)
    sim = whymatch.SimilarityModel(_Pool())
    g = torch.Generator().manual_seed(0)
    q, r = torch.rand(3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g)
    maps = RISE(sim, n_masks=16, batch_size=8).attribute(q, r)
    assert seen == [True]
    causal.insertion_deletion(sim, q[None], r, maps, n_steps=4)
    assert len(seen) == 3 and all(seen)  # insertion and deletion


@pytest.mark.parametrize("size, want", [(224, 69), (96, 256), (1024, 8)])
def test_default_cpu_image_batches_hold_at_most_cpu_batch_bytes(size, want):
    """The default 'images' batch on a CPU: at most CPU_BATCH_BYTES of input (at least 8 images); a batch size
    the user gave is kept; the maps do not depend on it."""
    import whymatch
    from whymatch.saliency import RISE, SlidingWindow, base

    sim = whymatch.SimilarityModel(_Pool())
    image = torch.zeros(3, size, size)
    for cls in (RISE, SlidingWindow):
        assert cls(sim)._batch_for(image) == want
        assert cls(sim, batch_size=256)._batch_for(image) == 256
        assert cls(sim, batch_size=5)._batch_for(image) == 5
        ex = cls(sim)
        ex.batch_size = 300  # set after construction: the user's choice
        assert ex._batch_for(image) == 300
    g = torch.Generator().manual_seed(1)
    q, r = torch.rand(3, 224, 224, generator=g), torch.rand(2, 3, 224, 224, generator=g)
    sizes = []
    real = base.batches

    def spy(n, batch_size, **kw):
        sizes.append(batch_size)
        return real(n, batch_size, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base, "batches", spy)
        default = RISE(sim, n_masks=150).attribute(q, r)
    assert sizes == [69]
    torch.testing.assert_close(default, RISE(sim, n_masks=150, batch_size=256).attribute(q, r), rtol=1e-5, atol=1e-6)
