"""The perturbation kernels' vector paths (csrc/perturb/blend_cpu.h) against the reference: streaming
(non-temporal) stores forced on and off, rows whose length is not a multiple of the vector width,
outputs whose address is not 32- or 64-byte aligned (out= slices at every element offset), every
output dtype and channels_last, and each instruction set (AVX-512, AVX2, baseline) in a fresh process."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import whymatch.ops as ops
from whymatch.ops import reference as ref

from helpers import TOL

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEVER = str(1 << 62)  # WHYMATCH_STREAM_MIN_BYTES: no output is that large


def _rise_inputs(n, c, h, w, s, gen):
    grids = torch.rand(n, s, s, generator=gen)  # not binary: every lerp weight shows
    ch, cw = math.ceil(h / s), math.ceil(w / s)
    shifts = torch.stack([torch.randint(0, ch, (n,), generator=gen), torch.randint(0, cw, (n,), generator=gen)], 1)
    image = torch.rand(c, h, w, generator=gen) * 4 - 2
    base = torch.rand(c, h, w, generator=gen)
    return grids, shifts, image, base


def _offset_out(n, c, h, w, dtype, offset, channels_last):
    """An (n, c, h, w) view into a NaN-filled flat buffer, starting `offset` elements in (so its
    address is offset * itemsize bytes past an aligned one), and the buffer."""
    flat = torch.full((offset + n * c * h * w + 7,), float("nan"), dtype=dtype)
    if channels_last:
        strides = (h * w * c, 1, w * c, c)
    else:
        strides = (c * h * w, h * w, w, 1)
    return flat.as_strided((n, c, h, w), strides, offset), flat


@pytest.mark.parametrize("stream", ["0", NEVER])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(3, 3, 7, 37, 4), (2, 1, 5, 16, 3), (2, 3, 3, 67, 5), (4, 2, 9, 1, 2)])
def test_rise_apply_unaligned_out_every_offset(stream, dtype, channels_last, shape, gen, monkeypatch):
    monkeypatch.setenv("WHYMATCH_STREAM_MIN_BYTES", stream)
    n, c, h, w, s = shape
    grids, shifts, image, base = _rise_inputs(n, c, h, w, s, gen)
    want = ref.rise_apply(grids, shifts, image, base, dtype, channels_last)
    for offset in (0, 1, 3, 5, 8, 13, 16, 31):  # 32 half/bf16 or 16 floats fill one 64-byte line
        out, flat = _offset_out(n, c, h, w, dtype, offset, channels_last)
        got = ops.rise_apply(grids, shifts, image, base, channels_last=channels_last, out=out)
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
        used = n * c * h * w
        assert flat[:offset].float().isnan().all() and flat[offset + used:].float().isnan().all(), offset


def _baselines(c, h, w, gen):
    """Baselines whose planes are constant in every way the kernel tells apart (it reads a constant plane
    as one value): all zero, one value, another value per channel, one plane constant and the others not,
    0.0 and -0.0 mixed (bitwise not constant), a NaN plane."""
    rand = torch.rand(c, h, w, generator=gen)
    per_channel = torch.arange(1, c + 1, dtype=torch.float32).view(c, 1, 1).expand(c, h, w).contiguous() * 0.3
    one_plane = rand.clone()
    one_plane[0] = -1.5
    signed_zero = torch.zeros(c, h, w)
    signed_zero[..., ::2] = -0.0
    nan_plane = rand.clone()
    nan_plane[-1] = float("nan")
    return {"zero": torch.zeros(c, h, w), "scalar": torch.full((c, h, w), 0.7), "per_channel": per_channel,
            "one_plane": one_plane, "signed_zero": signed_zero, "nan_plane": nan_plane}


BASELINE_KINDS = ["zero", "scalar", "per_channel", "one_plane", "signed_zero", "nan_plane"]


@pytest.mark.parametrize("kind", BASELINE_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_rise_apply_constant_baseline_planes_match_the_general_path(kind, dtype, channels_last, gen):
    """A constant baseline plane is read as one value: the reference agrees, and the result is bit for bit
    the general path's (the same baseline with one pixel of each plane changed, which makes no plane
    constant, changes only the outputs at that pixel)."""
    n, c, h, w, s = 4, 3, 6, 37, 4
    grids, shifts, image, _ = _rise_inputs(n, c, h, w, s, gen)
    base = _baselines(c, h, w, gen)[kind]
    got = ops.rise_apply(grids, shifts, image, base, dtype=dtype, channels_last=channels_last)
    want = ref.rise_apply(grids, shifts, image, base, dtype, channels_last)
    torch.testing.assert_close(got.float(), want.float(), equal_nan=True, **TOL[dtype])
    broken = base.clone()
    broken[:, 2, 5] += 1.0  # no plane is constant now; only pixel (2, 5) of the outputs may change
    general = ops.rise_apply(grids, shifts, image, broken, dtype=dtype, channels_last=channels_last)
    keep = torch.ones(h, w, dtype=torch.bool)
    keep[2, 5] = False
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.contiguous().view(bits)[..., keep], general.contiguous().view(bits)[..., keep])


@pytest.mark.parametrize("stream", ["0", NEVER])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_rise_apply_bands_and_mask_blocks(stream, dtype, channels_last, gen, monkeypatch):
    """Images wide enough that the kernel writes each block of masks in several bands of rows (and blocks
    of a few masks): every band, block and chunk boundary against the reference, constant and random
    baselines, 1 and 2 threads."""
    monkeypatch.setenv("WHYMATCH_STREAM_MIN_BYTES", stream)
    n, c, h, w, s = 23, 3, 50, 700, 4
    grids, shifts, image, base = _rise_inputs(n, c, h, w, s, gen)
    for b in (base, torch.zeros_like(base)):
        want = ref.rise_apply(grids, shifts, image, b, dtype, channels_last).float()
        for threads in (1, 2):
            ops.set_num_threads(threads)
            try:
                got = ops.rise_apply(grids, shifts, image, b, dtype=dtype, channels_last=channels_last)
            finally:
                ops.set_num_threads(None)
            torch.testing.assert_close(got.float(), want, **TOL[dtype])


@pytest.mark.parametrize("stream", ["0", NEVER])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hw", [(5, 7), (4, 16), (3, 43), (1, 1)])
def test_ranked_blend_vector_paths_exact(stream, dtype, hw, gen, monkeypatch):
    """Odd plane sizes put every (pair, step, channel) plane of the output at another alignment."""
    monkeypatch.setenv("WHYMATCH_STREAM_MIN_BYTES", stream)
    b, c, t = 3, 3, 6
    h, w = hw
    first = (torch.rand(b, c, h, w, generator=gen) * 10).to(dtype)
    second = (torch.rand(b, c, h, w, generator=gen) - 5).to(dtype)
    first[0, 0, 0, 0] = float("nan")  # a bitwise select copies NaN as it is
    rank = torch.stack([torch.randperm(h * w, generator=gen) for _ in range(b)])
    counts = torch.tensor([0, h * w, 1, (h * w) // 2, h * w + 5, 3])
    got = ops.ranked_blend(first, second, rank, counts)
    want = ref.ranked_blend(first, second, rank, counts)
    assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want.view(torch.int16 if dtype != torch.float32 else torch.int32))
    # inputs that are offset slices (unaligned loads)
    f2 = torch.cat([torch.zeros(1, dtype=dtype), first.flatten()])[1:].view_as(first)
    assert torch.equal(ops.ranked_blend(f2, second, rank, counts).float().nan_to_num(7.0), want.float().nan_to_num(7.0))


def test_stream_threshold_env_is_read_per_call(gen, monkeypatch):
    """Bad values are ignored (the 4 MiB default); results do not depend on the setting."""
    grids, shifts, image, base = _rise_inputs(3, 3, 11, 21, 4, gen)
    outs = []
    for v in ("0", NEVER, "not-a-number", "-5", ""):
        monkeypatch.setenv("WHYMATCH_STREAM_MIN_BYTES", v)
        outs.append(ops.rise_apply(grids, shifts, image, base))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)


_ISA_SCRIPT = textwrap.dedent(r"""
    import math, torch, whymatch
    import whymatch.ops as ops
    from whymatch.ops import reference as ref
    print("isa", whymatch.build_info()["cpu_isa"])
    g = torch.Generator().manual_seed(3)
    TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
    for n, c, h, w, s in ((3, 3, 7, 37, 4), (2, 1, 5, 16, 3), (2, 3, 3, 67, 5)):
        grids = torch.rand(n, s, s, generator=g)
        shifts = torch.stack([torch.randint(0, math.ceil(h / s), (n,), generator=g),
                              torch.randint(0, math.ceil(w / s), (n,), generator=g)], 1)
        image, rand = torch.rand(c, h, w, generator=g) * 4 - 2, torch.rand(c, h, w, generator=g)
        per_channel = torch.arange(c, dtype=torch.float32).view(c, 1, 1).expand(c, h, w).contiguous()
        for base, dt in [(b, dt) for b in (rand, torch.zeros(c, h, w), per_channel) for dt in TOL]:
            for cl in (False, True):
                want = ref.rise_apply(grids, shifts, image, base, dt, cl).float()
                for off in (0, 1, 5, 13):
                    flat = torch.full((off + n * c * h * w,), float("nan"), dtype=dt)
                    st = (h * w * c, 1, w * c, c) if cl else (c * h * w, h * w, w, 1)
                    out = flat.as_strided((n, c, h, w), st, off)
                    ops.rise_apply(grids, shifts, image, base, channels_last=cl, out=out)
                    torch.testing.assert_close(out.float(), want, rtol=TOL[dt], atol=TOL[dt])
    for dt in TOL:
        first, second = torch.rand(2, 3, 5, 7, generator=g).to(dt), torch.rand(2, 3, 5, 7, generator=g).to(dt)
        rank = torch.stack([torch.randperm(35, generator=g) for _ in range(2)])
        counts = torch.tensor([0, 35, 9, 17])
        assert torch.equal(ops.ranked_blend(first, second, rank, counts), ref.ranked_blend(first, second, rank, counts))
    print("ok")
""")


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_every_isa_path_streaming(isa):
    """The narrower instruction-set paths (chosen once per process: WHYMATCH_CPU_ISA caps it) with
    streaming stores forced on; the best path this CPU has runs in this process (the tests above).
    A cap above what the CPU has runs the best path it has."""
    env = dict(os.environ, WHYMATCH_CPU_ISA=isa, WHYMATCH_STREAM_MIN_BYTES="0")
    p = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().endswith("ok"), p.stdout
    if isa == "base":
        assert "isa base" in p.stdout


def _public_calls(gen):
    grids, shifts, image, base = _rise_inputs(5, 3, 9, 11, 4, gen)
    scores = torch.randn(5, 2, generator=gen)
    first, second = torch.rand(2, 3, 4, 5, generator=gen), torch.rand(2, 3, 4, 5, generator=gen)
    rank = torch.stack([torch.randperm(20, generator=gen) for _ in range(2)])
    return {
        "rise_apply": lambda: ops.rise_apply(grids, shifts, image, base),
        "rise_apply_bf16_cl": lambda: ops.rise_apply(grids, shifts, image, 0.25, dtype=torch.bfloat16,
                                                      channels_last=True),
        "rise_apply_out": lambda: ops.rise_apply(grids, shifts, image, base, out=torch.empty(5, 3, 9, 11)),
        "rise_saliency": lambda: ops.rise_saliency(grids, shifts, scores, (9, 11)),
        "ranked_blend": lambda: ops.ranked_blend(first, second, rank, torch.tensor([0, 7, 20])),
    }


@pytest.mark.parametrize("name", list(_public_calls(torch.Generator().manual_seed(0))))
def test_direct_cpu_launch_equals_the_registered_op(name, monkeypatch):
    """The public functions launch the CPU kernel themselves in plain eager mode (no dispatcher cost);
    the result is the registered op's, bit for bit, and under a dispatch mode the op is what runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from whymatch.ops import _ext

    call = _public_calls(torch.Generator().manual_seed(1))[name]
    direct = call()
    monkeypatch.setattr(_ext, "direct_cpu", False)
    via_op = call()
    assert direct.dtype == via_op.dtype and direct.stride() == via_op.stride()
    assert torch.equal(direct, via_op)
    monkeypatch.setattr(_ext, "direct_cpu", True)

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        call()
    if name != "rise_saliency":  # (its tiny case takes the grouped pure-torch path)
        assert any(n.startswith("whymatch.") for n in rec.names), rec.names


def test_direct_out_write_bumps_the_version_counter(gen):
    grids, shifts, image, base = _rise_inputs(2, 3, 6, 6, 3, gen)
    out = torch.empty(2, 3, 6, 6)
    v = out._version
    ops.rise_apply(grids, shifts, image, base, out=out)
    assert out._version > v


def test_inputs_that_need_grad_go_through_the_registered_op(gen):
    """The fast route is for plain eager calls only: an input that requires grad (or a functorch
    transform) takes the registered op, whatever it decides."""
    from whymatch.ops import _ext

    grids, shifts, image, base = _rise_inputs(2, 3, 6, 6, 3, gen)
    assert _ext.eager_cpu(grids, shifts, image, base)
    assert not _ext.eager_cpu(grids, shifts, image.requires_grad_(), base)
    with torch.no_grad():
        assert _ext.eager_cpu(grids, shifts, image, base)
    assert torch.func.vmap(lambda g: torch.tensor(float(_ext.eager_cpu(g))))(grids).sum() == 0
