#!/usr/bin/env python
"""SASS instruction counts of the CUDA kernels: a GPU-free regression signal.

    python benchmarks/sass_counts.py                    # before = 903ffc7, after = the checkout
    python benchmarks/sass_counts.py --before REV --arch sm_90 --stem benchmarks/results/sass_counts

Needs nvcc (``/usr/local/cuda/bin`` or ``$CUDACXX``) and nvdisasm + cuobjdump (the CUDA toolkit,
or ``pip install ".[sass]"``: the ``nvidia-cuda-nvdisasm`` / ``nvidia-cuda-cuobjdump`` wheels).
No GPU.

Each ``csrc/*/*_cuda.cu`` of two source trees (``--before``: a git revision exported to a temp
dir; after: the working tree) is compiled with ``nvcc -cubin -arch=<arch>`` and the flags and
compile definitions that CMakeLists.txt gives the ``_C_cuda`` target (read from it), plus
``-Xptxas -v``. Per kernel (every template instance):

* registers, stack frame and static shared memory: ``cuobjdump -res-usage``; spill stores /
  loads: ptxas's ``-v`` report. Dynamic shared memory is chosen at launch and is not in the
  binary.
* ``instructions``: SASS instructions of the whole function (static).
* per inner-loop element, for the loops named in ``SPECS`` below. Method:
  the SASS is disassembled with line information (``nvdisasm -c -g``); a loop is a backward
  branch (a ``BRA`` whose target label lies at a lower address in the same function), its body
  the instructions from the target label to the branch, both included. A metric names an
  *anchor*: a source line (found by its text, so that the spec survives edits elsewhere in the
  file) and an opcode pattern, e.g. the global store of one output value. The loop measured is
  the innermost (or, with ``outer``, the outermost) loop whose body contains an anchor
  instruction; where several innermost loops hold anchors (an unrolled main body and its
  remainder, or one loop per code path), the one holding the most anchors (the steady state);
  ``elements per iteration`` = the anchor instructions in its body divided by
  ``anchors per element`` (none: 1 element per iteration; so an unrolled loop with 4 stores of 1 value each counts 4 elements);
  ``instructions per element`` = body / elements. Where no loop contains the anchor (a kernel
  without a grid-stride loop: one element per thread), the whole function is the body.
  This is a static count: a body that holds two code paths (e.g. NCHW and channels_last, or
  an unrolled main loop and its remainder inside an outer loop) counts both, so for an
  ``outer`` loop it is an upper bound of what one iteration executes; for an innermost loop
  without branches it is exact. The same method runs on both trees, so before / after compare.

Writes ``<stem>.json`` (every number, the toolchain, the flags) and ``<stem>.md`` (a table).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# kernel name (substring of the demangled name) -> metrics.
# metric: (name, anchor line texts (any of them, substrings of the source line), opcode regex,
#          which loop: "inner" | "outer", anchors per element)
SPECS: dict[str, list[tuple]] = {
    "rise_apply_kernel": [
        # elements: the masks of an iteration (a thread may blend several), counted by the two
        # float-to-int conversions of their interpolation (y and x); __ldg's loads carry the line of
        # the intrinsics header, not of the source
        ("per (mask, pixel): grid-stride loop, all channels and paths", ["int i0 = static_cast<int>(src);"], r"^F2I",
         "outer", 2),
        ("per output value: channel loop", ["= from_f32<T>(m * __ldg(", "= from_f32<T>(mu * iv"], r"^STG", "inner", 1),
    ],
    "rise_saliency_kernel": [
        ("per (mask, pixel): mask loop, 8 references", ["acc[j] += __ldg(sc + j) * m"], r"^FFMA", "inner", 8),
    ],
    "ranked_blend_kernel": [
        ("per output value: channel loop", ["o[c * p.hw] = src[c * p.hw]", "o[c * p.HW] = src[c * p.HW]"], r"^STG", "inner", 1),
    ],
    "soft_mask_kernel": [
        ("per (image, pixel): grid-stride loop, all channels", ["return acc_t(1) / (acc_t(1) + exp_acc("], r".",
         "outer", None),
        ("per output value: channel loop", ["out[o] = from_acc_d<T>("], r"^STG", "inner", 1),
    ],
    "soft_mask_backward_pixels": [
        ("per output value: channel loop", ["if (gx) gx[o] = from_acc_d<T>("], r"^STG", "inner", 1),
    ],
    "soft_mask_backward_cells": [
        ("per pixel of a cell's window", ["racc += sm_weight("], r"^FFMA|^DFMA|^FADD|^DADD", "inner", 1),
    ],
    "avsl_forward_kernel": [
        ("per link: sparse link loop", ["acc += __ldg(vals + k) * prev["], r"^FFMA|^DFMA", "inner", 1),
        ("per (node, pair): level's column loop", ["cur[c * P + jj] = valid ? h : T(0)"], r"^ST(S|G)?(\.|\s|$)",
         "inner", 1),
        ("per node of the last level: final sum", ["s += prev[c * P + t]", "part += prev[c * P + jj]"],
         r"^FADD|^DADD", "inner", 1),
    ],
    "avsl_topk_partial_kernel": [
        ("per link: sparse link loop", ["acc += __ldg(vals + k) * prev["], r"^FFMA|^DFMA", "inner", 1),
        ("per node of the last level: final sum", ["s += prev[c * P + t]", "part += prev[c * P + jj]"],
         r"^FADD|^DADD", "inner", 1),
    ],
    "avsl_topk_merge_kernel": [
        ("per segment scanned: merge scan", ["const int64_t j = list_j["], r"^LDG", "inner", 1),
    ],
    "avsl_backward_kernel": [
        ("per link: sparse link loop (backward)", ["acc += __ldg(rv + k) * u["], r"^FFMA|^DFMA", "inner", 1),
    ],
    "gemm_kernel": [
        ("per multiply-add: K slice", ["acc[i][j] += a[i] * b[j]"], r"^FFMA|^DFMA", "inner", 1),
    ],
}

# The headline kernels of the markdown table (issue 14 "Done when").
HEADLINE = ("rise_apply_kernel", "soft_mask_kernel", "avsl_forward_kernel")


# --------------------------------------------------------------------------- tools

def find_tool(name: str) -> str:
    """nvdisasm / cuobjdump: PATH, the CUDA toolkit, then the nvidia-cuda-* wheels."""
    p = shutil.which(name)
    if p:
        return p
    cands = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name]
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        for base in nvidia.__path__:
            cands += sorted(Path(base).glob(f"*/bin/{name}"))
    except ImportError:
        pass
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    sys.exit(f"sass_counts: {name} not found (PATH, $CUDA_HOME/bin, nvidia wheels); "
             f'install the CUDA toolkit or `pip install ".[sass]"`')


def find_nvcc() -> str:
    for c in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if c and Path(c).is_file():
            return c
    sys.exit("sass_counts: nvcc not found (CUDACXX, PATH, /usr/local/cuda/bin)")


def cmake_cuda_flags(cmake_text: str) -> tuple[list[str], list[str]]:
    """The CUDA compile options and definitions CMakeLists.txt gives the _C_cuda target."""
    m = re.search(r"target_compile_options\(_C_cuda\s+PRIVATE\s+\$<\$<COMPILE_LANGUAGE:CUDA>:([^>]*)>", cmake_text)
    if not m:
        sys.exit("sass_counts: could not find _C_cuda's CUDA compile options in CMakeLists.txt")
    opts = m.group(1).split()
    m = re.search(r"target_compile_definitions\(_C_cuda\s+PRIVATE(.*?)\)", cmake_text, re.S)
    defs = []
    if m:
        for name in re.findall(r"(\w+)=", m.group(1)):
            defs.append(f'-D{name}="sass_counts"')  # string macros; values do not change device code
    return opts, defs


# --------------------------------------------------------------------------- SASS parsing

INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:(@!?U?P\w+)\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
LINEINFO = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
FUNC = re.compile(r"^\.text\.(\S+):$")
LABEL = re.compile(r"^(\.L_x_\d+):$")
BRA = re.compile(r"`\((\.L_x_\d+)\)")


def parse_sass(text: str) -> dict[str, dict]:
    """function -> {"instrs": [(addr, op, operands, file, line)], "labels": {label: index}}."""
    funcs: dict[str, dict] = {}
    cur = None
    loc = ("", 0)
    for raw in text.splitlines():
        m = FUNC.match(raw.strip())
        if m:
            cur = funcs.setdefault(m.group(1), {"instrs": [], "labels": {}})
            loc = ("", 0)
            continue
        if cur is None:
            continue
        m = LINEINFO.match(raw)
        if m:
            loc = (m.group(1), int(m.group(2)))
            continue
        m = LABEL.match(raw.strip())
        if m:
            cur["labels"][m.group(1)] = len(cur["instrs"])
            continue
        m = INSTR.match(raw)
        if m:
            cur["instrs"].append((int(m.group(1), 16), m.group(3), m.group(4), loc[0], loc[1]))
    return funcs


def loops_of(fn: dict) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every loop: a branch back to a label at or before it."""
    out = []
    for idx, (_, op, operands, _, _) in enumerate(fn["instrs"]):
        if op.startswith("BRA"):
            m = BRA.search(operands)
            if m and m.group(1) in fn["labels"]:
                t = fn["labels"][m.group(1)]
                if t <= idx:
                    out.append((t, idx))
    return out


def anchor_lines(src_root: Path, texts: list[str]) -> set[tuple[str, int]]:
    """(file name, line) of every source line under csrc containing one of texts."""
    found = set()
    for f in list(src_root.rglob("*.cu")) + list(src_root.rglob("*.cuh")) + list(src_root.rglob("*.h")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if any(t in line for t in texts):
                found.add((f.name, n))
    return found


def measure(fn: dict, anchors: set, op_re: str, which: str, per: int | None) -> dict | None:
    ins = fn["instrs"]
    rx = re.compile(op_re)
    hits = [i for i, (_, op, _, f, ln) in enumerate(ins) if (Path(f).name, ln) in anchors and rx.search(op)]
    if not hits:
        return None
    loops = [lp for lp in loops_of(fn) if any(lp[0] <= h <= lp[1] for h in hits)]
    if loops and which == "outer":
        lo, hi = max(loops, key=lambda lp: lp[1] - lp[0])
        kind = "loop"
    elif loops:
        # innermost: loops that hold no other anchor-holding loop; of those (an unrolled main body, its
        # remainder, one per code path), the one with the most anchors: the steady state
        inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
        lo, hi = max(inner, key=lambda lp: (sum(1 for h in hits if lp[0] <= h <= lp[1]), -lp[0]))
        kind = "loop"
    else:
        lo, hi, kind = 0, len(ins) - 1, "function"
    body = hi - lo + 1
    n_anchor = sum(1 for h in hits if lo <= h <= hi)
    elems = 1.0 if per is None else n_anchor / per
    return {
        "body": kind,
        "instructions": body,
        "anchors": n_anchor,
        "elements_per_iteration": elems,
        "instructions_per_element": round(body / elems, 1) if elems else None,
        "span": [hex(ins[lo][0]), hex(ins[hi][0])],
    }


# --------------------------------------------------------------------------- compile + analyse

PTXAS_FUNC = re.compile(r"Function properties for (\S+)")
PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
RES_FUNC = re.compile(r"^\s*Function (\S+):")
RES_VALS = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def demangle(names: list[str]) -> dict[str, str]:
    cf = shutil.which("c++filt")
    if not cf:
        return {n: n for n in names}
    out = subprocess.run([cf], input="\n".join(names), capture_output=True, text=True, check=True).stdout.splitlines()
    return dict(zip(names, out))


def short_name(dem: str) -> str:
    s = re.sub(r"whymatch::\(anonymous namespace\)::", "", dem)
    s = re.sub(r"whymatch::", "", s)
    # an enum template argument prints as (Enum)N: the AVSL kernels' hats placement (Hats::Shared = 0)
    s = re.sub(r"\(Hats\)0", "shared", s)
    s = re.sub(r"\(Hats\)1", "global", s)
    s = s.split("(")[0]
    return s.replace("__nv_bfloat16", "bf16").replace("__half", "f16").replace("double", "f64").replace("float", "f32")


def analyse_tree(tree: Path, cu: Path, tools: dict, flags: list[str], work: Path) -> dict:
    cubin = work / (cu.stem + ".cubin")
    cmd = [tools["nvcc"], "-cubin", f"-arch={tools['arch']}", "-std=c++17", *flags, "-Xptxas", "-v",
           "-I", str(tree / "csrc"), "-o", str(cubin), str(cu)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"nvcc failed on {cu}:\n{r.stderr[-3000:]}")
    spills = {}
    cur = None
    for line in r.stderr.splitlines():
        m = PTXAS_FUNC.search(line)
        if m:
            cur = m.group(1)
            continue
        m = PTXAS_SPILL.search(line)
        if m and cur:
            spills[cur] = {"stack": int(m.group(1)), "spill_stores": int(m.group(2)), "spill_loads": int(m.group(3))}
    res = {}
    cur = None
    for line in subprocess.run([tools["cuobjdump"], "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        m = RES_FUNC.match(line)
        if m:
            cur = m.group(1)
            continue
        m = RES_VALS.search(line)
        if m and cur:
            res[cur] = {"registers": int(m.group(1)), "stack": int(m.group(2)), "static_shared_bytes": int(m.group(3)),
                        "local_bytes": int(m.group(4))}
    sass = subprocess.run([tools["nvdisasm"], "-c", "-g", str(cubin)], capture_output=True, text=True, check=True).stdout
    funcs = parse_sass(sass)
    names = demangle(list(funcs))
    out = {}
    for mangled, fn in funcs.items():
        name = short_name(names[mangled])
        entry = {"file": str(cu.relative_to(tree)), "instructions": len(fn["instrs"]), **res.get(mangled, {}),
                 **{k: v for k, v in spills.get(mangled, {}).items() if k != "stack"}, "metrics": {}}
        for key, metrics in SPECS.items():
            if key in name:
                for mname, texts, op_re, which, per in metrics:
                    entry["metrics"][mname] = measure(fn, anchor_lines(tree / "csrc", texts), op_re, which, per)
        out[name] = entry
    return out


def analyse(tree: Path, tools: dict, flags: list[str], jobs: int) -> dict:
    cus = sorted((tree / "csrc").glob("*/*_cuda.cu"))
    with tempfile.TemporaryDirectory() as d, ThreadPoolExecutor(jobs) as ex:
        parts = list(ex.map(lambda cu: analyse_tree(tree, cu, tools, flags, Path(d)), cus))
    kernels = {}
    for p in parts:
        kernels.update(p)
    return dict(sorted(kernels.items()))


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def export_rev(rev: str, dest: Path) -> None:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "csrc"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def fmt(v) -> str:
    return "-" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def write_md(path: Path, res: dict) -> None:
    b, a = res["before"]["kernels"], res["after"]["kernels"]
    lines = [
        "# SASS instruction counts (no GPU)",
        "",
        f"`python benchmarks/sass_counts.py` — {res['arch']}, nvcc {res['toolchain']['nvcc']}, flags "
        f"`{' '.join(res['flags'])}`. Before: `{res['before']['source']}`; after: `{res['after']['source']}`.",
        "Method: benchmarks/sass_counts.py's docstring (a loop = a backward branch; static count of its body "
        "divided by the anchor instructions it holds; `outer` loops count every code path of their body).",
        "",
        "## Instructions per inner-loop element",
        "",
        "| kernel | loop / element | before | after | elements per iteration (before / after) |",
        "|---|---|---:|---:|---|",
    ]
    # a kernel that gained a template parameter (e.g. avsl_forward_kernel<f32> -> <f32, shared> and
    # <f32, global>) is compared with its one instance before
    base = {n: re.sub(r", (shared|global)>", ">", n) for n in a}
    b = {**b, **{n: b[base[n]] for n in a if n not in b and base[n] in b}}
    names = sorted((set(b) - {base[n] for n in a if base[n] != n}) | set(a),
                   key=lambda n: (not any(h in n for h in HEADLINE), n))
    for n in names:
        mb, ma = b.get(n, {}).get("metrics", {}), a.get(n, {}).get("metrics", {})
        for m in list(dict.fromkeys(list(mb) + list(ma))):
            vb, va = mb.get(m), ma.get(m)
            lines.append(f"| `{n}` | {m} | {fmt(vb and vb['instructions_per_element'])} | "
                         f"{fmt(va and va['instructions_per_element'])} | "
                         f"{fmt(vb and vb['elements_per_iteration'])} / {fmt(va and va['elements_per_iteration'])} |")
    lines += ["", "## Resources", "",
              "| kernel | registers | spill stores / loads (bytes) | static shared (bytes) | SASS instructions |",
              "|---|---|---|---|---|"]
    for n in names:
        kb, ka = b.get(n, {}), a.get(n, {})

        def pair(key):
            return f"{fmt(kb.get(key))} / {fmt(ka.get(key))}"

        lines.append(f"| `{n}` | {pair('registers')} | {fmt(kb.get('spill_stores'))}+{fmt(kb.get('spill_loads'))} / "
                     f"{fmt(ka.get('spill_stores'))}+{fmt(ka.get('spill_loads'))} | {pair('static_shared_bytes')} | "
                     f"{pair('instructions')} |")
    lines += ["", "Pairs are before / after. `-`: the kernel or loop does not exist on that side. Dynamic shared "
              "memory is chosen at launch (not in the binary). A kernel instance `<..., shared>` / `<..., global>` "
              "(where the AVSL hats live, a template parameter since issue 14) is compared with the one "
              "instance before, which held both paths."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default="903ffc7", help="git revision of the 'before' kernels (default 903ffc7)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--stem", default=str(ROOT / "benchmarks" / "results" / "sass_counts"))
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    tools = {"nvcc": find_nvcc(), "nvdisasm": find_tool("nvdisasm"), "cuobjdump": find_tool("cuobjdump"),
             "arch": args.arch}
    opts, defs = cmake_cuda_flags((ROOT / "CMakeLists.txt").read_text())
    flags = opts + defs
    version = {k: subprocess.run([tools[k], "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
               for k in ("nvcc", "nvdisasm", "cuobjdump")}
    head = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "csrc"))
    res = {"arch": args.arch, "flags": flags, "toolchain": version, "tools": tools}
    with tempfile.TemporaryDirectory() as d:
        export_rev(args.before, Path(d))
        res["before"] = {"source": f"git {git('rev-parse', '--short', args.before)}",
                         "kernels": analyse(Path(d), tools, flags, args.jobs)}
    res["after"] = {"source": f"working tree at {head}" + (" + uncommitted csrc changes" if dirty else ""),
                    "kernels": analyse(ROOT, tools, flags, args.jobs)}
    stem = Path(args.stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    write_md(stem.with_suffix(".md"), res)
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
