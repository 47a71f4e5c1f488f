"""Property-based tests (hypothesis) of every public op, every registered op (torch.ops.whymatch.*)
and the raw compiled entries: random shapes (zero and odd sizes), dtypes (int, bool, complex, float64
where unsupported), layouts (transposed, channels_last, expanded/zero-stride, offset views), devices
(cpu, meta), NaN/Inf and wrong ranks. Each example either equals ops/reference.py (per-dtype
tolerance, NaN where the reference has NaN) or raises a named ValueError/TypeError with a one-line
message; valid inputs must be accepted, invalid ones refused.

Each case runs in a child process (this file run as a script) with a derandomized, bounded
hypothesis run, so that a crash is a test failure, not a dead test run. WHYMATCH_PROPERTY_EXAMPLES
sets the number of examples per case (default 40).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

CASES = ["rise_apply", "rise_saliency", "ranked_blend", "soft_mask", "cam", "avsl", "finite", "raw"]
N_EXAMPLES = int(os.environ.get("WHYMATCH_PROPERTY_EXAMPLES", "40"))


@pytest.mark.parametrize("case", CASES)
def test_op_properties_in_a_child_process(case):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), case, str(N_EXAMPLES)], capture_output=True,
                          text=True, timeout=600, cwd=os.path.dirname(os.path.abspath(__file__)))
    tail = (proc.stdout[-4000:] + "\n" + proc.stderr[-6000:]).strip()
    assert proc.returncode == 0, (f"case {case!r}: the child exited with {proc.returncode} "
                                  f"({'killed by signal ' + str(-proc.returncode) + ': a crash' if proc.returncode < 0 else 'a failed property'})"
                                  f"\n{tail}")
    assert f"ok {case}" in proc.stdout, tail


# ---------------------------------------------------------------------------
# the child: hypothesis runs (only when this file is run as a script)
# ---------------------------------------------------------------------------

NAMED = (ValueError, TypeError)
BAD_DTYPES = [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8]
LOW = [torch.float32, torch.float16, torch.bfloat16]


def _tol(dtype):
    from helpers import TOL
    return TOL.get(dtype, dict(rtol=1e-5, atol=1e-6))


def _close(got, want, dtype=None):
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    if got.device.type == "meta" or got.numel() == 0:
        return
    tol = _tol(dtype or got.dtype)
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), equal_nan=True, **tol)


def _expect(valid, fn, check=None):
    """valid inputs must be accepted (and check(result) hold); invalid ones refused with a named one-line error
    (or, for a registered op, torch's own schema check of an argument's type: a RuntimeError naming it)."""
    try:
        out = fn()
    except (*NAMED, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not ("Expected a value of type" in str(exc) and "argument" in str(exc)):
            raise
        if isinstance(exc, RuntimeError):
            assert not valid, f"valid input refused by the schema: {exc}"
            return None
        msg = str(exc)
        if valid:
            raise AssertionError(f"valid input refused: {type(exc).__name__}: {msg}") from exc
        assert msg.strip() and "\n" not in msg.strip(), f"error message must be one line: {msg!r}"
        return None
    if not valid:
        raise AssertionError(f"invalid input accepted, returned {type(out).__name__}")
    if check is not None:
        check(out)
    return out


class Draw:
    """Imperative drawing from hypothesis' data, with a seeded torch generator for tensor values."""

    def __init__(self, data):
        from hypothesis import strategies as st
        self.st, self.data = st, data
        self.gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31 - 1)))

    def int(self, lo, hi):
        return self.data.draw(self.st.integers(lo, hi))

    def pick(self, options):
        return self.data.draw(self.st.sampled_from(list(options)))

    def bool(self):
        return self.data.draw(self.st.booleans())

    def rand(self, *shape, dtype=torch.float32):
        return torch.rand(*shape, generator=self.gen).to(dtype)

    def layout(self, t, kinds=("contiguous", "transposed", "offset", "expanded", "channels_last")):
        """t in another memory layout; 'expanded' changes the values (the first row repeated, stride 0)."""
        kind = self.pick(kinds)
        if kind == "transposed" and t.dim() >= 2:
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        if kind == "offset":
            base = torch.empty(t.numel() + 3, dtype=t.dtype)
            return base[3:].view(t.shape).copy_(t)
        if kind == "expanded" and t.dim() >= 1 and t.shape[0] > 0:
            return t[:1].expand(t.shape)
        if kind == "channels_last" and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    def poison(self, t, p=0.3):
        """NaN/Inf in some elements of a float tensor."""
        if t.numel() == 0 or not t.is_floating_point():
            return t
        t = t.clone()
        mask = torch.rand(t.shape, generator=self.gen) < p
        t[mask] = self.pick([float("nan"), float("inf"), -float("inf")])
        return t


def _meta(*ts):
    return [t.to("meta") if isinstance(t, torch.Tensor) else t for t in ts]


# ---- perturb --------------------------------------------------------------

def _grids_shifts(d, n, s, h, w):
    grids = (d.rand(n, s, s) < 0.5).float()
    ch, cw = max(1, math.ceil(h / s)), max(1, math.ceil(w / s))
    shifts = torch.stack([torch.randint(0, ch, (n,), generator=d.gen), torch.randint(0, cw, (n,), generator=d.gen)], 1)
    return grids, shifts


def prop_rise_apply(data):
    import whymatch.ops as ops
    from whymatch.ops import reference as ref
    d = Draw(data)
    n, c, h, w, s = d.int(0, 4), d.int(0, 3), d.int(0, 9), d.int(0, 9), d.int(1, 4)
    grids, shifts = _grids_shifts(d, n, s, h, w)
    img_dtype = d.pick(LOW + [torch.float64] + BAD_DTYPES)
    image = d.rand(c, h, w, dtype=img_dtype)
    valid = img_dtype in LOW
    mutation = d.pick(["none", "nan", "shift", "nonsquare", "rank", "shifts_dtype", "meta", "baseline_shape"])
    baseline_kind = d.pick(["number", "full", "broadcast"])
    baseline = {"number": d.pick([0.0, 0.5, 1.0]), "full": d.rand(c, h, w), "broadcast": d.rand(c, 1, 1)}[baseline_kind]
    if mutation == "nan":
        grids, image = d.poison(grids), d.poison(image)
        if d.bool():
            baseline, baseline_kind, valid = float("nan"), "number", False  # a scalar parameter: always checked
    elif mutation == "shift" and n and h and w:
        shifts = shifts.clone()
        shifts[d.int(0, n - 1), d.int(0, 1)] = d.pick([-1, math.ceil(max(h, w) / s) + 5, 2 ** 40])
        valid = False
    elif mutation == "nonsquare":
        grids, valid = d.rand(n, s, s + 1), False
    elif mutation == "rank":
        image, valid = image[None], False
    elif mutation == "shifts_dtype":
        shifts = shifts.to(d.pick([torch.float32, torch.bool, torch.int32]))
        valid = valid and shifts.dtype == torch.int32
    elif mutation == "baseline_shape":
        baseline, baseline_kind, valid = d.rand(c + 2, h, w), "full", False
    out_dtype = d.pick([None, torch.float32, torch.float16, torch.bfloat16, torch.float64])
    valid = valid and out_dtype != torch.float64
    channels_last = d.bool()
    grids, image = d.layout(grids), d.layout(image) if image.is_floating_point() else image
    meta = mutation == "meta"
    if meta:
        grids, shifts, image, baseline = _meta(grids, shifts, image, baseline)
    use_out = d.bool() and valid and out_dtype is not None
    out = None
    if use_out:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(n, c, h, w, dtype=out_dtype, device=image.device, memory_format=fmt)
        if d.bool():  # a wrong buffer
            out, valid = d.pick([out[:0] if n else out[:, :0] if c else out.transpose(0, 1)[:1],
                                 torch.empty(n, c, h, w + 1, dtype=out_dtype, device=image.device),
                                 out.to(torch.float64)]), False
            if out.shape == (n, c, h, w) and out.dtype == out_dtype and (out.is_contiguous(memory_format=fmt)):
                valid = True

    def check(res):
        want_dtype = out_dtype or img_dtype
        if meta:
            assert res.device.type == "meta" and res.shape == (n, c, h, w)
            return
        full = (torch.full((c, h, w), float(baseline)) if baseline_kind == "number" else baseline.expand(c, h, w))
        want = ref.rise_apply(grids.float(), shifts.long(), image.float(), full.float(), want_dtype, channels_last)
        assert res.dtype == want_dtype
        _close(res, want, want_dtype)
        if use_out:
            assert res is out
        elif channels_last and res.numel():
            assert res.is_contiguous(memory_format=torch.channels_last)

    _expect(valid, lambda: ops.rise_apply(grids, shifts, image, baseline, dtype=out_dtype,
                                          channels_last=channels_last, out=out), check)
    # the registered op directly: float32 contiguous inputs only
    if image.dim() == 3 and grids.dim() == 3:
        full = (torch.full(tuple(image.shape), 0.25, device=image.device) if baseline_kind == "number"
                else baseline.expand(image.shape) if baseline.dim() == 3 and baseline.shape[0] <= c else baseline)
        rvalid = (valid and image.dtype == torch.float32 and image.is_contiguous() and grids.is_contiguous()
                  and shifts.dtype == torch.int64 and full.is_contiguous() and full.shape == image.shape)
        dt = out_dtype or torch.float32
        _expect(rvalid, lambda: torch.ops.whymatch.rise_apply(grids, shifts, image, full, dt, channels_last))


def prop_rise_saliency(data):
    import whymatch.ops as ops
    from whymatch.ops import reference as ref
    d = Draw(data)
    n, k, h, w, s = d.int(0, 5), d.int(0, 3), d.int(0, 9), d.int(0, 9), d.int(1, 4)
    grids, shifts = _grids_shifts(d, n, s, h, w)
    sdt = d.pick(LOW + [torch.float64] + BAD_DTYPES)
    scores = d.rand(n, k, dtype=sdt) if sdt != torch.bool else torch.ones(n, k, dtype=torch.bool)
    valid = sdt in LOW
    mutation = d.pick(["none", "nan", "rows", "size", "rank", "meta"])
    size = (h, w)
    if mutation == "nan":
        scores = d.poison(scores)
    elif mutation == "rows":
        scores, valid = d.rand(n + 1, k), False
    elif mutation == "size":
        size, valid = d.pick([(h, -1), (h,), "hw", (h, 2.5), (2 ** 40, 2 ** 40)]), False
    elif mutation == "rank":
        scores, valid = scores.reshape(-1), False
    meta = mutation == "meta"
    grids, scores = d.layout(grids), d.layout(scores) if scores.is_floating_point() else scores
    if meta:
        grids, shifts, scores = _meta(grids, shifts, scores)

    def check(res):
        assert res.dtype == torch.float32 and res.shape == (k, h, w)
        if not meta:
            _close(res, ref.rise_saliency(grids.float(), shifts, scores.float(), (h, w)), torch.float32)

    _expect(valid, lambda: ops.rise_saliency(grids, shifts, scores, size), check)
    if scores.dim() == 2 and isinstance(size, tuple) and len(size) == 2:
        rvalid = valid and scores.dtype == torch.float32 and scores.is_contiguous() and grids.is_contiguous()
        _expect(rvalid, lambda: torch.ops.whymatch.rise_saliency(grids, shifts, scores, size[0], size[1]))


def prop_ranked_blend(data):
    import whymatch.ops as ops
    from whymatch.ops import reference as ref
    d = Draw(data)
    b, c, h, w, t = d.int(0, 3), d.int(0, 3), d.int(0, 6), d.int(0, 6), d.int(0, 4)
    dt = d.pick(LOW + [torch.float64] + BAD_DTYPES)
    first, second = d.rand(b, c, h, w, dtype=dt), d.rand(b, c, h, w, dtype=dt)
    valid = dt in LOW
    # rank values are compared, never used as addresses: any int64 value is valid, negative and huge too
    rank = torch.randint(-3, h * w + 3, (b, h * w), generator=d.gen)
    if d.bool() and b:
        rank[0, : min(2, h * w)] = d.pick([-2 ** 62, 2 ** 62])
    counts = torch.randint(-1, h * w + 2, (t,), generator=d.gen)
    mutation = d.pick(["none", "nan", "rank_shape", "rank_dtype", "counts_rank", "second", "rank4", "meta"])
    if mutation == "nan":
        first = d.poison(first)
    elif mutation == "rank_shape":
        rank, valid = torch.zeros(d.int(0, 2), d.int(0, 2), dtype=torch.long), (b, h * w) == (0, 0) and valid
        valid = valid and rank.shape == (b, h * w)
    elif mutation == "rank_dtype":
        rank = rank.to(d.pick([torch.int32, torch.float32, torch.bool]))
        valid = valid and rank.dtype == torch.int32
    elif mutation == "counts_rank":
        counts, valid = counts[None], False
    elif mutation == "second":
        second, valid = d.pick([second[:, :, :, :0] if w else second[None], second.to(torch.float64)
                                if dt != torch.float64 else second.float()]), False
    elif mutation == "rank4":
        first, valid = first[None], False
    meta = mutation == "meta"
    if first.is_floating_point():
        first, second = d.layout(first), d.layout(second)
    rank = d.layout(rank, ("contiguous", "transposed", "offset"))
    if meta:
        first, second, rank, counts = _meta(first, second, rank, counts)

    def check(res):
        assert res.shape == (b, t, c, h, w) and res.dtype == dt
        if not meta:
            _close(res, ref.ranked_blend(first, second, rank.long(), counts), dt)

    _expect(valid, lambda: ops.ranked_blend(first, second, rank, counts), check)
    if first.dim() == 4:
        rvalid = (valid and all(x.is_contiguous() for x in (first, second, rank, counts))
                  and rank.dtype == torch.int64)
        _expect(rvalid, lambda: torch.ops.whymatch.ranked_blend(first, second, rank, counts),
                lambda res: None if meta else _close(res, ref.ranked_blend(first, second, rank, counts), dt))


# ---- mining ---------------------------------------------------------------

def prop_soft_mask(data):
    import whymatch.ops as ops
    from whymatch.ops import reference as ref
    d = Draw(data)
    b, c, H, W, h, w = d.int(0, 3), d.int(0, 3), d.int(0, 7), d.int(0, 7), d.int(1, 5), d.int(1, 5)
    dt = d.pick([torch.float32, torch.float64, torch.float16, torch.bfloat16] + BAD_DTYPES)
    x = d.rand(b, c, H, W, dtype=dt)
    att = d.rand(b, h, w, dtype=d.pick([torch.float32, torch.float64, torch.float16]))
    if d.bool():
        att = att[:, None]
    alpha = d.pick([1.0, 5.0, -2.0])
    beta = d.pick([0.5, 0.0])
    valid = dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    mutation = d.pick(["none", "nan", "batch", "att_empty", "att_dtype", "alpha", "alpha_tensor", "rank", "meta"])
    if mutation == "nan":
        x, att = d.poison(x), d.poison(att)
    elif mutation == "batch":
        att, valid = d.rand(b + 1, h, w), False
    elif mutation == "att_empty":
        att = torch.rand(b, 0, w)
        valid = valid and b * H * W == 0
    elif mutation == "att_dtype":
        att, valid = att.to(d.pick(BAD_DTYPES)), False
    elif mutation == "alpha":
        alpha, valid = d.pick([float("nan"), float("inf"), "1", None]), False
    elif mutation == "alpha_tensor":
        alpha = d.pick([torch.tensor(2.0), torch.tensor([2.0]), torch.ones(2), torch.tensor(2)])
        valid = valid and alpha.numel() == 1 and alpha.is_floating_point()
    elif mutation == "rank":
        x, valid = x.flatten(0, 1), False
    meta = mutation == "meta"
    if x.is_floating_point():
        x = d.layout(x)
    if att.is_floating_point():
        att = d.layout(att, ("contiguous", "transposed", "offset"))
    if meta:
        x, att = _meta(x, att)
    want_grad = valid and not meta and dt in (torch.float32, torch.float64) and d.bool()
    if want_grad:
        x = x.detach().clone().requires_grad_(True)
        att = att.detach().clone().requires_grad_(True)

    def check(res):
        assert res.shape == x.shape and res.dtype == x.dtype
        if meta:
            return
        a2 = att[:, 0] if att.dim() == 4 else att
        want = ref.soft_mask(x.detach(), a2.detach(), alpha, beta)
        _close(res.detach(), want, dt)
        if want_grad and res.numel():
            wts = torch.rand(res.shape, generator=d.gen, dtype=res.dtype)
            gx, ga = torch.autograd.grad((res * wts).sum(), (x, att))
            xr, ar = x.detach().clone().requires_grad_(True), att.detach().clone().requires_grad_(True)
            ar2 = ar[:, 0] if ar.dim() == 4 else ar
            rx, ra = torch.autograd.grad((ref.soft_mask(xr, ar2, alpha, beta) * wts).sum(), (xr, ar))
            torch.testing.assert_close(gx, rx, equal_nan=True, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ga, ra, equal_nan=True, rtol=1e-3, atol=1e-4)

    _expect(valid, lambda: ops.soft_mask(x, att, alpha, beta), check)
    # the registered forward and backward directly
    if x.dim() == 4 and att.dim() in (3, 4) and isinstance(alpha, float):
        a3 = att[:, 0] if att.dim() == 4 else att
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        al, be = torch.tensor(alpha, dtype=acc, device=x.device), torch.tensor(beta, dtype=acc, device=x.device)
        dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
        # alpha/beta reach the registered op as tensors: data, not scanned by default (NaN propagates)
        rvalid = (valid or mutation == "alpha") and dense and a3.dtype == acc and a3.is_contiguous()
        _expect(rvalid, lambda: torch.ops.whymatch.soft_mask(x.detach(), a3.detach(), al, be))
        g = torch.ones_like(x.detach()) if d.bool() else torch.ones(x.shape[0] + 1, *x.shape[1:], dtype=x.dtype,
                                                                   device=x.device)
        _expect(rvalid and g.shape == x.shape,
                lambda: torch.ops.whymatch.soft_mask_backward(g, x.detach(), a3.detach(), al, be, d.bool(), True))


# ---- AVSL -----------------------------------------------------------------

def prop_cam(data):
    import whymatch.ops as ops
    from whymatch.ops import reference as ref
    d = Draw(data)
    B, R1, R2 = d.int(0, 3), d.int(0, 4), d.int(0, 4)
    H1, W1, H2, W2 = d.int(0, 6), d.int(1, 6), d.int(1, 4), d.int(0, 4)
    dt = d.pick([torch.float32, torch.float64, torch.float16] + BAD_DTYPES)
    low, high = d.rand(B, R1, H1, W1, dtype=dt), d.rand(B, R2, H2, W2, dtype=dt)
    floats = dt in (torch.float32, torch.float64, torch.float16)
    mutation = d.pick(["none", "nan", "batch", "edges_shape", "edges_layout", "momentum", "meta"])
    momentum = d.pick([0.0, 0.5, 0.9, 1.0])
    edges = torch.rand(R1, R2, generator=d.gen) if d.bool() else None
    first = d.bool()
    edges_ok = True
    if mutation == "nan":
        low, high = d.poison(low), d.poison(high)
    elif mutation == "batch":
        high = d.rand(B + 1, R2, H2, W2)
    elif mutation == "edges_shape":
        edges, edges_ok = torch.rand(R1 + 1, R2), False
    elif mutation == "edges_layout":
        edges = torch.rand(R2, R1).t() if d.bool() else torch.rand(R1, R2, dtype=torch.float64)
        edges_ok = edges.is_contiguous() and edges.dtype == torch.float32
    elif mutation == "momentum":  # a scalar hyperparameter: always checked, with or without edges
        momentum = d.pick([float("nan"), -0.5, 1.5, float("inf")])
    meta = mutation == "meta"
    if floats:
        low, high = d.layout(low), d.layout(high)
    if meta:
        low, high, edges = _meta(low, high, edges)
    rel = d.bool()
    pos_ok = H1 * W1 >= 1 and H2 * W2 >= 1 and (not rel or (H1 * W1 >= 2 and H2 * W2 >= 2))
    valid = floats and high.shape[0] == B and B > 0 and low.numel() > 0 and high.numel() > 0 and pos_ok
    valid = valid and (edges is None or edges_ok) and mutation != "momentum"
    before = None if edges is None or meta else edges.clone()

    def check(res):
        corr, rl, rh = res
        assert corr.shape == (R1, R2) and corr.dtype == torch.float32
        if meta:
            return
        _close(corr, ref.avsl_cam_correlation(low.float(), high.float()), torch.float32)
        if rel:
            _close(rl, ref.avsl_cam_reliability(low.float()), torch.float32)
        if edges is not None:
            want = corr if first else momentum * before + (1 - momentum) * corr
            _close(edges, want, torch.float32)

    _expect(valid, lambda: ops.cam_statistics(low, high, edges=edges, momentum=momentum, first=first,
                                               reliability=rel), check)
    rel_valid = floats and low.shape[2] * low.shape[3] >= 2
    _expect(rel_valid, lambda: ops.cam_reliability(low),
            lambda r: None if meta else _close(r, ref.avsl_cam_reliability(low.float()), torch.float32))
    # the registered ops directly
    # the registered op also takes zero nodes (R = 0): only the batch must be non-empty
    rvalid = (floats and high.shape[0] == B and B > 0 and pos_ok and low.dtype in (torch.float32, torch.float64)
              and low.dtype == high.dtype and low.is_contiguous() and high.is_contiguous())
    _expect(rvalid, lambda: torch.ops.whymatch.avsl_cam_correlation(low, high, rel, False))
    _expect(rel_valid and low.dtype in (torch.float32, torch.float64) and low.is_contiguous(),
            lambda: torch.ops.whymatch.avsl_cam_reliability(low, False))


def _levels(d, L, Q, G, dtype=torch.float32):
    from whymatch.ops import reference as ref
    R = [d.int(1, 5) for _ in range(L)]
    qs = [d.rand(Q, r, dtype=dtype) - 0.5 for r in R]
    gs = [d.rand(G, r, dtype=dtype) - 0.5 for r in R]
    rq = [d.rand(Q, r) for r in R]
    rg = [d.rand(G, r) for r in R]
    links = [ref.avsl_link_star(torch.randn(R[i - 1], R[i], generator=d.gen), d.int(1, 3)) for i in range(1, L)]
    coef = [1 + 0.1 * torch.randn(r, generator=d.gen) for r in R]
    bias = [0.1 * torch.randn(r, generator=d.gen) for r in R]
    return R, [qs, gs, rq, rg, links, coef, bias]


def prop_avsl(data):
    import whymatch.ops as ops
    from whymatch.ops import reference as ref
    d = Draw(data)
    L, Q, G = d.int(1, 3), d.int(0, 4), d.int(0, 5)
    R, args = _levels(d, L, Q, G)
    gamma = d.pick([10.0, 1.0, -3.0])
    valid = True
    mutation = d.pick(["none", "nan", "dtype", "shape", "rank", "gamma", "layout", "count", "meta"])
    if mutation == "nan":
        arg, lv = d.int(0, 3), d.int(0, L - 1)
        args[arg][lv] = d.poison(args[arg][lv], 0.5)
    elif mutation == "dtype":
        arg, lv = d.int(0, 3), d.int(0, L - 1)
        args[arg][lv], valid = args[arg][lv].to(d.pick(BAD_DTYPES)), False
    elif mutation == "shape" and L > 1:
        args[4][0], valid = torch.rand(R[0] + 1, R[1]), False
    elif mutation == "rank":
        args[d.int(0, 3)][0], valid = torch.rand(3), False
    elif mutation == "gamma":
        gamma, valid = d.pick([float("nan"), float("inf"), "10"]), False
    elif mutation == "layout":
        arg, lv = d.int(0, 3), d.int(0, L - 1)
        args[arg][lv] = d.layout(args[arg][lv], ("transposed", "offset", "expanded"))
    elif mutation == "meta":
        args = [[t.to("meta") for t in a] for a in args]
    elif mutation == "count":
        args[d.int(1, 6)] = [] if L > 1 else [torch.zeros(1)] * 3
        valid = False

    meta = mutation == "meta"
    # link_star: any float edges and k >= 1; anything else refused by name
    e = d.pick([torch.randn(3, 4, generator=d.gen), torch.zeros(0, 2), torch.ones(2, 3, dtype=torch.long),
                torch.rand(2, 2, 2)])
    kk = d.pick([1, 2, 7, 0, -1, True, 1.5])
    lvalid = e.dim() == 2 and e.is_floating_point() and isinstance(kk, int) and not isinstance(kk, bool) and kk >= 1
    _expect(lvalid, lambda: ops.link_star(e, kk), lambda r: _close(r, ref.avsl_link_star(e, kk), torch.float32))

    def check_d(res):
        if meta:
            assert res.device.type == "meta" and res.shape == (Q, G)
            return
        want = ref.avsl_distance(*args, gamma)
        if mutation == "nan" and L > 1:
            # link weights that are exactly zero are structural (skipped, as in a sparse product): a NaN
            # node reaches only the nodes it is linked to, where the dense reference multiplies NaN by 0
            assert not bool((res.isnan() & ~want.isnan()).any()), "NaN where the reference has none"
            both = ~res.isnan() & ~want.isnan()
            assert res.shape == want.shape
            want = torch.where(both, want, res)
        _close(res, want, torch.float32)

    res = _expect(valid, lambda: ops.avsl_distance(*args, gamma), check_d)
    if res is not None and L > 1 and Q * G > 0 and mutation not in ("nan", "meta") and d.bool():  # d/dcoef, d/dbias (levels >= 1)
        cs = [c.clone().requires_grad_(True) for c in args[5]]
        bs = [b.clone().requires_grad_(True) for b in args[6]]
        wts = torch.rand(Q, G, generator=d.gen)
        a2 = args[:5] + [cs, bs]
        got = torch.autograd.grad((ops.avsl_distance(*a2, gamma) * wts).sum(), cs[1:] + bs[1:])
        cr = [c.clone().requires_grad_(True) for c in args[5]]
        br = [b.clone().requires_grad_(True) for b in args[6]]
        want = torch.autograd.grad((ref.avsl_distance(*args[:5], cr, br, gamma) * wts).sum(), cr[1:] + br[1:])
        for g1, g2 in zip(got, want):
            torch.testing.assert_close(g1, g2, equal_nan=True, rtol=1e-3, atol=1e-4)
    k = d.int(0, G + 1)
    excl = d.bool() and Q == G
    kvalid = valid and 1 <= k <= G - (1 if excl else 0)

    def check_k(res):
        v, i = res
        assert v.shape == (Q, k) and i.shape == (Q, k) and i.dtype == torch.int64
        if Q * k and not meta:
            assert int(i.min()) >= 0 and int(i.max()) < G, "top-k indices out of range"
            for row in i:
                assert len(set(row.tolist())) == k, "top-k indices repeat"
            # the k smallest of the op's own distances (checked against the reference above), NaN last;
            # ties within tolerance may swap indices, so values and NaN positions are compared
            dd = ops.avsl_distance(*args, gamma).detach()
            if excl:
                dd.fill_diagonal_(float("inf"))
            order = torch.sort(dd, dim=1, stable=True).indices[:, :k]
            rv = dd.gather(1, order)
            _close(v, rv, torch.float32)
            assert torch.equal(torch.isnan(v), torch.isnan(rv)), "NaN must rank last"
            torch.testing.assert_close(dd.gather(1, i), v, equal_nan=True, rtol=1e-5, atol=1e-6)

    _expect(kvalid, lambda: ops.avsl_topk(*args, gamma, k, exclude_self=excl), check_k)
    # the registered packed ops directly, with packed tensors of random sizes
    from whymatch.ops.avsl import _pack
    if valid and Q * G > 0 and not meta:
        qe, ge, rq, rg, lk, cf, bs, sizes = _pack(*args)
        bad = d.pick(["none", "qe", "links", "sizes", "coef_dtype"])
        if bad == "qe":
            qe = qe[:, :-1]
        elif bad == "links":
            lk = torch.rand(lk.numel() + 1)
        elif bad == "sizes":
            sizes = list(sizes) + [1] if d.bool() else [0] + list(sizes[1:])
        elif bad == "coef_dtype":
            cf = cf.double()
        ok = bad == "none"
        _expect(ok, lambda: torch.ops.whymatch.avsl_distance(qe, ge, rq, rg, lk, cf, bs, sizes, float(gamma)),
                lambda r: _close(r, ref.avsl_distance(*args, gamma), torch.float32))
        _expect(ok, lambda: torch.ops.whymatch.avsl_distance_backward(torch.ones(Q, G), qe, ge, rq, rg, lk, cf, bs,
                                                                       sizes, float(gamma)))
        _expect(ok and kvalid, lambda: torch.ops.whymatch.avsl_topk(qe, ge, rq, rg, lk, cf, bs, sizes, float(gamma),
                                                                    k, excl))


def prop_finite(data):
    """With the opt-in scans on (set_check_finite(True) or WHYMATCH_CHECK_FINITE=1), every op refuses
    NaN/Inf in any float input by name; the same inputs pass with the scans off."""
    import whymatch.ops as ops
    from whymatch.ops import _validate as V
    d = Draw(data)
    W = torch.ops.whymatch
    n, c, h, w, s = d.int(1, 3), d.int(1, 2), d.int(2, 6), d.int(2, 6), d.int(1, 3)
    grids, shifts = _grids_shifts(d, n, s, h, w)
    L, Q, G = d.int(1, 3), d.int(1, 3), d.int(2, 4)
    _, la = _levels(d, L, Q, G)
    from whymatch.ops.avsl import _pack
    packed = list(_pack(*la))
    ops_and_inputs = {
        "rise_apply": (lambda a: ops.rise_apply(*a), [grids, shifts, d.rand(c, h, w), d.rand(c, h, w)]),
        "rise_saliency": (lambda a: ops.rise_saliency(*a, (h, w)), [grids, shifts, d.rand(n, 2)]),
        "ranked_blend": (lambda a: ops.ranked_blend(*a), [d.rand(n, c, h, w), d.rand(n, c, h, w),
                                                          torch.zeros(n, h * w, dtype=torch.long),
                                                          torch.arange(3)]),
        "soft_mask": (lambda a: ops.soft_mask(*a, 2.0, 0.5), [d.rand(n, c, h, w), d.rand(n, 2, 2)]),
        "soft_mask_backward": (lambda a: W.soft_mask_backward(*a, True, True),
                               [d.rand(n, c, h, w), d.rand(n, c, h, w), d.rand(n, 2, 2), torch.tensor(2.0),
                                torch.tensor(0.5)]),
        "cam_statistics": (lambda a: ops.cam_statistics(*a), [d.rand(2, 3, h, w), d.rand(2, 2, 2, 2),
                                                              torch.rand(3, 2)]),
        "cam_reliability": (lambda a: ops.cam_reliability(*a), [d.rand(2, 3, h, w)]),
        "avsl_distance": (lambda a: W.avsl_distance(*a, 10.0), packed[:7] + [packed[7]]),
        "avsl_topk": (lambda a: W.avsl_topk(*a, 10.0, 1, False), packed[:7] + [packed[7]]),
        "avsl_distance_backward": (lambda a: W.avsl_distance_backward(*a, 10.0),
                                   [torch.ones(Q, G)] + packed[:7] + [packed[7]]),
    }
    name = d.pick(sorted(ops_and_inputs))
    fn, inputs = ops_and_inputs[name]
    if name == "cam_statistics":
        fn = lambda a: ops.cam_statistics(a[0], a[1], edges=a[2])  # noqa: E731
    floats = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.is_floating_point()
              and t.numel() > 0]
    which = d.pick(floats)
    bad = list(inputs)
    bad[which] = bad[which].clone()
    bad[which].view(-1)[d.int(0, bad[which].numel() - 1)] = d.pick([float("nan"), float("inf")])
    V.set_check_finite(None)
    fn([t.clone() if isinstance(t, torch.Tensor) else t for t in bad])  # off: no scan, no error
    if d.bool():
        V.set_check_finite(True)
    else:
        os.environ["WHYMATCH_CHECK_FINITE"] = "1"
    try:
        try:
            fn(bad)
        except ValueError as exc:
            assert "must be finite" in str(exc), str(exc)
        else:
            raise AssertionError(f"{name}: NaN/Inf in input {which} accepted with the scans on")
    finally:
        V.set_check_finite(None)
        os.environ.pop("WHYMATCH_CHECK_FINITE", None)


# ---- the raw module -------------------------------------------------------

def prop_raw(data):
    """Random sizes and random (but real) buffers of random bytes handed to every raw entry of
    whymatch._C: the claimed byte counts never exceed the real allocations, so any call the entry
    accepts stays in bounds if its checks are right; it must return or raise ValueError/TypeError."""
    from whymatch.ops import _ext
    mod = _ext.cpu_module()
    d = Draw(data)
    keep = []

    def buf():
        kind = d.pick(["absent", "small", "medium", "large", "null_bytes", "misaligned"])
        if kind == "absent":
            return (0, 0)
        nbytes = {"small": 8, "medium": 256, "large": 4096, "null_bytes": 0, "misaligned": 256}[kind]
        t = torch.randint(0, 256, (max(nbytes, 1) + 8,), dtype=torch.uint8, generator=d.gen)
        if d.bool():  # plausible values: small non-negative int64s / floats in [0, 1) / int32s
            t.view(torch.uint8)[:] = 0
        keep.append(t)
        if kind == "null_bytes":
            return (0, d.pick([4, 64]))
        if kind == "misaligned":
            return (t.data_ptr() + 1, nbytes - 1)
        return (t.data_ptr(), d.int(0, nbytes))

    def size():
        return d.pick([0, 1, 2, 3, 4, -1, 2 ** 31, 2 ** 62])

    entry = d.pick(["rise_apply", "rise_saliency", "ranked_blend", "soft_mask", "soft_mask_backward",
                    "avsl_distance", "avsl_distance_backward", "avsl_topk", "avsl_workspace_bytes",
                    "avsl_cam_correlation", "avsl_cam_reliability", "avsl_cam_workspace_bytes"])
    code = d.pick([0, 1, 2, 3, 4, -1])
    sizes = [d.pick([1, 2, 3, 0, -1, 2 ** 40]) for _ in range(d.int(0, 3))]
    calls = {
        "rise_apply": lambda: mod.rise_apply(buf(), buf(), buf(), buf(), buf(), size(), size(), size(), size(),
                                             size(), code, d.bool(), 1),
        "rise_saliency": lambda: mod.rise_saliency(buf(), buf(), buf(), buf(), size(), size(), size(), size(),
                                                   size(), 1),
        "ranked_blend": lambda: mod.ranked_blend(buf(), buf(), buf(), buf(), buf(), size(), size(), size(), size(),
                                                 code, 1),
        "soft_mask": lambda: mod.soft_mask(buf(), buf(), buf(), buf(), buf(), size(), size(), size(), size(),
                                           size(), size(), code, d.bool(), 1),
        "soft_mask_backward": lambda: mod.soft_mask_backward(buf(), buf(), buf(), buf(), buf(), buf(), buf(), buf(),
                                                             size(), size(), size(), size(), size(), size(), code,
                                                             d.bool(), 1),
        "avsl_distance": lambda: mod.avsl_distance(*[buf() for _ in range(10)], size(), size(), sizes,
                                                   d.pick([10.0, float("nan")]), code, buf(), 1),
        "avsl_distance_backward": lambda: mod.avsl_distance_backward(*[buf() for _ in range(15)], size(), size(),
                                                                     sizes, 10.0, code, buf(), 1),
        "avsl_topk": lambda: mod.avsl_topk(*[buf() for _ in range(11)], size(), size(), sizes, 10.0, size(),
                                           d.bool(), code, buf(), 1),
        "avsl_workspace_bytes": lambda: mod.avsl_workspace_bytes(d.int(-1, 3), size(), size(), sizes, size(), code),
        "avsl_cam_correlation": lambda: mod.avsl_cam_correlation(*[buf() for _ in range(7)], size(), size(), size(),
                                                                 size(), size(), size(), size(),
                                                                 d.pick([0.5, float("nan"), 2.0]), d.bool(), d.bool(),
                                                                 code, 1),
        "avsl_cam_reliability": lambda: mod.avsl_cam_reliability(buf(), buf(), size(), size(), size(), size(),
                                                                 d.bool(), code, 1),
        "avsl_cam_workspace_bytes": lambda: mod.avsl_cam_workspace_bytes(size(), size(), size(), size(), size(),
                                                                         code),
    }
    try:
        calls[entry]()
    except NAMED as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), repr(str(exc))
    finally:
        keep.clear()


def _main(case: str, n: int) -> None:
    import warnings

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import whymatch.ops  # noqa: F401  (registers the ops)

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    prop = globals()[f"prop_{case}"]
    run = settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=False,
                   suppress_health_check=list(HealthCheck))(given(st.data())(prop))
    run()
    print(f"ok {case}", flush=True)


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]))
