"""`whymatch explain` on a CPU (issue 15): start-up without torch._dynamo, the per-phase timing line, the cheap
up-front estimate, and RISE's batch loop (one reused input buffer, no per-batch temporaries)."""

from __future__ import annotations

import subprocess
import sys

import torch

from whymatch import ops
from whymatch.ops import _lazy_dynamo


def test_first_op_call_does_not_import_dynamo():
    # a fresh interpreter: this test process may have imported torch._dynamo already (torch.compile tests)
    code = ("import sys, torch, whymatch.ops as o\n"
            "g = (torch.rand(3, 4, 4) < 0.5).float(); s = torch.zeros(3, 2, dtype=torch.long)\n"
            "x = o.rise_apply(g, s, torch.rand(3, 16, 16), 0.0)\n"
            "sal = o.rise_saliency(g, s, torch.rand(3, 2), (16, 16))\n"
            "a = torch.rand(1, 1, 4, 4, requires_grad=True)\n"
            "o.soft_mask(torch.rand(1, 3, 8, 8), a, 2.0, 0.5).sum().backward()\n"
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'clean', a.grad is not None)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["clean", "True"]


def test_deferred_kernels_still_work_under_torch_compile():
    assert _lazy_dynamo.defer_dynamo_import() >= 12  # every whymatch kernel, already deferred at import
    g = (torch.rand(5, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    s = torch.randint(0, 4, (5, 2), generator=torch.Generator().manual_seed(1))
    img = torch.rand(3, 16, 16)
    base = torch.zeros(3, 16, 16)

    def f(g, s, i, b):
        return torch.ops.whymatch.rise_apply(g, s, i, b, torch.float32, False) * 2

    eager = f(g, s, img, base)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(g, s, img, base)
    assert torch.equal(eager, compiled)
    assert "torch._dynamo" in sys.modules
    assert torch.equal(ops.rise_apply(g, s, img, base) * 2, eager)  # eager again, through torch's own disable
