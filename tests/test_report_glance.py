"""The report read at a glance: metric names in words with their direction, integers as integers, a colour
bar with its scale, maps scaled so that a weak match looks weak, constant maps flagged, detail text folded,
and the ranked-list report."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
import torch
from PIL import Image

from whymatch.viz import METRICS, format_table, is_constant, metric_label, write_ranked_report, write_report
from whymatch.viz.overlay import _jet


def _pair(sims=(0.95, 0.1), size=16, maps=None, name="q"):
    g = torch.Generator().manual_seed(0)
    k = len(sims)
    if maps is None:
        maps = {"rise": torch.rand(k, size, size, generator=g)}
    return {"name": name, "query": torch.zeros(3, size, size), "references": [torch.rand(3, size, size, generator=g)
                                                                             for _ in range(k)],
            "maps": maps, "similarity": torch.tensor(sims)}


def _rgb(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def _heat(path):
    """The overlay's pixels as (N, 3), without the white peak cross (the query images here are black, so a
    pixel is half the colour of the map)."""
    img = _rgb(path).reshape(-1, 3)
    return img[~(img >= 250).all(-1)]


def test_the_summary_names_metrics_in_words_with_direction_and_meaning(tmp_path):
    summary = [{"method": "rise", "insertion_auc": 0.81234, "deletion_auc": 0.2, "pointing_acc": 0.9,
                "mass_on_key": 0.3, "sec_per_query": 1.5, "refs_per_query": 3.0, "attribute_top1": 0.5},
               {"method": "lime", "refs_per_query": 2.5, "my_own_score": 7}]
    text = write_report(tmp_path / "r", [_pair()], summary).read_text()
    head = re.search(r"<table><tr>(.*?)</tr>", text).group(1)
    for key in ("insertion_auc", "deletion_auc", "pointing_acc", "mass_on_key", "sec_per_query", "attribute_top1"):
        assert key not in head and f">{metric_label(key)}</th>" in head
        assert html.escape(METRICS[key].meaning) in text  # the one-line meaning under the table
    assert "Insertion AUC ↑" in head and "Deletion AUC ↓" in head and "Seconds per query ↓" in head
    assert ">my_own_score</th>" in head  # an unknown key is shown as it is
    cells = re.findall(r"<td>([^<]*)</td>", text)
    assert "3" in cells and "3.000" not in cells and "2.50" in cells and "0.812" in cells and "7" in cells
    # the terminal table keeps the keys (scripts grep them) and prints integers as integers too
    t = format_table(summary)
    assert "insertion_auc" in t and "| 3 " in t and "3.000" not in t


def test_every_metric_the_jobs_write_has_a_name_and_meaning(tmp_path):
    from toy_models import tiny_cnn
    from whymatch import SimilarityModel
    from whymatch.jobs import JobSettings, explain_sets, summarize

    sim = SimilarityModel(tiny_cnn(), "cosine")
    g = torch.Generator().manual_seed(0)
    key = torch.zeros(16, 16, dtype=torch.bool)
    key[2:8, 2:8] = True
    sets = explain_sets(sim, [("q", torch.rand(3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g), key)],
                        ("gradcam",), JobSettings(n_steps=2, batch_size=8))
    keys = {k for row in summarize(sets, ("gradcam",)) for k in row}
    keys |= {k for row in sets[0].pair_metrics["gradcam"] for k in row}
    keys |= {"attribute", "query_attribute", "attribute_shared", "attribute_top1"}  # added by the demo's SANE step
    missing = sorted(k for k in keys if k not in METRICS)
    assert not missing, f"metrics without a name and meaning: {missing}"
    assert all(METRICS[k].direction in ("↑", "↓", "") and METRICS[k].meaning for k in keys)


def test_maps_relative_to_the_similarity_make_a_weak_match_look_weak(tmp_path):
    same = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(3)).expand(2, -1, -1).clone()
    index = write_report(tmp_path / "r", [_pair((0.95, 0.109), maps={"rise": same})], [])
    strong, weak = _heat(index.parent / "p0_ref0_rise.png"), _heat(index.parent / "p0_ref1_rise.png")
    # the weak pair's strongest colour is the colour bar's 0.109 (dark blue), the strong pair's reaches 0.95
    assert weak[:, 0].max() <= 1 and strong[:, 0].max() >= 0.5 * 255 * _jet(np.array(0.9))[0] - 1
    assert np.allclose(weak.max(0), 0.5 * 255 * _jet(np.array(0.109)), atol=2)
    text = index.read_text()
    assert "Colour scale (similarity)" in text and "similarity 0.109" in text and "colorbar.png" in text
    assert (index.parent / "colorbar.png").is_file()
    # a negative similarity is drawn at the bottom of the bar
    index = write_report(tmp_path / "n", [_pair((-0.4,), maps={"rise": same[:1]})], [])
    assert _heat(index.parent / "p0_ref0_rise.png")[:, 0].max() <= 1


def test_the_shared_scale_of_a_query_makes_a_weaker_map_look_weaker(tmp_path):
    base = torch.rand(16, 16, generator=torch.Generator().manual_seed(4))
    maps = {"sliding": torch.stack([base, 0.1 * base])}  # the second reference's evidence is 10x smaller
    pair = _pair((0.5, 0.5), maps=maps)
    del pair["similarity"]  # no similarity: the shared scale is chosen
    index = write_report(tmp_path / "r", [pair], [])
    a, b = _heat(index.parent / "p0_ref0_sliding.png"), _heat(index.parent / "p0_ref1_sliding.png")
    assert a[:, 0].max() > 100 and b[:, 0].max() < 5
    assert "Colour scale (shared)" in index.read_text()
    # per-map min-max (the old report) would have drawn both alike; the shared scale can be asked for explicitly
    index = write_report(tmp_path / "s", [_pair((0.5, 0.5), maps=maps)], [], scale="shared")
    assert _heat(index.parent / "p0_ref1_sliding.png")[:, 0].max() < 5


def test_a_constant_map_is_flagged_on_the_map_and_on_top(tmp_path):
    g = torch.Generator().manual_seed(5)
    maps = {"attention": torch.rand(3, 8, 8, generator=g)}
    maps["attention"][0] = 0.0                                   # all zero
    maps["attention"][2] = 0.25 + 1e-9 * torch.rand(8, 8, generator=g)  # within the tolerance
    pair = _pair((0.9, 0.9, 0.9), size=8, maps=maps)
    pair["warnings"] = {"attention": [None, "explainer says: saturated layer", None]}
    text = write_report(tmp_path / "r", [pair], []).read_text()
    cells = re.findall(r"<div><img src='p0_ref(\d)_attention.png'[^>]*>(.*?)<details>", text)
    flagged = {int(k): ("constant map" in body, "saturated layer" in body) for k, body in cells}
    assert flagged == {0: (True, False), 1: (False, True), 2: (True, False)}
    assert "2 maps in this report are constant" in text
    # on the shared scale too, a constant map sits at the bottom of the bar, not where its value falls
    shared = {"attention": torch.stack([torch.linspace(0, 1, 64).reshape(8, 8), torch.full((8, 8), 0.9)])}
    index = write_report(tmp_path / "s", [_pair((0.9, 0.9), size=8, maps=shared)], [], scale="shared")
    assert _heat(index.parent / "p0_ref1_attention.png")[:, 0].max() <= 1
    assert _heat(index.parent / "p0_ref0_attention.png")[:, 0].max() > 100
    assert is_constant(torch.zeros(4, 4)) and is_constant(torch.full((4, 4), 3.0))
    assert not is_constant(torch.tensor([[0.0, 1e-6]])) and not is_constant(torch.tensor([[1.0, 1.001]]))


def test_the_detail_text_is_folded_away(tmp_path):
    pair = _pair((0.9,), maps={"rise": torch.rand(1, 16, 16)})
    pair["metrics"] = {"rise": [{"similarity": 0.9, "insertion_auc": 0.7, "deletion_auc": 0.1, "pointing": True,
                                 "mass_on_key": 0.4, "attribute": "striped"}]}
    text = write_report(tmp_path / "r", [pair], []).read_text()
    cell = re.search(r"<div><img src='p0_ref0_rise.png'[^>]*>(.*?)</div></div>", text, re.S).group(1)
    visible, folded = cell.split("<details>", 1)
    assert "Insertion AUC" not in visible and "Insertion AUC ↑: 0.700" in folded and "Peak on key object" in folded
    assert "attribute: striped" in visible and "<details open" not in text


def test_scale_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="scale must be None, 'similarity' or 'shared', got 'loud'"):
        write_report(tmp_path / "a", [_pair()], [], scale="loud")
    pair = _pair()
    del pair["similarity"]
    with pytest.raises(ValueError, match=r"scale='similarity' needs every pair's 'similarity'.*pairs\[0\]"):
        write_report(tmp_path / "b", [pair], [], scale="similarity")
    with pytest.raises(ValueError, match=r"pairs\[0\]\['similarity'\] must be 2 finite numbers"):
        write_report(tmp_path / "c", [{**_pair(), "similarity": [0.5]}], [])
    with pytest.raises(ValueError, match=r"pairs\[0\]\['reference_names'\] must have one entry per reference \(2\)"):
        write_report(tmp_path / "d", [{**_pair(), "reference_names": ["only one"]}], [])
    # a similarity outside [-1, 1] (a dot product) falls back to the shared scale on its own
    text = write_report(tmp_path / "e", [_pair((12.0, 3.0))], []).read_text()
    assert "Colour scale (shared)" in text
    assert not any(p.name.startswith(("a", "b", "c", "d")) for p in tmp_path.iterdir())


def test_the_ranked_list_report(tmp_path):
    g = torch.Generator().manual_seed(6)
    results = [{"image": torch.rand(3, 12, 12, generator=g), "name": f"img{i}.jpg",
                "maps": {"rise": torch.rand(6, 6, generator=g), "attention": torch.rand(6, 6, generator=g)},
                "scores": {"rank": i + 1, "similarity": 0.9 - 0.2 * i}} for i in range(3)]
    index = write_ranked_report(tmp_path / "r", [{"name": "query.jpg", "query": torch.rand(3, 12, 12, generator=g),
                                                  "results": results}],
                                summary=[{"search_ms": 1.5, "explain_ms": 80.0}], methods=["attention", "rise"])
    text = index.read_text()
    assert text.index("#1 img0.jpg") < text.index("#2 img1.jpg") < text.index("#3 img2.jpg")
    assert "similarity 0.700" in text and "Colour scale (similarity)" in text and "Rank: 2" in text
    assert text.index(">attention</div>") < text.index(">rise</div>")
    for src in re.findall(r"src='([^']+)'", text):
        assert (index.parent / src).is_file()
    assert (index.parent / "p0_ref2_rise.png").is_file()
    with pytest.raises(ValueError, match=r"queries\[0\]\['results'\] must be a non-empty list"):
        write_ranked_report(tmp_path / "x", [{"name": "q", "query": torch.rand(3, 4, 4), "results": []}])
    bad = [dict(results[0], maps={"rise": torch.rand(2, 6, 6)})]
    with pytest.raises(ValueError, match=r"\['results'\]\[0\]\['maps'\]\['rise'\] must be an \(H, W\) map"):
        write_ranked_report(tmp_path / "x", [{"name": "q", "query": torch.rand(3, 12, 12), "results": bad}])
    with pytest.raises(TypeError, match="queries must be a sequence of dicts"):
        write_ranked_report(tmp_path / "x", "q")
