#!/usr/bin/env python
"""AVSL retrieval at Stanford Online Products scale: time to Recall@{1,10,100} over 60,502 x 60,502.

    python benchmarks/avsl_sop.py --device cuda                        # SOP-shaped synthetic data, all queries
    python benchmarks/avsl_sop.py --device cuda --time-budget 150      # baseline stops after ~150 s, extrapolated
    python benchmarks/avsl_sop.py --device cuda --features feats.pt    # features of a trained model
    python benchmarks/avsl_sop.py --n 3000 --classes 600 --baseline-queries 300 --stem /tmp/sop_check  # CPU look

The question (the open issue): can AVSL's overall distance rank SOP's test split, 60,502 queries
against the same 60,502 gallery items with the query excluded, to Recall@{1,10,100} in under 60 s
on an H100, and how does that compare with the published code's evaluation on the same GPU?

Variants, each in a fresh Python subprocess (the peak memory of one cannot hide another's), each
under ``--timeout`` seconds (a failed or timed-out variant becomes an error row, not a crash):

* ``whymatch``: one :func:`whymatch.ops.avsl_topk` call over the whole gallery (k = max(--ks),
  exclude_self=True), a fused kernel with memory O(Q k), then Recall@K from the indices and labels.
  Before the timed call: a small warm-up (64 items) and a probe (the first n/64 queries against
  the whole gallery) whose time, scaled to all queries, is logged as an estimate (so that a
  timed-out run still says how long it would have taken).
* ``sliced_torch``: the published code's evaluation (``sliced_distance`` of avsl_cpu.py: query
  slices of ``--slice``, full (slice, G, R) node and probability tensors per level, dense
  hat @ link*), for ``--baseline-queries`` queries (a seeded random subset, default all) against
  the whole gallery, written into their (queries, G) matrix, then the query itself masked and
  ``torch.topk``, then Recall@K. The slices run in blocks of ``--block-slices`` slices (the
  gallery is normalized once per block, < 1% of a block's work); with ``--time-budget`` the loop
  stops after the block that crosses the budget (the (queries, G) float32 matrix is allocated for
  all planned queries, 14.6 GB at 60,502, and counts in its peak memory). The slicing cost is
  linear in the number of queries, so its time is reported as measured and, when it ran fewer
  than all queries, extrapolated linearly to all of them (labelled "extrapolated").
  ``--baseline-queries 0`` skips it.

Recall@K = the fraction of queries with an item of their class among their K nearest (the query
itself excluded). The baseline's recall is over the queries it ran; whymatch's recall on the same
queries is reported beside it, with the agreement of the two top-k lists on those queries
(elementwise equal indices; float near-ties may order differently) and the largest difference of
their distances.

Timing: one run of each variant (at 60,502 x 60,502 one run is tens of seconds to minutes; the
warm-up keeps module loading, CUDA context, kernel loading and cuBLAS setup out of it); CUDA is
synchronized before every clock read, the CPU uses time.perf_counter. The headline time is the
ranking plus the Recall@K computation; data generation or loading is outside it. Peak memory:
CUDA: torch.cuda.max_memory_allocated above the allocation before the call (inputs excluded);
CPU: the peak RSS above the RSS before the call (common.peak_rss_region). float32 matmuls run at
torch's default precision (no TF32; recorded in the JSON).

Data. Default: synthetic and SOP-shaped, generated on the device in float32, seeded, in chunks of
8,192 items (temporaries of one chunk; 60,502 x 1,536 floats = 370 MB per tensor set): ``--n``
60,502 items in ``--classes`` 11,316 classes (SOP's test split sizes; with another ``--n`` the
default keeps SOP's ratio of classes to items), labels arange(n) % classes shuffled (classes of
5 or 6 items), ``--levels`` 3 x ``--nodes`` 512 nodes. Embeddings per
level: a unit-normal class centre plus ``--noise`` x unit-normal noise per item (the centres of
each level independent); reliabilities uniform in [0, 1]; link* = reference.avsl_link_star of
unit-normal edges keeping ``--link-k`` 128 per column; coef = 1 + 0.1 N(0, 1), bias = 0.1 N(0, 1);
gamma 10. The CPU and CUDA generators differ: the data (and recalls) differ between devices.
Recall values on synthetic data are NOT comparable to the published SOP numbers; the point is
the time to Recall@{1,10,100} at that scale, with recall away from 0 and 1 so that a broken
ranking shows.

How ``--noise`` 2.6 was chosen: recall falls as the gallery grows (more distractors), so it was
measured at the default sizes with the real AVSL distance (whymatch.ops.avsl_topk on the CPU,
float32) for 200 random queries against the whole 60,502-item synthetic gallery (the query itself
dropped): noise 2.5 / 2.6 / 2.75 gave Recall@1 0.67 / 0.52 / 0.36 (Recall@10 0.94 / 0.88 / 0.76,
Recall@100 0.995 / 0.975 / 0.96; +-0.035 at 200 queries), and noise 3.0 about 0.18 (128 queries).
The top level dominates the distance (p_l is about sigmoid(2.5) = 0.92 on average), which is why
the noise is lower than for three equally weighted levels (the plain sum of the three levels'
squared distances gives Recall@1 0.80 at noise 3.0). At the small CPU size (--n 3000 --classes
600, all queries) noise 2.6 gives Recall@1 0.85, Recall@10 0.99 (fewer distractors).

``--features PATH``: rank real features instead. PATH is a ``torch.save``d dict:

    {"embeddings":    [ (N, R_0), ..., (N, R_{L-1}) ] float tensors, one per level, low to high,
     "reliabilities": [ (N, R_l) per level ] float tensors (AVSL's CAM statistic eta),
     "labels":        (N,) integer tensor (class of each item),
     "links":         [ (R_{l-1}, R_l) for l = 1..L-1 ] float tensors (link*, e.g. AVSL.links()),
     "coef":          [ (R_l,) per level ] float tensors,
     "bias":          [ (R_l,) per level ] float tensors (level 0's are unused),
     "gamma":         float}

e.g. from a trained whymatch.avsl.AVSL on a test set: ``enc = model.encode(images)`` batch by
batch (embeddings and reliabilities concatenated), ``coef, bias = model.coefs()``,
``links = model.links()``, ``gamma = model.gamma``. Self-retrieval: every item is a query and the
gallery. ``--n``, ``--classes``, ``--levels``, ``--nodes``, ``--link-k``, ``--noise`` are then
ignored (the sizes come from the file). The file is validated first; a missing key, a wrong shape
or dtype, or a non-finite value stops the script with a message naming it.

Output: ``benchmarks/results/avsl_sop_<device type>.{json,md}`` (``--stem`` overrides; rewritten
after each variant, so that a run killed from outside keeps what finished).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

VARIANTS = ("whymatch", "sliced_torch")
SOP_N, SOP_CLASSES = 60502, 11316
CHUNK = 8192
FEATURE_KEYS = ("embeddings", "reliabilities", "labels", "links", "coef", "bias", "gamma")


# --------------------------------------------------------------------------- data

def make_labels(n: int, classes: int, seed: int) -> torch.Tensor:
    """(n,) int64 on the CPU: arange(n) % classes in a seeded random order (classes of floor/ceil(n / classes))."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.arange(n) % classes)[torch.randperm(n, generator=gen)]


def make_synthetic(n: int, classes: int, levels: int, nodes: int, link_k: int, noise: float, seed: int,
                   device: str | torch.device) -> dict:
    """The SOP-shaped synthetic set (see the module docstring), float32 on ``device``, in chunks."""
    from whymatch.ops import reference as ref

    device = torch.device(device)
    labels = make_labels(n, classes, seed)
    cpu = torch.Generator().manual_seed(seed + 1)  # the small parameters: identical on every device
    links = [ref.avsl_link_star(torch.randn(nodes, nodes, generator=cpu), link_k).to(device) for _ in range(levels - 1)]
    coef = [(1 + 0.1 * torch.randn(nodes, generator=cpu)).to(device) for _ in range(levels)]
    bias = [(0.1 * torch.randn(nodes, generator=cpu)).to(device) for _ in range(levels)]
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    lab = labels.to(device)
    emb, rel = [], []
    for _ in range(levels):
        centres = torch.randn(classes, nodes, generator=gen, device=device)
        e = torch.empty(n, nodes, device=device)
        r = torch.empty(n, nodes, device=device)
        for s in range(0, n, CHUNK):
            t = min(n, s + CHUNK)
            e[s:t] = torch.randn(t - s, nodes, generator=gen, device=device).mul_(noise).add_(centres[lab[s:t]])
            r[s:t] = torch.rand(t - s, nodes, generator=gen, device=device)
        emb.append(e)
        rel.append(r)
        del centres
    return {"embeddings": emb, "reliabilities": rel, "labels": lab, "links": links, "coef": coef, "bias": bias,
            "gamma": 10.0}


def validate_features(d, path: str = "features") -> dict:
    """Check a --features dict (see the module docstring); returns a summary, raises ValueError naming the problem."""
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict with keys {', '.join(FEATURE_KEYS)}, got {type(d).__name__}")
    missing = [k for k in FEATURE_KEYS if k not in d]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(repr(k) for k in missing)} "
                         f"(needs {', '.join(FEATURE_KEYS)}; has {', '.join(map(repr, d))})")

    def tensor_list(key: str, want_len: int | None) -> list:
        seq = d[key]
        if not isinstance(seq, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in seq):
            raise ValueError(f"{path}: {key!r} must be a list of tensors, got {type(seq).__name__}")
        if want_len is not None and len(seq) != want_len:
            raise ValueError(f"{path}: {key!r} must hold {want_len} tensors (one per level"
                             f"{' pair' if key == 'links' else ''}), got {len(seq)}")
        for i, t in enumerate(seq):
            if not t.is_floating_point():
                raise ValueError(f"{path}: {key}[{i}] must be a float tensor, got {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path}: {key}[{i}] holds non-finite values")
        return list(seq)

    emb = tensor_list("embeddings", None)
    if not emb:
        raise ValueError(f"{path}: 'embeddings' must hold at least one level, got an empty list")
    if len(emb) > 8:
        raise ValueError(f"{path}: at most 8 levels (the fused kernels' limit), got {len(emb)}")
    if emb[0].dim() != 2:
        raise ValueError(f"{path}: embeddings[0] must be (N, R_0), got shape {tuple(emb[0].shape)}")
    n = int(emb[0].shape[0])
    sizes = []
    for i, t in enumerate(emb):
        if t.dim() != 2 or t.shape[0] != n or t.shape[1] < 1:
            raise ValueError(f"{path}: embeddings[{i}] must be ({n}, R_{i}) with R_{i} >= 1, got {tuple(t.shape)}")
        sizes.append(int(t.shape[1]))
    L = len(emb)
    for i, t in enumerate(tensor_list("reliabilities", L)):
        if tuple(t.shape) != (n, sizes[i]):
            raise ValueError(f"{path}: reliabilities[{i}] must have shape {(n, sizes[i])}, got {tuple(t.shape)}")
    for i, t in enumerate(tensor_list("links", L - 1)):
        if tuple(t.shape) != (sizes[i], sizes[i + 1]):
            raise ValueError(f"{path}: links[{i}] must have shape {(sizes[i], sizes[i + 1])} "
                             f"(R_{i}, R_{i + 1}), got {tuple(t.shape)}")
    for key in ("coef", "bias"):
        for i, t in enumerate(tensor_list(key, L)):
            if tuple(t.shape) != (sizes[i],):
                raise ValueError(f"{path}: {key}[{i}] must have shape {(sizes[i],)}, got {tuple(t.shape)}")
    lab = d["labels"]
    if not isinstance(lab, torch.Tensor) or lab.dim() != 1 or lab.shape[0] != n:
        got = tuple(lab.shape) if isinstance(lab, torch.Tensor) else type(lab).__name__
        raise ValueError(f"{path}: 'labels' must be a ({n},) tensor (one per item), got {got}")
    if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
        raise ValueError(f"{path}: 'labels' must be an integer tensor, got {lab.dtype}")
    gamma = d["gamma"]
    if isinstance(gamma, torch.Tensor) and gamma.numel() == 1:
        gamma = gamma.item()
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise ValueError(f"{path}: 'gamma' must be a finite number, got {gamma!r}")
    classes = int(torch.unique(lab).numel())
    return {"n": n, "levels": L, "sizes": sizes, "classes": classes, "gamma": float(gamma)}


def load_features(path: str) -> tuple[dict, dict]:
    """(the validated dict on the CPU, its summary from validate_features)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--features: no such file: {p}")
    try:
        d = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"--features: cannot read {p} with torch.load: {exc}") from exc
    return d, validate_features(d, str(p))


def get_data(args) -> dict:
    if args.features:
        d, _ = load_features(args.features)
        mv = lambda xs: [x.to(args.device, torch.float32).contiguous() for x in xs]  # noqa: E731
        gamma = d["gamma"].item() if isinstance(d["gamma"], torch.Tensor) else float(d["gamma"])
        return {"embeddings": mv(d["embeddings"]), "reliabilities": mv(d["reliabilities"]),
                "labels": d["labels"].to(args.device, torch.int64), "links": mv(d["links"]), "coef": mv(d["coef"]),
                "bias": mv(d["bias"]), "gamma": gamma}
    return make_synthetic(args.n, args.classes, args.levels, args.nodes, args.link_k, args.noise, args.seed,
                          args.device)


def query_subset(n: int, m: int, seed: int) -> torch.Tensor:
    """The baseline's queries: m of the n items, a seeded random sample in random order (a prefix of it, where
    the time budget stops the loop early, is a random sample too)."""
    gen = torch.Generator().manual_seed(seed + 3)
    return torch.randperm(n, generator=gen)[:m]


def recall_at(indices: torch.Tensor, labels: torch.Tensor, ks, rows: torch.Tensor | None = None) -> dict:
    """Recall@K of top-k ``indices`` (queries x k, nearest first) of the queries ``rows`` (default all)."""
    qlab = labels if rows is None else labels[rows]
    hit = labels[indices] == qlab[:, None]
    return {str(k): float(hit[:, :k].any(dim=1).float().mean()) if hit.shape[0] else None for k in ks}


# --------------------------------------------------------------------------- variants (in the child)

def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_whymatch(data: dict, args, out: dict):
    """(holder, call): call() runs the timed part and fills holder (top-k) and out (times, recall)."""
    from whymatch import ops

    e, r = data["embeddings"], data["reliabilities"]
    lk, cf, bs, gamma = data["links"], data["coef"], data["bias"], data["gamma"]
    n, k = e[0].shape[0], max(args.ks)
    # warm-up: module, CUDA context and kernel loading
    w = min(n, 64)
    ops.avsl_topk([x[:w] for x in e], [x[:w] for x in e], [x[:w] for x in r], [x[:w] for x in r], lk, cf, bs, gamma,
                  min(k, w - 1), exclude_self=True)
    _sync(args.device)
    # probe: the first n/64 queries against the whole gallery, for an estimate that survives a timeout
    pq = max(1, min(n, n // 64))
    t0 = time.perf_counter()
    ops.avsl_topk([x[:pq] for x in e], e, [x[:pq] for x in r], r, lk, cf, bs, gamma, k + 1, exclude_self=False)
    _sync(args.device)
    probe = time.perf_counter() - t0
    out["probe"] = {"queries": pq, "seconds": probe, "estimated_all_seconds": probe * n / pq}
    _log(f"whymatch probe: {pq} queries x {n} gallery in {probe:.3f} s -> all {n} queries ~{probe * n / pq:.1f} s "
         "(estimate)")
    holder = {}

    def call():
        t0 = time.perf_counter()
        v, i = ops.avsl_topk(e, e, r, r, lk, cf, bs, gamma, k, exclude_self=True)
        _sync(args.device)
        t1 = time.perf_counter()
        rec = recall_at(i, data["labels"], args.ks)
        _sync(args.device)
        t2 = time.perf_counter()
        holder.update(values=v, indices=i)
        out.update(topk_seconds=t1 - t0, recall_seconds=t2 - t1, seconds=t2 - t0, recall=rec)

    out["queries_run"] = n
    return holder, call


def run_sliced(data: dict, args, out: dict):
    """(holder, call) as run_whymatch, for the published code's slicing."""
    from avsl_cpu import sliced_distance

    e, r = data["embeddings"], data["reliabilities"]
    lk, cf, bs, gamma = data["links"], data["coef"], data["bias"], data["gamma"]
    n, k = e[0].shape[0], max(args.ks)
    m = n if args.baseline_queries is None else args.baseline_queries
    order = query_subset(n, m, args.seed).to(args.device)
    # warm-up: one slice against a small gallery (kernels, cuBLAS handles)
    w = min(n, 256)
    sliced_distance([x[:args.slice] for x in e], [x[:w] for x in e], [x[:args.slice] for x in r], [x[:w] for x in r],
                    lk, cf, bs, gamma, args.slice)
    _sync(args.device)
    block = args.slice * args.block_slices
    holder = {}

    def call():
        t0 = time.perf_counter()
        dist = torch.empty(m, n, device=e[0].device)
        done, stopped, last_log = 0, False, t0
        for s in range(0, m, block):
            t = min(m, s + block)
            qi = order[s:t]
            dist[s:t] = sliced_distance([x[qi] for x in e], e, [x[qi] for x in r], r, lk, cf, bs, gamma, args.slice)
            done = t
            _sync(args.device)
            now = time.perf_counter()
            if now - last_log > 10:
                _log(f"sliced_torch: {done}/{m} queries in {now - t0:.1f} s -> all {n} ~{(now - t0) * n / done:.1f} s "
                     "(extrapolated)")
                last_log = now
            if args.time_budget is not None and now - t0 > args.time_budget and done < m:
                stopped = True
                break
        t1 = time.perf_counter()
        d = dist[:done]
        rows = order[:done]
        d[torch.arange(done, device=d.device), rows] = float("inf")  # the query itself
        v, i = torch.topk(d, k, dim=1, largest=False, sorted=True)
        _sync(args.device)
        t2 = time.perf_counter()
        rec = recall_at(i, data["labels"], args.ks, rows)
        _sync(args.device)
        t3 = time.perf_counter()
        holder.update(values=v, indices=i, rows=rows)
        out.update(distance_seconds=t1 - t0, topk_seconds=t2 - t1, recall_seconds=t3 - t2, seconds=t3 - t0,
                   recall=rec, queries_run=done, queries_planned=m, stopped_by_time_budget=stopped)
        if stopped:
            _log(f"sliced_torch: time budget {args.time_budget} s crossed: stopped after {done}/{m} queries")

    return holder, call


def child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    torch.set_grad_enabled(False)
    res: dict = {"variant": args.child}
    t0 = time.perf_counter()
    data = get_data(args)
    _sync(args.device)
    res["data_seconds"] = time.perf_counter() - t0
    _log(f"{args.child}: data ready in {res['data_seconds']:.2f} s ({'features' if args.features else 'synthetic'})")
    holder, call = (run_whymatch if args.child == "whymatch" else run_sliced)(data, args, res)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    res["memory"] = C.peak_rss_region(call)
    if cuda:
        res["memory"]["host_peak_over_before_bytes"] = res["memory"]["peak_over_before_bytes"]
        res["memory"]["peak_over_before_bytes"] = torch.cuda.max_memory_allocated() - before
    save = {"values": holder["values"].cpu(), "indices": holder["indices"].cpu(), "labels": data["labels"].cpu()}
    if "rows" in holder:
        save["rows"] = holder["rows"].cpu()
    torch.save(save, args.save)
    print(json.dumps(res))


# --------------------------------------------------------------------------- parent

def _child_cmd(args, variant: str, save: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--save", str(save),
           "--device", args.device, "--n", str(args.n), "--classes", str(args.classes), "--levels", str(args.levels),
           "--nodes", str(args.nodes), "--link-k", str(args.link_k), "--noise", repr(args.noise),
           "--ks", ",".join(map(str, args.ks)), "--slice", str(args.slice), "--block-slices", str(args.block_slices),
           "--seed", str(args.seed)]
    if args.features:
        cmd += ["--features", args.features]
    if args.baseline_queries is not None:
        cmd += ["--baseline-queries", str(args.baseline_queries)]
    if args.time_budget is not None:
        cmd += ["--time-budget", repr(args.time_budget)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def _text(x) -> str:
    if x is None:
        return ""
    return x.decode(errors="replace") if isinstance(x, bytes) else x


def run_variant(args, variant: str, save: Path) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(_child_cmd(args, variant, save), capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as exc:
        err = _text(exc.stderr).strip().splitlines()
        print("\n".join(err[-5:]), flush=True)
        return {"error": f"timed out after {args.timeout:g} s" + (f"; last: {err[-1][:250]}" if err else ""),
                "stderr_tail": err[-8:], "wall_seconds": time.perf_counter() - t0}
    err = p.stderr.strip().splitlines()
    if err:
        print("\n".join(err[-8:]), flush=True)
    if p.returncode != 0:
        return {"error": (err or [f"exit {p.returncode}"])[-1][:300], "stderr_tail": err[-8:],
                "wall_seconds": time.perf_counter() - t0}
    try:
        row = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"no result line from the child (stdout: {p.stdout[-200:]!r})"}
    row["wall_seconds"] = time.perf_counter() - t0
    return row


def compare(outs: dict, ks) -> dict:
    """whymatch on the baseline's queries: its recall there, and agreement of the two top-k lists."""
    if "whymatch" not in outs or "sliced_torch" not in outs:
        return {}
    a, b = outs["whymatch"], outs["sliced_torch"]
    rows = b["rows"]
    if rows.numel() == 0:
        return {"queries": 0}
    ia, va = a["indices"][rows], a["values"][rows]
    ib, vb = b["indices"], b["values"]
    return {"queries": int(rows.numel()),
            "whymatch_recall_on_these": recall_at(ia, a["labels"], ks, rows),
            "topk_indices_agree_fraction": float((ia == ib).float().mean()),
            "top1_agree_fraction": float((ia[:, 0] == ib[:, 0]).float().mean()),
            "topk_values_max_abs_diff": float((va - vb).abs().max()),
            "labels_equal": bool(torch.equal(a["labels"], b["labels"]))}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="The module docstring (the top of this file) describes the data, the variants, the timing "
                                        "and the --features format.")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    ap.add_argument("--features", default=None, help="torch.save'd features dict (see the docstring); default synthetic")
    ap.add_argument("--n", type=int, default=SOP_N, help="items = queries = gallery (synthetic)")
    ap.add_argument("--classes", type=int, default=None,
                    help="classes (synthetic), in [1, n]; default SOP's ratio, round(n * 11316 / 60502)")
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=512, help="R, nodes per level")
    ap.add_argument("--link-k", type=int, default=128, help="k of link* (entries kept per column), in [1, nodes]")
    ap.add_argument("--noise", type=float, default=2.6, help="per-item noise / class-centre spread (synthetic)")
    ap.add_argument("--ks", default="1,10,100", help="Recall@K values; top-max(K) is ranked")
    ap.add_argument("--baseline-queries", type=int, default=None,
                    help="queries the baseline runs (random subset), in [0, n]; default all; 0 skips the baseline")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: the baseline stops after the block of slices that crosses it (extrapolated)")
    ap.add_argument("--slice", type=int, default=20, help="queries per slice of the baseline (published: 20)")
    ap.add_argument("--block-slices", type=int, default=10,
                    help="slices per block of the baseline (time budget checked after each block)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per variant subprocess")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the children (CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--stem", default=None, help="default benchmarks/results/avsl_sop_<device type>")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    try:
        args.ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    except ValueError:
        ap.error(f"--ks must be comma-separated integers, got {args.ks!r}")
    if not args.ks or args.ks[0] < 1:
        ap.error(f"--ks must be positive integers, got {args.ks}")
    try:
        dev = torch.device(args.device)
    except RuntimeError as exc:
        ap.error(f"--device {args.device!r}: {exc}")
    if dev.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda, got {args.device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available in this torch ({torch.__version__})")
    if args.child:
        return args
    if args.features:
        try:
            _, info = load_features(args.features)
        except (FileNotFoundError, ValueError) as exc:
            ap.error(str(exc))
        args.n, args.levels, args.classes = info["n"], info["levels"], info["classes"]
        args.sizes, args.gamma = info["sizes"], info["gamma"]
    else:
        if args.n < 2:
            ap.error(f"--n must be >= 2, got {args.n}")
        if args.classes is None:
            args.classes = max(1, round(args.n * SOP_CLASSES / SOP_N))
        if not 1 <= args.classes <= args.n:
            ap.error(f"--classes must be in [1, n={args.n}], got {args.classes}")
        if not 1 <= args.levels <= 8:
            ap.error(f"--levels must be in [1, 8] (the fused kernels' limit), got {args.levels}")
        if args.nodes < 1:
            ap.error(f"--nodes must be >= 1, got {args.nodes}")
        if not 1 <= args.link_k <= args.nodes:
            ap.error(f"--link-k must be in [1, nodes={args.nodes}], got {args.link_k}")
        if not (math.isfinite(args.noise) and args.noise >= 0):
            ap.error(f"--noise must be a finite number >= 0, got {args.noise}")
        args.sizes, args.gamma = [args.nodes] * args.levels, 10.0
    if args.ks[-1] > args.n - 1:
        ap.error(f"max(--ks) = {args.ks[-1]} must be <= n - 1 = {args.n - 1} (the query itself is excluded)")
    if args.baseline_queries is not None and not 0 <= args.baseline_queries <= args.n:
        ap.error(f"--baseline-queries must be in [0, n={args.n}] (0 skips the baseline), got {args.baseline_queries}")
    if args.time_budget is not None and not (math.isfinite(args.time_budget) and args.time_budget > 0):
        ap.error(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        ap.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.time_budget is not None and args.time_budget >= args.timeout:
        ap.error(f"--time-budget ({args.time_budget:g} s) must be below --timeout ({args.timeout:g} s), which kills "
                 "the baseline's process; leave room for its start, the last block and the top-k")
    if args.slice < 1 or args.block_slices < 1:
        ap.error(f"--slice and --block-slices must be >= 1, got {args.slice}, {args.block_slices}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variant_list if v not in VARIANTS]
    if bad or not args.variant_list:
        ap.error(f"--variants must be a comma-separated subset of {','.join(VARIANTS)}, got {args.variants!r}")
    if args.baseline_queries == 0 and "sliced_torch" in args.variant_list:
        args.variant_list.remove("sliced_torch")
    return args


def report(args, rows: dict, comparison: dict, mi: dict, final: bool) -> tuple[dict, str]:
    import whymatch

    dev = torch.device(args.device)
    n, ks = args.n, args.ks
    ok = {v: r for v, r in rows.items() if "seconds" in r}

    def all_queries(r):
        q = r.get("queries_run") or 0
        return (r["seconds"] * n / q, q < n) if q else (None, False)

    head = ["variant", "queries run", "seconds (measured)", "seconds (all queries)"] + \
        [f"Recall@{k}" for k in ks] + ["peak memory"]
    body = []
    fr = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    for v, r in rows.items():
        if "error" in r:
            body.append([v, "failed", "", "", *[""] * len(ks), r["error"]])
            continue
        t_all, extra = all_queries(r)
        body.append([v, f"{r['queries_run']:,}" + (" (time budget)" if r.get("stopped_by_time_budget") else ""),
                     C.fmt_s(r["seconds"]), C.fmt_s(t_all) + (" (extrapolated)" if extra else " (measured)"),
                     *[fr(r["recall"].get(str(k))) for k in ks], C.fmt_bytes(r["memory"].get("peak_over_before_bytes"))])
        if v == "sliced_torch" and comparison.get("whymatch_recall_on_these"):
            body.append([f"whymatch on these {comparison['queries']:,} queries", f"{comparison['queries']:,}",
                         "(same run as whymatch)", "",
                         *[fr(comparison["whymatch_recall_on_these"].get(str(k))) for k in ks], ""])
    ratio = None
    if "whymatch" in ok and "sliced_torch" in ok:
        tb, extra = all_queries(ok["sliced_torch"])
        tw = ok["whymatch"]["seconds"]
        if tb and tw:
            ratio = {"baseline_over_whymatch": tb / tw, "baseline_extrapolated": extra}
    gpu = mi.get("gpu") or ""
    is_sop = n == SOP_N
    if dev.type != "cuda" or "H100" not in gpu:
        goal = f"n/a (not an H100: {gpu or mi.get('cpu_model', 'cpu')})"
    elif not is_sop:
        goal = f"n/a (n = {n:,}, not 60,502)"
    elif "whymatch" not in ok:
        goal = "NOT met (whymatch failed: " + rows.get("whymatch", {}).get("error", "not run") + ")"
    else:
        tw = ok["whymatch"]["seconds"]
        goal = f"{'met' if tw < 60 else 'NOT met'} ({C.fmt_s(tw)})"
    where = mi.get("gpu") or f"{mi['cpu_model']} ({args.threads or mi['torch_threads']} threads)"
    data_line = (f"Features from `{args.features}`: N = {n:,} items in {args.classes:,} classes, {args.levels} levels of "
                 f"{args.sizes} nodes, gamma {args.gamma:g}." if args.features else
                 f"Synthetic SOP-shaped data (not SOP; recall is not comparable to published SOP numbers): "
                 f"N = {n:,} items in {args.classes:,} classes, {args.levels} levels of R = {args.nodes} nodes, class "
                 f"centre + {args.noise:g} x noise per item, reliabilities U[0, 1], link* keeps {args.link_k} per "
                 f"column, gamma 10, seed {args.seed}.")
    cmp_line = ""
    if comparison.get("queries"):
        cmp_line = (f"On the baseline's {comparison['queries']:,} queries the two top-{ks[-1]} lists agree on "
                    f"{comparison['topk_indices_agree_fraction']:.4%} of the entries "
                    f"({comparison['top1_agree_fraction']:.4%} of the top-1), largest distance difference "
                    f"{comparison['topk_values_max_abs_diff']:.3g} (float near-ties may order differently).")
    base = ok.get("sliced_torch")
    budget_line = ""
    if base and base.get("stopped_by_time_budget"):
        budget_line = (f"The baseline stopped at its time budget ({args.time_budget:g} s) after {base['queries_run']:,} "
                       f"of {base['queries_planned']:,} queries; its all-queries time is extrapolated linearly "
                       "(the slicing cost is linear in the number of queries).")
    ratio_line = ("Ratio baseline / whymatch (same run, all queries): "
                  + (f"{ratio['baseline_over_whymatch']:.2f}x" + (" (baseline extrapolated)"
                                                                   if ratio["baseline_extrapolated"] else "")
                     if ratio else "n/a") + ".")
    md = "\n".join([
        f"# AVSL retrieval at SOP scale: time to Recall@{{{','.join(map(str, ks))}}} ({dev.type})"
        + ("" if final else " (partial)"),
        "",
        f"`python benchmarks/avsl_sop.py {' '.join(sys.argv[1:])}` on {where}, torch {mi['torch']}, "
        f"whymatch {whymatch.__version__} at {str(mi['git_commit'])[:10]}.",
        data_line,
        f"Self-retrieval, {n:,} x {n:,}, top-{ks[-1]}, the query excluded. whymatch = one `avsl_topk` over the "
        f"whole gallery; sliced_torch = the published code's slicing ({args.slice} queries per slice, full "
        "(slice, G, R) tensors, dense hat @ link*), then torch.topk. Each variant in a fresh process, one timed "
        "run after a warm-up; times include the Recall@K computation, not data generation; peak memory above "
        "the memory before the call.",
        "",
        C.md_table(head, body),
        ratio_line,
        *([budget_line] if budget_line else []),
        *([cmp_line] if cmp_line else []),
        "",
        f"Goal (< 60 s on an H100 for 60,502 x 60,502 to Recall@{{1,10,100}}): {goal}.",
        "",
        C.load_note({"machine": mi, "load_at_end": C.system_load()}),
    ]) + "\n"
    data = {"benchmark": "avsl_sop", "device": str(dev), "argv": sys.argv[1:], "complete": final,
            "sizes": {"n": n, "classes": args.classes, "levels": args.levels, "nodes": args.sizes,
                      "link_k": None if args.features else args.link_k, "ks": ks, "slice": args.slice,
                      "block_slices": args.block_slices, "gamma": args.gamma,
                      "baseline_queries": n if args.baseline_queries is None else args.baseline_queries},
            "data": {"features": args.features} if args.features else
            {"synthetic": True, "noise": args.noise, "seed": args.seed, "chunk": CHUNK},
            "time_budget_s": args.time_budget, "timeout_s": args.timeout, "child_threads": args.threads,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "variants": rows, "comparison": comparison, "ratio": ratio, "goal": goal, "machine": mi,
            "load_at_end": C.system_load()}
    return data, md


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    dev = torch.device(args.device)
    stem = args.stem or str(C.RESULTS / f"avsl_sop_{dev.type}")
    mi = C.machine_info(dev)
    rows, outs = {}, {}
    comparison: dict = {}
    with tempfile.TemporaryDirectory(prefix="avsl_sop_") as tmp:
        for v in args.variant_list:
            save = Path(tmp) / f"{v}.pt"
            print(f"--- {v} (timeout {args.timeout:g} s)", flush=True)
            rows[v] = run_variant(args, v, save)
            if "error" not in rows[v]:
                outs[v] = torch.load(save, weights_only=True)
                os.unlink(save)
            print(v, json.dumps(rows[v])[:400], flush=True)
            comparison = compare(outs, args.ks)
            data, md = report(args, rows, comparison, mi, final=False)
            C.write_results(stem, data, md)  # what finished survives a kill from outside
    data, md = report(args, rows, comparison, mi, final=True)
    C.write_results(stem, data, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
