"""The HTML report in a real browser: headless Chromium (Debian's package; .ci/run installs it) opens
the report at 1,280 px and a script in the page writes back what it found: every image decoded
(naturalWidth > 0) and nothing wider than the window (document.documentElement.scrollWidth <= 1280).

Chromium missing is a failure, not a skip: the check is part of CI."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from whymatch.viz import write_ranked_report, write_report

WIDTH = 1280
METHODS = ("rise", "sliding", "lime", "mask", "attention", "gradcam")

# Runs on the page's load event (after every image has loaded or failed) and appends the result to the DOM,
# which --dump-dom prints.
_PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var r = {images: imgs.length,
           broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                       .map(function (i) { return i.getAttribute('src'); }),
           scrollWidth: document.documentElement.scrollWidth,
           innerWidth: window.innerWidth,
           details: document.querySelectorAll('.grid details').length,
           openDetails: document.querySelectorAll('details[open]').length,
           warnings: document.querySelectorAll('.grid .warn').length};
  var pre = document.createElement('pre');
  pre.id = 'whymatch-probe';
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    exe = os.environ.get("WHYMATCH_CHROMIUM")
    for name in ([exe] if exe else []) + ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed for the report's browser test and none was found (set "
                "WHYMATCH_CHROMIUM, or install Debian's: apt-get install -y --no-install-recommends chromium; "
                ".ci/run installs it)")


def _probe(index: Path, tmp_path: Path) -> dict:
    """Open a copy of ``index`` (beside it, so its relative image paths resolve) with the probe script
    in headless Chromium at WIDTH px; return what the probe found."""
    page = index.with_name("_probe.html")
    text = index.read_text(encoding="utf-8")
    if "</body>" not in text:
        raise AssertionError(f"{index} has no </body>")
    page.write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage",  # containers often have a small /dev/shm
           f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={WIDTH},900",
           "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        page.unlink()
    m = re.search(r"<pre id=\"whymatch-probe\">(.*?)</pre>", proc.stdout, re.S)
    assert m, f"the probe wrote nothing (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(html.unescape(m.group(1)))


def _synthetic_pairs(n_pairs=2, n_refs=3, size=96):
    g = torch.Generator().manual_seed(0)
    pairs = []
    for pi in range(n_pairs):
        maps = {m: torch.rand(n_refs, size // 8, size // 8, generator=g) for m in METHODS}
        maps["attention"][n_refs // 2] = 0.0  # a constant map: flagged on the page
        key = torch.zeros(size, size, dtype=torch.bool)
        key[20:50, 30:60] = True
        met = {m: [{"similarity": 0.5, "insertion_auc": 0.8, "deletion_auc": 0.2, "pointing": True,
                    "mass_on_key": 0.3, "attribute": "striped", "query_attribute": "red",
                    "attribute_shared": False} for _ in range(n_refs)] for m in METHODS}
        pairs.append({"name": "test #%d: a large red striped circle, a long name that must wrap " % pi * 3,
                      "query": torch.rand(3, size, size, generator=g),
                      "references": [torch.rand(3, size, size, generator=g) for _ in range(n_refs)],
                      "maps": maps, "metrics": met, "key_mask": key,
                      "similarity": torch.linspace(0.95, 0.1, n_refs)})
    summary = [{"method": m, "insertion_auc": 0.8, "deletion_auc": 0.2, "pointing_acc": 0.9, "mass_on_key": 0.3,
                "sec_per_query": 1.25, "refs_per_query": float(n_refs), "attribute_top1": 0.5} for m in METHODS]
    summary.append({"method": "chance (key-object area)", "pointing_acc": 0.07, "mass_on_key": 0.07})
    return pairs, summary


def test_the_report_of_every_method_fits_1280px_and_every_image_loads(tmp_path):
    pairs, summary = _synthetic_pairs()
    index = write_report(tmp_path / "rep", pairs, summary, title="six methods, three references",
                         methods=list(METHODS))
    r = _probe(index, tmp_path)
    n_images = 1 + sum(1 + len(p["references"]) * (1 + len(METHODS)) for p in pairs)  # colour bar, queries, refs, maps
    assert r["innerWidth"] == WIDTH, r
    assert r["images"] == n_images and r["broken"] == [], r
    assert r["scrollWidth"] <= WIDTH, f"the page overflows the {WIDTH} px window: {r}"
    assert r["details"] >= len(METHODS) * 6 and r["openDetails"] == 0, r  # per-map text folded away
    assert r["warnings"] == 2, r  # the two constant maps


def test_the_ranked_list_report_fits_1280px(tmp_path):
    g = torch.Generator().manual_seed(1)
    results = [{"image": torch.rand(3, 64, 64, generator=g), "name": f"gallery/item_{i:05d}_with_a_long_file_name.jpg",
                "maps": {"rise": torch.rand(8, 8, generator=g), "attention": torch.rand(8, 8, generator=g)},
                "scores": {"rank": i + 1, "similarity": 0.9 - 0.1 * i}} for i in range(10)]
    index = write_ranked_report(tmp_path / "ranked", [{"name": "query.jpg", "query": torch.rand(3, 64, 64,
                                                                                                generator=g),
                                                        "results": results}],
                                summary=[{"search_ms": 1.5, "explain_ms": 120.0}])
    r = _probe(index, tmp_path)
    assert r["images"] == 1 + 1 + 10 * 3 and r["broken"] == [], r
    assert r["scrollWidth"] <= WIDTH, r


def test_a_tiny_real_run_report_in_the_browser(tmp_path):
    """The jobs' own path (shipped model, explain_sets, summarize, write) on one ShapesWorld query."""
    from whymatch.data import ShapesWorld
    from whymatch.jobs import JobSettings, explain_sets, summarize, write
    from whymatch.models import load_default_model

    sim = load_default_model()
    ds = ShapesWorld("test", n_samples=4, seed=0)
    smp = ds.sample(0)
    refs = torch.stack([ds[1][0], ds[2][0]])
    methods = ("attention", "gradcam")
    sets = explain_sets(sim, [("test #0", smp.image, refs, smp.key_mask)], methods,
                        JobSettings(n_steps=4, batch_size=16))
    index = write(tmp_path / "demo", sets, methods, summarize(sets, methods), "tiny demo")
    text = index.read_text()
    assert "Colour scale (similarity)" in text and "References per query" in text and ">2</td>" in text
    r = _probe(index, tmp_path)
    assert r["images"] == 1 + 1 + 2 * 3 and r["broken"] == [], r
    assert r["scrollWidth"] <= WIDTH, r


def test_the_probe_sees_an_overflow_and_a_broken_image(tmp_path):
    """The browser check can fail: a page wider than the window and an image that does not load."""
    pairs, summary = _synthetic_pairs(n_pairs=1, n_refs=1)
    index = write_report(tmp_path / "rep", pairs, summary)
    text = index.read_text().replace("</body>", "<div style='width:2000px'>wide</div><img src='missing.png'></body>")
    index.write_text(text)
    (index.parent / "p0_ref0.png").write_bytes(b"not a png")
    r = _probe(index, tmp_path)
    assert r["scrollWidth"] > WIDTH, r
    assert sorted(r["broken"]) == ["missing.png", "p0_ref0.png"], r
