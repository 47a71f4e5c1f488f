"""RISE on one GPU: kernel bandwidth against the device's copy ceiling, and end-to-end RISE with ResNet-50.

Sections (each checks correctness before it times; results are written after
every section, so a run cut short still leaves what it measured):

1. ``copy``: the device's memory ceiling, a large device-to-device copy,
   bytes read + bytes written over time.
2. ``rise_apply``: N=4000 masks on a 224 x 224 x 3 image, bf16 and fp32,
   contiguous and channels_last. Bytes = output written + grids, shifts,
   image and baseline read once. Achieved bytes/s vs the copy ceiling. Timed
   through the registered op (``torch.ops.whymatch.rise_apply``, no argument
   checks) and the public ``whymatch.ops.rise_apply`` (whose checks sync the
   device). Every output element is checked written (the caching allocator's
   block is poisoned with NaN first) and compared with ops/reference.py.
3. ``rise_saliency``: K=1 and 16 maps from N=4000 masks vs a float64
   reference; against the plain PyTorch way (all masks built, one matmul).
4. ``e2e``: ``RISE(sim, n_masks=4000, batch_size=500)`` with ResNet-50
   (python/whymatch/models/resnet.py, random init) under bf16 autocast and
   channels_last, one reference, vs the model's own forward over the same 4000
   perturbed images (goal: RISE within 5% of it), and vs the plain PyTorch
   pipeline on the GPU (all masks built; per batch m * x + (1 - m) * b, cast
   to bf16 channels_last; scores.T @ masks).

Times: CUDA events on the current stream around each call, warm-up first,
median of repeats. ``--dry-run`` runs every section on the CPU at toy sizes
(host clock) to check the script itself.

Usage::

    python benchmarks/gpu_rise.py                 # on a GPU machine; writes benchmarks/results/gpu/gpu_rise.{json,md}
    python benchmarks/gpu_rise.py --dry-run       # anywhere: CPU, toy sizes, writes to /tmp
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common as C  # noqa: E402
import whymatch  # noqa: E402
from whymatch import ops  # noqa: E402
from whymatch.ops import reference as ref  # noqa: E402
from whymatch.saliency import RISE  # noqa: E402

GOAL_E2E_OVERHEAD = 0.05
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# rel-err limits for checks: float32 arithmetic; bf16 output rounding
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def load_resnet50():
    """whymatch.models.resnet.resnet50, from the installed package or else from this checkout."""
    try:
        from whymatch.models.resnet import resnet50
    except ImportError:
        path = Path(__file__).resolve().parent.parent / "python" / "whymatch" / "models" / "resnet.py"
        spec = importlib.util.spec_from_file_location("_whymatch_resnet", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        resnet50 = mod.resnet50
    return resnet50


def gen_masks(n: int, size: tuple[int, int], s: int, p: float, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Grids and shifts exactly as ``RISE(..., seed=seed).generate_masks`` draws them."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cell_h, cell_w, _, _ = ref.rise_grid_geometry(size, s)
    grids = (torch.rand(n, s, s, generator=gen) < p).float()
    shifts = torch.stack([torch.randint(0, cell_h, (n,), generator=gen),
                          torch.randint(0, cell_w, (n,), generator=gen)], dim=1)
    return grids.to(device), shifts.to(device)


def pytorch_masks(grids: torch.Tensor, shifts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) float32 masks, the plain way: F.interpolate of all grids, one gather for the crops."""
    n, s, _ = grids.shape
    h, w = size
    _, _, up_h, up_w = ref.rise_grid_geometry(size, s)
    up = F.interpolate(grids[:, None], size=(up_h, up_w), mode="bilinear", align_corners=False)[:, 0]
    rows = (shifts[:, 0, None] + torch.arange(h, device=grids.device))[:, :, None]
    cols = (shifts[:, 1, None] + torch.arange(w, device=grids.device))[:, None, :]
    return up[torch.arange(n, device=grids.device)[:, None, None], rows, cols]


def poison(shape, dtype, device, channels_last: bool) -> None:
    """Fill a block of the output's size with NaN and free it: the caching allocator hands it out next."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
    t.fill_(float("nan"))
    del t


def chunked_err(out: torch.Tensor, ref_fn, n: int, chunk: int) -> dict:
    """rel err and max |diff| of out against ref_fn(i, j) over chunks of the first dim, in float64."""
    num = den = 0.0
    mx = 0.0
    for i in range(0, n, chunk):
        j = min(n, i + chunk)
        a = out[i:j].double()
        b = ref_fn(i, j).double()
        d = a - b
        num += float((d * d).sum())
        den += float((b * b).sum())
        mx = max(mx, float(d.abs().max()))
    return {"rel_err": math.sqrt(num / den) if den > 0 else math.inf, "max_abs_diff": mx}


# --------------------------------------------------------------------------- sections

def section_copy(a, dev) -> dict:
    nbytes = a.copy_bytes
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ok = bool(torch.equal(dst[: 1 << 20], src[: 1 << 20])) and bool(torch.equal(dst[-(1 << 20):], src[-(1 << 20):]))
    t = C.time_fn(lambda: dst.copy_(src), warmup=a.warmup + 2, repeats=max(a.repeats, 10), device=dev)
    bw = 2 * nbytes / t["median_s"]
    return {"bytes_copied": nbytes, "bytes_moved": 2 * nbytes, "time": t, "bytes_per_s": bw, "check_ok": ok}


def section_rise_apply(a, dev, ceiling: float | None) -> dict:
    n, size, s = a.n, (a.size, a.size), 8
    grids, shifts = gen_masks(n, size, s, 0.5, 0, dev)
    g = torch.Generator(device="cpu").manual_seed(2)
    image = torch.rand(3, *size, generator=g).to(dev)
    base = (torch.rand(3, *size, generator=g) * 0.5).to(dev)
    rows = []
    for dname, dtype in DTYPES.items():
        for cl in (False, True):
            row = {"dtype": dname, "channels_last": cl, "n": n, "size": list(size)}
            poison((n, 3, *size), dtype, dev, cl)
            out = torch.ops.whymatch.rise_apply(grids, shifts, image, base, dtype, cl)
            row["all_written"] = bool(torch.isfinite(out).all())
            row["layout_ok"] = bool(out.is_contiguous(memory_format=torch.channels_last if cl
                                                      else torch.contiguous_format))
            err = chunked_err(out, lambda i, j: ref.rise_apply(grids[i:j], shifts[i:j], image, base, dtype, cl),
                              n, a.check_chunk)
            row.update(err)
            row["tolerance"] = TOL[dtype]
            row["check_ok"] = bool(row["all_written"] and row["layout_ok"] and err["rel_err"] < TOL[dtype])
            out_bytes = out.numel() * out.element_size()
            del out
            in_bytes = sum(t.numel() * t.element_size() for t in (grids, shifts, image, base))
            row["bytes"] = out_bytes + in_bytes
            t_op = C.time_fn(lambda: torch.ops.whymatch.rise_apply(grids, shifts, image, base, dtype, cl),
                             warmup=a.warmup + 2, repeats=max(a.repeats, 10), device=dev)
            t_pub = C.time_fn(lambda: ops.rise_apply(grids, shifts, image, base, dtype=dtype, channels_last=cl),
                              warmup=a.warmup + 2, repeats=max(a.repeats, 10), device=dev)
            row["time_op"], row["time_public"] = t_op, t_pub
            row["bytes_per_s_op"] = row["bytes"] / t_op["median_s"]
            row["bytes_per_s_public"] = row["bytes"] / t_pub["median_s"]
            row["fraction_of_copy_ceiling_op"] = row["bytes_per_s_op"] / ceiling if ceiling else None
            row["fraction_of_copy_ceiling_public"] = row["bytes_per_s_public"] / ceiling if ceiling else None
            row["floor_s_at_ceiling"] = row["bytes"] / ceiling if ceiling else None

            # the plain PyTorch way for the same batch: masks built, blended in fp32, cast, laid out
            def plain():
                m = pytorch_masks(grids, shifts, size)[:, None]
                x = (m * image + (1 - m) * base).to(dtype)
                return x.contiguous(memory_format=torch.channels_last) if cl else x

            row["time_pytorch"] = C.time_fn(plain, warmup=a.warmup, repeats=a.repeats, device=dev)
            row["speedup_op_vs_pytorch"] = row["time_pytorch"]["median_s"] / t_op["median_s"]
            rows.append(row)
            frac = row["fraction_of_copy_ceiling_op"]
            print(f"  rise_apply {dname} cl={cl}: check {'ok' if row['check_ok'] else 'FAILED'} "
                  f"(rel {err['rel_err']:.1e}); op {C.fmt_s(t_op['median_s'])} "
                  f"{row['bytes_per_s_op'] / 1e9:.0f} GB/s" + (f" = {frac:.0%} of copy" if frac else "")
                  + f"; public {C.fmt_s(t_pub['median_s'])}; pytorch {C.fmt_s(row['time_pytorch']['median_s'])}",
                  flush=True)
    return {"rows": rows}


def section_rise_saliency(a, dev) -> dict:
    n, size, s = a.n, (a.size, a.size), 8
    grids, shifts = gen_masks(n, size, s, 0.5, 0, dev)
    masks = pytorch_masks(grids, shifts, size)
    rows = []
    for k in a.ks:
        g = torch.Generator(device="cpu").manual_seed(3 + k)
        scores = torch.randn(n, k, generator=g).to(dev)
        poison((k, *size), torch.float32, dev, False)
        out = torch.ops.whymatch.rise_saliency(grids, shifts, scores, *size)
        sal64 = torch.zeros(k, size[0] * size[1], dtype=torch.float64, device=dev)
        for i in range(0, n, a.check_chunk):
            j = min(n, i + a.check_chunk)
            m64 = ref.rise_masks(grids[i:j], shifts[i:j], size).double().view(j - i, -1)
            sal64 += scores[i:j].double().T @ m64
        sal64 = sal64.view(k, *size)
        plain_out = (scores.T @ masks.view(n, -1)).view(k, *size)
        row = {"k": k, "n": n, "size": list(size), "all_written": bool(torch.isfinite(out).all()),
               "rel_err_vs_float64": C.rel_err(out, sal64), "pytorch_rel_err_vs_float64": C.rel_err(plain_out, sal64),
               "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
        row["check_ok"] = bool(row["all_written"] and row["rel_err_vs_float64"] < 1e-4)
        del out, sal64, plain_out
        row["time_op"] = C.time_fn(lambda: torch.ops.whymatch.rise_saliency(grids, shifts, scores, *size),
                                   warmup=a.warmup + 1, repeats=a.repeats, device=dev)
        row["time_public"] = C.time_fn(lambda: ops.rise_saliency(grids, shifts, scores, size),
                                       warmup=a.warmup + 1, repeats=a.repeats, device=dev)
        row["time_pytorch_matmul_only"] = C.time_fn(lambda: scores.T @ masks.view(n, -1), warmup=a.warmup + 1,
                                                    repeats=a.repeats, device=dev)
        row["time_pytorch_masks_and_matmul"] = C.time_fn(
            lambda: scores.T @ pytorch_masks(grids, shifts, size).view(n, -1), warmup=a.warmup, repeats=a.repeats,
            device=dev)
        fma = n * size[0] * size[1] * k
        row["fma"] = fma
        row["gfma_per_s_op"] = fma / row["time_op"]["median_s"] / 1e9
        row["mask_pixels_per_s_op"] = n * size[0] * size[1] / row["time_op"]["median_s"]
        rows.append(row)
        print(f"  rise_saliency K={k}: check {'ok' if row['check_ok'] else 'FAILED'} "
              f"(rel {row['rel_err_vs_float64']:.1e}); op {C.fmt_s(row['time_op']['median_s'])}, "
              f"pytorch matmul only {C.fmt_s(row['time_pytorch_matmul_only']['median_s'])}, "
              f"masks+matmul {C.fmt_s(row['time_pytorch_masks_and_matmul']['median_s'])}", flush=True)
    return {"rows": rows}


def section_e2e(a, dev) -> dict:
    n, size, bs, p, seed = a.n, (a.size, a.size), a.batch_size, 0.5, 0
    resnet50 = load_resnet50()
    torch.manual_seed(0)
    net = resnet50(embedding=True).to(dev).eval().to(memory_format=torch.channels_last)
    sim = whymatch.SimilarityModel(net, "cosine", autocast=torch.bfloat16, channels_last=True).eval()
    in_dtype = sim.input_dtype(torch.device(dev))
    g = torch.Generator(device="cpu").manual_seed(4)
    query = torch.rand(3, *size, generator=g).to(dev)
    reference = torch.rand(1, 3, *size, generator=g).to(dev)
    # normalize='rise' (the published form, scores @ masks / (N p)), which the plain pipeline below computes; the
    # library's default 'centered' divides by the per-pixel mask sum instead, so it would not equal it
    rise = RISE(sim, n_masks=n, grid=8, p=p, batch_size=bs, seed=seed, normalize="rise")
    grids, shifts = gen_masks(n, size, 8, p, seed, dev)
    zero = torch.zeros(3, *size, device=dev)  # RISE's default baseline 0.0

    with torch.no_grad():
        # the model alone, on the very images RISE will make
        inputs = [ops.rise_apply(grids[i:i + bs], shifts[i:i + bs], query, zero, dtype=in_dtype,
                                 channels_last=sim.channels_last) for i in range(0, n, bs)]

        def forward_only():
            return torch.cat([sim(x) for x in inputs])

        def rise_e2e():
            return rise.attribute(query, reference)

        def pytorch_pipeline():
            masks = pytorch_masks(grids, shifts, size)
            embs = []
            for i in range(0, n, bs):
                m = masks[i:i + bs, None]
                x = (m * query + (1 - m) * zero).to(in_dtype).contiguous(memory_format=torch.channels_last)
                embs.append(sim(x))
            scores = sim.pairwise(torch.cat(embs), sim.embed(reference))
            return (scores.T @ masks.view(n, -1)).view(-1, *size) / (n * p)

        # correctness: RISE == saliency of the forward-only scores (same inputs), and ~ the plain pipeline
        sal = rise_e2e()
        scores_fwd = sim.pairwise(forward_only(), sim.embed(reference))
        sal_fwd = ops.rise_saliency(grids, shifts, scores_fwd, size) / (n * p)
        sal_pt = pytorch_pipeline()
        try:  # RISE's own mask generator, if its signature is still (size, n, generator, device)
            same_masks = bool(torch.equal(rise.generate_masks(size, n, torch.Generator().manual_seed(seed), dev)[0],
                                          grids))
        except (TypeError, AttributeError) as exc:
            same_masks = None
            print(f"  e2e: could not call RISE.generate_masks ({exc}); relying on the saliency comparison",
                  flush=True)
        check = {
            "same_masks_as_rise": same_masks,
            "finite": bool(torch.isfinite(sal).all()),
            "rel_err_vs_forward_scores": C.rel_err(sal, sal_fwd),
            "rel_err_vs_pytorch_pipeline": C.rel_err(sal, sal_pt),
            "centered_rel_err_vs_pytorch_pipeline": C.rel_err(sal - sal.mean(), sal_pt - sal_pt.mean()),
            "score_std": float(scores_fwd.std()),
        }
        check["ok"] = bool(same_masks is not False and check["finite"] and check["rel_err_vs_forward_scores"] < 1e-3
                           and check["rel_err_vs_pytorch_pipeline"] < 1e-2)
        del sal, sal_fwd, sal_pt, scores_fwd
        print(f"  e2e check: {'ok' if check['ok'] else 'FAILED'} {check}", flush=True)

        res = {"n": n, "size": list(size), "batch_size": bs, "k": 1, "model": "ResNet-50 (random init), "
               "bf16 autocast, channels_last, cosine", "input_dtype": str(in_dtype), "check": check}
        for name, fn in (("forward_only", forward_only), ("rise", rise_e2e), ("pytorch_pipeline", pytorch_pipeline)):
            if torch.device(dev).type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated() if torch.device(dev).type == "cuda" else None
            res[name] = C.time_fn(fn, warmup=a.warmup + 1, repeats=a.e2e_repeats, device=dev)
            if base_mem is not None:
                res[name]["peak_gpu_bytes_over_start"] = torch.cuda.max_memory_allocated() - base_mem
            print(f"  e2e {name}: {C.fmt_s(res[name]['median_s'])} (spread {res[name]['spread']:.0%})", flush=True)
        res["rise_over_forward"] = res["rise"]["median_s"] / res["forward_only"]["median_s"]
        res["pytorch_over_rise"] = res["pytorch_pipeline"]["median_s"] / res["rise"]["median_s"]
        res["pytorch_over_forward"] = res["pytorch_pipeline"]["median_s"] / res["forward_only"]["median_s"]
        res["goal"] = {"rise_within": GOAL_E2E_OVERHEAD, "met": res["rise_over_forward"] <= 1 + GOAL_E2E_OVERHEAD}
        res["images_per_s_forward"] = n / res["forward_only"]["median_s"]
    return res


# --------------------------------------------------------------------------- report

def markdown(res: dict) -> str:
    m, cfg = res["machine"], res["config"]
    dev = m.get("gpu", m["device"])
    out = ["# RISE on the GPU: kernels vs the copy ceiling, end-to-end with ResNet-50\n",
           f"{dev}, torch {m['torch']} (CUDA {m.get('torch_cuda')}), whymatch {m['whymatch']}, {m['date_utc']}; "
           f"N={cfg['n']}, {cfg['size']}x{cfg['size']}x3, median of {cfg['repeats']}+ timed runs after warm-up "
           f"(CUDA events; end-to-end: {cfg['e2e_repeats']} runs). "
           f"{'DRY RUN on the CPU at toy sizes: numbers mean nothing.' if cfg['dry_run'] else ''}\n"]
    for name, sec in res.get("errors", {}).items():
        out.append(f"**Section {name} failed:** `{sec.splitlines()[-1] if sec else ''}`\n")
    if "copy" in res:
        c = res["copy"]
        out.append(f"Copy ceiling: {C.fmt_bytes(c['bytes_copied'])} device-to-device, "
                   f"{c['bytes_per_s'] / 1e9:.0f} GB/s (read + write), {C.fmt_s(c['time']['median_s'])}.\n")
    if "rise_apply" in res:
        out.append("## rise_apply (N perturbed images)\n")
        rows = [[r["dtype"], "yes" if r["channels_last"] else "no", "ok" if r["check_ok"] else "FAILED",
                 C.fmt_bytes(r["bytes"]), C.fmt_s(r["time_op"]["median_s"]),
                 f"{r['bytes_per_s_op'] / 1e9:.0f}",
                 f"{r['fraction_of_copy_ceiling_op']:.0%}" if r["fraction_of_copy_ceiling_op"] else "n/a",
                 C.fmt_s(r["time_public"]["median_s"]), C.fmt_s(r["time_pytorch"]["median_s"]),
                 f"{r['speedup_op_vs_pytorch']:.1f}x"] for r in res["rise_apply"]["rows"]]
        out.append(C.md_table(["dtype", "channels_last", "check", "bytes", "op time", "GB/s",
                               "of copy ceiling", "public fn time", "pytorch time", "op vs pytorch"], rows))
    if "rise_saliency" in res:
        out.append("\n## rise_saliency (K maps from N masks)\n")
        rows = [[r["k"], "ok" if r["check_ok"] else "FAILED", f"{r['rel_err_vs_float64']:.1e}",
                 C.fmt_s(r["time_op"]["median_s"]), C.fmt_s(r["time_public"]["median_s"]),
                 f"{r['gfma_per_s_op']:.0f}", C.fmt_s(r["time_pytorch_matmul_only"]["median_s"]),
                 C.fmt_s(r["time_pytorch_masks_and_matmul"]["median_s"])] for r in res["rise_saliency"]["rows"]]
        out.append(C.md_table(["K", "check", "rel err vs fp64", "op time", "public fn time", "GFMA/s",
                               "pytorch matmul (masks given)", "pytorch masks + matmul"], rows))
    if "e2e" in res:
        e = res["e2e"]
        out.append(f"\n## End-to-end RISE, {e['model']}, N={e['n']}, batch {e['batch_size']}, K=1\n")
        rows = []
        for name in ("forward_only", "rise", "pytorch_pipeline"):
            t = e[name]
            rows.append([name, C.fmt_s(t["median_s"]), f"{t['spread']:.0%}",
                         f"{t['median_s'] / e['forward_only']['median_s']:.3f}x",
                         C.fmt_bytes(t.get("peak_gpu_bytes_over_start"))])
        out.append(C.md_table(["what", "time (median)", "spread", "vs model forward", "peak GPU memory (added)"],
                              rows))
        out.append(f"\nGoal: RISE within {GOAL_E2E_OVERHEAD:.0%} of the model's forward over the same images: "
                   f"{e['rise_over_forward']:.3f}x, {'met' if e['goal']['met'] else 'NOT met'}. "
                   f"Plain PyTorch pipeline / RISE: {e['pytorch_over_rise']:.2f}x. "
                   f"Check: {'ok' if e['check']['ok'] else 'FAILED'} (RISE vs plain pipeline rel err "
                   f"{e['check']['rel_err_vs_pytorch_pipeline']:.1e}).\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="toy sizes (N=48, 64x64, batch 16)")
    ap.add_argument("--dry-run", action="store_true", help="= --device cpu --small, output to a temp folder")
    ap.add_argument("--n", type=int, default=None, help="masks N (default 4000; --small 48)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 224; --small 64)")
    ap.add_argument("--batch-size", type=int, default=None, help="RISE batch (default 500; --small 16)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--copy-bytes", type=int, default=None, help="bytes per copy (default 2 GiB; --small 64 MiB)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 10; --small 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--e2e-repeats", type=int, default=5, help="timed runs of each end-to-end variant")
    ap.add_argument("--sections", nargs="+", default=["copy", "rise_apply", "rise_saliency", "e2e"],
                    choices=["copy", "rise_apply", "rise_saliency", "e2e"])
    ap.add_argument("--out", default=None, help="folder for gpu_rise.json / .md (default benchmarks/results/gpu)")
    a = ap.parse_args(argv)
    if a.dry_run:
        a.device, a.small = "cpu", True
    small = a.small
    a.n = a.n or (48 if small else 4000)
    a.size = a.size or (64 if small else 224)
    a.batch_size = a.batch_size or (16 if small else 500)
    a.copy_bytes = a.copy_bytes or ((64 << 20) if small else (2 << 30))
    a.repeats = a.repeats or (2 if small else 10)
    a.check_chunk = 16 if small else 500
    a.e2e_repeats = min(a.repeats, a.e2e_repeats)
    out_dir = Path(a.out) if a.out else (Path("/tmp/whymatch_gpu_rise_dry") if a.dry_run else C.RESULTS / "gpu")

    dev = torch.device(a.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_rise: no CUDA device visible (use --dry-run to check the script on the CPU)", file=sys.stderr)
            return 2
        info = whymatch.build_info()
        if "rise_apply" not in info["cuda_kernels"]:
            print(f"gpu_rise: whymatch was built without CUDA kernels: {info}", file=sys.stderr)
            return 2
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(min(4, torch.get_num_threads()))

    res: dict = {"benchmark": "gpu_rise", "machine": C.machine_info(dev),
                 "config": {"n": a.n, "size": a.size, "batch_size": a.batch_size, "ks": a.ks, "grid": 8, "p": 0.5,
                            "copy_bytes": a.copy_bytes, "repeats": a.repeats, "e2e_repeats": a.e2e_repeats,
                            "warmup": a.warmup,
                            "dry_run": bool(a.dry_run), "small": small, "sections": a.sections},
                 "errors": {}}
    print(f"gpu_rise on {res['machine'].get('gpu', dev)}: N={a.n} {a.size}x{a.size} batch {a.batch_size}", flush=True)

    def save():
        C.write_results(out_dir / "gpu_rise", res, markdown(res))

    ceiling = None
    for sec in a.sections:
        try:
            if sec == "copy":
                res["copy"] = section_copy(a, dev)
                ceiling = res["copy"]["bytes_per_s"]
                print(f"  copy: {ceiling / 1e9:.0f} GB/s (read + write)", flush=True)
            elif sec == "rise_apply":
                res["rise_apply"] = section_rise_apply(a, dev, ceiling)
            elif sec == "rise_saliency":
                res["rise_saliency"] = section_rise_saliency(a, dev)
            elif sec == "e2e":
                res["e2e"] = section_e2e(a, dev)
        except Exception:  # noqa: BLE001 - record, go on with the next section
            res["errors"][sec] = traceback.format_exc()
            print(f"  section {sec} FAILED:\n{res['errors'][sec]}", file=sys.stderr, flush=True)
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        save()

    checks = [r["check_ok"] for key in ("rise_apply", "rise_saliency") for r in res.get(key, {}).get("rows", [])]
    checks += [res["copy"]["check_ok"]] if "copy" in res else []
    checks += [res["e2e"]["check"]["ok"]] if "e2e" in res else []
    res["all_checks_ok"] = bool(all(checks)) and not res["errors"]
    save()
    print()
    print(markdown(res))
    print(f"wrote {out_dir / 'gpu_rise.json'} and .md")
    return 0 if res["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
