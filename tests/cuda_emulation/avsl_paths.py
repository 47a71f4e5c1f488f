"""Helpers of the emulated AVSL GPU-path tests (test_emulated_tensorcore.py, test_emulated_avsl_fused.py):
run an op through one forced GPU path of the emulated module under several thread schedules, and the
error bound of a float32 path measured against the SIMT kernel's."""
from __future__ import annotations

import os

import torch

from whymatch.ops import _ext

EPS32 = torch.finfo(torch.float32).eps


def run_path(mod, path: str, fn, schedules=("forward", "reverse")):
    """fn() with WHYMATCH_AVSL_GPU_PATH=path through the emulated module under each schedule; the
    outputs must agree bit for bit (else a race between the threads of a block). Returns the first."""
    outs = []
    saved = {k: os.environ.get(k) for k in ("WHYMATCH_AVSL_GPU_PATH", "WHYMATCH_EMU_SCHEDULE")}
    try:
        os.environ["WHYMATCH_AVSL_GPU_PATH"] = path
        for sch in schedules:
            os.environ["WHYMATCH_EMU_SCHEDULE"] = sch
            with _ext.emulate_cuda_on_cpu(mod):
                out = fn()
            outs.append(out if isinstance(out, tuple) else (out,))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            same = torch.equal(a, b) or (a.is_floating_point() and
                                         torch.equal(a.view(torch.int32), b.view(torch.int32)))
            assert same, f"two schedules disagree ({schedules}): a race between the threads of a block"
    return outs[0] if len(outs[0]) > 1 else outs[0][0]


def bound(simt_err: float, want: torch.Tensor) -> float:
    """Twice the float32 SIMT kernel's error (STYLE.md), floored at 4 float32 ulps of the largest distance."""
    floor = 4 * EPS32 * (want.abs().max().item() if want.numel() else 0.0)
    return max(2 * simt_err, floor)
