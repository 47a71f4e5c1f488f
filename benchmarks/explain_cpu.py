"""`whymatch explain` on a CPU as a user runs it: wall time, where it goes, and the system time of RISE's batches.

The command (``whymatch explain chelsea.png astronaut.png coffee.png rocket.png --pretrained
efficientnet-lite0 --size 224``: one query against K = 3 references, scikit-image's bundled photos
saved as PNG) runs in a fresh process with its CPU defaults. Recorded: wall time around the process
(the host clock), user and system time, peak memory, the settings line and the up-front estimate the
command printed, and its per-phase line (start-up: interpreter and imports, from /proc; model and
images; estimate; checks; each method; scoring; report). The load average and CPU pressure at start
and end are recorded: on a shared machine other work inflates every time here.

``--stime N``: the system time (getrusage ru_stime) of one RISE run of N masks at 224 px with
EfficientNet-lite0 in a fresh process without the CLI's glibc tuning (``keep_freed_memory``), with
the model's batches contiguous (the old path) and channels_last (the CPU default since issue 15);
each in its own process, one after the other.

Usage::

    python benchmarks/explain_cpu.py                  # writes benchmarks/results/explain_cpu.{json,md}
    python benchmarks/explain_cpu.py --stime 2000     # also the RISE system-time comparison
    python benchmarks/explain_cpu.py --env OMP_NUM_THREADS=1 --stem /tmp/explain_1thread
"""

from __future__ import annotations

import argparse
import json
import os
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

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")


def write_photos(folder: Path) -> list[str]:
    """scikit-image's bundled photos as PNG files (query first); returns their paths."""
    import numpy as np
    import skimage.data
    from PIL import Image

    paths = []
    for name in PHOTOS:
        p = folder / f"{name}.png"
        Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB").save(p)
        paths.append(str(p))
    return paths


def parse_phases(text: str) -> tuple[dict[str, float], float | None]:
    """The command's 'time: a 1.0 s, b 2.0 s; total 3.0 s' line as ({phase: seconds}, total)."""
    line = next((ln for ln in text.splitlines() if ln.startswith("time: ")), None)
    if line is None:
        return {}, None
    body, _, tail = line[len("time: "):].rpartition("; total ")
    phases = {}
    for part in body.split(", "):
        m = re.fullmatch(r"(.+) ([0-9.]+) s", part.strip())
        if m:
            phases[m.group(1)] = float(m.group(2))
    total = re.match(r"([0-9.]+) s", tail)
    return phases, float(total.group(1)) if total else None


def run_explain(extra: list[str], env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(Path(tmp))
        out = Path(tmp) / "report"
        cmd = [sys.executable, "-m", "whymatch.cli", "explain", *paths, "--pretrained", "efficientnet-lite0",
               "--size", "224", "--out", str(out), *extra]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
        wall = time.perf_counter() - t0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"explain_cpu: `{shlex.join(cmd)}` exited {proc.returncode}")
        if not (out / "index.html").is_file():
            raise SystemExit("explain_cpu: the command wrote no index.html")
    text = proc.stdout
    phases, total = parse_phases(text)
    settings = next((ln for ln in text.splitlines() if ln.startswith("settings for a CPU")), None)
    est_line = next((ln for ln in text.splitlines() if "estimated time:" in ln), "")
    m = re.search(r"estimated time: ([0-9.]+) (s|min)", est_line)
    estimate = None if m is None else float(m.group(1)) * (60 if m.group(2) == "min" else 1)
    return {"command": "whymatch explain " + " ".join(f"{n}.png" for n in PHOTOS) +
            " --pretrained efficientnet-lite0 --size 224 " + " ".join(extra), "env": env, "wall_s": wall,
            "user_s": ru.ru_utime - before.ru_utime, "system_s": ru.ru_stime - before.ru_stime,
            "peak_rss_bytes": ru.ru_maxrss * 1024, "settings_line": settings, "estimate_line": est_line.strip(),
            "estimated_s": estimate, "phases_s": phases, "phases_total_s": total}


_STIME_CHILD = """
import json, resource, sys, time, torch
from whymatch.models.efficientnet import efficientnet_lite0_similarity
from whymatch.similarity import SimilarityModel
from whymatch.saliency import RISE
n, channels_last = int(sys.argv[1]), sys.argv[2] == "channels_last"
sim = SimilarityModel(efficientnet_lite0_similarity("cpu").embedder, "cosine", channels_last=channels_last)
g = torch.Generator().manual_seed(0)
q, refs = torch.rand(3, 224, 224, generator=g), torch.rand(3, 3, 224, 224, generator=g)
rise = RISE(sim, n_masks=n, grid=8, batch_size=50, seed=0)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
rise.attribute(q, refs)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"layout": sys.argv[2], "n_masks": n, "batch_size": 50, "wall_s": time.perf_counter() - t0,
                  "user_s": r1.ru_utime - r0.ru_utime, "system_s": r1.ru_stime - r0.ru_stime,
                  "minor_faults": r1.ru_minflt - r0.ru_minflt}))
"""


def rise_stime(n: int) -> list[dict]:
    rows = []
    for layout in ("contiguous", "channels_last"):
        proc = subprocess.run([sys.executable, "-c", _STIME_CHILD, str(n), layout], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"explain_cpu: the RISE system-time child failed: {proc.stderr[-2000:]}")
        rows.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "load_at_end": C.system_load()})
    return rows


def _stime_md(res: dict, n: int) -> list[str]:
    return [f"System time of one RISE run ({n} masks, 224 px, batch 50, K = 3, EfficientNet-lite0), each layout in "
            "a fresh process without the CLI's glibc tuning, one after the other:\n",
            C.md_table(["model batches", "wall", "user", "system", "minor page faults"],
                       [[r["layout"], f"{r['wall_s']:.1f} s", f"{r['user_s']:.1f} s", f"{r['system_s']:.1f} s",
                         r["minor_faults"]] for r in res["rise_stime"]]), ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--args", default="", help="extra options for `whymatch explain` (default: none)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the command")
    ap.add_argument("--stime", type=int, default=0, metavar="N",
                    help="also measure RISE's system time over N masks, contiguous vs channels_last (0: skip)")
    ap.add_argument("--skip-explain", action="store_true", help="only the --stime measurement")
    ap.add_argument("--stem", default=str(Path(__file__).resolve().parent / "results" / "explain_cpu"))
    a = ap.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in a.env)
    info = C.machine_info("cpu")
    if a.skip_explain and not a.stime:
        ap.error("--skip-explain needs --stime N")
    if a.skip_explain:
        res = {"machine": info, "rise_stime": rise_stime(a.stime), "load_at_end": C.system_load()}
        md = ["# RISE's system time on the CPU\n", *_stime_md(res, a.stime), C.load_note(res)]
        js, mdp = C.write_results(a.stem, res, "\n".join(md))
        print(f"explain_cpu: RISE system time {[round(r['system_s'], 1) for r in res['rise_stime']]}; wrote {js}")
        return 0
    res = {"machine": info, **run_explain(shlex.split(a.args), env), "load_at_end": C.system_load()}
    if a.stime:
        res["rise_stime"] = rise_stime(a.stime)
    ph = res["phases_s"]
    md = ["# `whymatch explain` on the CPU\n",
          f"`python benchmarks/explain_cpu.py` ran `{res['command'].strip()}` in a fresh process "
          f"({info['cpu_model']}, {info['affinity_cpus']} CPUs, torch {info.get('torch')}"
          + (f", environment {env}" if env else "") + ").\n",
          f"Settings it printed: `{res['settings_line']}`\n",
          f"Its up-front estimate: `{res['estimate_line']}`\n",
          C.md_table(["wall time (whole command)", "user", "system", "estimate printed", "peak memory"],
                     [[f"{res['wall_s']:.1f} s", f"{res['user_s']:.1f} s", f"{res['system_s']:.1f} s",
                       "n/a" if res["estimated_s"] is None else f"{res['estimated_s']:.1f} s",
                       C.fmt_bytes(res["peak_rss_bytes"])]]),
          "", "Where the wall time went (the command's own `time:` line; start-up = interpreter and imports):\n",
          C.md_table(["phase", "seconds", "share"],
                     [[k, f"{v:.1f}", f"{v / res['wall_s']:.0%}"] for k, v in ph.items()]
                     + [["(total the command counted)", f"{res['phases_total_s'] or 0:.1f}", ""]]), ""]
    if a.stime:
        md += _stime_md(res, a.stime)
    md.append(C.load_note(res))
    js, mdp = C.write_results(a.stem, res, "\n".join(md))
    print(f"explain_cpu: {res['wall_s']:.1f} s wall ({', '.join(f'{k} {v:.1f}' for k, v in ph.items())}); "
          f"wrote {js} and {mdp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
