"""The explainer registry (whymatch.saliency.registry) and the base every explainer shares (issue 18, item 4)."""

from __future__ import annotations

import argparse
import inspect
import warnings

import pytest
import torch
from torch import nn

import whymatch
from whymatch import jobs, saliency
from whymatch.saliency import base, registry

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_sim():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    return whymatch.SimilarityModel(net.eval())


def test_every_registered_method_is_what_the_jobs_know():
    assert registry.method_names() == tuple(registry.EXPLAINERS) == jobs.METHODS
    assert len(set(registry.method_names())) == len(registry.method_names())


@pytest.mark.parametrize("name", registry.method_names())
def test_every_option_sets_a_constructor_keyword_of_its_explainer(name):
    spec = registry.get(name)
    params = inspect.signature(spec.cls.__init__).parameters
    assert list(params)[1] == "sim"  # sim is the first argument of every explainer
    for o in spec.all_options():
        assert o.param in params, f"{name}: option {o.setting} sets {o.param!r}, not a keyword of {spec.cls}"
        assert spec.cls in o.owners
        assert o.default() == params[o.param].default  # the default is the explainer's own, read not repeated
    for k in spec.fixed:
        assert k in params


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match=r"method must be one of rise, sliding, .*gradcam, got 'nope'"):
        registry.get("nope")
    with pytest.raises(ValueError, match="method must be one of"):
        jobs.make_explainer("nope", tiny_sim(), jobs.JobSettings())
    with pytest.raises(ValueError, match="setting must be one of"):
        registry.setting_default("nope")
    with pytest.raises(ValueError, match="attention takes the settings target_layer, show_progress; got n_masks"):
        registry.build("attention", tiny_sim(), None, n_masks=3)


def test_make_explainer_passes_each_method_its_settings():
    sim = tiny_sim()
    s = jobs.JobSettings(n_masks=7, grid=3, p=0.25, batch_size=5, window=4, stride=2, fixed_reference=False,
                         seed=9, lime_samples=11, lime_segments="grid", mask_iters=3, target_layer="0",
                         show_progress=True)
    rise = jobs.make_explainer("rise", sim, s)
    assert isinstance(rise, saliency.RISE)
    assert (rise.n_masks, rise.grid, rise.p, rise.batch_size, rise.fixed_reference, rise.seed,
            rise.show_progress) == (7, 3, 0.25, 5, False, 9, True)
    sw = jobs.make_explainer("sliding", sim, s)
    assert isinstance(sw, saliency.SlidingWindow) and sw.batch_size == 5 and sw.fixed_reference is False
    assert (sw.window, sw.stride) == ((4, 4), (2, 2))
    lime = jobs.make_explainer("lime", sim, s)
    assert (lime.n_samples, lime.segments, lime.batch_size, lime.seed) == (11, "grid", 5, 9)
    mask = jobs.make_explainer("mask", sim, s)
    assert (mask.n_iter, mask.fixed_reference, mask.seed) == (3, False, 9)
    att = jobs.make_explainer("attention", sim, s)
    assert isinstance(att, saliency.SimilarityAttention) and att.mode == "siamese"
    assert att.target_layer_names == ["0"]
    cam = jobs.make_explainer("gradcam", sim, s)
    assert isinstance(cam, saliency.EmbeddingGradCAM) and cam.target_layer_names == ["0"]


def test_a_setting_left_none_takes_the_explainers_default():
    sim = tiny_sim()
    ex = registry.build("sliding", sim, jobs.JobSettings(window=None, stride=None))
    assert ex.boxes((16, 16)).shape == saliency.SlidingWindow(sim).boxes((16, 16)).shape
    rise = registry.build("rise", sim, None, n_masks=3)  # no settings object: defaults plus the overrides
    assert rise.n_masks == 3 and rise.grid == saliency.RISE(sim).grid


def test_cli_options_round_trip_through_argparse():
    opts = registry.cli_options()
    flags = [o.flag for o in opts]
    assert len(flags) == len(set(flags)) and None not in flags
    parser = argparse.ArgumentParser()
    for o in opts:
        parser.add_argument(o.flag, default=o.job_value(), **o.argparse_kwargs())
    default = parser.parse_args([])
    for o in opts:
        assert getattr(default, o.setting) == registry.setting_default(o.setting)
    args = parser.parse_args(["--both-images", "--n-masks", "7", "--lime-segments", "grid", "--progress"])
    assert args.fixed_reference is False and args.n_masks == 7 and args.show_progress is True
    rise = registry.build("rise", tiny_sim(), args)
    assert (rise.n_masks, rise.fixed_reference, rise.show_progress) == (7, False, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--lime-segments", "felzenszwalb"])


def test_attention_takes_sim_first_and_still_accepts_model():
    sim = tiny_sim()
    assert saliency.SimilarityAttention(sim, "0").sim is sim
    assert saliency.SimilarityAttention(sim=sim).sim is sim
    with pytest.warns(DeprecationWarning, match=r"model=\.\.\.\) is deprecated: the first argument is sim"):
        old = saliency.SimilarityAttention(model=sim, target_layers="0", mode="triplet")
    assert old.sim is sim and old.mode == "triplet" and old.target_layer_names == ["0"]
    with pytest.raises(TypeError, match="not both"):
        saliency.SimilarityAttention(sim, model=sim)
    with pytest.raises(TypeError, match="missing the similarity model"):
        saliency.SimilarityAttention()


@pytest.mark.parametrize("name", registry.method_names())
def test_every_explainer_shares_the_base_and_its_batch_size_policy(name):
    spec = registry.get(name)
    sim = tiny_sim()
    assert issubclass(spec.cls, base.Explainer)
    ex = spec.cls(sim)
    assert ex.sim is sim and ex.device == sim.device and ex.show_progress is False
    assert ex.batch_size == base.DEFAULT_BATCH_SIZE[spec.cls.batch_kind]
    assert spec.cls(sim, batch_size=3).batch_size == 3
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        spec.cls(sim, batch_size=0)
    with pytest.raises(TypeError, match="sim must be a whymatch.SimilarityModel, got int"):
        spec.cls(42)


def test_the_batch_size_policy_by_what_a_batch_holds():
    kinds = {n: registry.get(n).cls.batch_kind for n in registry.method_names()}
    assert kinds == {"rise": "images", "sliding": "images", "lime": "images", "mask": "pairs",
                     "attention": "pairs", "gradcam": "pairs"}
    assert base.default_batch_size("images") > base.default_batch_size("pairs")
    with pytest.raises(ValueError, match="kind must be one of"):
        base.default_batch_size("tuples")
    with pytest.raises(NotImplementedError, match="must implement attribute"):
        base.Explainer(tiny_sim()).attribute(torch.zeros(3, 8, 8), torch.zeros(1, 3, 8, 8))


TINY = jobs.JobSettings(n_masks=8, batch_size=4, lime_samples=8, lime_segments="grid", mask_iters=2,
                        window=4, stride=4)


@pytest.mark.parametrize("name", registry.method_names())
def test_attribute_returns_one_map_per_reference_on_the_models_device(name):
    sim = tiny_sim()
    g = torch.Generator().manual_seed(0)
    q, refs = torch.rand(3, 12, 12, generator=g), torch.rand(2, 3, 12, 12, generator=g)
    ex = registry.build(name, sim, TINY)
    ex.check(q, refs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny random model may give a constant map: not the point here
        maps = ex.attribute(q, refs)
    assert maps.shape == (2, 12, 12) and maps.dtype == torch.float32 and maps.device == sim.device
    with pytest.raises(ValueError, match="query must be"):
        ex.attribute(torch.rand(2, 3, 12, 12), refs)


@pytest.mark.parametrize("name", ("rise", "lime", "attention", "gradcam"))
def test_show_progress_draws_one_bar_over_the_batches(name, capsys):
    sim = tiny_sim()
    q, refs = torch.rand(3, 12, 12), torch.rand(2, 3, 12, 12)
    ex = registry.build(name, sim, TINY, show_progress=True)
    ex.batch_size = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex.attribute(q, refs)
    assert "batch" in capsys.readouterr().err


def test_job_settings_take_their_defaults_from_the_registry():
    import dataclasses

    settings = {o.setting for o in registry.SHARED_OPTIONS} | {o.setting for s in registry.EXPLAINERS.values()
                                                                for o in s.options}
    fields = {f.name for f in dataclasses.fields(jobs.JobSettings)}
    assert fields - settings == {"n_steps"}  # every other field is a registered method setting
    d = jobs.JobSettings()
    for name in fields & settings:
        assert getattr(d, name) == registry.setting_default(name)
    own = inspect.signature(saliency.RISE.__init__).parameters
    assert (d.grid, d.p) == (own["grid"].default, own["p"].default)  # RISE's own defaults, not a copy
    assert jobs.make_explainer("rise", tiny_sim(), d).grid == saliency.RISE(tiny_sim()).grid
