"""Report directories: swapped in whole, refused clearly, recovered after a crash; every write and
rename of the report writer and of atomic_write / atomic_torch_save failing in turn."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import InjectedFault as _Boom
from helpers import fail_nth_call as _arm
from whymatch import io as wio
from whymatch.io import REPORT_MARKER, atomic_output_dir, atomic_torch_save, atomic_write_text, check_output_dir
from whymatch.viz import write_report


def _pairs(tag: str, n_refs: int = 2):
    g = torch.Generator().manual_seed(len(tag))
    q = torch.rand(3, 8, 8, generator=g)
    refs = [torch.rand(3, 8, 8, generator=g) for _ in range(n_refs)]
    return [{"name": f"pair {tag}", "query": q, "references": refs,
             "maps": {"rise": torch.rand(n_refs, 8, 8, generator=g), "lime": torch.rand(n_refs, 8, 8, generator=g)}}]


def _write(out, tag, n_refs=2):
    return write_report(out, _pairs(tag, n_refs), [{"method": "rise", "run": tag}], title=f"report {tag}")


def _report_state(out: Path) -> str | None:
    """The tag of the complete report at ``out`` (every file index.html names exists, and no other
    file), None when there is none; fails on a mixed or half-written report."""
    if not out.exists():
        return None
    index = out / "index.html"
    assert index.is_file(), sorted(os.listdir(out))
    text = index.read_text()
    tag = re.search(r"<title>report (\w+)</title>", text).group(1)
    assert text.endswith("</body></html>")
    srcs = set(re.findall(r"src='([^']+)'", text))
    assert srcs and all((out / s).is_file() and (out / s).stat().st_size > 0 for s in srcs)
    assert set(os.listdir(out)) == srcs | {"index.html", REPORT_MARKER}, "a file of another report is mixed in"
    return tag


def _sides(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".whymatch-" in p.name)


# ------------------------------------------------------------------ refusals, before any work
def test_check_output_dir_refuses_clearly(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.html").write_text("<html>")  # a report of an older whymatch: replaceable
    (tmp_path / "old" / "p0_query.png").write_bytes(b"png")
    os.symlink(tmp_path / "file", tmp_path / "to-file")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    os.symlink(tmp_path / "mine", tmp_path / "to-mine")
    cases = {
        "file": "is an existing file, not a directory",
        "to-file": "is a symlink to .*file, which is not a directory",
        "dangling": "is a symlink to .*nowhere, which does not exist",
        "mine": "is a non-empty directory that is not a whymatch report",
        "to-mine": "is a non-empty directory that is not a whymatch report",
        "file/sub": "file is not a directory",
    }
    for name, pattern in cases.items():
        with pytest.raises(ValueError, match=pattern) as info:
            check_output_dir(tmp_path / name)
        assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
        with pytest.raises(ValueError, match=pattern):   # the writer refuses before rendering anything
            _write(tmp_path / name, "new")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious" and (tmp_path / "file").read_text() == "x"
    with pytest.raises(TypeError, match="out_dir must be a str or os.PathLike, got int"):
        check_output_dir(3)
    with pytest.raises(ValueError, match="must not be empty"):
        check_output_dir("")
    with pytest.raises(ValueError, match="root of the file system"):
        check_output_dir("/")
    assert check_output_dir(tmp_path / "old") == tmp_path / "old"
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()                      # the check creates nothing
    # an unwritable parent (simulated: tests may run as root, for whom permissions do not apply)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(ValueError, match=f"cannot write out_dir .*: {re.escape(str(tmp_path))} is not writable"):
        check_output_dir(tmp_path / "new")
    monkeypatch.undo()
    _write(tmp_path / "old", "v1")
    assert _report_state(tmp_path / "old") == "v1"


def test_report_replaces_the_old_one_whole_and_follows_a_symlink(tmp_path):
    out = tmp_path / "rep"
    _write(out, "v1", n_refs=3)
    assert _report_state(out) == "v1" and (out / "p0_ref2_rise.png").is_file()
    _write(out, "v2", n_refs=1)
    assert _report_state(out) == "v2" and not (out / "p0_ref2_rise.png").exists()  # no file of v1 left
    os.symlink(out, tmp_path / "link")
    _write(tmp_path / "link", "v3")
    assert (tmp_path / "link").is_symlink() and _report_state(out) == "v3"
    assert _sides(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask          # not mkdtemp's 0700


# ------------------------------------------------------------------ crashes and stale side directories
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_side_directories_of_dead_runs_are_cleaned_and_a_lost_swap_is_restored(tmp_path):
    out = tmp_path / "rep"
    _write(out, "v1")
    pid = _dead_pid()
    # a run died between its two renames: the old report sits in its backup, out is gone
    backup = tmp_path / f".rep.whymatch-old-{wio._HOST}-{pid}-100"
    os.rename(out, backup)
    half = tmp_path / f".rep.whymatch-tmp-{wio._HOST}-{pid}-200"
    half.mkdir()
    (half / "index.html").write_text("half")
    other = tmp_path / ".other.whymatch-tmp-00000000-1-1"   # another out_dir's: not ours to touch
    other.mkdir()
    alive = tmp_path / f".rep.whymatch-tmp-{wio._HOST}-1-300"  # pid 1 is alive: a run in progress
    alive.mkdir()
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            raise RuntimeError("the run fails before it writes anything")
    assert _report_state(out) == "v1"                            # restored from the backup
    assert _sides(tmp_path) == sorted([other.name, alive.name])
    _write(out, "v2")
    assert _report_state(out) == "v2"


# ------------------------------------------------------------------ injected faults


_REPORT_FAULTS = [(os, "rename"), (os, "replace"), (os, "mkdir"), (os, "fsync"), (wio, "_exchange"),
                  (Path, "write_bytes"), (Path, "write_text"), (wio, "_fsync_tree")]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_every_write_and_rename_of_the_report_failing_in_turn(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(wio, "_exchange", lambda a, b: False)
    out = tmp_path / "rep"
    _write(out, "v1", n_refs=3)
    tried = 0
    for owner, name in _REPORT_FAULTS:
        with monkeypatch.context() as m:
            seen = _arm(m, owner, name, fail_at=0)
            _write(tmp_path / "probe", "v2")
        for n in range(1, len(seen) + 1):
            with monkeypatch.context() as m:
                _arm(m, owner, name, fail_at=n)
                try:
                    _write(out, "v2")
                    failed = False
                except (_Boom, ValueError):
                    failed = True
            tried += 1
            state = _report_state(out)           # never a mix: the old one or the new one, complete
            assert state == ("v1" if failed else "v2"), (name, n, state)
            if not failed:
                _write(out, "v1", n_refs=3)
            assert _sides(tmp_path) == [], (name, n, _sides(tmp_path))
    print(f"{tried} report faults injected")
    assert tried >= 20
    _write(out, "v2")
    assert _report_state(out) == "v2" and _sides(tmp_path) == []


def test_a_swap_whose_restore_also_fails_is_recovered_by_the_next_run(tmp_path, monkeypatch):
    out = tmp_path / "rep"
    _write(out, "v1")
    monkeypatch.setattr(wio, "_exchange", lambda a, b: False)
    real = os.rename
    calls = []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) >= 2:                   # new -> out fails, and so does backup -> out
            raise _Boom("disk gone")
        return real(a, b)

    with monkeypatch.context() as m:
        m.setattr(os, "rename", rename)
        with pytest.raises(_Boom):
            _write(out, "v2")
    assert not out.exists() and len(_sides(tmp_path)) == 1    # the old report waits in its backup
    _write(out, "v3")                                           # the next run restores it, then replaces it
    assert _report_state(out) == "v3" and _sides(tmp_path) == []


def test_a_failing_report_body_leaves_the_old_report(tmp_path):
    out = tmp_path / "rep"
    _write(out, "v1")
    bad = _pairs("v2")
    bad[0]["maps"]["lime"] = torch.rand(1, 8, 8)              # fewer maps than references: refused first
    with pytest.raises(ValueError, match=r"pairs\[0\]\['maps'\]\['lime'\] must be \(2, H, W\), one map per reference"):
        write_report(out, bad, [], title="report v2")
    nan = _pairs("v2")
    nan[0]["maps"]["lime"][1, 3, 3] = float("nan")              # found while drawing, after some PNGs are written
    with pytest.raises(ValueError, match="saliency must be finite, got 1 NaN"):
        write_report(out, nan, [], title="report v2")
    for pairs, error, pattern in (("x", TypeError, "pairs must be a sequence"), ([3], TypeError, r"pairs\[0\] must be a dict"),
                                  ([{"name": "a"}], ValueError, "lacks the keys 'query', 'references', 'maps'"),
                                  ([{**_pairs("v2")[0], "query": torch.rand(8, 8)}], ValueError,
                                   r"\['query'\] must be a \(3, H, W\) image tensor, got \(8, 8\)")):
        with pytest.raises(error, match=pattern):
            write_report(out, pairs, [], title="report v2")
    with pytest.raises(ValueError, match="has no maps of method 'mask'"):
        write_report(out, _pairs("v2"), [], title="report v2", methods=["rise", "mask"])
    assert _report_state(out) == "v1" and _sides(tmp_path) == []


@pytest.mark.parametrize("writer", ["text", "torch"])
def test_atomic_write_failing_in_turn_keeps_the_previous_file(tmp_path, monkeypatch, writer):
    path = tmp_path / "f"

    def write(version):
        if writer == "text":
            atomic_write_text(path, f"version {version}\n" * 100)
        else:
            atomic_torch_save({"version": version, "w": torch.full((50,), float(version))}, path)

    def read():
        if writer == "text":
            text = path.read_text()
            assert text == text.splitlines()[0] + "\n" + (text.splitlines()[0] + "\n") * 99
            return int(text.split()[1])
        obj = wio.load_torch_file(path)
        assert torch.equal(obj["w"], torch.full((50,), float(obj["version"])))
        return obj["version"]

    write(1)
    tried = 0
    for owner, name in [(os, "replace"), (os, "fsync"), (os, "fchmod"), (os, "fdopen"), (wio.tempfile, "mkstemp")]:
        with monkeypatch.context() as m:
            seen = _arm(m, owner, name, fail_at=0)
            write(1)
        for n in range(1, len(seen) + 1):
            with monkeypatch.context() as m:
                _arm(m, owner, name, fail_at=n)
                try:
                    write(2)
                    failed = False
                except _Boom:
                    failed = True
            tried += 1
            assert read() == (1 if failed else 2), (name, n)
            write(1)
            assert sorted(os.listdir(tmp_path)) == ["f"], (name, n)  # no temporary file left
    assert tried >= 5


def test_a_folder_that_only_looks_like_a_report_and_the_current_directory_are_refused(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html>my web site</html>")
    (site / "logo.png").write_bytes(b"png")                  # not a name whymatch gives its PNGs
    with pytest.raises(ValueError, match="not a whymatch report"):
        _write(site, "v1")
    assert (site / "logo.png").read_bytes() == b"png"
    _write(tmp_path / "rep", "v1")
    monkeypatch.chdir(tmp_path / "rep")
    for target in (".", str(tmp_path / "rep"), str(tmp_path)):
        with pytest.raises(ValueError, match="is or holds the current directory"):
            check_output_dir(target)
    assert _report_state(tmp_path / "rep") == "v1"
