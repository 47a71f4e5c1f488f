"""Every explainer called from several threads on one shared SimilarityModel gives the serial result."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import whymatch
from whymatch.saliency import LIME, RISE, EmbeddingGradCAM, Mask, SimilarityAttention, SlidingWindow

pytestmark = pytest.mark.usefixtures("single_thread")

N_THREADS = 4


class Yield(nn.Module):
    """Sleeps a little in the forward pass, so that the threads' forward passes interleave."""

    def forward(self, x):
        time.sleep(0.001)
        return x


def shared_model() -> whymatch.SimilarityModel:
    torch.manual_seed(9)  # weights whose gradient maps are not constant for these inputs (checked below)
    net = nn.Sequential()
    net.add_module("c1", nn.Conv2d(3, 6, 3, padding=1))
    net.add_module("r1", nn.ReLU())
    net.add_module("y1", Yield())
    net.add_module("c2", nn.Conv2d(6, 8, 3, padding=1, stride=2))
    net.add_module("r2", nn.ReLU())
    net.add_module("y2", Yield())
    net.add_module("gap", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(8, 5))
    return whymatch.SimilarityModel(net.eval())


EXPLAINERS = {
    "rise": lambda sim: RISE(sim, n_masks=24, grid=4, batch_size=8, seed=0),
    "rise_both": lambda sim: RISE(sim, n_masks=16, grid=4, batch_size=8, seed=0, fixed_reference=False,
                                  n_reference_masks=3),
    "sliding": lambda sim: SlidingWindow(sim, window=6, stride=3, batch_size=8),
    "lime": lambda sim: LIME(sim, 24, segments="grid", n_segments=6, batch_size=8, seed=0),
    # SANE's settings: the 'real' preset's L1 weight keeps every pixel of this small model (a constant map)
    "mask": lambda sim: Mask(sim, preset="sane", n_iter=4, mask_size=4, blur_size=3, seed=0),
    "attention": lambda sim: SimilarityAttention(sim, "c2"),
    "attention_auto": lambda sim: SimilarityAttention(sim),
    "attention_triplet": lambda sim: SimilarityAttention(sim, ["c1", "r2"], mode="triplet"),
    "gradcam": lambda sim: EmbeddingGradCAM(sim, "c2", batch_size=1),
    "gradcam_auto": lambda sim: EmbeddingGradCAM(sim),
}


def inputs(i: int):
    g = torch.Generator().manual_seed(100 + i)
    return torch.rand(3, 12, 12, generator=g), torch.rand(2, 3, 12, 12, generator=g)


def call(ex, i: int):
    q, r = inputs(i)
    if getattr(ex, "mode", None) == "triplet":
        return ex.attribute(q, r, negatives=r.flip(0))
    return ex.attribute(q, r)


def run_threaded(make, sim, n_calls):
    """Per call index: the result of a fresh explainer in each call, and of one explainer shared by all."""
    shared = make(sim)
    with ThreadPoolExecutor(N_THREADS) as pool:
        fresh = list(pool.map(lambda i: call(make(sim), i), range(n_calls)))
        same = list(pool.map(lambda i: call(shared, i), range(n_calls)))
    return fresh, same


@pytest.mark.parametrize("method", list(EXPLAINERS))
def test_threads_give_the_serial_result(method):
    sim = shared_model()
    make = EXPLAINERS[method]
    n_calls = 2 * N_THREADS
    serial = [call(make(sim), i) for i in range(n_calls)]
    rng = torch.random.get_rng_state()
    fresh, same = run_threaded(make, sim, n_calls)
    for i in range(n_calls):
        assert torch.isfinite(serial[i]).all()
        flat = serial[i].flatten(1)
        assert (flat.amax(1) > flat.amin(1)).any()  # informative maps, so equal results mean something
        torch.testing.assert_close(fresh[i], serial[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(same[i], serial[i], rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.random.get_rng_state(), rng)  # no call touches the global generator
    for m in sim.modules():  # nothing left behind on the shared model
        assert not m._forward_hooks and not m._backward_hooks
    assert all(p.grad is None for p in sim.parameters())


def test_every_method_at_once_on_one_model():
    """Black-box and gradient explainers interleave on one model: hooked passes see only their own thread."""
    sim = shared_model()
    methods = ["attention", "gradcam", "attention_auto", "rise", "sliding", "gradcam_auto", "lime", "mask"]
    serial = {m: call(EXPLAINERS[m](sim), 0) for m in methods}
    jobs = [m for m in methods for _ in range(2)]
    with ThreadPoolExecutor(len(methods)) as pool:
        got = list(pool.map(lambda m: (m, call(EXPLAINERS[m](sim), 0)), jobs))
    for m, out in got:
        torch.testing.assert_close(out, serial[m], rtol=1e-5, atol=1e-6)
