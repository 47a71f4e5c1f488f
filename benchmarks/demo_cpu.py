"""`whymatch demo` as a user runs it: wall time and peak memory of the whole command, on the CPU.

The command runs in a fresh process (``python -m whymatch.cli demo --out DIR``) with its default
settings, as the README's first command runs it, unless ``--args`` adds options; the methods it ran
and their seconds per query come from the command's own summary table. Wall time is the host clock
around the process (imports and model loading included), with the CPU time (user + system, all
threads) beside it; peak memory is the child's maximum resident set size
(``getrusage(RUSAGE_CHILDREN)``, Linux reports KiB). The load average at the start and end is
recorded: on a shared machine other work inflates the wall time (not the memory). The report it
writes is checked (index.html and every file it names exist).

Usage::

    python benchmarks/demo_cpu.py                    # writes benchmarks/results/demo_cpu.{json,md}
    python benchmarks/demo_cpu.py --args "--queries 1 --refs 2 --n-masks 100" --stem /tmp/quick
"""

from __future__ import annotations

import argparse
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402


def _parse_table(text: str) -> list[dict]:
    """The summary table the command prints (markdown, keys as headers) as rows of strings."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    if len(lines) < 3:
        return []
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--args", default="", help="extra options for `whymatch demo` (default: none)")
    ap.add_argument("--stem", default=str(Path(__file__).resolve().parent / "results" / "demo_cpu"))
    a = ap.parse_args(argv)
    info = C.machine_info("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "whymatch-demo"
        cmd = [sys.executable, "-m", "whymatch.cli", "demo", "--out", str(out), *shlex.split(a.args)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_kib, cpu_s = ru.ru_maxrss, ru.ru_utime + ru.ru_stime
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
            print(f"demo_cpu: `{shlex.join(cmd)}` exited {proc.returncode}", file=sys.stderr)
            return 1
        index = out / "index.html"
        srcs = re.findall(r"src='([^']+)'", index.read_text(encoding="utf-8"))
        missing = [s for s in srcs if not (out / s).is_file()]
        if not srcs or missing:
            print(f"demo_cpu: the report names missing files: {missing[:5]}", file=sys.stderr)
            return 1
        n_files = len(list(out.iterdir()))
        report_bytes = sum(p.stat().st_size for p in out.iterdir())
    rows = _parse_table(proc.stdout)
    res = {"command": "whymatch demo --out DIR " + a.args, "machine": info, "load_at_end": C.system_load(),
           "wall_s": wall, "cpu_s": cpu_s, "peak_rss_bytes": peak_kib * 1024, "report_files": n_files,
           "report_bytes": report_bytes, "summary": rows}
    md = [f"# `whymatch demo` on the CPU\n", f"`python benchmarks/demo_cpu.py` ran `{res['command'].strip()}` in a "
          f"fresh process ({info['cpu_model']}, {info['affinity_cpus']} CPUs, torch {info.get('torch')}).\n",
          C.md_table(["wall time (whole command)", "CPU time (user + system)", "peak memory (max RSS)", "report"],
                     [[f"{wall:.1f} s", f"{cpu_s:.1f} s", C.fmt_bytes(peak_kib * 1024),
                       f"{n_files} files, {C.fmt_bytes(report_bytes)}"]]),
          "",
          "Seconds per query of each method (the command's summary, all references of a query at once):\n",
          C.md_table(["method", "sec_per_query"], [[r.get("method", ""), r.get("sec_per_query", "")] for r in rows
                                                    if r.get("sec_per_query")]),
          "", C.load_note(res)]
    js, mdp = C.write_results(a.stem, res, "\n".join(md))
    print(f"demo_cpu: {wall:.1f} s wall, peak RSS {C.fmt_bytes(peak_kib * 1024)}; wrote {js} and {mdp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
