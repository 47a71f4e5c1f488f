#!/usr/bin/env python
"""Fused soft mask (similarity mining) against the composite PyTorch version: time and saved memory.

    python benchmarks/soft_mask.py                      # CPU, 180 x 3 x 224 x 224, 7 x 7 maps
    python benchmarks/soft_mask.py --device cuda --dtypes float32,bfloat16 --stem benchmarks/results/gpu/soft_mask

What it measures, for x (B, C, H, W) and attention maps (B, h, w) (ResNet layer4 at 224 px: 7 x 7):

* ``fused``: :func:`whymatch.ops.soft_mask`, one kernel forward and one backward
  (upsampling, sigmoid and product fused; the backward recomputes the mask).
* ``composite``: ``x * (1 - sigmoid(alpha * (interpolate(M) - beta)))`` in eager PyTorch
  with its autograd (the keep-mask cast to x's dtype before the product).
* ``composite_compiled``: the same function under ``torch.compile`` (inductor), the
  strongest plain-PyTorch baseline (``--no-compile`` skips it).

Two gradient settings: ``mining`` (gradients for the attention, alpha and beta, the
images are data: the similarity-mining loss) and ``all`` (x needs a gradient too).
Per variant: forward time, forward + backward time (median of ``--repeats`` after a
warm-up), the bytes autograd saves for the backward beyond the inputs themselves
(saved_tensors_hooks; storages of x, M, alpha and beta are not counted), and on CUDA
the peak memory allocated during forward + backward above what was allocated before.
Correctness first: every variant's output and gradients against the fused op's.
Ratios are baseline / fused, measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

import whymatch  # noqa: E402
from whymatch import ops  # noqa: E402


def composite(x, m, alpha, beta):
    up = F.interpolate(m[:, None], size=tuple(x.shape[2:]), mode="bilinear", align_corners=False)
    return x * (1 - torch.sigmoid(alpha * (up - beta))).to(x.dtype)


def fused(x, m, alpha, beta):
    return ops.soft_mask(x, m, alpha, beta)


def make_inputs(args, dtype, device, grads):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=gen).to(device=device, dtype=dtype)
    m = torch.rand(args.batch, args.map, args.map, generator=gen).to(device)
    alpha = torch.tensor(args.alpha, device=device)
    beta = torch.tensor(args.beta, device=device)
    g = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device=device, dtype=dtype)
    x.requires_grad_(grads == "all")
    for t in (m, alpha, beta):
        t.requires_grad_(True)
    return x, m, alpha, beta, g


def saved_bytes(fn, inputs) -> int:
    """Bytes of tensors autograd saves for fn's backward, excluding the inputs' own storages."""
    skip = {t.untyped_storage().data_ptr() for t in inputs}
    seen: set[int] = set()
    total = 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    return total


def run_variant(fn, inputs, g, args, device):
    x, m, alpha, beta = inputs
    params = [t for t in (x, m, alpha, beta) if t.requires_grad]

    def fwd():
        return fn(x, m, alpha, beta)

    def fwd_bwd():
        out = fn(x, m, alpha, beta)
        return torch.autograd.grad(out, params, g)

    res = {
        "forward": C.time_fn(fwd, warmup=args.warmup, repeats=args.repeats, device=device),
        "forward_backward": C.time_fn(fwd_bwd, warmup=args.warmup, repeats=args.repeats, device=device),
        "saved_bytes": saved_bytes(fn, inputs),
    }
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        r = fwd_bwd()
        torch.cuda.synchronize()
        res["peak_over_before_bytes"] = torch.cuda.max_memory_allocated() - base
        del r
    return res


def check(fn, ref_fn, inputs, g):
    x, m, alpha, beta = inputs
    params = [t for t in (x, m, alpha, beta) if t.requires_grad]
    out_a = fn(x, m, alpha, beta)
    ga = torch.autograd.grad(out_a, params, g)
    out_b = ref_fn(x, m, alpha, beta)
    gb = torch.autograd.grad(out_b, params, g)
    names = [n for n, t in zip(("x", "attention", "alpha", "beta"), (x, m, alpha, beta)) if t.requires_grad]
    return {"out": C.rel_err(out_a, out_b), **{f"grad_{n}": C.rel_err(a, b) for n, a, b in zip(names, ga, gb)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=180)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--map", type=int, default=7, help="attention map side (7: ResNet layer4 at 224 px)")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--alpha", type=float, default=10.0)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--stem", default=None, help="result path without suffix (default benchmarks/results/soft_mask_<device>)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, to check the script")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.batch, args.size, args.repeats, args.warmup = 4, 32, 2, 1
    device = torch.device(args.device)
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]
    stem = Path(args.stem) if args.stem else C.RESULTS / f"soft_mask_{device.type}"

    variants = {"fused": fused, "composite": composite}
    if not args.no_compile:
        variants["composite_compiled"] = torch.compile(composite)
    results = []
    for dtype in dtypes:
        for grads in ("mining", "all"):
            x, m, alpha, beta, g = make_inputs(args, dtype, device, grads)
            inputs = (x, m, alpha, beta)
            row = {"dtype": str(dtype).replace("torch.", ""), "grads": grads, "variants": {}}
            for name, fn in variants.items():
                if name != "fused":
                    row.setdefault("check_vs_fused", {})[name] = check(fn, fused, inputs, g)
                print(f"[soft_mask] {row['dtype']} grads={grads} {name} ...", flush=True)
                row["variants"][name] = run_variant(fn, inputs, g, args, device)
            results.append(row)
            del x, m, alpha, beta, g

    info = C.machine_info(device)
    data = {"benchmark": "soft_mask", "argv": sys.argv[1:], "machine": info,
            "sizes": {"batch": args.batch, "channels": 3, "size": args.size, "map": args.map},
            "alpha": args.alpha, "beta": args.beta, "results": results}
    where = info.get("gpu") or f"{info['cpu_model']} ({info['torch_threads']} threads)"
    lines = [f"# Soft mask: fused kernel vs composite PyTorch ({device.type})", "",
             f"`python benchmarks/soft_mask.py {' '.join(sys.argv[1:])}` on {where}, torch {info['torch']}, "
             f"whymatch {whymatch.__version__} at {str(info['git_commit'])[:10]}.",
             f"x = {args.batch} x 3 x {args.size} x {args.size}, attention {args.batch} x {args.map} x {args.map}; "
             "grads `mining`: attention, alpha, beta; `all`: x too. Median of "
             f"{args.repeats} after {args.warmup} warm-up calls. Saved = bytes autograd keeps for the backward beyond "
             "the inputs. Speedup = variant time / fused time, same run.", ""]
    headers = ["dtype", "grads", "variant", "forward", "fwd+bwd", "speedup fwd+bwd", "saved for backward"]
    if device.type == "cuda":
        headers.append("peak fwd+bwd")
    rows = []
    for r in results:
        fused_t = r["variants"]["fused"]["forward_backward"]["median_s"]
        for name, v in r["variants"].items():
            t = v["forward_backward"]["median_s"]
            row = [r["dtype"], r["grads"], name, C.fmt_s(v["forward"]["median_s"]), C.fmt_s(t),
                   "1.00x" if name == "fused" else f"{t / fused_t:.2f}x", C.fmt_bytes(v["saved_bytes"])]
            if device.type == "cuda":
                row.append(C.fmt_bytes(v.get("peak_over_before_bytes")))
            rows.append(row)
    lines.append(C.md_table(headers, rows))
    worst = max((e for r in results for c in r.get("check_vs_fused", {}).values() for e in c.values()), default=0.0)
    lines.append(f"Largest relative error of a baseline's output or gradient against the fused op: {worst:.2e}.")
    js, md = C.write_results(stem, data, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
