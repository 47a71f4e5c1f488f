#!/usr/bin/env python
"""Performance model of AVSL retrieval at SOP scale on an H100 and an H200, per GPU path.

    python benchmarks/avsl_sop_model.py [--arch sm_90] [--no-accuracy] [--stem benchmarks/results/avsl_sop_model]

Problem (SOP self-retrieval, the published evaluation): Q = G = 60,502 images (the SOP test split,
11,316 classes), 3 levels of R = 512 nodes (ResNet-50 layer2/3/4, embedding dim 512), link* with
k = 128 nonzeros per column (the published topk 128), per-query top-k 128 (REFERENCES.md, AVSL).

Paths:
* ``simt``: the sparse SIMT kernel (csrc/avsl/avsl_distance_cuda.cu), top-k variant.
* ``tensorcore``: the fused dense 3xTF32 kernel (csrc/avsl/avsl_tensorcore_cuda.cu).
* ``cublas``: ``whymatch.ops.avsl.cublas_topk`` (the torch-op form, WHYMATCH_AVSL_CUBLAS_FUSED=0):
  per query chunk, torch ops for the prologue and epilogue and torch.matmul (cuBLAS SGEMM,
  float32) for hat @ link*. The published slicing runs the same torch ops (plus a full sort), so
  its model is this one's.
* ``cublas_fused``: the cuBLAS path as it runs with the compiled module: the same SGEMMs, and the
  fused kernels of csrc/avsl/avsl_fused_cuda.cu around them (prologue, in-place blend, epilogue with
  the running top-k): pairs x R crosses HBM 2 L + 2 (L - 2) times instead of 3 + 25 (L - 1) + 1.

Method: each path's kernel is compiled with nvcc for ``--arch`` with CMakeLists.txt's flags and
disassembled (nvdisasm, as benchmarks/sass_counts.py); the instruction mix of each loop body
(static SASS per iteration) times the loop's trip count at SOP size (from the kernel's code,
written out below) gives warp instructions and tensor-core instructions (HMMA). Time of a path =
the largest of its resource times (tensor pipe, instruction issue, L2, HBM) under the stated
efficiency factors (a roofline: the resources overlap); the sum is given as the no-overlap
bound. cuBLAS's own SASS is closed: that path is modelled from FLOPs and bytes only.

With ``--no-accuracy`` skipped: the error of the tensor-core kernel (3xTF32, the emulated kernel:
tests/cuda_emulation) and of the SIMT kernel against the float64 reference on one random
problem, and the errors that a 1xTF32 and a 2xTF32 split would have (the same product computed in
float64 from tf32-rounded operands), to justify the split.

Writes ``<stem>.json`` and ``<stem>.md``. Needs nvcc and nvdisasm (``pip install ".[sass]"``).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import sass_counts as sc  # noqa: E402

SOP = {"Q": 60502, "G": 60502, "levels": 3, "R": 512, "link_k": 128, "topk": 128}

# Vendor figures (NVIDIA H100 / H200 datasheets, SXM parts, dense, i.e. without the 2:4 sparsity
# factor that the datasheets' TF32 headline of 989 TFLOPS includes) and the assumptions beside them.
DEVICES = {
    "h100": {"name": "H100 SXM5 80 GB", "sms": 132, "boost_ghz": 1.98, "tf32_dense_tflops": 494.7,
             "fp32_tflops": 66.9, "hbm_tbs": 3.35, "l2_tbs": 5.5},
    "h200": {"name": "H200 SXM 141 GB", "sms": 132, "boost_ghz": 1.98, "tf32_dense_tflops": 494.7,
             "fp32_tflops": 66.9, "hbm_tbs": 4.8, "l2_tbs": 5.5},
}
ASSUMPTIONS = {
    "l2_tbs": "L2 read bandwidth 5.5 TB/s: NOT a vendor figure (NVIDIA publishes none); third-party "
              "microbenchmarks of Hopper report 5.5-7 TB/s; the H200 has the same 50 MB L2 and clocks",
    "mma_sync_efficiency": 0.5,
    "mma_sync_why": "WMMA compiles to mma.sync (HMMA) on sm_90; Hopper's full tensor rate needs wgmma. "
                    "FlashAttention-2 (mma.sync) reaches ~35-50% of H100 peak against FA-3's ~75% (wgmma); "
                    "0.5 of the dense TF32 peak is assumed",
    "issue_efficiency": 0.7,
    "issue_why": "4 warp schedulers per SM, one warp instruction per clock each at the boost clock, 70% "
                 "sustained (dependency and memory stalls with 8 warps per SM: one 256-thread block)",
    "l2_efficiency": 0.8,
    "hbm_efficiency": 0.8,
    "sgemm_efficiency": 0.8,
    "sgemm_why": "cuBLAS float32 SGEMM on M >> K = N = 512 reaches ~80% of the FP32 (non-tensor) peak",
    "fused_io": "the fused cuBLAS path's intermediates (two chunk buffers of 1 GiB together, default "
                "CUBLAS_CHUNK_BYTES) do not fit the 50 MB L2: every pass over pairs x R is counted at HBM, "
                "cuBLAS's operand read and output write included; the gallery and reliability rows the fused "
                "kernels read (8 B per element: ge, rg; qe, rq rows stay in L1) are counted at L2",
    "fused_overlap": "the cuBLAS path's kernels run one after another on one stream: its time is the sum of "
                     "the SGEMMs' max(FP32, HBM) and each fused kernel's max(HBM, L2, issue)",
    "fused_topk_serial": "the top-k epilogue's insertion runs on one thread per query: per candidate, one pass "
                         "of its loop body's static instructions (one warp instruction each) is counted; the "
                         "warps of a block wait at the barrier meanwhile (not overlapped: added to the time)",
    "fused_topk_latency_factor": 4,
    "fused_topk_latency_why": "1,024 inserting threads (one per query of a chunk) are ~2 warps per scheduler: too few "
                              "to hide the dependent-issue latency; counted at 1/4 of the issue rate",
    "gallery_from_l2": "the blocks walk the gallery in the same order at the same pace: the gallery tile's "
                       "embeddings and reliabilities (16 items x 2,560 floats) are read from HBM once per "
                       "wave of 132 blocks (4 queries each), from L2 by the others; the 4 queries' rows from L1",
}

HMMA_FLOPS = {"HMMA.1684.F32.TF32": 2 * 16 * 8 * 4, "HMMA.1688.F32.TF32": 2 * 16 * 8 * 8}


def compile_sass(cu: Path, arch: str, tools: dict, flags: list[str], work: Path) -> dict:
    cubin = work / (cu.stem + ".cubin")
    subprocess.run([tools["nvcc"], "-cubin", f"-arch={arch}", "-std=c++17", *flags, "-I", str(ROOT / "csrc"),
                    "-o", str(cubin), str(cu)], check=True, capture_output=True, text=True)
    res = subprocess.run([tools["cuobjdump"], "-res-usage", str(cubin)], capture_output=True, text=True,
                         check=True).stdout
    sass = subprocess.run([tools["nvdisasm"], "-c", "-g", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    funcs = sc.parse_sass(sass)
    names = sc.demangle(list(funcs))
    regs = {}
    cur = None
    for line in res.splitlines():
        m = sc.RES_FUNC.match(line)
        if m:
            cur = m.group(1)
        m2 = sc.RES_VALS.search(line)
        if m2 and cur:
            regs[cur] = int(m2.group(1))
    return {sc.short_name(names[k]): {"fn": v, "registers": regs.get(k)} for k, v in funcs.items()}


def lines_of(cu: Path, text: str) -> set[int]:
    return {n for n, line in enumerate(cu.read_text().splitlines(), 1) if text in line}


def loop_mix(fn: dict, cu: Path, anchor: str | None, op_re: str = r".", shortest: bool = False) -> dict:
    """The innermost loop that holds an instruction of source line `anchor` (None: any line) matching op_re: its
    instruction count, opcode mix (by base opcode) and its HMMA variants."""
    import re

    ins = fn["instrs"]
    lines = lines_of(cu, anchor) if anchor else set()
    rx = re.compile(op_re)
    hits = [i for i, x in enumerate(ins)
            if rx.search(x[1]) and (anchor is None or (Path(x[3]).name == cu.name and x[4] in lines))]
    if not hits:
        raise RuntimeError(f"{cu.name}: no SASS instruction for the line {anchor!r}")
    loops = [lp for lp in sc.loops_of(fn) if any(lp[0] <= h <= lp[1] for h in hits)]
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    most = max(sum(1 for h in hits if lp[0] <= h <= lp[1]) for lp in inner)
    tops = [lp for lp in inner if sum(1 for h in hits if lp[0] <= h <= lp[1]) == most]
    # several copies of the loop (template instances): the first, or with shortest the smallest body
    lo, hi = min(tops, key=lambda lp: lp[1] - lp[0]) if shortest else tops[0]
    body = ins[lo:hi + 1]
    mix = collections.Counter(x[1].split(".")[0] for x in body)
    hmma = collections.Counter(x[1] for x in body if x[1].startswith("HMMA"))
    return {"instructions": len(body), "anchors": sum(1 for h in hits if lo <= h <= hi),
            "mix": dict(mix.most_common()), "hmma": dict(hmma)}


def tensorcore_model(k: dict, cu: Path) -> dict:
    fn = k["fn"]
    Q, G, L, R = SOP["Q"], SOP["G"], SOP["levels"], SOP["R"]
    tiles = math.ceil(Q / 4) * math.ceil(G / 16)  # a tile: 4 queries x 16 gallery items
    # the HMMA carry the line of crt/mma.hpp: any HMMA; of the two K loops (tc_gemm<4>, every warp 4
    # column tiles, the one that runs at R = 512, and tc_gemm<0> for narrower levels) the branch-free one
    kloop = loop_mix(fn, cu, None, r"^HMMA", shortest=True)
    epi = loop_mix(fn, cu, "*ha = da * da * pa + *ha * (1.f - pa);", r"^ST")
    pro = loop_mix(fn, cu, "hat[m * ld + r] = h;", r"^ST")
    rsum = loop_mix(fn, cu, "for (int64_t c = part; c < R; c += 4) s += hat[m * ld + c];", r"^FADD")
    # trip counts per tile (64 pairs), from avsl_tensorcore_cuda.cu at R = 512 (every warp has 4 column slots):
    k_iters = (L - 1) * 8 * (R // 8)                       # per level: 8 warps x Rp/8 k-steps
    epi_iters = (L - 1) * 8 * 4 * 16 / max(1, epi["anchors"] / 2)  # per warp: 4 slots x 16 columns; 2 stores per column
    pro_iters = 256 * R / 4 / 32 / max(1, pro["anchors"])   # 256 threads, R columns in steps of 4, per warp
    rsum_iters = 8 * (R / 4) / max(1, rsum["anchors"])      # 8 warps, R / 4 columns per thread
    warp_instr = tiles * (k_iters * kloop["instructions"] + epi_iters * epi["instructions"]
                          + pro_iters * pro["instructions"] + rsum_iters * rsum["instructions"])
    hmma_per_iter = kloop["hmma"]
    tc_flops = tiles * k_iters * sum(n * HMMA_FLOPS.get(op, 0) for op, n in hmma_per_iter.items())
    useful = 2.0 * Q * G * (L - 1) * R * R
    link_bytes = tiles * (L - 1) * 2 * R * R * 4             # hi + lo fragments of link*, read per tile from L2
    gallery_bytes = tiles * 16 * (L * R + (L - 1) * R) * 4   # embeddings + reliabilities of the tile's 16 items
    # (the 4 queries' rows, 41 KB, are the same for all of a block's tiles: L1, not counted)
    waves = math.ceil(Q / 4 / 132)
    hbm_bytes = waves * G * (L * R + (L - 1) * R) * 4 + Q * (L * R + (L - 1) * R) * 4
    return {"tiles": tiles, "k_loop": kloop, "epilogue_loop": epi, "prologue_loop": pro, "row_sum_loop": rsum,
            "trip_counts_per_tile": {"k_loop": k_iters, "epilogue": epi_iters, "prologue": pro_iters,
                                     "row_sum": rsum_iters},
            "warp_instructions": warp_instr, "tensor_flops": tc_flops, "useful_flops": useful,
            "l2_bytes": link_bytes + gallery_bytes, "hbm_bytes": hbm_bytes, "registers": k["registers"]}


def simt_model(k: dict, cu: Path, link_k: int | None = None) -> dict:
    """The sparse SIMT kernel's work at SOP size with ``link_k`` nonzeros per link* column (default SOP's)."""
    fn = k["fn"]
    Q, G, L, R = SOP["Q"], SOP["G"], SOP["levels"], SOP["R"]
    link = loop_mix(fn, cu, "for (int64_t k = kb; k < ke; ++k) acc += __ldg(vals + k) * prev[", r"^FFMA")
    col = loop_mix(fn, cu, "cur[c * P + jj] = valid ? h : T(0);", r"^ST")
    per_link = link["instructions"] / max(1, link["anchors"])
    links_per_pair = (L - 1) * R * (SOP["link_k"] if link_k is None else link_k)
    thread_instr = Q * G * (links_per_pair * per_link + (L - 1) * R * col["instructions"] / max(1, col["anchors"]))
    warp_instr = thread_instr / 32
    flops = 2.0 * Q * G * links_per_pair
    # hats in shared memory: 1 load per link (4 B) per thread
    smem_bytes = Q * G * links_per_pair * 4
    return {"link_loop": link, "column_loop": col, "instructions_per_link": per_link,
            "links_per_pair": links_per_pair, "warp_instructions": warp_instr, "fp32_flops": flops,
            "smem_bytes": smem_bytes, "registers": k["registers"]}


def cublas_model() -> dict:
    Q, G, L, R = SOP["Q"], SOP["G"], SOP["levels"], SOP["R"]
    pr = Q * G * R
    # float32 transfers of a pairs x R tensor per level in ops/avsl.py _packed_reference (read + write):
    # level 0: sub (2 reads of broadcast inputs are small; 1 write), pow (1 read, 1 write) = 3;
    # level >= 1: delta 3; p: rq*rg (1 w), *coef (1 r 1 w), +bias (2), *gamma (2), sigmoid (2) = 9;
    # matmul: read hat, write A = 2; blend: delta*p (2 r 1 w), 1-p (2), A*(1-p) (3), + (3) = 11 -> 25;
    # final sum: 1 read. Sort of each query's G distances: small beside these.
    transfers = 3 + (L - 1) * 25 + 1
    return {"transfers_of_pairs_x_R": transfers, "hbm_bytes": pr * 4 * transfers,
            "sgemm_flops": 2.0 * Q * G * (L - 1) * R * R}


def cublas_fused_model(k: dict, cu: Path) -> dict:
    """The cuBLAS path with the fused kernels: SGEMMs as cublas_model, the kernels around them from their SASS."""
    Q, G, L, R = SOP["Q"], SOP["G"], SOP["levels"], SOP["R"]
    pairs, pr = Q * G, Q * G * R
    topk_fn = k["topk"]["fn"]
    pro = loop_mix(k["prologue"]["fn"], cu,
                   "for (int64_t c = lane; c < p.R; c += 32) h[c] = fused_value(r, 0, 0.f, c, 0.f);", r"^ST")
    blend = loop_mix(k["blend"]["fn"], cu,
                     "for (int64_t c = lane; c < p.R; c += 32) h[c] = fused_value(r, p.level, p.gamma, c, h[c]);",
                     r"^ST")
    epi = loop_mix(topk_fn, cu, "s += fused_value(r, p.level, p.gamma, c, a ? a[c] : 0.f);", r"^FADD")
    ins = loop_mix(topk_fn, cu, "if (cnt == p.k && !avsl_before(v, j, ld[p.k - 1], lj[p.k - 1])) continue;", r".")
    it = R / 32  # column iterations per pair and level (a warp per pair, lanes over the columns)
    # per pair: prologue (level 0), blend (levels 1 .. L-2), epilogue (level L-1); the loops are unrolled
    # by the compiler (anchors: stores / adds per iteration of the unrolled body)
    warp_pro = pairs * it * pro["instructions"] / max(1, pro["anchors"])
    warp_blend = pairs * (L - 2) * it * blend["instructions"] / max(1, blend["anchors"])
    warp_epi = pairs * it * epi["instructions"] / max(1, epi["anchors"])
    warp_ins = pairs * ins["instructions"]  # one thread per query: one warp instruction per instruction
    transfers = {"prologue_write": 1, "gemm_read_write": 2 * (L - 1), "blend_read_write": 2 * (L - 2),
                 "epilogue_read": 1}
    kernel_transfers = transfers["prologue_write"] + transfers["blend_read_write"] + transfers["epilogue_read"]
    unfused = cublas_model()["transfers_of_pairs_x_R"]
    fused_total = sum(transfers.values())
    return {"prologue_loop": pro, "blend_loop": blend, "epilogue_loop": epi, "topk_insert_loop": ins,
            "warp_instructions": {"prologue": warp_pro, "blend": warp_blend, "epilogue": warp_epi,
                                  "topk_insert": warp_ins},
            "transfers_of_pairs_x_R": transfers, "transfers_total": fused_total,
            "hbm_bytes_gemm": pr * 4 * transfers["gemm_read_write"], "hbm_bytes_kernels": pr * 4 * kernel_transfers,
            "hbm_bytes": pr * 4 * fused_total, "l2_bytes_kernels": pr * (4 + 8 * (L - 1)),
            "bytes_saved_by_fusion": pr * 4 * (unfused - fused_total), "unfused_transfers": unfused,
            "sgemm_flops": 2.0 * Q * G * (L - 1) * R * R,
            "registers": {n: k[n]["registers"] for n in ("prologue", "blend", "epilogue_distance", "topk")}}


def predict(path: str, m: dict, dev: dict, a: dict = ASSUMPTIONS) -> dict:
    """Predicted seconds of ``path`` with the work ``m`` on the device ``dev`` under the assumptions ``a``."""
    issue_rate = dev["sms"] * 4 * dev["boost_ghz"] * 1e9 * a["issue_efficiency"]
    t = {}
    if path == "tensorcore":
        t["tensor"] = m["tensor_flops"] / (dev["tf32_dense_tflops"] * 1e12 * a["mma_sync_efficiency"])
        t["issue"] = m["warp_instructions"] / issue_rate
        t["l2"] = m["l2_bytes"] / (dev["l2_tbs"] * 1e12 * a["l2_efficiency"])
        t["hbm"] = m["hbm_bytes"] / (dev["hbm_tbs"] * 1e12 * a["hbm_efficiency"])
    elif path == "cublas_fused":
        hbm = dev["hbm_tbs"] * 1e12 * a["hbm_efficiency"]
        w = m["warp_instructions"]
        r = {"sgemm_fp32": m["sgemm_flops"] / (dev["fp32_tflops"] * 1e12 * a["sgemm_efficiency"]),
             "sgemm_hbm": m["hbm_bytes_gemm"] / hbm, "kernels_hbm": m["hbm_bytes_kernels"] / hbm,
             "kernels_l2": m["l2_bytes_kernels"] / (dev["l2_tbs"] * 1e12 * a["l2_efficiency"]),
             "kernels_issue": (w["prologue"] + w["blend"] + w["epilogue"]) / issue_rate,
             "topk_insert_issue": w["topk_insert"] * a["fused_topk_latency_factor"] / issue_rate}
        # one stream: the SGEMMs (max of their FLOPs and their own HBM traffic), then the fused kernels
        # (max of their resources), then the serial insertion, one after another
        t = {"sgemm": max(r["sgemm_fp32"], r["sgemm_hbm"]),
             "fused_kernels": max(r["kernels_hbm"], r["kernels_l2"], r["kernels_issue"]),
             "topk_insert": r["topk_insert_issue"]}
        return {"seconds": sum(t.values()), "components_s": t, "resources_s": r, "bound": max(t, key=t.get),
                "no_overlap_s": sum(r.values())}
    elif path == "simt":
        t["issue"] = m["warp_instructions"] / issue_rate
        t["fp32"] = m["fp32_flops"] / (dev["fp32_tflops"] * 1e12)
    else:
        t["sgemm"] = m["sgemm_flops"] / (dev["fp32_tflops"] * 1e12 * a["sgemm_efficiency"])
        t["hbm"] = m["hbm_bytes"] / (dev["hbm_tbs"] * 1e12 * a["hbm_efficiency"])
    bound = max(t, key=t.get)
    # cuBLAS path: the kernels run one after another (no overlap): the sum is the prediction
    pred = sum(t.values()) if path == "cublas" else t[bound]
    return {"seconds": pred, "components_s": t, "bound": bound, "no_overlap_s": sum(t.values())}


def accuracy() -> dict:
    """Errors against the float64 reference on one problem (3 levels of 96 nodes, 4 x 150 pairs)."""
    import os

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from cuda_emulation import build as emu_build

    from whymatch.ops import _ext
    from whymatch.ops import avsl as A
    from whymatch.ops import reference as ref

    mod = emu_build.load(emu_build.build("fiber"))
    gen = torch.Generator().manual_seed(19)
    sizes, q, g = [96, 96, 96], 4, 150
    x = ([torch.randn(q, r, generator=gen) for r in sizes], [torch.randn(g, r, generator=gen) for r in sizes],
         [torch.rand(q, r, generator=gen) for r in sizes], [torch.rand(g, r, generator=gen) for r in sizes],
         [ref.avsl_link_star(torch.randn(r, r, generator=gen), 24) for r in sizes[1:]],
         [1 + 0.1 * torch.randn(r, generator=gen) for r in sizes], [0.1 * torch.randn(r, generator=gen) for r in sizes])
    want = ref.avsl_distance_float64(*x, 10.0)
    out = {"problem": {"sizes": sizes, "Q": q, "G": g, "link_k": 24, "max_distance": want.abs().max().item()}}
    for path, fused in (("simt", "1"), ("tensorcore", "1"), ("cublas_fused", "1"), ("cublas", "0")):
        os.environ["WHYMATCH_AVSL_GPU_PATH"] = path.split("_")[0]
        os.environ["WHYMATCH_AVSL_CUBLAS_FUSED"] = fused
        with _ext.emulate_cuda_on_cpu(mod):
            d = A.avsl_distance(*x, 10.0)
        out[f"{path}_max_abs_error"] = (d.double() - want).abs().max().item()
    os.environ.pop("WHYMATCH_AVSL_GPU_PATH", None)
    os.environ.pop("WHYMATCH_AVSL_CUBLAS_FUSED", None)

    def tf32(t):  # round to nearest, ties away (cvt.rna.tf32.f32), as emu_wmma.h
        b = t.float().contiguous().view(torch.int32).to(torch.int64)
        b = ((b + 0x1000) & ~0x1FFF) & 0xFFFFFFFF
        return torch.where(b >= 2 ** 31, b - 2 ** 32, b).to(torch.int32).view(torch.float32).double()

    def split_matmul(h, link, terms):
        h32, l32 = h.float(), link.float()
        hh, lh = tf32(h32), tf32(l32)
        hl, ll = tf32(h32.double() - hh), tf32(l32.double() - lh)
        acc = hh @ lh
        if terms >= 2:
            acc = acc + hl @ lh
        if terms >= 3:
            acc = acc + hh @ ll
        return acc.float()

    qe, ge, rq, rg, lk, cf, bs, sz = A._pack(*x)
    for terms in (1, 2, 3):
        off, hat, pos = A._offsets(sz), None, 0
        for lv, r in enumerate(sz):
            delta = (qe[:, None, off[lv]:off[lv] + r] - ge[None, :, off[lv]:off[lv] + r]) ** 2
            if hat is None:
                hat = delta
                continue
            o1, rp = off[lv] - sz[0], sz[lv - 1]
            link = lk[pos:pos + rp * r].view(rp, r)
            pos += rp * r
            sl = slice(o1, o1 + r)
            p = torch.sigmoid(10.0 * (rq[:, None, sl] * rg[None, :, sl] * cf[sl] + bs[sl]))
            hat = delta * p + split_matmul(hat, link, terms) * (1 - p)
        out[f"split_{terms}xtf32_simulated_max_abs_error"] = (hat.sum(-1).double() - want).abs().max().item()
    return out


def write_md(path: Path, res: dict) -> None:
    L = []
    w = L.append
    s = res["sop"]
    w("# AVSL at SOP scale on a GPU: performance model\n")
    w(f"Problem: Q = G = {s['Q']:,}, {s['levels']} levels x {s['R']} nodes, link* k = {s['link_k']}, "
      f"top-k {s['topk']}. SASS: nvcc {res['toolchain']['nvcc']}, {res['arch']}. No GPU measured this: "
      "every time below is a prediction. Written by `python benchmarks/avsl_sop_model.py`.\n")
    w("| path | bound by | H100 (s) | H200 (s) | no-overlap sum, H100 (s) |")
    w("|---|---|---|---|---|")
    for p in ("simt", "tensorcore", "cublas", "cublas_fused"):
        h1, h2 = res["predictions"]["h100"][p], res["predictions"]["h200"][p]
        w(f"| {p} | {h1['bound']} | {h1['seconds']:.1f} | {h2['seconds']:.1f} | {h1['no_overlap_s']:.1f} |")
    w("")
    w(f"`predicted_seconds.h100_tensorcore` = {res['predicted_seconds']['h100_tensorcore']:.1f} s "
      f"(goal < 60 s: {'met' if res['predicted_seconds']['h100_tensorcore'] < 60 else 'NOT met'} under these assumptions).\n")
    sens = res["sensitivity"]["h100_tensorcore_l2_7tbs"]
    w(f"Sensitivity: with L2 at 7 TB/s (the top of the reported range) the H100 tensor-core prediction is "
      f"{sens['seconds']:.1f} s, bound by {sens['bound']}. Resource times of the tensor-core path on the H100: "
      + ", ".join(f"{k} {v:.1f} s" for k, v in res["predictions"]["h100"]["tensorcore"]["components_s"].items()) + ".\n")
    w("Tensor-core prediction on the H100 against its two guessed figures (L2 bandwidth 5.5 TB/s +-20 %, "
      "mma.sync efficiency 0.4-0.7; seconds, bound):\n")
    grid = res["sensitivity"]["h100_tensorcore_grid"]
    effs = sorted({g["mma_sync_efficiency"] for g in grid})
    w("| L2 (TB/s) | " + " | ".join(f"mma eff {e}" for e in effs) + " |")
    w("|---|" + "---|" * len(effs))
    for l2 in sorted({g["l2_tbs"] for g in grid}):
        row = {g["mma_sync_efficiency"]: g for g in grid if g["l2_tbs"] == l2}
        w(f"| {l2:.1f} | " + " | ".join(f"{row[e]['seconds']:.1f} ({row[e]['bound']})" for e in effs) + " |")
    n_ok = sum(g["seconds"] < 60 for g in grid)
    need = res["sensitivity"]["h100_tensorcore_needs_for_60s"]
    w(f"\n{n_ok} of {len(grid)} corners are under 60 s; the worst is "
      f"{max(g['seconds'] for g in grid):.1f} s. Under 60 s needs an L2 read bandwidth of at least "
      f"{need['l2_tbs']:.2f} TB/s (at {ASSUMPTIONS['l2_efficiency']} efficiency) and an mma.sync efficiency of at "
      f"least {need['mma_sync_efficiency']:.2f}, with the issue time ({need['issue_s_at_stated_efficiency']:.1f} s "
      f"at {ASSUMPTIONS['issue_efficiency']} issue efficiency) under it: \"< 60 s\" is a prediction within about "
      f"5 % of its limit, not a margin.\n")
    f = res["paths"]["cublas_fused"]
    fp = res["predictions"]["h100"]["cublas_fused"]
    w(f"Fused cuBLAS path: pairs x R crosses HBM {f['transfers_total']} times "
      f"({', '.join(f'{k} {v}' for k, v in f['transfers_of_pairs_x_R'].items())}) instead of the torch ops' "
      f"{f['unfused_transfers']}: {f['bytes_saved_by_fusion']:.3g} bytes saved at SOP size. H100 resource times: "
      + ", ".join(f"{k} {v:.1f} s" for k, v in fp["resources_s"].items())
      + f". Size rule: the SIMT kernel's prediction reaches the fused cuBLAS path's at a link* density of "
      f"{res['size_rule']['h100_simt_equals_cublas_fused_at_link_density']}.\n")
    w("## Work per path\n")
    t, m, c = res["paths"]["tensorcore"], res["paths"]["simt"], res["paths"]["cublas"]
    w("| path | FLOPs | bytes | warp instructions | registers |")
    w("|---|---|---|---|---|")
    w(f"| simt | {m['fp32_flops']:.3g} (FP32, sparse links) | {m['smem_bytes']:.3g} shared-memory reads of hats | "
      f"{m['warp_instructions']:.3g} | {m['registers']} |")
    w(f"| tensorcore | {t['tensor_flops']:.3g} on tensor cores (3 x {t['useful_flops']:.3g} useful) | "
      f"{t['l2_bytes']:.3g} L2, {t['hbm_bytes']:.3g} HBM | {t['warp_instructions']:.3g} | {t['registers']} |")
    w(f"| cublas | {c['sgemm_flops']:.3g} (SGEMM, dense) | {c['hbm_bytes']:.3g} HBM ({c['transfers_of_pairs_x_R']} "
      f"passes over pairs x R) | cuBLAS SASS is closed | - |")
    fw = sum(f["warp_instructions"].values())
    w(f"| cublas_fused | {f['sgemm_flops']:.3g} (SGEMM, dense) | {f['hbm_bytes']:.3g} HBM ({f['transfers_total']} "
      f"passes), {f['l2_bytes_kernels']:.3g} L2 (gallery rows) | {fw:.3g} in the fused kernels (SGEMM closed) | "
      + ", ".join(f"{k} {v}" for k, v in f["registers"].items()) + " |")
    w("")
    w("## SASS instruction mix (static, per loop iteration)\n")
    w("| kernel loop | instructions | top opcodes | HMMA |")
    w("|---|---|---|---|")
    for name, lp in (("tensorcore K step (8 of K, 4 x 4 tiles, 3 products)", t["k_loop"]),
                     ("tensorcore epilogue", t["epilogue_loop"]), ("tensorcore prologue", t["prologue_loop"]),
                     ("tensorcore row sum", t["row_sum_loop"]),
                     ("fused prologue (per unrolled body)", f["prologue_loop"]),
                     ("fused blend (per unrolled body)", f["blend_loop"]),
                     ("fused epilogue, top-k kernel's pair sum", f["epilogue_loop"]),
                     ("fused top-k insertion (thread 0, per candidate)", f["topk_insert_loop"]),
                     ("simt sparse link loop", m["link_loop"]),
                     ("simt column loop", m["column_loop"])):
        top = ", ".join(f"{k} {v}" for k, v in list(lp["mix"].items())[:8])
        w(f"| {name} | {lp['instructions']} | {top} | {lp['hmma'] or '-'} |")
    w("")
    w("## Devices and assumptions\n")
    for key, d in DEVICES.items():
        w(f"- {key}: {d['name']}: {d['sms']} SMs at {d['boost_ghz']} GHz; TF32 tensor {d['tf32_dense_tflops']} "
          f"TFLOPS dense (datasheet 989 with sparsity); FP32 {d['fp32_tflops']} TFLOPS; HBM {d['hbm_tbs']} TB/s "
          f"(datasheet); L2 {d['l2_tbs']} TB/s (assumed).")
    for k, v in ASSUMPTIONS.items():
        w(f"- {k}: {v}")
    w("- Time of a fused path = the largest resource time (roofline: the resources overlap); the cuBLAS paths "
      "run their kernels one after another: the sum (for cublas_fused: see fused_overlap).")
    w("- Fusion cannot make the cuBLAS path reach the tensor-core kernel: its SGEMMs alone run on the FP32 "
      "pipe (float32 accuracy; TF32 cuBLAS would be 1xTF32, an error of ~5e-5, see the accuracy table).")
    if "accuracy" in res:
        a = res["accuracy"]
        w("\n## Accuracy of the split (emulated kernels and simulated splits, against float64)\n")
        w(f"Problem: {a['problem']}.\n")
        w("| computation | max abs error |")
        w("|---|---|")
        for k, v in a.items():
            if k != "problem":
                w(f"| {k} | {v:.3g} |")
    path.write_text("\n".join(L) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--stem", default=str(ROOT / "benchmarks" / "results" / "avsl_sop_model"))
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args(argv)
    tools = {"nvcc": sc.find_nvcc(), "nvdisasm": sc.find_tool("nvdisasm"), "cuobjdump": sc.find_tool("cuobjdump")}
    opts, defs = sc.cmake_cuda_flags((ROOT / "CMakeLists.txt").read_text())
    tc_cu, simt_cu = ROOT / "csrc/avsl/avsl_tensorcore_cuda.cu", ROOT / "csrc/avsl/avsl_distance_cuda.cu"
    fused_cu = ROOT / "csrc/avsl/avsl_fused_cuda.cu"
    with tempfile.TemporaryDirectory() as d:
        tck = compile_sass(tc_cu, args.arch, tools, opts + defs, Path(d))
        smk = compile_sass(simt_cu, args.arch, tools, opts + defs, Path(d))
        fk = compile_sass(fused_cu, args.arch, tools, opts + defs, Path(d))
    fused_kernels = {n: next(v for key, v in fk.items() if f"avsl_fused_{n}_kernel" in key)
                     for n in ("prologue", "blend", "topk")}
    fused_kernels["epilogue_distance"] = next(v for key, v in fk.items() if "avsl_fused_distance_kernel" in key)
    tc = tensorcore_model(next(v for k, v in tck.items() if "avsl_tc_topk_kernel" in k), tc_cu)
    # the float32 top-k kernel with the hats in shared memory (the default at R = 512)
    cands = sorted(k for k in smk if "avsl_topk_partial_kernel<f32" in k)
    pick = [k for k in cands if "Shared" in k or k.endswith("<f32>")] or cands
    simt = simt_model(smk[pick[0]], simt_cu)
    simt["kernel"] = pick[0]
    cub = cublas_model()
    fused = cublas_fused_model(fused_kernels, fused_cu)
    paths = {"simt": simt, "tensorcore": tc, "cublas": cub, "cublas_fused": fused}
    preds = {dev: {p: predict(p, paths[p], DEVICES[dev]) for p in paths} for dev in DEVICES}
    nvcc_v = subprocess.run([tools["nvcc"], "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    res = {"sop": SOP, "arch": args.arch, "toolchain": {"nvcc": nvcc_v}, "devices": DEVICES, "assumptions": ASSUMPTIONS,
           "paths": paths, "predictions": preds,
           "predicted_seconds": {f"{dev}_{p}": preds[dev][p]["seconds"] for dev in preds for p in paths}}
    # sensitivity to the one non-vendor figure: L2 bandwidth at the top of the reported range
    hi = dict(DEVICES["h100"], l2_tbs=7.0)
    res["sensitivity"] = {"h100_tensorcore_l2_7tbs": predict("tensorcore", tc, hi)}
    # the two guessed figures of the tensor-core prediction: L2 bandwidth +-20 %, mma.sync efficiency 0.4-0.7
    grid = []
    for l2 in (0.8, 1.0, 1.2):
        for eff in (0.4, 0.5, 0.6, 0.7):
            r = predict("tensorcore", tc, dict(DEVICES["h100"], l2_tbs=DEVICES["h100"]["l2_tbs"] * l2),
                        dict(ASSUMPTIONS, mma_sync_efficiency=eff))
            grid.append({"l2_tbs": DEVICES["h100"]["l2_tbs"] * l2, "mma_sync_efficiency": eff,
                         "seconds": r["seconds"], "bound": r["bound"]})
    res["sensitivity"]["h100_tensorcore_grid"] = grid
    # what the two guessed figures must at least be for the 60 s goal (the other resources unchanged)
    d = DEVICES["h100"]
    res["sensitivity"]["h100_tensorcore_needs_for_60s"] = {
        "l2_tbs": tc["l2_bytes"] / (60 * ASSUMPTIONS["l2_efficiency"] * 1e12),
        "mma_sync_efficiency": tc["tensor_flops"] / (60 * d["tf32_dense_tflops"] * 1e12),
        "issue_s_at_stated_efficiency": predict("tensorcore", tc, d)["components_s"]["issue"]}
    # the size rule's density threshold: the link* density at which the sparse SIMT kernel's prediction
    # reaches the fused cuBLAS path's (the SIMT kernel's work grows with the nonzeros, cuBLAS's does not)
    t_fused = preds["h100"]["cublas_fused"]["seconds"]
    cross = next((kk / SOP["R"] for kk in range(1, SOP["R"] + 1)
                  if predict("simt", simt_model(smk[pick[0]], simt_cu, kk), DEVICES["h100"])["seconds"] >= t_fused),
                 None)
    res["size_rule"] = {"h100_simt_equals_cublas_fused_at_link_density": cross,
                        "h100_cublas_fused_seconds": t_fused}
    if not args.no_accuracy:
        res["accuracy"] = accuracy()
    stem = Path(args.stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    write_md(stem.with_suffix(".md"), res)
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
