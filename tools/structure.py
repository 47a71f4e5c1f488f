"""The import structure of python/whymatch: circles, floors, arrows that run back up.

Reads every module under python/whymatch with ``ast`` (nothing is imported or run) and builds
the graph "module A imports module B". Imports are counted in two kinds:

- ``module``: executed when A is imported (top level, class bodies, ``try``/``if`` at top level);
- ``function``: inside a function body, executed only when the function runs (a lazy import).

Imports under ``if TYPE_CHECKING:`` never run and are left out.

Circles are the strongly connected components of more than one node, computed twice: at module
granularity (``whymatch.attributes.train``) and at package granularity (the first level under
``whymatch``: ``whymatch.attributes``, ``whymatch.cli``), each over all imports and over
module-level imports only (a circle of module-level imports can fail at import time).

Floors. The data flow data -> SimilarityModel -> explainers / trainers -> ops -> kernels gives
each part a floor; a module may import its own floor and the floors below it. Read from the
bottom (FLOORS below):

0 base     _version, io, _checks, memory: helpers that need nothing of whymatch
1 data     data/: the input of the flow; loads and generates images, needs no model nor kernel
2 model    similarity.py, models/: SimilarityModel and the networks it wraps, usable without
           registering a single op
3 ops      ops/ (and beneath it the compiled kernels whymatch._C / _C_cuda): the compute the
           explainers and trainers call
4 explain  saliency, attributes, avsl, train, mining, metrics, evaluation, search, viz, segment:
           explainers and trainers (they read data, wrap a SimilarityModel, call ops)
5 app      cli, jobs and the package root ``whymatch`` (its build_info reports on the kernels)

An arrow running back up is an import from a lower floor to a higher one (``data`` importing
``ops`` registers every op; ``attributes.train`` importing ``cli``). A module missing from
FLOORS is reported as ``unplaced``.

Also reported: the ten longest functions (by source lines, methods by ``Class.method``) and the
pair count of the ``duplicates`` command over python/ and csrc/ (when it is installed).

    python tools/structure.py            # compact summary
    python tools/structure.py --json     # everything as JSON
    python tools/structure.py --no-duplicates   # skip the duplicates command (fast)
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "python" / "whymatch"
PACKAGE = "whymatch"

FLOOR_NAMES = ["base", "data", "model", "ops", "explain", "app"]
# first-level part of the package -> floor (index into FLOOR_NAMES)
FLOORS: dict[str, int] = {
    "_version": 0, "io": 0, "_checks": 0, "memory": 0,
    "data": 1,
    "similarity": 2, "models": 2,
    "ops": 3, "_C": 3, "_C_cuda": 3,
    "saliency": 4, "attributes": 4, "avsl": 4, "train": 4, "mining": 4, "metrics": 4,
    "evaluation": 4, "search": 4, "viz": 4, "segment": 4,
    "cli": 5, "jobs": 5, "": 5,
}


def module_files(pkg_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Module name -> file, for every .py under the package (packages by their __init__)."""
    out = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        rel = path.relative_to(pkg_dir.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, str, int]]:
    """(target module, kind, line) for each import of a whymatch module in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, str, int]] = []

    def target(name: str) -> str | None:
        # the longest known module that the dotted name starts with
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            cand = ".".join(parts[:i])
            if cand in known:
                return cand
        return None

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    visit_stmt(sub, kind)
                continue
            visit_stmt(child, kind)

    def visit_stmt(child: ast.AST, kind: str) -> None:
        if isinstance(child, ast.Import):
            for alias in child.names:
                t = target(alias.name)
                if t is not None:
                    found.append((t, kind, child.lineno))
        elif isinstance(child, ast.ImportFrom):
            base = _resolve(module, is_package, child)
            for alias in child.names:
                # `from pkg import name`: the submodule pkg.name when there is one, else pkg
                t = target(f"{base}.{alias.name}") if alias.name != "*" else target(base)
                if t is not None:
                    found.append((t, kind, child.lineno))
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            visit(child, "function")
        else:
            visit(child, kind)

    visit(tree, "module")
    return sorted({(t, k, ln) for t, k, ln in found if t != module}, key=lambda x: (x[2], x[0]))


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_of(module: str) -> str:
    p = part_of(module)
    return f"{PACKAGE}.{p}" if p else PACKAGE


def sccs(nodes: set[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def longest_functions(files: dict[str, Path], n: int = 10) -> list[dict]:
    rows = []
    top = ROOT if all(p.is_relative_to(ROOT) for p in files.values()) else None
    for path in sorted(set(files.values())):
        tree = ast.parse(path.read_text(), filename=str(path))

        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    rows.append({"name": name, "file": str(path.relative_to(top) if top else path), "line": child.lineno,
                                 "lines": child.end_lineno - child.lineno + 1})
                    walk(child, f"{name}.")
                elif isinstance(child, ast.ClassDef):
                    walk(child, f"{prefix}{child.name}.")
                else:
                    walk(child, prefix)

        walk(tree, "")
    rows.sort(key=lambda r: (-r["lines"], r["file"], r["line"]))
    return rows[:n]


def duplicate_pairs(folders=("python", "csrc"), seconds: int = 60) -> dict | None:
    """Pair count of the `duplicates` command for each folder (None when it is not installed)."""
    exe = shutil.which("duplicates")
    if exe is None:
        return None
    out = {}
    for folder in folders:
        res = subprocess.run([exe, "--repo", str(ROOT / folder), "--seconds", str(seconds)],
                             capture_output=True, text=True, cwd=ROOT)
        first = res.stdout.splitlines()[0] if res.stdout else ""
        m = re.match(r"(\d+) pairs?", first)
        out[folder] = {"pairs": int(m.group(1)) if m else 0, "summary": first,
                       "incomplete": any(line.startswith("incomplete:") for line in res.stdout.splitlines())}
    out["total"] = sum(v["pairs"] for v in out.values())
    return out


def analyse(pkg_dir: Path = PACKAGE_DIR, with_duplicates: bool = True) -> dict:
    files = module_files(pkg_dir)
    known = set(files)
    edges: list[dict] = []
    for mod, path in files.items():
        for tgt, kind, line in imports_of(mod, path, known):
            edges.append({"src": mod, "dst": tgt, "kind": kind, "line": line})

    graphs: dict[str, dict[str, set[str]]] = {}
    for gran, key in (("module", lambda m: m), ("package", package_of)):
        for scope in ("all", "module-level"):
            g: dict[str, set[str]] = defaultdict(set)
            for e in edges:
                if scope == "module-level" and e["kind"] != "module":
                    continue
                a, b = key(e["src"]), key(e["dst"])
                if a != b:
                    g[a].add(b)
            graphs[f"{gran}/{scope}"] = g
    nodes = {"module": known, "package": {package_of(m) for m in known}}
    cycles = {name: sccs(nodes[name.split("/")[0]], g) for name, g in graphs.items()}

    unplaced = sorted({part_of(m) for m in known if part_of(m) not in FLOORS})
    back = []
    for e in edges:
        fs, fd = FLOORS.get(part_of(e["src"])), FLOORS.get(part_of(e["dst"]))
        if fs is not None and fd is not None and fs < fd:
            back.append({**e, "src_floor": FLOOR_NAMES[fs], "dst_floor": FLOOR_NAMES[fd]})
    back.sort(key=lambda e: (e["src"], e["dst"], e["line"]))

    floors = {name: sorted({part_of(m) or PACKAGE for m in known if FLOORS.get(part_of(m)) == i})
              for i, name in enumerate(FLOOR_NAMES)}
    counts = {k: sum(1 for e in edges if e["kind"] == k) for k in ("module", "function")}
    return {
        "modules": len(known),
        "imports": counts,
        "floors": floors,
        "unplaced": unplaced,
        "cycles": cycles,
        "back_arrows": back,
        "longest_functions": longest_functions(files),
        "duplicates": duplicate_pairs() if with_duplicates else None,
    }


def summary(r: dict) -> str:
    lines = [f"modules: {r['modules']}  imports of whymatch modules: {r['imports']['module']} module-level, "
             f"{r['imports']['function']} function-level"]
    lines.append("floors (bottom up): " + "; ".join(f"{i} {n}: {', '.join(r['floors'][n])}"
                                                   for i, n in enumerate(FLOOR_NAMES)))
    if r["unplaced"]:
        lines.append(f"unplaced parts: {', '.join(r['unplaced'])}")
    for name, comps in r["cycles"].items():
        lines.append(f"circles ({name}): {len(comps)}")
        for c in comps:
            lines.append("  " + " <-> ".join(c))
    by_kind = {k: sum(1 for e in r["back_arrows"] if e["kind"] == k) for k in ("module", "function")}
    lines.append(f"arrows running back up: {len(r['back_arrows'])} ({by_kind['module']} module-level, "
                 f"{by_kind['function']} function-level)")
    for e in r["back_arrows"]:
        lines.append(f"  {e['src']}:{e['line']} -> {e['dst']} ({e['src_floor']} -> {e['dst_floor']}, {e['kind']})")
    lines.append("ten longest functions:")
    for f in r["longest_functions"]:
        lines.append(f"  {f['lines']:4d}  {f['name']}  {f['file']}:{f['line']}")
    d = r["duplicates"]
    if d is None:
        lines.append("duplicates: not run")
    else:
        lines.append(f"duplicate pairs: {d['total']} (" + ", ".join(
            f"{k}: {v['pairs']}{' incomplete' if v['incomplete'] else ''}" for k, v in d.items() if k != "total") + ")")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print everything as JSON")
    ap.add_argument("--no-duplicates", action="store_true", help="do not run the duplicates command")
    args = ap.parse_args(argv)
    r = analyse(with_duplicates=not args.no_duplicates)
    print(json.dumps(r, indent=1) if args.json else summary(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
