"""Mutation check of the emulated CUDA tests: do tests/test_emulated_*.py notice a broken kernel?

    python tools/cuda_mutants.py [--kinds barrier,shrink,store] [--sample N] [--jobs J] [--out benchmarks/results]

Mutants of csrc/*/*_cuda.cu (one change each):
  barrier  every __syncthreads() / __syncwarp(...) call removed in turn
  shrink   every __shared__ array's first dimension minus one; every launch's dynamic shared memory
           minus 16 bytes
  store    every store `name[index] = ...` shifted by one element (`name[(index) + 1] = ...`)
Each mutant is built with the emulation (tests/cuda_emulation/build.py; only the mutated file
recompiles, the other objects come from the cache) and the emulated tests of its op family run
against it (WHYMATCH_EMU_MODULE): the tests of every tests/test_emulated_*.py file that run the
mutated kernel file (TESTS below: a map from each emulated test to the kernel files it runs, checked
at start to name every emulated test and to give every kernel file a test). Killed: a test failed
(or the run timed out); survived: all passed; invalid: the mutant did not compile (not counted).
Writes cuda_mutants.json and .md.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
emu_build = None  # tests/cuda_emulation/build.py, imported from the snapshot (main)
CACHE = REPO / "build" / "cuda_emulation"

# The kernel files (csrc/*/<name>) that each emulated test runs, per test file: {test function:
# [kernel files]}, "*" for every test of the file. A mutant of kernel file F runs every test mapped
# to F. check_tests() fails when an emulated test or a kernel file is left out.
TESTS = {
    "tests/test_emulated_kernels.py": {
        "test_rise_apply": ["rise_apply_cuda.cu"],
        "test_rise_apply_out": ["rise_apply_cuda.cu"],
        "test_rise_saliency": ["rise_saliency_cuda.cu"],
        "test_ranked_blend": ["ranked_blend_cuda.cu"],
        "test_soft_mask_forward_backward": ["soft_mask_cuda.cu"],
        "test_avsl_distance_and_backward": ["avsl_distance_cuda.cu"],
        "test_avsl_topk": ["avsl_distance_cuda.cu"],
        "test_avsl_hats_placement": ["avsl_distance_cuda.cu"],
        "test_avsl_default_hats_in_shared_memory": ["avsl_distance_cuda.cu"],
        "test_cam_statistics_and_edges": ["cam_correlation_cuda.cu"],
    },
    "tests/test_emulated_findings.py": {
        "test_pending_error_is_reported_and_left_pending": ["rise_apply_cuda.cu"],
        "test_topk_merge_many_segments": ["avsl_distance_cuda.cu"],
        "test_cam_correlation_empty_product_leaves_workspace": ["cam_correlation_cuda.cu"],
        "test_std_algorithms_have_their_include": [],  # reads the sources; runs no kernel
        "test_avsl_forward_last_level_sum_every_pair_group": ["avsl_distance_cuda.cu"],
        "test_rise_saliency_masks_split_over_warps": ["rise_saliency_cuda.cu"],
    },
    "tests/test_emulated_barriers.py": {"*": ["avsl_distance_cuda.cu"]},
    # the tensor-core tests also run the SIMT kernel, for their error bound
    "tests/test_emulated_tensorcore.py": {"*": ["avsl_tensorcore_cuda.cu", "avsl_distance_cuda.cu"]},
    # the fused cuBLAS-path tests also run the SIMT kernel, for their error bound
    "tests/test_emulated_avsl_fused.py": {"*": ["avsl_fused_cuda.cu", "avsl_distance_cuda.cu"]},
    "tests/test_emulated_checks.py": {"*": []},  # the emulation's self-tests (selftest.cu), no csrc kernel
}


def _collect() -> dict[str, set[str]]:
    """{test file: the names of its emulated test functions} (pytest --collect-only)."""
    files = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "tests").glob("test_emulated_*.py"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "-m", "emulated",
                        *files], cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        sys.exit("collecting the emulated tests failed:\n" + r.stdout[-3000:] + r.stderr[-2000:])
    out: dict[str, set[str]] = {f: set() for f in files}
    for ln in r.stdout.splitlines():
        if "::" in ln:
            f, name = ln.split("::", 1)
            out.setdefault(f, set()).add(name.split("[", 1)[0])
    return out


def check_tests(collected: dict[str, set[str]], kernels: list[str]) -> dict[str, list[str]]:
    """{kernel file name: pytest node ids (file::function) of the tests that run it}; exits naming
    every emulated test without an entry in TESTS, every entry without a test, and every kernel file
    without a test."""
    problems, by_kernel = [], {k: [] for k in kernels}
    for f, names in sorted(collected.items()):
        m = TESTS.get(f)
        if m is None:
            problems.append(f"{f}: not in TESTS")
            continue
        for name in sorted(names):
            ks = m.get(name, m.get("*"))
            if ks is None:
                problems.append(f"{f}::{name}: not in TESTS")
                continue
            for k in ks:
                if k not in by_kernel:
                    problems.append(f"{f}::{name}: names {k}, not a csrc/*/*_cuda.cu")
                elif "*" in m:
                    if f not in by_kernel[k]:
                        by_kernel[k].append(f)
                else:
                    by_kernel[k].append(f"{f}::{name}")
        problems += [f"{f}::{name}: in TESTS, not collected" for name in m if name != "*" and name not in names]
    problems += [f"{f}: in TESTS, no such file" for f in TESTS if f not in collected]
    problems += [f"{k}: no emulated test runs it" for k, ids in by_kernel.items() if not ids]
    if problems:
        sys.exit("tools/cuda_mutants.py TESTS is out of date:\n  " + "\n  ".join(problems))
    return by_kernel


def _code_spans(text: str) -> list[tuple[int, int]]:
    """Spans of comments, which no mutant touches."""
    return [m.span() for m in re.finditer(r"//[^\n]*|/\*.*?\*/", text, re.S)]


def _in(spans, pos):
    return any(a <= pos < b for a, b in spans)


def _split_top(s: str) -> list[str]:
    """s split at the commas outside parentheses / brackets / angle brackets."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([<":
            depth += 1
        elif ch in ")]>":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def mutants(src_root: Path, kinds: set[str]) -> list[dict]:
    out = []
    for path in sorted((src_root / "csrc").glob("*/*_cuda.cu")):
        rel = path.relative_to(src_root).as_posix()
        text = path.read_text()
        comments = _code_spans(text)

        def add(kind, m, new, what):
            if _in(comments, m.start()):
                return
            line = text.count("\n", 0, m.start()) + 1
            out.append({"kind": kind, "file": rel, "line": line, "what": what,
                        "start": m.start(), "end": m.end(), "new": new})
        if "barrier" in kinds:
            for m in re.finditer(r"__sync(?:threads|warp)\s*\([^;]*?\)\s*;", text):
                add("barrier", m, "/* mutant: barrier removed */;", m.group(0).split("(")[0] + " removed")
        if "shrink" in kinds:
            for m in re.finditer(r"(__shared__[^;\[]*?\b\w+\s*\[)([^\]]+)(\])", text):
                if "extern" in text[max(0, m.start() - 10):m.start()]:
                    continue
                add("shrink", m, f"{m.group(1)}({m.group(2)}) - 1{m.group(3)}",
                    f"shared array [{m.group(2)}] -> [{m.group(2)} - 1]")
            for m in re.finditer(r"<<<(.*?)>>>", text, re.S):
                args = _split_top(m.group(1))
                if len(args) < 3 or args[2].strip() == "0":
                    continue
                args[2] = f" ({args[2].strip()}) - 16"
                add("shrink", m, "<<<" + ",".join(args) + ">>>", f"dynamic shared memory {args[2].strip()}")
        if "store" in kinds:
            for m in re.finditer(r"\b(\w+)\[([^\[\]\n]+)\]\s*=(?!=)", text):
                if m.group(1) in ("int", "float", "double", "char"):
                    continue
                add("store", m, f"{m.group(1)}[({m.group(2)}) + 1] =", f"store {m.group(1)}[{m.group(2)}] shifted by +1")
    for i, mu in enumerate(out):
        mu["id"] = i
    return out


def run_one(mu: dict, src_root: Path, work: Path, timeout: int, tests: list[str]) -> dict:
    t0 = time.perf_counter()
    root = work / f"m{mu['id']}"
    shutil.copytree(src_root / "csrc", root / "csrc")
    (root / "python/whymatch").mkdir(parents=True)
    shutil.copy(src_root / "python/whymatch/_version.py", root / "python/whymatch/_version.py")
    shutil.copy(src_root / "CMakeLists.txt", root / "CMakeLists.txt")
    f = root / mu["file"]
    text = f.read_text()
    f.write_text(text[:mu["start"]] + mu["new"] + text[mu["end"]:])
    res = {k: mu[k] for k in ("id", "kind", "file", "line", "what")}
    try:
        so = emu_build.build("fiber", src_root=root, cache=CACHE, jobs=1)
    except Exception as exc:  # noqa: BLE001 (a compile error of the mutant, reported as such)
        res.update(status="invalid", detail=str(exc).splitlines()[-1][:200], seconds=round(time.perf_counter() - t0, 1))
        return res
    env = dict(os.environ, WHYMATCH_EMU_MODULE=str(so), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "emulated", *tests]
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        failed = [ln for ln in r.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
        res.update(status="killed" if r.returncode else "survived",
                   detail=(failed[0][:200] if failed else r.stdout.strip().splitlines()[-1][:200] if r.stdout else ""))
    except subprocess.TimeoutExpired:
        res.update(status="killed", detail=f"timed out after {timeout} s (a hang)")
    res["seconds"] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(root, ignore_errors=True)
    return res


def write(results: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_mutants.json").write_text(json.dumps({"meta": meta, "mutants": results}, indent=1) + "\n")
    lines = ["# Mutation check of the emulated CUDA tests", "",
             f"Produced by `{meta['command']}` on {meta['date']} ({meta['machine']}); {meta['seconds']} s wall.",
             f"Checkout: {meta['commit']}. {meta['note']}", "",
             "| kind | mutants (of all found) | killed | survived | invalid (did not compile) | kill rate |",
             "|---|---|---|---|---|---|"]
    for kind in ("barrier", "shrink", "store"):
        rs = [r for r in results if r["kind"] == kind]
        if not rs and kind not in meta["found"]:
            continue
        k = sum(r["status"] == "killed" for r in rs)
        s = sum(r["status"] == "survived" for r in rs)
        inv = sum(r["status"] == "invalid" for r in rs)
        rate = f"{k}/{k + s}" + (f" ({100 * k / (k + s):.0f}%)" if k + s else "")
        lines.append(f"| {kind} | {len(rs)} (of {meta['found'].get(kind, 0)}) | {k} | {s} | {inv} | {rate} |")
    lines += ["", "| # | kind | where | mutation | result | detail |", "|---|---|---|---|---|---|"]
    for r in results:
        detail = r.get("detail", "").replace("|", "\\|")
        lines.append(f"| {r['id']} | {r['kind']} | {r['file']}:{r['line']} | {r['what'].replace('|', '/')} | "
                     f"{r['status']} | {detail} |")
    if meta.get("notes"):
        lines += ["", "## Notes on the survivors (reviewed by hand; the table above is measured)", "", meta["notes"].strip()]
    (out / "cuda_mutants.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="barrier,shrink,store")
    ap.add_argument("--sample", type=int, default=0,
                    help="run every barrier mutant and at most this many of each other kind (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="run only the mutants whose FILE:LINE contains this (a quick check; "
                                                 "use with --out elsewhere)")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)))
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    ap.add_argument("--notes", type=Path, default=None, help="a markdown file appended to the table (the survivors' review)")
    ap.add_argument("--rewrite-md", action="store_true", help="only rewrite the .md from the .json (with --notes)")
    a = ap.parse_args()
    if a.rewrite_md:
        data = json.loads((a.out / "cuda_mutants.json").read_text())
        data["meta"]["notes"] = a.notes.read_text() if a.notes else ""
        write(data["mutants"], data["meta"], a.out)
        return
    t0 = time.perf_counter()
    # a snapshot of the sources and of the emulation: the checkout may change while the mutants run
    global emu_build
    snap = Path(tempfile.mkdtemp(prefix="wm_mutants_src_"))
    # the checkout the snapshot is taken of (HEAD may move while the mutants run)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "csrc"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    shutil.copytree(REPO / "csrc", snap / "csrc")
    shutil.copytree(REPO / "tests/cuda_emulation", snap / "tests/cuda_emulation",
                    ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(snap / "tests"))
    from cuda_emulation import build as emu_build
    (snap / "python/whymatch").mkdir(parents=True)
    shutil.copy(REPO / "python/whymatch/_version.py", snap / "python/whymatch/_version.py")
    shutil.copy(REPO / "CMakeLists.txt", snap / "CMakeLists.txt")
    base = emu_build.build("fiber", src_root=snap, cache=CACHE)  # the unmutated objects, which every mutant reuses
    # the unmutated kernels must pass, or every mutant would count as killed
    collected = _collect()
    by_kernel = check_tests(collected, sorted(p.name for p in (snap / "csrc").glob("*/*_cuda.cu")))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "emulated",
                        *sorted(collected)], cwd=REPO,
                       env=dict(os.environ, WHYMATCH_EMU_MODULE=str(base)), capture_output=True, text=True)
    if r.returncode:
        sys.exit("the emulated tests fail on the unmutated checkout; fix that first:\n" + r.stdout[-3000:])
    kinds = set(a.kinds.split(","))
    found = mutants(snap, kinds)
    counts = {k: sum(m["kind"] == k for m in found) for k in kinds}
    chosen = found
    note = "Every mutant found was run."
    if a.sample:
        rng = random.Random(a.seed)
        chosen = [m for m in found if m["kind"] == "barrier"]
        for k in sorted(kinds - {"barrier"}):
            pool = [m for m in found if m["kind"] == k]
            chosen += sorted(rng.sample(pool, min(a.sample, len(pool))), key=lambda m: m["id"])
        note = (f"Every barrier mutant was run; of the other kinds a random sample of at most {a.sample} each "
                f"(seed {a.seed}).")
    if a.only:
        chosen = [m for m in chosen if a.only in f"{m['file']}:{m['line']}"]
        note += f" Only those at '{a.only}'."
    # the barrier mutants first (the target), then shrink, then store; the tables are rewritten after
    # every mutant, so that a run stopped early leaves what it measured (the note says how much)
    order = {"barrier": 0, "shrink": 1, "store": 2}
    chosen = sorted(chosen, key=lambda m: (order[m["kind"]], m["id"]))
    meta = {"command": "python tools/cuda_mutants.py " + " ".join(sys.argv[1:]),
            "machine": f"{os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.1f}",
            "commit": commit + (" with uncommitted csrc/ edits" if dirty else ""), "found": counts,
            "notes": a.notes.read_text() if a.notes else ""}
    results = []

    def save(final: bool) -> None:
        meta.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seconds=round(time.perf_counter() - t0),
                    note=note if final else f"{note} PARTIAL: {len(results)} of the {len(chosen)} chosen mutants "
                                            "have run (the run was still going when this was written).")
        write(sorted(results, key=lambda r: r["id"]), meta, a.out)

    with tempfile.TemporaryDirectory(prefix="wm_mutants_") as tmp, cf.ThreadPoolExecutor(a.jobs) as ex:
        futs = [ex.submit(run_one, m, snap, Path(tmp), a.timeout, by_kernel[Path(m["file"]).name]) for m in chosen]
        for fut in cf.as_completed(futs):
            r = fut.result()
            results.append(r)
            print(f"[{len(results)}/{len(chosen)}] {r['status']:8s} {r['kind']:7s} {r['file']}:{r['line']} {r['what']}"
                  f" ({r['seconds']} s)", flush=True)
            save(final=False)
    results.sort(key=lambda r: r["id"])
    shutil.rmtree(snap, ignore_errors=True)
    save(final=True)
    killed = sum(r["status"] == "killed" for r in results)
    valid = sum(r["status"] != "invalid" for r in results)
    print(f"killed {killed} / {valid} valid mutants ({len(results) - valid} invalid); {meta['seconds']} s")


if __name__ == "__main__":
    main()
