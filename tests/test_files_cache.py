"""The saliency cache on disk: concurrent builders, corrupt manifests and data files, crashes and
injected faults (every write / rename failing in turn) never leave a cache that lies."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import InjectedFault as _Boom
from helpers import count_calls
from helpers import fail_nth_call as _arm
from whymatch import SimilarityModel
from whymatch.attributes import cache as cache_mod
from whymatch.attributes.cache import LOCK, MANIFEST, SaliencyCache, SaliencyCacheError
from whymatch.models import ShapesCNN
from whymatch.saliency import RISE

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 16
KW = dict(k=2, size=8, n_masks=6, batch_size=6)


def _sim():
    torch.manual_seed(0)
    return SimilarityModel(ShapesCNN(8, (4, 8, 8, 8))).eval()


def _images(n=6):
    gen = torch.Generator().manual_seed(3)
    imgs = torch.rand(n, 3, SIZE, SIZE, generator=gen)
    labels = torch.tensor([0, 0, 0, 1, 1, 2][:n])
    return list(zip(imgs, labels.tolist())), labels


def _build(path, **kw):
    items, labels = _images()
    return SaliencyCache.build(_sim(), items, path, labels=labels, **{**KW, **kw})


def _count_rise(monkeypatch) -> list:
    return count_calls(monkeypatch, RISE, "attribute")


def _content(c: SaliencyCache):
    return c.fingerprint["rise"]["n_masks"], np.array(c.maps), c.references.clone()


def _same(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


def _files(path):
    """The visible files of a cache directory (the lock and atomic_write's dot files aside)."""
    return sorted(p.name for p in path.iterdir() if not p.name.startswith("."))


def _published_only(c: SaliencyCache) -> bool:
    return _files(c.path) == sorted([MANIFEST, *c.manifest["files"].values()])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """What a clean single build gives, with n_masks 6 and 7."""
    root = tmp_path_factory.mktemp("ref")
    return {m: _content(_build(root / f"m{m}", n_masks=m)) for m in (6, 7)}


# ------------------------------------------------------------------ bad manifests and data files
def _corrupt_manifest(path, how):
    man = path / MANIFEST
    m = json.loads(man.read_text())
    if how == "not json":
        man.write_text("{not json")
    elif how == "empty":
        man.write_text("")
    elif how == "binary":
        man.write_bytes(b"\xff\xfe\x00garbage")
    elif how == "a list":
        man.write_text(json.dumps([m]))
    elif how == "null":
        man.write_text("null")
    elif how.startswith("without "):
        del m[how.split()[1]]
        man.write_text(json.dumps(m))
    else:
        key, value = how.split("=", 1)
        target = m
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        target[last] = json.loads(value)
        man.write_text(json.dumps(m))


BAD_MANIFESTS = ["not json", "empty", "binary", "a list", "null", "without fingerprint", "without sha256",
                 "without n", "without files", "n=\"6\"", "n=true", "n=0", "k=-1", "size=8.0", "format=1",
                 "format=true", "fingerprint=[]", "files=null", "files.maps=\"../../etc/passwd\"",
                 "files.maps=\"/etc/passwd\"", "files.references=\"maps-0123456789abcdef.npy\"",
                 "files={\"maps\": \"maps.npy\"}", "sha256.maps=\"abc\"", "sha256.maps=7", "n=7", "k=3", "size=4"]


@pytest.mark.parametrize("how", BAD_MANIFESTS)
def test_a_bad_manifest_is_a_named_error_and_rebuilt(tmp_path, monkeypatch, reference, how):
    path = tmp_path / "c"
    _build(path)
    _corrupt_manifest(path, how)
    with pytest.raises((SaliencyCacheError, FileNotFoundError)) as info:
        SaliencyCache.open(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    if how != "files.references=\"maps-0123456789abcdef.npy\"":
        assert isinstance(info.value, SaliencyCacheError) and isinstance(info.value, ValueError)
    calls = _count_rise(monkeypatch)
    c = _build(path)
    assert len(calls) == 5 and _same(_content(c), reference[6]) and _published_only(c)
    assert _same(_content(SaliencyCache.open(path)), reference[6])


def _rewrite_npy(path, arr):
    with open(path, "wb") as f:
        np.save(f, arr)


def _fix_sha(c: SaliencyCache, kind: str) -> None:
    m = json.loads((c.path / MANIFEST).read_text())
    m["sha256"][kind] = cache_mod._file_sha256(c.path / m["files"][kind])
    (c.path / MANIFEST).write_text(json.dumps(m))


DATA_FAULTS = {
    "maps byte flipped": ("maps", lambda f: f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1])),
                          False, "does not match its manifest"),
    "maps truncated": ("maps", lambda f: f.write_bytes(f.read_bytes()[:200]), False, "does not match"),
    "maps truncated, sha fixed": ("maps", lambda f: f.write_bytes(f.read_bytes()[:200]), True, "not a readable"),
    "maps empty, sha fixed": ("maps", lambda f: f.write_bytes(b""), True, "not a readable"),
    "maps wrong shape": ("maps", lambda f: _rewrite_npy(f, np.zeros((6, 2, 4, 4), np.float16)), True,
                         r"float16 \(6, 2, 4, 4\), the manifest says float16 \(6, 2, 8, 8\)"),
    "maps wrong dtype": ("maps", lambda f: _rewrite_npy(f, np.zeros((6, 2, 8, 8), np.float32)), True,
                         "holds float32"),
    "maps pickled object": ("maps", lambda f: np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True),
                            True, "not a readable .npy"),
    "references wrong shape": ("references", lambda f: _rewrite_npy(f, np.zeros((5, 2), np.int64)), True,
                               r"int64 \(5, 2\), the manifest says int64 \(6, 2\)"),
    "references float": ("references", lambda f: _rewrite_npy(f, np.zeros((6, 2), np.float64)), True,
                         "holds float64"),
    "references out of range": ("references", lambda f: _rewrite_npy(f, np.full((6, 2), 6, np.int64)), True,
                                r"indices in \[6, 6\], expected -1 or \[0, 6\)"),
    "references negative": ("references", lambda f: _rewrite_npy(f, np.full((6, 2), -7, np.int64)), True,
                            r"indices in \[-7, -7\]"),
    "references garbage": ("references", lambda f: f.write_bytes(b"garbage" * 10), True, "not a readable"),
}


@pytest.mark.parametrize("fault", sorted(DATA_FAULTS))
def test_a_bad_data_file_is_a_named_error_and_rebuilt(tmp_path, monkeypatch, reference, fault):
    kind, corrupt, fix_sha, pattern = DATA_FAULTS[fault]
    path = tmp_path / "c"
    c = _build(path)
    target = c.path / c.manifest["files"][kind]
    corrupt(target)
    if fix_sha:
        _fix_sha(c, kind)
    with pytest.raises(SaliencyCacheError, match=pattern) as info:
        SaliencyCache.open(path)
    assert "\n" not in str(info.value) and str(target) in str(info.value)
    calls = _count_rise(monkeypatch)
    again = _build(path)
    assert len(calls) == 5 and _same(_content(again), reference[6]) and _published_only(again)


def test_a_missing_data_file_is_named_and_rebuilt(tmp_path, monkeypatch, reference):
    path = tmp_path / "c"
    c = _build(path)
    gone = c.path / c.manifest["files"]["references"]
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=f"{gone.name} is missing"):
        SaliencyCache.open(path)
    calls = _count_rise(monkeypatch)
    assert _same(_content(_build(path)), reference[6]) and len(calls) == 5


def test_open_without_verify_still_checks_shapes_and_an_existing_file_is_refused(tmp_path):
    path = tmp_path / "c"
    c = _build(path)
    _rewrite_npy(c.path / c.manifest["files"]["maps"], np.zeros((6, 2, 4, 4), np.float16))
    with pytest.raises(SaliencyCacheError, match="the manifest says"):
        SaliencyCache.open(path, verify=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is an existing file, not a directory"):
        _build(tmp_path / "file")


def test_a_format_1_cache_is_rebuilt_and_its_files_removed(tmp_path, monkeypatch, reference):
    path = tmp_path / "c"
    path.mkdir()
    np.save(path / "maps.npy", np.zeros((6, 2, 8, 8), np.float16))
    np.save(path / "references.npy", np.zeros((6, 2), np.int64))
    _rewrite_npy(path / "maps.npy.partial", np.zeros(3, np.float16))  # what a killed format-1 build left
    (path / MANIFEST).write_text(json.dumps({"format": 1, "fingerprint": {}, "n": 6, "k": 2, "size": 8}))
    with pytest.raises(SaliencyCacheError, match="lacks the keys 'files', 'sha256'"):
        SaliencyCache.open(path)
    calls = _count_rise(monkeypatch)
    c = _build(path)
    assert len(calls) == 5 and _same(_content(c), reference[6]) and _published_only(c)


# ------------------------------------------------------------------ injected faults: every write and rename
def _fault_points(monkeypatch):
    """Callables a build writes through, each wrapped so that the N-th call of one of them raises."""
    return [
        (os, "replace"),
        (os, "fsync"),
        (cache_mod, "atomic_write"),
        (cache_mod, "atomic_write_text"),
        (np.lib.format, "open_memmap"),
        (np, "save"),
        (RISE, "attribute"),
        (cache_mod, "_file_sha256"),
    ]




@pytest.mark.slow
def test_every_write_and_rename_failing_in_turn_keeps_the_previous_cache(tmp_path, monkeypatch, reference):
    path = tmp_path / "c"
    _build(path)                     # the previous cache: n_masks 6
    prev_files = _files(path)
    tried, survived = 0, []
    for owner, name in _fault_points(monkeypatch):
        # how many calls a clean rebuild (n_masks 6 -> 7) makes of this function
        _build(tmp_path / f"probe-{name}")
        with monkeypatch.context() as m:
            seen = _arm(m, owner, name, fail_at=0)
            probe = _build(tmp_path / f"probe-{name}", n_masks=7)
            assert _same(_content(probe), reference[7])
        assert seen, name
        for n in range(1, len(seen) + 1):
            with monkeypatch.context() as m:
                _arm(m, owner, name, fail_at=n)
                try:
                    _build(path, n_masks=7)
                    failed = False
                except (_Boom, SaliencyCacheError):  # the fault itself, or reading back the new cache failed
                    failed = True
            tried += 1
            # the directory holds a complete cache, verified: the previous one or (the fault came after the
            # publication, or reading the old cache failed so it was rebuilt) the new one; nothing half-done
            now = _content(SaliencyCache.open(path))
            if _same(now, reference[6]):
                assert failed, (name, n)
                assert set(prev_files) <= set(_files(path))
            else:
                assert _same(now, reference[7]), (name, n)
                survived.append((name, n))
                assert _published_only(SaliencyCache.open(path))
                prev_files = _files(_build(path).path)  # back to the previous state for the next fault
    print(f"{tried} faults injected; the build survived {survived}")
    assert tried >= 15 and len(survived) < tried / 2, survived
    # the next run recovers: a correct new cache and no file of the failed runs left
    calls = _count_rise(monkeypatch)
    c = _build(path, n_masks=7)
    assert len(calls) == 5 and _same(_content(c), reference[7]) and _published_only(c)
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_first_build_publishes_nothing_and_the_next_one_recovers(tmp_path, monkeypatch, reference):
    path = tmp_path / "c"
    with monkeypatch.context() as m:
        _arm(m, cache_mod, "atomic_write_text", fail_at=1)  # the manifest: the last step
        with pytest.raises(_Boom):
            _build(path)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        SaliencyCache.open(path)
    c = _build(path)
    assert _same(_content(c), reference[6]) and _published_only(c)


# ------------------------------------------------------------------ real processes
def _child_build(path, go, result, n_masks):
    torch.set_num_threads(1)
    calls = []
    orig = RISE.attribute

    def counted(self, *a, **kw):
        calls.append(1)
        time.sleep(0.02)  # a slower build: the other process surely arrives while it runs
        return orig(self, *a, **kw)

    RISE.attribute = counted
    while not os.path.exists(go):
        time.sleep(0.005)
    c = _build(path, n_masks=n_masks)
    np.save(result, np.array([len(calls), float(np.abs(np.asarray(c.maps, np.float32)).sum())]))


@pytest.mark.slow
def test_concurrent_builders_in_processes_build_once_and_agree(tmp_path, reference):
    """Three processes build the same cache at the same instant: one computes, the others wait for
    the lock and reuse it; the cache equals a single-process build."""
    ctx = mp.get_context("spawn")
    path, go = tmp_path / "c", tmp_path / "go"
    procs = [ctx.Process(target=_child_build, args=(str(path), str(go), str(tmp_path / f"r{i}.npy"), 6))
             for i in range(3)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    go.write_text("go")
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = [np.load(tmp_path / f"r{i}.npy") for i in range(3)]
    assert sorted(int(r[0]) for r in results) == [0, 0, 5]      # built once, reused twice
    assert len({float(r[1]) for r in results}) == 1
    c = SaliencyCache.open(path)
    assert _same(_content(c), reference[6]) and _published_only(c)
    assert (path / LOCK).is_file()


_KILL_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
import test_files_cache as t
from whymatch.saliency import RISE
orig = RISE.attribute
def slow(self, *a, **kw):
    print("computing", flush=True)
    time.sleep(0.3)
    return orig(self, *a, **kw)
RISE.attribute = slow
torch.set_num_threads(1)
t._build({path!r}, n_masks=7)
"""


@pytest.mark.slow
def test_a_builder_killed_mid_build_leaves_the_previous_cache_and_the_next_build_recovers(tmp_path, reference):
    path = tmp_path / "c"
    _build(path)
    script = _KILL_SCRIPT.format(tests=os.path.dirname(__file__), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "computing"
        time.sleep(0.1)
        # while the build runs, the previous cache is complete and a second builder would wait
        assert _same(_content(SaliencyCache.open(path)), reference[6])
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(60)
    stray = [f for f in _files(path) if f not in (MANIFEST, *SaliencyCache.open(path).manifest["files"].values())]
    assert stray                                                  # the killed build's unpublished maps file
    assert _same(_content(SaliencyCache.open(path)), reference[6])
    c = _build(path, n_masks=7)                                    # the lock died with it: no wait
    assert _same(_content(c), reference[7]) and _published_only(c)
