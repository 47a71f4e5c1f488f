"""Regressions for the crashes and silent misreads at the compiled-op boundary (issue 13, defect 2).

Each case once crashed the interpreter or read the wrong memory; each must now raise a named
ValueError/TypeError. All cases run in ONE child process (started once per module), so that a
crash fails these tests instead of killing the test run; each parametrized test checks its case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# name -> (python expression evaluated in the child, expected exception type, message regex)
CASES = {
    # the examples
    "ranked_blend_rank_1x1_float": (
        "W.ranked_blend(e(64, 3, 224, 224), e(64, 3, 224, 224), torch.zeros(1, 1), torch.arange(3))",
        "ValueError", r"ranked_blend: rank must have dtype int64, got float32"),
    "ranked_blend_rank_1x1": (
        "W.ranked_blend(e(64, 3, 224, 224), e(64, 3, 224, 224), torch.zeros(1, 1, dtype=torch.long), torch.arange(3))",
        "ValueError", r"ranked_blend: rank must have shape \(64, 50176\), got \(1, 1\)"),
    "rise_apply_one_element_baseline": (
        "W.rise_apply(f(4, 3, 3), z(4, 2), f(3, 10, 10), torch.zeros(1), torch.float32, False)",
        "ValueError", r"rise_apply: baseline must be a 3-D tensor, got 1-D"),
    "rise_apply_int64_image": (
        "W.rise_apply(f(4, 3, 3), z(4, 2), torch.ones(3, 10, 10, dtype=torch.long), f(3, 10, 10), torch.float32, False)",
        "ValueError", r"rise_apply: image must have dtype float32, got int64"),
    "soft_mask_attention_batch": (
        "W.soft_mask(f(2, 3, 8, 8), f(1, 4, 4), torch.tensor(1.0), torch.tensor(0.5))",
        "ValueError", r"soft_mask: attention must have shape \(2, \*, \*\), got \(1, 4, 4\)"),
    # the same kinds, beyond the list
    "rise_apply_out_too_small": (
        "W.rise_apply_out(f(4, 3, 3), z(4, 2), f(3, 10, 10), f(3, 10, 10), torch.empty(1, 3, 10, 10))",
        "ValueError", r"rise_apply_out: out must have shape \(4, 3, 10, 10\), got \(1, 3, 10, 10\)"),
    "rise_apply_out_strided": (
        "W.rise_apply_out(f(4, 3, 3), z(4, 2), f(3, 10, 10), f(3, 10, 10), torch.empty(4, 3, 10, 20)[..., ::2])",
        "ValueError", r"rise_apply_out: out must be contiguous or channels_last"),
    "rise_apply_shift_out_of_canvas": (
        "W.rise_apply(f(4, 3, 3), z(4, 2) + 10**9, f(3, 10, 10), f(3, 10, 10), torch.float32, False)",
        "ValueError", r"rise_apply: shifts\[0\] must lie in \[0, 4\) x \[0, 4\)"),
    "rise_apply_negative_shift": (
        "W.rise_apply(f(4, 3, 3), z(4, 2) - 1, f(3, 10, 10), f(3, 10, 10), torch.float32, False)",
        "ValueError", r"rise_apply: shifts\[0\] must lie in"),
    "rise_saliency_scores_rows": (
        "W.rise_saliency(f(4, 3, 3), z(4, 2), f(2, 5), 10, 10)",
        "ValueError", r"rise_saliency: scores must have shape \(4, \*\), got \(2, 5\)"),
    "rise_saliency_output_overflow": (
        "W.rise_saliency(f(4, 3, 3), z(4, 2), f(4, 5), 2**40, 2**40)",
        "ValueError", r"rise_saliency: the output of shape \(5, 1099511627776, 1099511627776\) would hold"),
    "rise_saliency_output_too_large": (
        "W.rise_saliency(f(4, 3, 3), z(4, 2), f(4, 5), 2**20, 2**20)",
        "ValueError", r"rise_saliency: the output of shape .* would take \d+ bytes, more than"),
    "ranked_blend_counts_2d": (
        "W.ranked_blend(f(2, 3, 4, 4), f(2, 3, 4, 4), z(2, 16), z(2, 2))",
        "ValueError", r"ranked_blend: counts must be a 1-D tensor"),
    "ranked_blend_second_dtype": (
        "W.ranked_blend(f(2, 3, 4, 4), f(2, 3, 4, 4).double(), z(2, 16), z(3))",
        "ValueError", r"ranked_blend: second must have dtype float32, got float64"),
    "ranked_blend_transposed": (
        "W.ranked_blend(f(2, 3, 4, 4).transpose(2, 3), f(2, 3, 4, 4), z(2, 16), z(3))",
        "ValueError", r"ranked_blend: first must be contiguous"),
    "soft_mask_alpha_shape": (
        "W.soft_mask(f(2, 3, 8, 8), f(2, 4, 4), torch.ones(3), torch.tensor(0.5))",
        "ValueError", r"soft_mask: alpha must be a one-element tensor, got shape \(3,\)"),
    "soft_mask_attention_dtype": (
        "W.soft_mask(f(2, 3, 8, 8), f(2, 4, 4).half(), torch.tensor(1.0), torch.tensor(0.5))",
        "ValueError", r"soft_mask: attention must have dtype float32, got float16"),
    "soft_mask_backward_grad_shape": (
        "W.soft_mask_backward(f(1, 3, 8, 8), f(2, 3, 8, 8), f(2, 4, 4), torch.tensor(1.0), torch.tensor(0.5), True, True)",
        "ValueError", r"soft_mask_backward: grad must have shape \(2, 3, 8, 8\), got \(1, 3, 8, 8\)"),
    "cam_correlation_batch": (
        "W.avsl_cam_correlation(f(2, 3, 4, 4), f(3, 2, 2, 2), False, False)",
        "ValueError", r"avsl_cam_correlation: cam_high must have shape \(2, \*, \*, \*\), got \(3, 2, 2, 2\)"),
    "cam_reliability_one_position": (
        "W.avsl_cam_reliability(f(2, 3, 1, 1), False)",
        "ValueError", r"avsl_cam_reliability: cam must have at least 2 positions per map"),
    "edge_update_edges_shape": (
        "W.avsl_edge_update_(f(2, 2), f(2, 3, 4, 4), f(2, 2, 2, 2), 0.5, False, False, False)",
        "ValueError", r"avsl_edge_update_: edges must have shape \(3, 2\), got \(2, 2\)"),
    "edge_update_momentum_nan": (
        "W.avsl_edge_update_(f(3, 2), f(2, 3, 4, 4), f(2, 2, 2, 2), float('nan'), False, False, False)",
        "ValueError", r"avsl_edge_update_: momentum must be finite"),
    "avsl_distance_links_short": (
        "W.avsl_distance(f(2, 5), f(3, 5), f(2, 3), f(3, 3), f(2), f(3), f(3), [2, 3], 10.0)",
        "ValueError", r"avsl_distance: links must have shape \(6\), got \(2,\)"),
    "avsl_distance_sizes_mismatch": (
        "W.avsl_distance(f(2, 5), f(3, 5), f(2, 3), f(3, 3), f(6), f(3), f(3), [2, 4], 10.0)",
        "ValueError", r"avsl_distance: qe must have shape \(\*, 6\), got \(2, 5\)"),
    "avsl_topk_k_too_large": (
        "W.avsl_topk(f(2, 5), f(3, 5), f(2, 3), f(3, 3), f(6), f(3), f(3), [2, 3], 10.0, 4, False)",
        "ValueError", r"avsl_topk: k must be an int in \[1, 3\]"),
    "avsl_backward_grad_shape": (
        "W.avsl_distance_backward(f(3, 2), f(2, 5), f(3, 5), f(2, 3), f(3, 3), f(6), f(3), f(3), [2, 3], 10.0)",
        "ValueError", r"avsl_distance_backward: grad must have shape \(2, 3\), got \(3, 2\)"),
    # the raw module: sizes it is told are checked against the bytes it is given
    "raw_ranked_blend_short_rank": (
        "C.ranked_blend(B(x), B(x), B(z(1)), B(z(2)), B(torch.empty(2, 2, 3, 4, 4)), 2, 2, 3, 16, 0, 1)",
        "ValueError", r"ranked_blend: rank must hold at least 256 bytes \(32 values of 8 bytes\), got 8"),
    "raw_soft_mask_short_attention": (
        "C.soft_mask(B(x), B(f(1, 2, 2)), B(torch.tensor(1.0)), B(torch.tensor(1.0)), B(torch.empty_like(x)), "
        "2, 3, 4, 4, 2, 2, 0, False, 1)",
        "ValueError", r"soft_mask: attention must hold at least 32 bytes"),
    "raw_size_overflow": (
        "C.ranked_blend((8, 8), (8, 8), (8, 8), (8, 8), (8, 8), 2**40, 2**40, 3, 16, 0, 1)",
        "ValueError", r"ranked_blend: b\*t\*c\*hw overflows int64"),
    "raw_negative_size": (
        "C.rise_saliency((0, 0), (0, 0), (0, 0), (0, 0), 1, -1, 2, 2, 1, 1)",
        "ValueError", r"rise_saliency: k\*h\*w must be made of non-negative sizes, got -1"),
    "raw_null_with_bytes": (
        "C.rise_apply((0, 64), B(z(2)), B(f(1, 2, 2)), B(f(1, 2, 2)), B(f(1, 1, 2, 2)), 1, 1, 2, 2, 1, 0, False, 1)",
        "ValueError", r"rise_apply: grids must not be null"),
    "raw_misaligned": (
        "C.rise_apply((x.data_ptr() + 1, 60), B(z(2)), B(f(1, 2, 2)), B(f(1, 2, 2)), B(f(1, 1, 2, 2)), 1, 1, 2, 2, 1, "
        "0, False, 1)",
        "ValueError", r"rise_apply: grids must be aligned to 4 bytes"),
    "raw_avsl_col_ptr_out_of_range": (
        "C.avsl_distance(B(f(2, 5)), B(f(3, 5)), B(f(2, 3)), B(f(3, 3)), B(f(3)), B(f(3)), "
        "B(torch.tensor([0, 1, 2, 10**6])), B(torch.zeros(2, dtype=torch.int32)), B(f(2)), B(f(2, 3)), 2, 3, [2, 3], "
        "10.0, 0, (0, 0), 1)",
        "ValueError", r"avsl_distance: row_idx must hold at least 4000000 bytes"),
    "raw_avsl_row_idx_out_of_range": (
        "C.avsl_distance(B(f(2, 5)), B(f(3, 5)), B(f(2, 3)), B(f(3, 3)), B(f(3)), B(f(3)), "
        "B(torch.tensor([0, 1, 2, 2])), B(torch.tensor([0, 7], dtype=torch.int32)), B(f(2)), B(f(2, 3)), 2, 3, "
        "[2, 3], 10.0, 0, (0, 0), 1)",
        "ValueError", r"avsl_distance: row_idx\[1\] must be in \[0, 2\) \(level pair 0\), got 7"),
    "raw_avsl_col_ptr_decreasing": (
        "C.avsl_distance(B(f(2, 5)), B(f(3, 5)), B(f(2, 3)), B(f(3, 3)), B(f(3)), B(f(3)), "
        "B(torch.tensor([0, 2, 1, 2])), B(torch.zeros(2, dtype=torch.int32)), B(f(2)), B(f(2, 3)), 2, 3, [2, 3], "
        "10.0, 0, (0, 0), 1)",
        "ValueError", r"avsl_distance: col_ptr must be non-decreasing within a level"),
    "raw_cam_workspace_short": (
        "C.avsl_cam_correlation(B(f(2, 3, 4, 4)), B(f(2, 2, 2, 2)), B(f(3, 2)), (0, 0), (0, 0), (0, 0), B(z(1)), "
        "2, 3, 4, 4, 2, 2, 2, 0.5, False, False, 0, 1)",
        "ValueError", r"avsl_cam_correlation: workspace must hold at least \d+ bytes"),
}

_CHILD = r"""
import json, re, sys
import torch
import whymatch.ops  # registers torch.ops.whymatch.*
from whymatch.ops import _ext
W, C = torch.ops.whymatch, _ext.cpu_module()
f = lambda *s: torch.rand(*s)
e = lambda *s: torch.zeros(*s)  # the issue's sizes; values do not matter
z = lambda *s: torch.zeros(*s, dtype=torch.long)
keep = []  # the buffers' tensors stay alive until the call returns
B = lambda t: (keep.append(t), _ext.buf(t))[1]
x = torch.rand(2, 3, 4, 4)
out = {}
for name, (expr, _, _) in json.loads(sys.argv[1]).items():
    try:
        eval(expr)
        out[name] = [["returned"], ""]
    except Exception as exc:  # recorded, judged by the parent
        out[name] = [[c.__name__ for c in type(exc).__mro__], str(exc)]
    keep.clear()
    print(json.dumps({name: out[name]}), flush=True)
"""


@pytest.fixture(scope="module")
def outcomes():
    env = dict(os.environ, WHYMATCH_MAX_OUTPUT_BYTES=str(1 << 34))
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(CASES)], capture_output=True, text=True,
                          timeout=240, env=env)
    seen = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            seen.update(json.loads(line))
    return proc.returncode, seen, proc.stderr[-3000:]


@pytest.mark.parametrize("name", sorted(CASES))
def test_boundary_case_raises_named_error(name, outcomes):
    rc, seen, stderr = outcomes
    _, exc_type, pattern = CASES[name]
    assert name in seen, f"the child died (exit {rc}) before or at case {name!r}: {stderr}"
    got_types, msg = seen[name]
    assert exc_type in got_types, f"{name}: expected {exc_type}, got {got_types[0]}: {msg}"
    import re
    assert re.search(pattern, msg), f"{name}: message {msg!r} does not match {pattern!r}"
    assert "\n" not in msg.strip(), f"{name}: the message must be one line, got {msg!r}"


def test_child_exited_cleanly(outcomes):
    rc, seen, stderr = outcomes
    assert rc == 0 and len(seen) == len(CASES), f"exit {rc}, {len(seen)} of {len(CASES)} cases ran: {stderr}"
