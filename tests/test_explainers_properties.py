"""Property tests of the explainer entry points: any input either gives maps of the documented shape that are
finite, or a named error (ValueError / TypeError, one line); never another exception, a NaN map or a crash."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import whymatch
from whymatch.saliency import LIME, RISE, EmbeddingGradCAM, Mask, SimilarityAttention, SlidingWindow

pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NAMED = (ValueError, TypeError)


def tiny_model() -> whymatch.SimilarityModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 6))
    return whymatch.SimilarityModel(net.eval())


SIM = tiny_model()
EMB_DIM = 6

# explainers with small settings (the constructor arguments themselves are drawn in test_bad_parameters)
MAKERS = {
    "rise": lambda: RISE(SIM, n_masks=8, grid=2, batch_size=4, seed=0),
    "rise_both": lambda: RISE(SIM, n_masks=6, grid=2, batch_size=4, fixed_reference=False, n_reference_masks=2),
    "sliding": lambda: SlidingWindow(SIM, batch_size=16),
    "sliding_both": lambda: SlidingWindow(SIM, batch_size=16, fixed_reference=False),
    "lime": lambda: LIME(SIM, 8, segments="grid", n_segments=4, batch_size=4),
    "mask": lambda: Mask(SIM, n_iter=2, mask_size=3, blur_size=3),
    "mask_both": lambda: Mask(SIM, n_iter=2, mask_size=3, blur_size=3, fixed_reference=False),
    "attention": lambda: SimilarityAttention(SIM),
    "attention_layer": lambda: SimilarityAttention(SIM, "0"),
    "gradcam": lambda: EmbeddingGradCAM(SIM),
}


def one_line(e: BaseException) -> None:
    msg = str(e)
    assert msg and "\n" not in msg, f"not a one-line message: {type(e).__name__}: {msg!r}"


def run(fn):
    """fn() -> maps or a named error; returns the maps or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant maps, lasso convergence
        try:
            return fn()
        except NAMED as e:
            one_line(e)
            return None


GOOD_DTYPES = [torch.float32, torch.float32, torch.float16, torch.bfloat16]
BAD_DTYPES = [torch.float64, torch.int64, torch.bool, torch.complex64]


CORRUPTIONS = ["channels", "empty", "rank", "nan", "dtype", "not_a_tensor", "batch"]


@st.composite
def images(draw, batch=None, size=None):
    """A tensor that is usually a valid image batch (B, C, H, W) in one of several layouts and dtypes, and
    sometimes (one time in four) has exactly one thing wrong: channels, an empty side, the rank, a NaN/Inf,
    the dtype, the type, or the batch size."""
    wrong = draw(st.sampled_from([None] * 3 * len(CORRUPTIONS) + CORRUPTIONS))
    c = draw(st.sampled_from([1, 4])) if wrong == "channels" else 3
    if wrong == "empty":
        h, w = draw(st.sampled_from([(0, 4), (4, 0), (0, 0)]))
    elif size is not None and draw(st.booleans()):
        h, w = size
    else:
        h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    b = batch if batch is not None else draw(st.integers(1, 3))
    if wrong == "batch":
        b = draw(st.sampled_from([0, b + 1]))
    shape = draw(st.sampled_from([(c, h, w), (h, w), (1, b, c, h, w)])) if wrong == "rank" else (b, c, h, w)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.rand(shape, generator=g)
    if wrong == "nan":
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"),
                                                                                -float("inf")]))
    dt = draw(st.sampled_from(BAD_DTYPES if wrong == "dtype" else GOOD_DTYPES))
    x = (x > 0.5) if dt == torch.bool else (x * 255).to(dt) if dt == torch.int64 else x.to(dt)
    layout = draw(st.sampled_from(["plain"] * 4 + ["channels_last", "transposed", "expanded", "requires_grad",
                                                   "strided"]))
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed" and x.dim() >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "expanded" and x.dim() >= 1 and x.numel():
        x = x[..., :1].expand(x.shape)
    elif layout == "requires_grad" and x.is_floating_point():
        x = x.requires_grad_(True)
    elif layout == "strided" and x.dim() >= 1 and x.numel():
        x = torch.stack([x, x], dim=-1)[..., 0]
    if wrong == "not_a_tensor":
        return draw(st.sampled_from([None, x.tolist(), x.detach().numpy() if x.dtype != torch.bfloat16 else 1.0]))
    return x


def check_maps(maps, query, references, k_from_emb=None):
    assert isinstance(maps, torch.Tensor)
    q = query if query.dim() == 3 else query[0]
    k = k_from_emb if k_from_emb is not None else (1 if references.dim() == 3 else references.shape[0])
    assert maps.shape == (k, *q.shape[1:]), (maps.shape, q.shape)
    assert maps.dtype == torch.float32 and maps.device == q.device
    assert torch.isfinite(maps).all()


@settings(SETTINGS, max_examples=100)
@given(method=st.sampled_from(sorted(MAKERS)), query=images(batch=1), references=images(size=(8, 8)),
       use_emb=st.integers(0, 3), emb_rows=st.integers(0, 3), emb_dim=st.sampled_from([EMB_DIM] * 4 + [1, 7]))
def test_attribute_gives_finite_maps_or_a_named_error(method, query, references, use_emb, emb_rows, emb_dim):
    ex = MAKERS[method]()
    emb = None
    if use_emb == 3 and not method.startswith("attention"):
        emb = torch.rand(emb_rows, emb_dim)
        call = lambda: ex.attribute(query, reference_embeddings=emb)  # noqa: E731
    else:
        call = lambda: ex.attribute(query, references)  # noqa: E731
    checked = run(lambda: ex.check(query, references) if emb is None else ex.check(query, reference_embeddings=emb))
    maps = run(call)
    if maps is not None:
        check_maps(maps, query, references, None if emb is None else emb.shape[0])
    if maps is not None:  # check() accepts whatever attribute() explains
        assert checked is None


@st.composite
def tuples(draw):
    """A mode and its tuple members: usually the right count of batches of one size B, sometimes not."""
    mode = draw(st.sampled_from(["siamese", "triplet", "quadruplet"]))
    n = {"siamese": 2, "triplet": 3, "quadruplet": 4}[mode]
    if draw(st.integers(0, 9)) == 9:  # rarely the wrong count (hypothesis favours small draws)
        n = draw(st.integers(0, 5))
    b = draw(st.integers(1, 3))
    members = [draw(images(batch=b)) for _ in range(n)]
    positive = draw(st.sampled_from([True, False, True, "tensor", "wrong_len", "float", None, 1]))
    if positive == "tensor":
        positive = torch.arange(b) % 2 == 0
    elif positive == "wrong_len":
        positive = torch.ones(b + 1, dtype=torch.bool)
    elif positive == "float":
        positive = torch.rand(b)
    return mode, members, positive


@SETTINGS
@given(t=tuples())
def test_attention_tuples_give_finite_maps_or_a_named_error(t):
    mode, members, positive = t
    ex = SimilarityAttention(SIM, mode=mode)
    out = run(lambda: ex.attribute_tuples(*members, positive=positive))
    if out is not None:
        assert len(out) == len(members)
        for m, x in zip(out, members):
            assert m.shape == (x.shape[0], *x.shape[2:]) and torch.isfinite(m).all()


@SETTINGS
@given(b=st.integers(1, 3), data=st.data(), reference_maps=st.booleans(),
       method=st.sampled_from(["mask", "mask_both", "gradcam"]))
def test_pair_entries_give_finite_maps_or_a_named_error(b, data, reference_maps, method):
    queries = data.draw(images(batch=b))
    references = data.draw(images(batch=b))
    ex = MAKERS[method]()
    out = run(lambda: ex.attribute_pairs(queries, references, return_reference_maps=reference_maps))
    if out is not None:
        maps = out[0] if reference_maps else out
        assert maps.shape == (queries.shape[0], *queries.shape[2:]) and torch.isfinite(maps).all()
        if reference_maps:
            assert out[1].shape == (references.shape[0], *references.shape[2:]) and torch.isfinite(out[1]).all()


BAD_VALUES = [0, -1, 1, 2, 3, 10**12, 2**70, 0.5, -0.5, 1.5, float("nan"), float("inf"), True, None, "3", (2, 2),
              (0, 1), (2, 2, 2), [3, 3], torch.tensor(2), np.int64(3)]

PARAMS = {
    RISE: ["n_masks", "grid", "p", "batch_size", "n_reference_masks", "seed", "baseline", "normalize"],
    SlidingWindow: ["window", "stride", "padding", "batch_size", "reference_window", "reference_stride",
                    "baseline"],
    LIME: ["n_samples", "n_segments", "kernel_width", "alpha", "batch_size", "seed", "baseline", "input_mean",
           "input_std", "segments", "solver"],
    Mask: ["mask_size", "n_iter", "lr", "l1_coeff", "tv_coeff", "tv_beta", "blur_size", "blur_sigma",
           "noise_std", "batch_size", "seed", "perturbation", "baseline", "preset"],
    SimilarityAttention: ["batch_size", "target_layers", "mode"],
    EmbeddingGradCAM: ["batch_size", "target_layers"],
}
SMALL = {RISE: dict(n_masks=4, grid=2, batch_size=4), SlidingWindow: dict(batch_size=64),
         LIME: dict(n_samples=6, segments="grid", n_segments=4), Mask: dict(n_iter=1, mask_size=3, blur_size=3),
         SimilarityAttention: {}, EmbeddingGradCAM: {}}


@SETTINGS
@given(cls=st.sampled_from(list(PARAMS)), data=st.data())
def test_bad_parameters_give_a_named_error_or_work(cls, data):
    name = data.draw(st.sampled_from(PARAMS[cls]))
    value = data.draw(st.sampled_from(BAD_VALUES))
    kwargs = {**SMALL[cls], name: value}
    if name in ("n_masks", "n_samples", "n_iter", "n_reference_masks") and isinstance(value, int) \
            and not isinstance(value, bool) and value > 64:
        kwargs[name] = 64 if name == "n_iter" else value  # a huge count must be refused, not attempted
    q = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    r = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ex = run(lambda: cls(SIM, **kwargs))
    if ex is None:
        return
    maps = run(lambda: ex.attribute(q, r))
    if maps is not None:
        check_maps(maps, q, r)


@pytest.mark.parametrize("method", sorted(MAKERS))
def test_every_float_dtype_and_layout_explains(method):
    """Valid inputs in every accepted dtype and layout give the same maps as float32 contiguous ones (to the
    dtype's precision), for the query and for the references."""
    g = torch.Generator().manual_seed(3)
    q, r = torch.rand(3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        base = MAKERS[method]().attribute(q, r)
        variants = {"channels_last": (q, r.contiguous(memory_format=torch.channels_last)),
                    "transposed": (q.transpose(1, 2).contiguous().transpose(1, 2), r.transpose(2, 3).contiguous()
                                   .transpose(2, 3)),
                    "requires_grad": (q.clone().requires_grad_(True), r.clone().requires_grad_(True)),
                    "float16": (q.half(), r.half()), "bfloat16": (q.bfloat16(), r.bfloat16()),
                    "refs float16": (q, r.half())}
        for name, (qv, rv) in variants.items():
            out = MAKERS[method]().attribute(qv, rv)
            check_maps(out, q, r)
            if not name.endswith("float16") and name != "bfloat16":
                torch.testing.assert_close(out, base, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", sorted(MAKERS))
def test_wrong_device_and_embedding_size_are_named(method):
    q, r = torch.rand(3, 8, 8), torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="query must be on the model's device cpu, got meta"):
        MAKERS[method]().attribute(q.to("meta"), r)
    with pytest.raises(ValueError, match="references must be on the model's device cpu, got meta"):
        MAKERS[method]().attribute(q, r.to("meta"))
    with pytest.raises(ValueError, match="references must not be empty"):
        MAKERS[method]().attribute(q, r[:0])
    if not method.startswith(("attention", "rise_both", "sliding_both", "mask_both")):
        with pytest.raises(ValueError, match=r"got shapes \(\d+, 6\) and \(\d+, 7\)"):
            MAKERS[method]().attribute(q, reference_embeddings=torch.rand(2, 7))


def test_property_examples_cover_both_outcomes():
    """The strategies above reach both sides: valid inputs explained and bad ones refused."""
    q, r = torch.rand(3, 8, 8), torch.rand(2, 3, 8, 8)
    for make in MAKERS.values():
        check_maps(run(lambda: make().attribute(q, r)), q, r)
    for bad in (q.double(), q[None, None], torch.rand(4, 8, 8), torch.full((3, 8, 8), float("nan"))):
        for make in MAKERS.values():
            with pytest.raises(NAMED):
                make().attribute(bad, r)
