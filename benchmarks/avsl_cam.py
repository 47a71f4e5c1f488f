#!/usr/bin/env python
"""AVSL CAM statistics of a level pair: the fused whymatch op against the published code's PyTorch.

    python benchmarks/avsl_cam.py                 # B = 180, 512 nodes, 28x28 -> 14x14 and 14x14 -> 7x7
    python benchmarks/avsl_cam.py --dry-run       # tiny sizes, to check the script

The task per level pair, as one AVSL training step does it (no gradient): the batch-mean
correlation of the two levels' CAMs (the lower pooled to the upper's size), the momentum update
of the edge buffer, and both levels' reliability statistic (published variant: minimum over
the last axis).

* ``fused``: :func:`whymatch.ops.avsl.cam_statistics`, one call (``whymatch::avsl_edge_update_``):
  each CAM read once, a workspace the size of the CAMs, never B x R x R.
* ``fused_corr_only`` / ``torch_corr_only``: the correlation and edge update alone (no
  reliability), to separate the product (MKL's GEMM for torch) from the rest.
* ``torch``: the published code's way (zbr17/AVSL avsl_collector): ``F.adaptive_avg_pool2d``,
  ``F.normalize``, ``torch.einsum("bmj,bnj->mn") / B`` (MKL's GEMM on the CPU), the in-place
  momentum update, and the reliability (min, ``F.normalize(p=1)``, ``std``) of each level.

Correctness first (corr, edges and reliabilities of the two against each other). Times: median of
``--repeats`` after a warm-up. Peak memory: each variant in a fresh subprocess, peak RSS above the
RSS before the call (inputs excluded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

VARIANTS = ("fused", "torch", "fused_corr_only", "torch_corr_only")


def make_inputs(batch, nodes, low, high, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    c1 = torch.relu(torch.randn(batch, nodes, low, low, generator=gen))  # CAMs of post-ReLU features
    c2 = torch.relu(torch.randn(batch, nodes, high, high, generator=gen))
    edges = torch.rand(nodes, nodes, generator=gen)
    return c1.to(device), c2.to(device), edges.to(device)


def torch_reliability(cam):
    x = cam - cam.amin(dim=-1, keepdim=True)  # the published code's FIXME: last axis only
    return F.normalize(x.flatten(2), p=1, dim=-1).std(dim=-1)


def torch_step(c1, c2, edges, momentum):
    with torch.no_grad():
        r1, r2 = torch_reliability(c1), torch_reliability(c2)
        low = F.normalize(F.adaptive_avg_pool2d(c1, tuple(c2.shape[2:])).flatten(2), dim=-1)
        high = F.normalize(c2.flatten(2), dim=-1)
        corr = torch.einsum("bmj,bnj->mn", low, high) / low.shape[0]
        edges.mul_(momentum).add_(corr, alpha=1 - momentum)
    return corr, r1, r2


def fused_step(c1, c2, edges, momentum):
    from whymatch.ops.avsl import cam_statistics

    return cam_statistics(c1, c2, edges=edges, momentum=momentum, published=True)


def torch_corr_step(c1, c2, edges, momentum):
    with torch.no_grad():
        low = F.normalize(F.adaptive_avg_pool2d(c1, tuple(c2.shape[2:])).flatten(2), dim=-1)
        high = F.normalize(c2.flatten(2), dim=-1)
        corr = torch.einsum("bmj,bnj->mn", low, high) / low.shape[0]
        edges.mul_(momentum).add_(corr, alpha=1 - momentum)
    return corr


def fused_corr_step(c1, c2, edges, momentum):
    from whymatch.ops import cam_correlation

    return cam_correlation(c1, c2, edges=edges, momentum=momentum)


STEPS = {"fused": fused_step, "torch": torch_step, "fused_corr_only": fused_corr_step,
         "torch_corr_only": torch_corr_step}


def check(args, low, high):
    c1, c2, edges = make_inputs(args.batch, args.nodes, low, high, args.seed, args.device)
    e1, e2 = edges.clone(), edges.clone()
    a, b = fused_step(c1, c2, e1, args.momentum), torch_step(c1, c2, e2, args.momentum)
    return {"corr": C.rel_err(a[0], b[0]), "edges": C.rel_err(e1, e2), "rel_low": C.rel_err(a[1], b[1]),
            "rel_high": C.rel_err(a[2], b[2])}


def run_child(args, variant, low, high) -> dict:
    """Time and peak memory of one variant (run in a fresh process by the parent)."""
    c1, c2, edges = make_inputs(args.batch, args.nodes, low, high, args.seed, args.device)
    fn = STEPS[variant]
    fn(c1, c2, edges, args.momentum)  # warm-up (thread pools, the ISA choice, CUDA context)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    mem = C.peak_rss_region(lambda: fn(c1, c2, edges, args.momentum))
    if cuda:  # on the GPU, peak = torch's peak CUDA allocation above the allocation before the call
        torch.cuda.synchronize()
        mem = {"host": mem, "peak_over_before_bytes": torch.cuda.max_memory_allocated() - before}
    t = C.time_fn(lambda: fn(c1, c2, edges, args.momentum), warmup=args.warmup, repeats=args.repeats,
                  device=args.device)
    return {"time": t, "memory": mem}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch", type=int, default=180)
    ap.add_argument("--nodes", type=int, default=512)
    ap.add_argument("--pairs", default="28:14,14:7", help="lower:upper map sides, comma-separated")
    ap.add_argument("--momentum", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stem", default=None, help="result path without suffix (default benchmarks/results/avsl_cam_<device type>)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, to check the script")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "variant:low:high"
    args = ap.parse_args(argv)
    if args.dry_run:
        args.batch, args.nodes, args.repeats = 4, 24, 2
    if args.child:
        variant, low, high = args.child.split(":")
        print(json.dumps(run_child(args, variant, int(low), int(high))))
        return 0

    import whymatch

    pairs = [tuple(int(v) for v in p.split(":")) for p in args.pairs.split(",")]
    results = []
    for low, high in pairs:
        row = {"low": low, "high": high, "check_rel_err": check(args, low, high), "variants": {}}
        bad = {k: v for k, v in row["check_rel_err"].items() if not v < 1e-4}
        if bad:
            raise SystemExit(f"fused and torch disagree at {low}->{high}: {bad}")
        for variant in VARIANTS:
            print(f"[avsl_cam] {low}x{low} -> {high}x{high} {variant} ...", flush=True)
            cmd = [sys.executable, __file__, "--child", f"{variant}:{low}:{high}", "--batch", str(args.batch),
                   "--nodes", str(args.nodes), "--momentum", str(args.momentum), "--repeats", str(args.repeats),
                   "--warmup", str(args.warmup), "--seed", str(args.seed), "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row["variants"][variant] = json.loads(out.strip().splitlines()[-1])
        results.append(row)

    dev = torch.device(args.device)
    info = C.machine_info(dev)
    data = {"benchmark": "avsl_cam", "argv": sys.argv[1:], "machine": info,
            "sizes": {"batch": args.batch, "nodes": args.nodes, "pairs": pairs}, "momentum": args.momentum,
            "results": results}
    where = info.get("gpu") or f"{info['cpu_model']} ({info['torch_threads']} threads)"
    lines = [f"# AVSL CAM statistics of a level pair: fused op vs the published code's PyTorch ({dev.type})", "",
             f"`python benchmarks/avsl_cam.py {' '.join(sys.argv[1:])}` on {where}, torch {info['torch']}, "
             f"whymatch {whymatch.__version__} at {str(info['git_commit'])[:10]}.",
             f"B = {args.batch}, R = {args.nodes} nodes per level; one step = correlation + edge update + both "
             f"levels' reliability. Median of {args.repeats} after {args.warmup} warm-up calls; peak = peak RSS "
             "(on CUDA: peak CUDA allocation) above the level before one call, each variant in its own process. time / fused = the variant's time over the fused op's (of the same task), same run.",
             ""]
    rows = []
    for r in results:
        ce = r["check_rel_err"]
        for name, v in r["variants"].items():
            ft = r["variants"]["fused_corr_only" if name.endswith("corr_only") else "fused"]["time"]["median_s"]
            t = v["time"]["median_s"]
            err = (f"corr {ce['corr']:.1e}, edges {ce['edges']:.1e}, rel {max(ce['rel_low'], ce['rel_high']):.1e}"
                   if name == "fused" else "")
            rows.append([f"{r['low']}x{r['low']} -> {r['high']}x{r['high']}", name, C.fmt_s(t),
                         f"{v['time']['spread']:.0%}", f"{t / ft:.2f}x",
                         C.fmt_bytes(v["memory"]["peak_over_before_bytes"]), err])
    lines.append(C.md_table(["pair", "variant", "time", "spread", "time / fused", "peak memory",
                             "rel. error fused vs torch"], rows))
    data["load_at_end"] = C.system_load()
    lines.append(C.load_note(data))
    stem = Path(args.stem) if args.stem else C.RESULTS / f"avsl_cam_{dev.type}"
    if args.dry_run and not args.stem:
        stem = Path("/tmp/avsl_cam_dry")
    js, md = C.write_results(stem, data, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
