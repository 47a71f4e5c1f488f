#!/usr/bin/env python
"""AVSL rectified distance and top-k retrieval: fused whymatch kernels against the published code's approach.

    python benchmarks/avsl_cpu.py                          # Q = G = 2,000, 3 levels of 512 nodes, k* = 128
    python benchmarks/avsl_cpu.py --n 500                  # a quicker run
    python benchmarks/avsl_cpu.py --device cuda --stem benchmarks/results/gpu/avsl

Variants, each in a fresh Python subprocess (peak memory of one cannot hide another's):

* ``whymatch``: :func:`whymatch.ops.avsl_distance` (the (Q, G) matrix) and
  :func:`whymatch.ops.avsl_topk` (each query's ``--topk`` nearest, exclude_self), fused kernels that
  never form a pairs x nodes tensor.
* ``sliced_torch``: what the published code does (zbr17/AVSL avsl_collector.compute_all_mat):
  for each slice of ``--slice`` queries, the full (slice, G, R) node and probability tensors of
  every level, a dense ``hat @ link*`` and the sum; the (Q, G) matrix assembled, then
  ``torch.topk`` over it for retrieval (the published code sorts it fully).

Correctness first: the whymatch distances against the baseline's (rtol 1e-4), and the top-k
indices against a top-k of the baseline's matrix. Times are runs of the whole task (after a
small warm-up call); with ``--repeats N`` each variant runs N times, the variants alternating, and
the table shows the median (the JSON keeps every run and the spread); peak memory = peak RSS above the RSS before the call (CPU), or
torch's peak CUDA allocation above the allocation before it (CUDA).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

VARIANTS = ("whymatch", "sliced_torch")


def make_inputs(n: int, levels: int, nodes: int, link_k: int, seed: int, device: str):
    from whymatch.ops import reference as ref

    gen = torch.Generator().manual_seed(seed)
    emb = [torch.randn(n, nodes, generator=gen) for _ in range(levels)]
    rel = [torch.rand(n, nodes, generator=gen) for _ in range(levels)]
    links = [ref.avsl_link_star(torch.randn(nodes, nodes, generator=gen), link_k) for _ in range(levels - 1)]
    coef = [1 + 0.1 * torch.randn(nodes, generator=gen) for _ in range(levels)]
    bias = [0.1 * torch.randn(nodes, generator=gen) for _ in range(levels)]
    mv = lambda xs: [x.to(device) for x in xs]  # noqa: E731
    # self-retrieval: the query set is the gallery
    return mv(emb), mv(emb), mv(rel), mv(rel), mv(links), mv(coef), mv(bias)


def sliced_distance(queries, galleries, rel_q, rel_g, links, coef, bias, gamma, slice_size):
    """The published code's evaluation: query slices, full (slice, G, R) tensors per level, dense hat @ link*."""
    q, g = queries[0].shape[0], galleries[0].shape[0]
    a = [F.normalize(x, dim=1) for x in queries]
    b = [F.normalize(x, dim=1) for x in galleries]
    out = torch.empty(q, g, device=queries[0].device)
    for s in range(0, q, slice_size):
        hat = None
        for lv in range(len(queries)):
            delta = (a[lv][s:s + slice_size, None, :] - b[lv][None, :, :]) ** 2
            if hat is None:
                hat = delta
                continue
            p = torch.sigmoid(gamma * (rel_q[lv][s:s + slice_size, None, :] * rel_g[lv][None] * coef[lv] + bias[lv]))
            hat = delta * p + torch.matmul(hat, links[lv - 1]) * (1 - p)
        out[s:s + slice_size] = hat.sum(dim=-1)
    return out


def run(variant: str, inputs, args) -> dict:
    from whymatch import ops

    gamma, k = args.gamma, args.topk
    if variant == "whymatch":
        d = ops.avsl_distance(*inputs, gamma)
        _sync(args.device)
        t1 = time.perf_counter()
        v, i = ops.avsl_topk(*inputs, gamma, k, exclude_self=True)
        _sync(args.device)
        return {"distance": d, "topk_values": v, "topk_indices": i, "topk_s": time.perf_counter() - t1}
    if variant == "sliced_torch":
        d = sliced_distance(*inputs, gamma, args.slice)
        t1 = time.perf_counter()
        dd = d.clone()
        dd.fill_diagonal_(float("inf"))
        v, i = torch.topk(dd, k, dim=1, largest=False, sorted=True)
        _sync(args.device)
        return {"distance": d, "topk_values": v, "topk_indices": i, "topk_s": time.perf_counter() - t1}
    raise ValueError(f"unknown variant {variant!r}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child(args: argparse.Namespace) -> None:
    cuda = args.device.startswith("cuda")
    with torch.no_grad():
        small = make_inputs(64, args.levels, args.nodes, args.link_k, args.seed, args.device)
        run(args.child, small, argparse.Namespace(**{**vars(args), "topk": min(args.topk, 10)}))  # warm-up
        inputs = make_inputs(args.n, args.levels, args.nodes, args.link_k, args.seed, args.device)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        res: dict = {}

        def call():
            t0 = time.perf_counter()
            out = run(args.child, inputs, args)
            _sync(args.device)
            res["seconds"] = time.perf_counter() - t0
            res["topk_seconds"] = out["topk_s"]
            res["distance_seconds"] = res["seconds"] - out["topk_s"]
            return out

        holder = {}
        res["memory"] = C.peak_rss_region(lambda: holder.setdefault("out", call()))
        if cuda:
            res["memory"]["host_peak_over_before_bytes"] = res["memory"]["peak_over_before_bytes"]
            res["memory"]["peak_over_before_bytes"] = torch.cuda.max_memory_allocated() - before
        out = holder["out"]
        torch.save({k: out[k].cpu() for k in ("distance", "topk_values", "topk_indices")}, args.save)
    print(json.dumps(res))


def _median_run(runs: list[dict]) -> dict:
    """One row from repeated runs of a variant: the median of each time, the largest peak memory,
    every run's times and the spread (max - min) / median of the total."""
    import statistics

    med = {key: statistics.median(r[key] for r in runs) for key in ("seconds", "topk_seconds", "distance_seconds")}
    mem = max((r["memory"] for r in runs), key=lambda m: m.get("peak_over_before_bytes") or 0)
    tot = [r["seconds"] for r in runs]
    return {**med, "memory": mem, "repeats": len(runs), "spread": (max(tot) - min(tot)) / med["seconds"],
            "runs": [{k: r[k] for k in ("seconds", "topk_seconds", "distance_seconds")} for r in runs]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--n", type=int, default=2000, help="queries = gallery items (self-retrieval)")
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=512, help="R, nodes per level")
    ap.add_argument("--link-k", type=int, default=128, help="k of link* (entries kept per column)")
    ap.add_argument("--topk", type=int, default=100, help="neighbours per query for retrieval")
    ap.add_argument("--gamma", type=float, default=10.0)
    ap.add_argument("--slice", type=int, default=20, help="queries per slice of the baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each variant, alternating; the table shows medians (default %(default)s)")
    ap.add_argument("--stem", default=None, help="default benchmarks/results/avsl_<device type>")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.child:
        child(args)
        return 0
    import tempfile

    import whymatch

    dev = torch.device(args.device)
    stem = args.stem or str(C.RESULTS / f"avsl_{dev.type}")
    rows, outs = {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="avsl_bench_"))
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):  # variants alternate, so a slow phase of the machine hits both
        for v in args.variants.split(","):
            if v in runs and runs[v] is None:
                continue  # failed before: not again
            save = tmp / f"{v}.pt"
            cmd = [sys.executable, __file__, "--child", v, "--save", str(save)] + [
                a for kv in (("--device", args.device), ("--n", args.n), ("--levels", args.levels),
                             ("--nodes", args.nodes), ("--link-k", args.link_k), ("--topk", args.topk),
                             ("--gamma", args.gamma), ("--slice", args.slice), ("--seed", args.seed))
                for a in map(str, kv)]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if p.returncode != 0:
                rows[v] = {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:300]}
                runs[v] = None
            else:
                runs.setdefault(v, []).append(json.loads(p.stdout.strip().splitlines()[-1]))
                outs[v] = torch.load(save, weights_only=True)
                rows[v] = _median_run(runs[v])
            print(v, f"run {rep + 1}/{args.repeats}", json.dumps(rows[v])[:300], flush=True)

    check = {}
    if "whymatch" in outs and "sliced_torch" in outs:
        a, b = outs["whymatch"], outs["sliced_torch"]
        check["distance_rel_err"] = C.rel_err(a["distance"], b["distance"])
        check["distance_allclose_rtol_1e-4"] = bool(torch.allclose(a["distance"], b["distance"], rtol=1e-4, atol=1e-6))
        check["topk_indices_equal"] = bool(torch.equal(a["topk_indices"], b["topk_indices"]))
        check["topk_indices_agree_fraction"] = float((a["topk_indices"] == b["topk_indices"]).float().mean())
        check["topk_values_max_abs_diff"] = float((a["topk_values"] - b["topk_values"]).abs().max())

    ok = {v: r for v, r in rows.items() if "seconds" in r}

    def ratio(key, v, base="sliced_torch"):
        if v in ok and base in ok:
            x, y = key(ok[base]), key(ok[v])
            return x / y if x and y else None
        return None

    t_d = lambda r: r["distance_seconds"]  # noqa: E731
    mem = lambda r: r["memory"].get("peak_over_before_bytes") or None  # noqa: E731
    fr = lambda x: "" if x is None else f"{x:.2f}x"  # noqa: E731
    # two tasks: the (Q, G) matrix (baseline: its sliced loop), and retrieval (baseline: the matrix then
    # torch.topk; whymatch: avsl_topk alone, which never forms the matrix)
    head = ["variant", "distance (Q x G)", "speedup distance", "retrieval (top-k)", "speedup retrieval",
            "peak memory (both)", "x less memory"]
    body = []
    for v, r in rows.items():
        if "error" in r:
            body.append([v, "failed", "", "", "", "", r["error"]])
            continue
        retr = r["topk_seconds"] if v == "whymatch" else r["seconds"]
        base_retr = ok["sliced_torch"]["seconds"] if "sliced_torch" in ok else None
        body.append([v, C.fmt_s(r["distance_seconds"]), fr(ratio(t_d, v)), C.fmt_s(retr),
                     fr(base_retr / retr if base_retr and retr else None), C.fmt_bytes(mem(r)), fr(ratio(mem, v))])
    mi = C.machine_info(dev)
    where = mi.get("gpu") or f"{mi['cpu_model']} ({mi['torch_threads']} threads)"
    out_bytes = args.n * args.n * 4
    speed = ratio(t_d, "whymatch")
    goal = ("met" if speed and speed >= 5 else "NOT met") if speed else "n/a"
    md = "\n".join([
        f"# AVSL rectified distance and top-k retrieval ({dev.type})",
        "",
        f"`python benchmarks/avsl_cpu.py {' '.join(sys.argv[1:])}` on {where}, torch {mi['torch']}, "
        f"whymatch {whymatch.__version__} at {str(mi['git_commit'])[:10]}.",
        f"Self-retrieval: Q = G = {args.n:,}, {args.levels} levels of R = {args.nodes} nodes, link* keeps "
        f"{args.link_k} entries per column, top-{args.topk} neighbours (query excluded). Baseline = the published "
        f"code's slicing ({args.slice} queries per slice, full (slice, G, R) tensors, dense hat @ link*), then "
        "torch.topk over the (Q, G) matrix. Each variant in a fresh process, timed after a small warm-up; "
        f"{'one run' if args.repeats == 1 else f'median of {args.repeats} runs, the variants alternating'}; "
        "peak memory above the memory before the call (the largest of the runs). Ratios: baseline / whymatch, "
        "same invocation.",
        "",
        C.md_table(head, body),
        "",
        f"Correctness: {json.dumps(check)}.",
        f"The (Q, G) float32 output alone is {C.fmt_bytes(out_bytes)}. Goal (>= 5x faster, memory bounded by the "
        f"output): distance speed {goal} ({fr(speed) or 'n/a'}); whymatch's peak {C.fmt_bytes(mem(ok['whymatch'])) if 'whymatch' in ok else 'n/a'}.",
        "",
        C.load_note({"machine": mi, "load_at_end": C.system_load()}),
    ]) + "\n"
    C.write_results(stem, {"benchmark": "avsl", "device": str(dev), "argv": sys.argv[1:],
                           "sizes": {"n": args.n, "levels": args.levels, "nodes": args.nodes, "link_k": args.link_k,
                                     "topk": args.topk, "slice": args.slice, "gamma": args.gamma},
                           "variants": rows, "check": check, "machine": mi, "load_at_end": C.system_load()}, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
