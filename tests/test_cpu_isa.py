"""Every CPU instruction-set path of the AVSL kernels against the reference.

The kernels pick AVX-512, AVX2 or the baseline at the first call; WHYMATCH_CPU_ISA caps the
choice, so each path runs here in a fresh process (the choice is made once per process).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import whymatch

_SCRIPT = r"""
import torch
import whymatch
import whymatch.ops as ops
from whymatch.ops import avsl as A, reference as ref

print("isa", whymatch.build_info()["cpu_isa"])
g = torch.Generator().manual_seed(0)
R = [33, 17, 40]
Q, G = 7, 19
qs = [torch.randn(Q, r, generator=g) for r in R]
gs = [torch.randn(G, r, generator=g) for r in R]
rq = [torch.rand(Q, r, generator=g) for r in R]
rg = [torch.rand(G, r, generator=g) for r in R]
links = [ref.avsl_link_star(torch.randn(R[i], R[i + 1], generator=g), 5) for i in range(2)]
coef = [torch.rand(r, generator=g).requires_grad_() for r in R]
bias = [(torch.rand(r, generator=g) - 0.5).requires_grad_() for r in R]
d = ops.avsl_distance(qs, gs, rq, rg, links, coef, bias, 10.0)
d_ref = ref.avsl_distance(qs, gs, rq, rg, links, coef, bias, 10.0)
torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5)
w = torch.randn(Q, G, generator=g)
gk = torch.autograd.grad((d * w).sum(), coef[1:] + bias[1:])
gr = torch.autograd.grad((d_ref * w).sum(), coef[1:] + bias[1:])
for a, b in zip(gk, gr):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
for gamma in (1e3, -1e3):  # both tails of the kernels' own sigmoid
    torch.testing.assert_close(ops.avsl_distance(qs, gs, rq, rg, links, coef, bias, gamma),
                               ref.avsl_distance(qs, gs, rq, rg, links, coef, bias, gamma), rtol=1e-5, atol=1e-5)
d64 = [[t.double() for t in part] for part in (qs, gs, rq, rg, links, coef, bias)]
torch.testing.assert_close(ops.avsl_distance(*d64, 3.0), ref.avsl_distance(*d64, 3.0), rtol=1e-12, atol=1e-12)
v, i = ops.avsl_topk(qs, gs, rq, rg, links, coef, bias, 10.0, 5)
vr, ir = ref.avsl_topk(qs, gs, rq, rg, links, coef, bias, 10.0, 5)
torch.testing.assert_close(v, vr, rtol=1e-5, atol=1e-5)
assert torch.equal(i, ir)
for low, high in ((9, 4), (14, 7)):
    c1 = torch.relu(torch.randn(3, 37, low, low, generator=g))
    c2 = torch.relu(torch.randn(3, 29, high, high, generator=g))
    torch.testing.assert_close(A.cam_correlation(c1, c2), ref.avsl_cam_correlation(c1, c2), rtol=2e-5, atol=1e-6)
    for published in (False, True):
        torch.testing.assert_close(A.cam_reliability(c1, published=published),
                                   ref.avsl_cam_reliability(c1, published=published), rtol=2e-5, atol=1e-7)
x = torch.rand(2, 3, 9, 37, generator=g)
m = torch.rand(2, 3, 5, generator=g)
for alpha in (10.0, 300.0, -300.0):  # the soft mask's exp is dispatched the same way; 300 reaches its clamp
    torch.testing.assert_close(ops.soft_mask(x, m, alpha, 0.4), ref.soft_mask(x, m, alpha, 0.4), rtol=1e-5, atol=2e-5)
torch.testing.assert_close(ops.soft_mask(x.double(), m.double(), 3.0, 0.4),
                           ref.soft_mask(x.double(), m.double(), 3.0, 0.4), rtol=1e-12, atol=1e-12)
print("ok")
"""


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_avsl_cpu_kernels_on_every_instruction_set(isa):
    env = {**os.environ, "WHYMATCH_CPU_ISA": isa}
    p = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
    used = p.stdout.split()[1]
    native = whymatch.build_info()["cpu_isa"]
    order = ["base", "avx2", "avx512"]
    assert used == order[min(order.index(isa), order.index(native))]
