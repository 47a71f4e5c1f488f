"""End-to-end RISE on the CPU: cost of explaining one query against K = 1, 4, 16 references.

``whymatch.saliency.RISE(sim, n_masks=2000, grid=8, p=0.5, batch_size=256).attribute(query, refs)``
with a small CNN at 96 x 96. The query's N perturbations go through the model
once whatever K is; only the K reference embeddings, the (N, K) similarity and
the K-map saliency grow with K. Goal (issue): time(K=16) / time(K=1) <= 1.3.

Model: the shipped ShapesWorld model (``whymatch.models.load_default_model``)
when its weights are installed; else the same ShapesCNN architecture randomly
initialized (the cost is the same); else a 4-conv CNN defined here.

Correctness first: the K=16 maps must equal the K=1 map of each reference
alone (same seed, same masks). Then medians of repeats, K values interleaved.

Usage::

    python benchmarks/rise_references.py          # writes benchmarks/results/rise_references.{json,md}
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import common as C  # noqa: E402
import whymatch  # noqa: E402
from whymatch import ops  # noqa: E402
from whymatch.saliency import RISE  # noqa: E402

GOAL_RATIO = 1.3


class TinyCNN(nn.Module):
    """Four 3x3 stride-2 convolutions with ReLU, global average pooling: (B, 128) embeddings."""

    def __init__(self, width: int = 32, dim: int = 128) -> None:
        super().__init__()
        chans = (3, width, 2 * width, 4 * width, dim)
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_model() -> tuple[whymatch.SimilarityModel, str]:
    """(model, description): shipped ShapesWorld model, else random ShapesCNN, else TinyCNN."""
    try:
        from whymatch.models import load_default_model
    except ImportError as exc:
        why = f"whymatch.models.load_default_model not importable ({exc})"
    else:
        try:
            return load_default_model("cpu"), "ShapesWorld CNN, shipped weights (load_default_model)"
        except (FileNotFoundError, RuntimeError, OSError) as exc:
            why = f"load_default_model failed: {exc}"
    try:
        from whymatch.models import ShapesCNN

        torch.manual_seed(0)
        return (whymatch.SimilarityModel(ShapesCNN().eval(), "cosine"),
                f"ShapesCNN architecture, random init ({why})")
    except ImportError:
        torch.manual_seed(0)
        return whymatch.SimilarityModel(TinyCNN().eval(), "cosine"), f"TinyCNN defined here ({why})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-masks", type=int, default=2000)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=str(C.RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    sim, model_desc = load_model()
    sim.eval()
    size = args.size
    kmax = max(args.ks)
    g = torch.Generator().manual_seed(1)
    query = torch.rand(3, size, size, generator=g)
    refs = torch.rand(kmax, 3, size, size, generator=g)
    rise = RISE(sim, n_masks=args.n_masks, grid=args.grid, p=args.p, batch_size=args.batch_size, seed=0)
    cfg = {"n_masks": args.n_masks, "size": size, "grid": args.grid, "p": args.p, "batch_size": args.batch_size,
           "ks": args.ks, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
           "model": model_desc, "model_params": sum(p.numel() for p in sim.parameters()), "seed": 0}
    res: dict = {"benchmark": "rise_references", "machine": C.machine_info("cpu"), "config": cfg}
    print(f"rise_references: N={args.n_masks} {size}x{size} K={args.ks} threads={args.threads}; model: {model_desc}",
          flush=True)

    # correctness: K maps at once == each reference alone
    sal_all = rise.attribute(query, refs)
    singles = {k: rise.attribute(query, refs[k:k + 1]) for k in (0, kmax - 1)}
    corr = {
        "shape": list(sal_all.shape),
        "shape_ok": tuple(sal_all.shape) == (kmax, size, size),
        "finite": bool(torch.isfinite(sal_all).all()),
        "max_rel_err_vs_single_reference": max(C.rel_err(sal_all[k], s[0]) for k, s in singles.items()),
        "maps_differ_between_references": C.rel_err(sal_all[0], sal_all[kmax - 1]) if kmax > 1 else None,
    }
    corr["ok"] = bool(corr["shape_ok"] and corr["finite"] and corr["max_rel_err_vs_single_reference"] < 1e-5)
    res["correctness"] = corr
    print(f"  check: {'ok' if corr['ok'] else 'FAILED'} (K={kmax} maps vs one reference at a time: "
          f"rel err {corr['max_rel_err_vs_single_reference']:.1e})", flush=True)

    # end-to-end timing, K interleaved
    for _ in range(args.warmup):
        for k in args.ks:
            rise.attribute(query, refs[:k])
    times: dict[int, list] = {k: [] for k in args.ks}
    for _ in range(args.repeats):
        for k in args.ks:
            t0 = time.perf_counter()
            rise.attribute(query, refs[:k])
            times[k].append(time.perf_counter() - t0)
    timing = {str(k): C.summarize(times[k]) for k in args.ks}
    k1 = timing[str(min(args.ks))]["median_s"]
    for k in args.ks:
        timing[str(k)]["ratio_vs_k1"] = timing[str(k)]["median_s"] / k1
    res["timing"] = timing

    # context: the parts that do / do not depend on K
    n = args.n_masks
    grids, shifts = rise.generate_masks((size, size), n, torch.Generator().manual_seed(0), torch.device("cpu"))
    batches = [ops.rise_apply(grids[i:i + args.batch_size], shifts[i:i + args.batch_size], query)
               for i in range(0, n, args.batch_size)]
    parts = {"model_forward_all_masks": C.time_fn(lambda: [sim(b) for b in batches], warmup=1,
                                                  repeats=args.repeats)}
    parts["rise_apply_all_batches"] = C.time_fn(
        lambda: [ops.rise_apply(grids[i:i + args.batch_size], shifts[i:i + args.batch_size], query)
                 for i in range(0, n, args.batch_size)], warmup=1, repeats=args.repeats)
    for k in args.ks:
        sc = torch.randn(n, k, generator=g)
        parts[f"rise_saliency_k{k}"] = C.time_fn(lambda sc=sc: ops.rise_saliency(grids, shifts, sc, (size, size)),
                                                 warmup=1, repeats=args.repeats)
    res["parts"] = parts
    # the same ratio predicted from the parts: less noisy than the end-to-end ratio
    common_s = parts["model_forward_all_masks"]["median_s"] + parts["rise_apply_all_batches"]["median_s"]
    res["ratio_from_parts"] = {str(k): (common_s + parts[f"rise_saliency_k{k}"]["median_s"])
                               / (common_s + parts[f"rise_saliency_k{min(args.ks)}"]["median_s"]) for k in args.ks}
    kmaxs = str(kmax)
    res["goal"] = {"ratio_k_max_vs_k1": timing[kmaxs]["ratio_vs_k1"], "k_max": kmax, "goal": GOAL_RATIO,
                   "met": timing[kmaxs]["ratio_vs_k1"] <= GOAL_RATIO}

    res["load_at_end"] = C.system_load()
    m = res["machine"]
    rows = [[k, C.fmt_s(timing[str(k)]["median_s"]), f"{timing[str(k)]['spread']:.0%}",
             f"{timing[str(k)]['ratio_vs_k1']:.3f}x"] for k in args.ks]
    prow = [[name, C.fmt_s(t["median_s"]), f"{t['spread']:.0%}"] for name, t in parts.items()]
    md = "\n".join([
        "# End-to-end RISE on the CPU vs number of references K\n",
        f"`RISE(sim, n_masks={n}, grid={args.grid}, p={args.p}, batch_size={args.batch_size}).attribute(query, "
        f"references[:K])`, {size}x{size}x3, model: {model_desc} ({cfg['model_params']} parameters); "
        f"{m['cpu_model']}, {m['torch_threads']} threads, torch {m['torch']}, {m['date_utc']}. "
        f"Median of {args.repeats} runs, K values interleaved; spread = (max - min) / median.\n",
        C.load_note(res),
        C.md_table(["K", "time (median)", "spread", "time / time(K=1)"], rows),
        f"\nGoal (issue): time(K={kmax}) / time(K=1) <= {GOAL_RATIO}: "
        f"{res['goal']['ratio_k_max_vs_k1']:.3f}x, {'met' if res['goal']['met'] else 'NOT met'}. "
        f"Predicted from the parts below (model forward + rise_apply + rise_saliency for K): "
        f"{res['ratio_from_parts'][kmaxs]:.3f}x.\n",
        "\n## Parts (same sizes, timed separately)\n",
        C.md_table(["part", "time (median)", "spread"], prow),
        f"\nCorrectness (before timing): K={kmax} maps vs each reference alone, max rel err "
        f"{corr['max_rel_err_vs_single_reference']:.1e}: {'ok' if corr['ok'] else 'FAILED'}.\n",
    ])
    js, mdp = C.write_results(Path(args.out) / "rise_references", res, md)
    print()
    print(md)
    print(f"wrote {js} and {mdp}")
    return 0 if corr["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
