"""RISE work outside the model on the CPU: fused whymatch ops vs the plain PyTorch pipeline.

What is timed is everything RISE does except the model: making N perturbed
copies of one image (in batches, as the model would consume them) and the
score-weighted sum of the N masks. Scores are random: no model runs.

Paths (same grids, shifts, image, baseline and scores):

* ``fused``: grids + shifts; per batch ``whymatch.ops.rise_apply`` into one
  reused model input buffer (``out=``, as ``whymatch.saliency.RISE`` does); then
  one ``whymatch.ops.rise_saliency`` over all N.
* ``pytorch``: what the RISE code does: all N masks built up front
  (``F.interpolate`` bilinear of the (N, 1, s, s) grids to (s+1)*cell, crop
  at the shifts, an N x H x W float32 tensor kept), per batch
  ``masks * image + (1 - masks) * baseline``, then ``scores.T @ masks.view(N, -1)``.
  This is the baseline the ratios are taken against.
* ``pytorch_lerp``: the same with the blend written as one ``torch.lerp``
  (fewer temporaries); shown for context, not a goal.

Correctness first (full size, every batch and the saliency compared between
paths and against a float64 saliency), then timing (median of repeats,
variants interleaved), then peak memory: each variant runs once in a fresh
subprocess, peak RSS (VmHWM, reset just before the region) minus RSS just
before, after imports and a small warm-up run. A diagnostic run repeats the
timing in subprocesses where fresh large allocations cost fewer page faults
(glibc malloc keeping freed memory: ``MALLOC_MMAP_MAX_=0``,
``MALLOC_TRIM_THRESHOLD_`` huge; or torch's ``THP_MEM_ALLOC_ENABLE=1``,
2 MiB huge pages), to show how much of each path's time is that cost.

Usage::

    python benchmarks/rise_cpu.py                 # writes benchmarks/results/rise_cpu.{json,md}
    python benchmarks/rise_cpu.py --n 256 --repeats 2 --out /tmp/x   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common as C  # noqa: E402
from whymatch import ops  # noqa: E402
from whymatch.ops.reference import rise_grid_geometry, rise_masks  # noqa: E402

VARIANTS = ("fused", "pytorch", "pytorch_lerp")
BASELINE = "pytorch"
GOAL_SPEEDUP, GOAL_MEMORY = 3.0, 4.0
# Diagnostic reruns (not the headline): how much of each path's time is page faults on fresh allocations.
DIAGNOSTICS = {
    "malloc_cache": ({"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)},
                     "glibc malloc keeps freed memory mapped, so a fresh allocation reuses pages that "
                     "are already resident (no page faults)"),
    "torch_thp": ({"THP_MEM_ALLOC_ENABLE": "1"},
                  "torch's CPU allocator aligns large blocks to 2 MiB and asks for transparent huge "
                  "pages (madvise), so a fresh allocation takes 512x fewer page faults"),
}


# --------------------------------------------------------------------------- the two paths

def generate(n: int, size: tuple[int, int], s: int, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grids (n, s, s) float32 and shifts (n, 2) int64, drawn as whymatch.saliency.RISE draws them."""
    gen = torch.Generator().manual_seed(seed)
    cell_h, cell_w, _, _ = rise_grid_geometry(size, s)
    grids = (torch.rand(n, s, s, generator=gen) < p).float()
    shifts = torch.stack([torch.randint(0, cell_h, (n,), generator=gen),
                          torch.randint(0, cell_w, (n,), generator=gen)], dim=1)
    return grids, shifts


def pytorch_masks(grids: torch.Tensor, shifts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """All N masks (N, H, W) float32: bilinear upsample of every grid, then crop each at its shift.

    The crop is a loop of slice copies (as in the RISE code); on this CPU it is
    about 2x faster than one advanced-indexing gather.
    """
    n, s, _ = grids.shape
    h, w = size
    _, _, up_h, up_w = rise_grid_geometry(size, s)
    up = F.interpolate(grids[:, None], size=(up_h, up_w), mode="bilinear", align_corners=False)[:, 0]
    masks = torch.empty(n, h, w)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        masks[i] = up[i, dy:dy + h, dx:dx + w]
    return masks


def run_fused(cfg: dict, inp: dict, pt: C.PhaseTimer, sink: list | None = None) -> torch.Tensor:
    n, bs, size = cfg["n"], cfg["batch_size"], (cfg["size"], cfg["size"])
    with pt("generate"):
        grids, shifts = generate(n, size, cfg["s"], cfg["p"], cfg["seed"])
    with pt("perturb"):
        # one model input buffer reused by every batch, as whymatch.saliency.RISE does
        buf = torch.empty((min(bs, n), *inp["image"].shape), dtype=torch.float32)
        for i in range(0, n, bs):
            j = min(n, i + bs)
            batch = ops.rise_apply(grids[i:j], shifts[i:j], inp["image"], inp["baseline"], out=buf[:j - i])
            if sink is not None:  # correctness check only
                sink.append(batch.clone())
            del batch  # the model would consume it here
    with pt("saliency"):
        sal = ops.rise_saliency(grids, shifts, inp["scores"], size)
    return sal


def run_pytorch(cfg: dict, inp: dict, pt: C.PhaseTimer, sink: list | None = None, *,
                lerp: bool = False) -> torch.Tensor:
    n, bs, size = cfg["n"], cfg["batch_size"], (cfg["size"], cfg["size"])
    image, base, scores = inp["image"], inp["baseline"], inp["scores"]
    with pt("generate"):
        grids, shifts = generate(n, size, cfg["s"], cfg["p"], cfg["seed"])
    with pt("masks"):
        masks = pytorch_masks(grids, shifts, size)
    with pt("perturb"):
        for i in range(0, n, bs):
            m = masks[i:i + bs, None]
            batch = torch.lerp(base, image, m) if lerp else m * image + (1 - m) * base
            if sink is not None:
                sink.append(batch)
            del batch
    with pt("saliency"):
        sal = (scores.T @ masks.view(n, -1)).view(-1, *size)
    return sal


def run_variant(name: str, cfg: dict, inp: dict, pt: C.PhaseTimer, sink: list | None = None) -> torch.Tensor:
    if name == "fused":
        return run_fused(cfg, inp, pt, sink)
    if name == "pytorch":
        return run_pytorch(cfg, inp, pt, sink)
    if name == "pytorch_lerp":
        return run_pytorch(cfg, inp, pt, sink, lerp=True)
    raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")


def make_inputs(cfg: dict, k: int) -> dict:
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    size = cfg["size"]
    return {
        "image": torch.rand(3, size, size, generator=g),
        "baseline": torch.rand(3, size, size, generator=g) * 0.5,  # not zero: both terms of the blend count
        "scores": torch.randn(cfg["n"], k, generator=g),
    }


# --------------------------------------------------------------------------- stages

def check(cfg: dict, k: int) -> dict:
    """Both paths on the same masks: every perturbed batch and the saliency compared."""
    inp = make_inputs(cfg, k)
    size = (cfg["size"], cfg["size"])
    fb: list = []
    pb: list = []
    sal_f = run_fused(cfg, inp, C.PhaseTimer(), fb)
    sal_p = run_pytorch(cfg, inp, C.PhaseTimer(), pb)
    grids, shifts = generate(cfg["n"], size, cfg["s"], cfg["p"], cfg["seed"])
    masks = pytorch_masks(grids, shifts, size)
    spec = rise_masks(grids[:64], shifts[:64], size)  # the op's definition (advanced-indexing crop)
    sal64 = (inp["scores"].double().T @ masks.double().view(cfg["n"], -1)).view(k, *size)
    batch_max = max(float((a - b).abs().max()) for a, b in zip(fb, pb))
    batch_rel = max(C.rel_err(a, b) for a, b in zip(fb, pb))
    res = {
        "k": k,
        "batches_compared": len(fb),
        "batch_shapes_equal": all(a.shape == b.shape for a, b in zip(fb, pb)) and len(fb) == len(pb),
        "batches_finite": all(bool(torch.isfinite(a).all()) for a in fb),
        "perturbed_max_abs_diff": batch_max,
        "perturbed_max_rel_err": batch_rel,
        "baseline_masks_vs_reference_max_abs": float((masks[:64] - spec).abs().max()),
        "saliency_fused_vs_pytorch_rel_err": C.rel_err(sal_f, sal_p),
        "saliency_fused_vs_float64_rel_err": C.rel_err(sal_f, sal64),
        "saliency_pytorch_vs_float64_rel_err": C.rel_err(sal_p, sal64),
    }
    res["ok"] = bool(res["batch_shapes_equal"] and res["batches_finite"] and batch_rel < 1e-5
                     and res["baseline_masks_vs_reference_max_abs"] < 1e-6
                     and res["saliency_fused_vs_pytorch_rel_err"] < 1e-4
                     and res["saliency_fused_vs_float64_rel_err"] < 1e-4)
    return res


def time_variants(cfg: dict, k: int, variants: tuple[str, ...], repeats: int, warmup: int) -> dict:
    """Median wall time per variant, repeats interleaved across variants so that drift hits all alike."""
    inp = make_inputs(cfg, k)
    for _ in range(warmup):
        for v in variants:
            run_variant(v, cfg, inp, C.PhaseTimer())
    times: dict[str, list] = {v: [] for v in variants}
    phases: dict[str, list] = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            pt = C.PhaseTimer()
            t0 = time.perf_counter()
            sal = run_variant(v, cfg, inp, pt)
            times[v].append(time.perf_counter() - t0)
            phases[v].append(pt.totals)
            del sal
    return {v: {**C.summarize(times[v]), "phases_median_s": C.median_phases(phases[v])} for v in variants}


def child_memory(cfg: dict, variant: str, k: int) -> dict:
    """Runs in a fresh process: warm-up at a tiny size, then one measured full-size run."""
    tiny = {**cfg, "n": 16, "size": 32, "batch_size": 8}
    run_variant(variant, tiny, make_inputs(tiny, k), C.PhaseTimer())
    inp = make_inputs(cfg, k)
    return C.peak_rss_region(lambda: run_variant(variant, cfg, inp, C.PhaseTimer()))


def spawn(args: argparse.Namespace, extra: list[str], env: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *cfg_argv(args), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"child {' '.join(extra)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cfg_argv(args: argparse.Namespace) -> list[str]:
    return ["--n", str(args.n), "--size", str(args.size), "--s", str(args.s), "--p", str(args.p),
            "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--seed", str(args.seed)]


# --------------------------------------------------------------------------- report

def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def markdown(res: dict) -> str:
    cfg, m = res["config"], res["machine"]
    lines = [
        "# RISE outside the model, CPU: fused whymatch ops vs plain PyTorch\n",
        f"N={cfg['n']} masks, {cfg['size']}x{cfg['size']}x3, s={cfg['s']}, p={cfg['p']}, "
        f"batch {cfg['batch_size']}, float32; {m['cpu_model']}, {m['torch_threads']} threads, "
        f"torch {m['torch']}, {m['date_utc']}. Median of {cfg['repeats']} runs (variants interleaved); "
        f"spread = (max - min) / median. Peak = peak RSS over RSS before, one run in a fresh process. "
        f"Ratios against `{BASELINE}` (the RISE code's pipeline), measured in the same run.\n",
        C.load_note(res),
    ]
    rows = []
    for k, tk in res["timing"].items():
        mem = res.get("memory", {}).get(k, {})
        for v, t in tk.items():
            pk = mem.get(v, {}).get("peak_over_before_bytes")
            rows.append([k, v, C.fmt_s(t["median_s"]), f"{t['spread']:.0%}",
                         f"{t['speedup_vs_baseline']:.2f}x", C.fmt_bytes(pk),
                         fmt_ratio(mem.get(v, {}).get("memory_ratio_vs_baseline"))])
    lines.append(C.md_table(["K", "path", "time (median)", "spread", "speedup vs pytorch", "peak memory",
                             "memory ratio vs pytorch"], rows))
    lines.append("\nGoals (issue): fused >= 3x faster and >= 4x lower peak memory than `pytorch`.\n")
    grows = []
    for k, g in res["goals"].items():
        grows.append([k, fmt_ratio(g["speedup"]), "met" if g["speedup_met"] else "NOT met",
                      fmt_ratio(g["memory_ratio"]),
                      "met" if g["memory_met"] else "NOT met"])
    lines.append(C.md_table(["K", "speedup", "speed goal", "memory ratio", "memory goal"], grows))
    lines.append("\n## Where the time goes (median seconds per phase)\n")
    prow = []
    for k, tk in res["timing"].items():
        for v, t in tk.items():
            ph = t["phases_median_s"]
            prow.append([k, v] + [C.fmt_s(ph.get(p)) if p in ph else "-" for p in
                                  ("generate", "masks", "perturb", "saliency")])
    lines.append(C.md_table(["K", "path", "generate", "build masks", "perturb (all batches)", "saliency"], prow))
    for name, d in res.get("diagnostics", {}).items():
        lines.append(f"\n## Diagnostic `{name}`: `{d['env']}`\n")
        lines.append(f"The same timing in a subprocess where {d['what']}. Not the headline numbers: it shows how "
                     "much of each path's time is page faults on fresh large allocations on this machine.\n")
        drow = []
        for k, tk in d["timing"].items():
            for v, t in tk.items():
                ph = t["phases_median_s"]
                drow.append([k, v, C.fmt_s(t["median_s"]), f"{t['speedup_vs_baseline']:.2f}x",
                             C.fmt_s(ph.get("masks")) if "masks" in ph else "-",
                             C.fmt_s(ph.get("perturb")), C.fmt_s(ph.get("saliency"))])
        lines.append(C.md_table(["K", "path", "time (median)", "speedup vs pytorch", "build masks", "perturb",
                                 "saliency"], drow))
    lines.append("\n## Correctness (checked before timing, same masks)\n")
    crow = [[c["k"], "ok" if c["ok"] else "FAILED", f"{c['perturbed_max_abs_diff']:.2e}",
             f"{c['saliency_fused_vs_pytorch_rel_err']:.2e}", f"{c['saliency_fused_vs_float64_rel_err']:.2e}",
             f"{c['saliency_pytorch_vs_float64_rel_err']:.2e}"] for c in res["correctness"]]
    lines.append(C.md_table(["K", "status", "perturbed batches max |diff|", "saliency fused vs pytorch (rel)",
                             "fused vs float64", "pytorch vs float64"], crow))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="number of masks N")
    ap.add_argument("--size", type=int, default=224, help="image side H = W")
    ap.add_argument("--s", type=int, default=8, help="grid side")
    ap.add_argument("--p", type=float, default=0.5, help="probability a grid cell is kept")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 16], help="score columns (references) K")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-diagnostic", action="store_true", help="skip the diagnostic reruns (malloc cache, THP)")
    ap.add_argument("--out", default=str(C.RESULTS), help="folder for rise_cpu.json / .md")
    ap.add_argument("--child-memory", metavar="VARIANT", help=argparse.SUPPRESS)
    ap.add_argument("--child-time", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = {"n": args.n, "size": args.size, "s": args.s, "p": args.p, "batch_size": args.batch_size,
           "seed": args.seed, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
           "ks": args.ks, "channels": 3, "dtype": "float32"}

    if args.child_memory:
        print(json.dumps(child_memory(cfg, args.child_memory, args.k)))
        return 0
    if args.child_time:
        print(json.dumps({str(k): time_variants(cfg, k, VARIANTS, args.repeats, args.warmup) for k in args.ks}))
        return 0

    res: dict = {"benchmark": "rise_cpu", "machine": C.machine_info("cpu"), "config": cfg}
    print(f"rise_cpu: N={args.n} {args.size}x{args.size} s={args.s} K={args.ks} batch={args.batch_size} "
          f"threads={args.threads} on {res['machine']['cpu_model']}", flush=True)

    res["correctness"] = [check(cfg, k) for k in sorted(set(args.ks))]
    for c in res["correctness"]:
        print(f"  check K={c['k']}: {'ok' if c['ok'] else 'FAILED'}  batches max|diff| "
              f"{c['perturbed_max_abs_diff']:.2e}, saliency fused vs pytorch "
              f"{c['saliency_fused_vs_pytorch_rel_err']:.2e}"
              f", vs float64 {c['saliency_fused_vs_float64_rel_err']:.2e}", flush=True)

    res["timing"] = {}
    for k in args.ks:
        tk = time_variants(cfg, k, VARIANTS, args.repeats, args.warmup)
        for v in VARIANTS:
            tk[v]["speedup_vs_baseline"] = tk[BASELINE]["median_s"] / tk[v]["median_s"]
        res["timing"][str(k)] = tk
        print(f"  K={k}: " + ", ".join(f"{v} {C.fmt_s(tk[v]['median_s'])} (x{tk[v]['speedup_vs_baseline']:.2f})"
                                       for v in VARIANTS), flush=True)

    if not args.no_memory:
        res["memory_method"] = (
            "Each (variant, K) runs in a fresh Python subprocess: imports, then one warm-up run of the same "
            "variant at N=16, 32x32; gc.collect(); RSS read (VmRSS, /proc/self/status); the kernel's peak-RSS "
            "counter reset (write '5' to /proc/self/clear_refs; field hwm_reset says whether it worked, "
            "otherwise VmHWM / ru_maxrss covers the whole process and the small warm-up keeps it below the "
            "region's peak); one full-size run; peak = VmHWM - RSS before. Inputs (image, baseline, "
            "N x K scores) exist before the region; the region's result (K x H x W saliency) is alive at the end. "
            "torch's CPU allocator returns memory to malloc, which tracemalloc does not see.")
        res["memory"] = {}
        for k in args.ks:
            mk = {v: spawn(args, ["--child-memory", v, "--k", str(k)]) for v in VARIANTS}
            base = mk[BASELINE]["peak_over_before_bytes"]
            for v in VARIANTS:
                pk = mk[v]["peak_over_before_bytes"]
                mk[v]["memory_ratio_vs_baseline"] = base / pk if pk else None
            res["memory"][str(k)] = mk
            print(f"  K={k} peak: " + ", ".join(f"{v} {C.fmt_bytes(mk[v]['peak_over_before_bytes'])}"
                                                for v in VARIANTS), flush=True)

    res["goals"] = {}
    for k in args.ks:
        sp = res["timing"][str(k)]["fused"]["speedup_vs_baseline"]
        mr = res.get("memory", {}).get(str(k), {}).get("fused", {}).get("memory_ratio_vs_baseline")
        res["goals"][str(k)] = {"speedup": sp, "speedup_goal": GOAL_SPEEDUP, "speedup_met": sp >= GOAL_SPEEDUP,
                                "memory_ratio": mr, "memory_goal": GOAL_MEMORY,
                                "memory_met": mr is not None and mr >= GOAL_MEMORY}

    if not args.no_diagnostic:
        res["diagnostics"] = {}
        for name, (env, what) in DIAGNOSTICS.items():
            d = spawn(args, ["--child-time", "--repeats", str(max(2, args.repeats - 2)), "--warmup", "1",
                             "--ks", *map(str, args.ks)], env=env)
            for tk in d.values():
                for v in VARIANTS:
                    tk[v]["speedup_vs_baseline"] = tk[BASELINE]["median_s"] / tk[v]["median_s"]
            res["diagnostics"][name] = {"env": " ".join(f"{k}={v}" for k, v in env.items()), "what": what,
                                        "timing": d}
            for k, tk in d.items():
                print(f"  [{name}] K={k}: " + ", ".join(
                    f"{v} {C.fmt_s(tk[v]['median_s'])} (x{tk[v]['speedup_vs_baseline']:.2f})" for v in VARIANTS),
                    flush=True)

    res["load_at_end"] = C.system_load()
    md = markdown(res)
    js, mdp = C.write_results(Path(args.out) / "rise_cpu", res, md)
    print()
    print(md)
    print(f"wrote {js} and {mdp}")
    return 0 if all(c["ok"] for c in res["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
