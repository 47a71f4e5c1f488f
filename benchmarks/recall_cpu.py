"""Recall@{1,2,4,8} of a 60,000 x 512 self-retrieval on the CPU: whymatch against the usual ways.

Variants, each in a fresh Python subprocess (so that one variant's freed memory
cannot hide another's peak), on the same seeded data (``--classes`` Gaussian
clusters, noise 4x the spread of the centres, float32):

- ``whymatch_faiss``: ``RetrievalEvaluator(metrics=('recall',), backend='faiss')``
  (exact faiss IndexFlatIP on l2-normalized embeddings, queries in chunks of 4096).
- ``whymatch_torch``: the same with ``backend='torch'`` (chunked matmul + topk).
- ``naive_torch``: the whole N x N cosine matrix in one matmul, diagonal masked,
  topk(8): what training scripts often write (N = 60,000 needs 14.4 GB).
- ``pml``: pytorch-metric-learning's ``AccuracyCalculator(include=('precision_at_1',),
  k=8)`` (its faiss kNN; it has no recall@K, and precision@1 = recall@1).

Reported: wall time of the evaluation call (one timed run after data generation;
the variants take tens of seconds, so the run-to-run noise is small against the
ratios), peak RSS above the process's RSS before the call, and recall@1 of each
variant (they must agree). Ratios are against ``naive_torch`` and ``pml`` measured
in the same run.

Usage::

    python benchmarks/recall_cpu.py                    # writes benchmarks/results/recall_cpu.{json,md}
    python benchmarks/recall_cpu.py --n 5000 --stem /tmp/recall_small
    python benchmarks/recall_cpu.py --device cuda      # the same on a GPU: benchmarks/results/recall_cuda.{json,md}

With ``--device cuda`` the embeddings live on the GPU, each call is followed by a
synchronize, and peak memory is torch's peak CUDA allocation above what was
allocated before the call (faiss's own GPU memory, when faiss-gpu is installed,
is not seen by torch's allocator; the host RSS peak is reported beside it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common as C  # noqa: E402

VARIANTS = ("whymatch_faiss", "whymatch_torch", "naive_torch", "pml")
KS = (1, 2, 4, 8)


def data(n: int, dim: int, classes: int, seed: int, noise: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian classes: unit-normal centres plus ``noise`` x unit-normal noise (recall@1 well below 1)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + noise * torch.randn(n, dim, generator=g)
    return x, y


def run(variant: str, x: torch.Tensor, y: torch.Tensor) -> dict:
    if variant in ("whymatch_faiss", "whymatch_torch"):
        from whymatch.evaluation import RetrievalEvaluator

        ev = RetrievalEvaluator(KS, metrics=("recall",), backend=variant.split("_")[1])
        out = ev.get_accuracy(x, y)
        return {f"recall@{k}": out[f"recall@{k}"] for k in KS}
    if variant == "naive_torch":
        e = F.normalize(x, dim=1)
        sim = e @ e.T
        sim.fill_diagonal_(float("-inf"))
        idx = sim.topk(max(KS), dim=1).indices
        del sim
        hit = y[idx] == y[:, None]
        return {f"recall@{k}": float(hit[:, :k].any(1).double().mean()) for k in KS}
    if variant == "pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(include=("precision_at_1",), k=max(KS))
        out = calc.get_accuracy(F.normalize(x, dim=1), y)
        return {"recall@1": float(out["precision_at_1"])}
    raise ValueError(f"unknown variant {variant!r}")


def child(args: argparse.Namespace) -> None:
    x, y = data(args.n, args.dim, args.classes, args.seed)
    cuda = args.device.startswith("cuda")
    if cuda:
        x, y = x.to(args.device), y.to(args.device)
        run(args.child, x[:512], y[:512])  # warm-up: CUDA context, kernels, faiss resources
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    res: dict = {}

    def call() -> None:
        t0 = time.perf_counter()
        res["metrics"] = run(args.child, x, y)
        if cuda:
            torch.cuda.synchronize()
        res["seconds"] = time.perf_counter() - t0

    res["memory"] = C.peak_rss_region(call)
    if cuda:
        res["memory"]["host_peak_over_before_bytes"] = res["memory"]["peak_over_before_bytes"]
        res["memory"]["peak_over_before_bytes"] = torch.cuda.max_memory_allocated() - before
    print(json.dumps(res))


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--stem", default=None, help="default benchmarks/results/recall_<device type>")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    dev = torch.device(args.device)
    stem = args.stem or str(C.RESULTS / f"recall_{dev.type}")
    rows = {}
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--child", v, "--n", str(args.n), "--dim", str(args.dim),
               "--classes", str(args.classes), "--seed", str(args.seed), "--device", args.device]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            rows[v] = {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:300],
                       "returncode": p.returncode}
        else:
            rows[v] = json.loads(p.stdout.strip().splitlines()[-1])
        print(v, json.dumps(rows[v])[:300], flush=True)
    ok = {v: r for v, r in rows.items() if "seconds" in r}
    r1 = {v: r["metrics"]["recall@1"] for v, r in ok.items()}
    agree = max(r1.values()) - min(r1.values()) < 1e-9 if r1 else False

    def ratio(v: str, base: str, key) -> float | None:
        if v in ok and base in ok and key(ok[v]):
            return key(ok[base]) / key(ok[v])
        return None

    t = lambda r: r["seconds"]  # noqa: E731
    m = lambda r: r["memory"].get("peak_over_before_bytes") or None  # noqa: E731
    head = ["variant", "time", "x vs naive", "x vs pml", "peak memory", "x less vs naive", "recall@1/2/4/8"]
    body = []
    for v, r in rows.items():
        if "error" in r:
            body.append([v, "failed", "", "", "", "", r["error"]])
            continue
        rec = "/".join(f"{r['metrics'][f'recall@{k}']:.4f}" for k in KS if f"recall@{k}" in r["metrics"])
        fr = lambda x: "" if x is None else f"{x:.2f}x"  # noqa: E731
        body.append([v, C.fmt_s(r["seconds"]), fr(ratio(v, "naive_torch", t)), fr(ratio(v, "pml", t)),
                     C.fmt_bytes(m(r)), fr(ratio(v, "naive_torch", m)), rec])
    mi = C.machine_info(dev)
    where = mi.get("gpu") or f"{mi['cpu_model']} ({mi['torch_threads']} threads)"
    mem_note = ("peak memory = torch's peak CUDA allocation above the allocation before the call" if dev.type == "cuda"
                else "peak memory = peak RSS above the RSS before the call")
    md = "\n".join([
        f"# Recall@K evaluation on the {'GPU' if dev.type == 'cuda' else 'CPU'}",
        "",
        f"`python benchmarks/recall_cpu.py --n {args.n} --dim {args.dim} --classes {args.classes} --device {args.device}` "
        f"on {where}, torch {mi['torch']}, commit {str(mi['git_commit'])[:10]}.",
        f"Self-retrieval of {args.n:,} x {args.dim} float32 embeddings ({args.classes} Gaussian classes, noise 4), cosine, "
        f"the query excluded from its own neighbours. Each variant in a fresh process; {mem_note}. "
        "Ratios: the baseline's time (or memory) over the variant's, same run.",
        "",
        C.md_table(head, body),
        "",
        f"recall@1 agrees across the variants that ran: {'yes' if agree else 'NO'} ({r1}).",
    ]) + "\n"
    C.write_results(stem, {"benchmark": "recall_cpu", "device": str(dev), "n": args.n, "dim": args.dim, "classes": args.classes,
                                "seed": args.seed, "variants": rows, "recall_at_1_agree": agree, "machine": mi}, md)
    print(md)


if __name__ == "__main__":
    main()
