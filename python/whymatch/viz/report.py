"""The HTML reports: every method side by side for each query with a summary table on top
(:func:`write_report`), a ranked retrieval list with its explanations (:func:`write_ranked_report`),
and AVSL's node-level explanations (:func:`write_avsl_report`)."""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_output_dir
from .overlay import colorbar, contour, is_constant, map_range, mark_point, overlay, to_pil

__all__ = ["write_report", "write_ranked_report", "write_avsl_report", "format_table", "html_table", "METRICS",
           "MetricInfo", "metric_label", "SCALES"]

_CSS = """body{font-family:sans-serif;margin:16px;color:#222;max-width:100%}
table{border-collapse:collapse;margin:8px 0;max-width:100%}
td,th{border:1px solid #ccc;padding:4px 6px;text-align:right}th{background:#f0f0f0;font-weight:600}
td:first-child,th:first-child{text-align:left}
.twrap{max-width:100%;overflow-x:auto}
.legend{display:flex;flex-wrap:wrap;gap:8px 24px;align-items:flex-start;font-size:13px;margin:8px 0}
.legend p{margin:4px 0;max-width:62em}.cbar{width:256px;height:14px;image-rendering:auto;border:1px solid #888}
.ticks{display:flex;justify-content:space-between;width:258px;font-size:11px}
dl.metrics{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;font-size:13px;margin:6px 0}
dl.metrics dt{font-weight:600}dl.metrics dd{margin:0}
.pair{margin:20px 0;border-top:2px solid #888}
.grid{display:grid;gap:6px;align-items:start;font-size:12px;max-width:100%}
.grid>div{min-width:0;text-align:center;overflow-wrap:anywhere}
.grid .head{font-weight:600;background:#f0f0f0;padding:3px}
.grid img{image-rendering:pixelated;width:100%;max-width:160px;height:auto;display:block;margin:0 auto}
.grid details{text-align:left;margin-top:2px}.grid summary{cursor:pointer;color:#555}
.grid ul{margin:2px 0;padding-left:14px}.sub{color:#555}
.warn{background:#fff3cd;border:1px solid #d39e00;color:#6b4e00;padding:2px 4px;margin:2px auto;max-width:160px}
.notice{background:#fff3cd;border:1px solid #d39e00;padding:6px 10px;max-width:62em}
.avsl td{text-align:center;vertical-align:top;font-size:12px}
.avsl img{image-rendering:pixelated;width:160px;height:160px}"""


@dataclass(frozen=True)
class MetricInfo:
    """How a report names a metric: label in words, direction ('↑' higher is better, '↓' lower is
    better, '' neither) and a one-line meaning; ``count`` metrics print as integers when whole."""

    label: str
    direction: str
    meaning: str
    count: bool = False


#: Every metric the jobs write, by the key they use (the terminal table and JSON keep the keys).
METRICS: dict[str, MetricInfo] = {
    "method": MetricInfo("Method", "", "the saliency method (see the README's method table)"),
    "similarity": MetricInfo("Similarity", "", "the model's similarity of the unchanged pair (cosine: 1 = same "
                                               "direction, 0 = unrelated)"),
    "insertion_auc": MetricInfo("Insertion AUC", "↑", "similarity as the query's pixels are revealed over a blurred "
                                "copy, most salient first; area under that curve, each curve min-max scaled "
                                "(a flat curve scores 0.5)"),
    "deletion_auc": MetricInfo("Deletion AUC", "↓", "similarity as the query's most salient pixels are blacked out "
                               "first; area under that curve, min-max scaled (a flat curve scores 0.5)"),
    "pointing": MetricInfo("Peak on key object", "↑", "the map's highest pixel lies on the ground-truth key object"),
    "pointing_acc": MetricInfo("Pointing game", "↑", "share of maps whose highest pixel lies on the ground-truth "
                               "key object (chance row: the key object's share of the image)"),
    "mass_on_key": MetricInfo("Mass on key object", "↑", "share of the map's positive mass (zero = no effect) "
                              "inside the key object (chance row: the key object's share of the image)"),
    "sec_per_query": MetricInfo("Seconds per query", "↓", "wall time of the method for one query and all its "
                                "references (this machine, this run)"),
    "refs_per_query": MetricInfo("References per query", "", "how many references each query was explained "
                                 "against", count=True),
    "attribute": MetricInfo("Attribute (SANE)", "", "the attribute that best explains the match under this map "
                            "(SANE Eq. 4)"),
    "query_attribute": MetricInfo("Query's attribute", "", "the query's own most likely attribute (SANE)"),
    "attribute_shared": MetricInfo("Attribute right", "↑", "the chosen attribute is one the two key objects share"),
    "attribute_top1": MetricInfo("Attribute top-1", "↑", "share of pairs whose chosen attribute (SANE) is one the "
                                 "two key objects share"),
    "attribute_terms": MetricInfo("Attribute terms", "", "SANE Eq. 4 for the chosen attribute: phi1 x confidence + "
                                  "phi2 x cos(saliency, attribute map) + phi3 x TCAV"),
    "attribute_causal_top": MetricInfo("Causal top attribute", "", "the query attribute whose change alone (a "
                                       "counterfactual re-render) drops the similarity most"),
    "attribute_causal": MetricInfo("Attribute causal", "↑", "SANE's attribute is the causal top attribute"),
    "attribute_drop": MetricInfo("Attribute drop", "↑", "drop in similarity when SANE's attribute alone is changed "
                                 "in the query"),
    "attribute_causal_top1": MetricInfo("Attribute causal top-1", "↑", "share of pairs whose chosen attribute "
                                        "(SANE) is the causal top attribute"),
    "rank": MetricInfo("Rank", "", "position in the retrieval list (1 = most similar)", count=True),
    "distance": MetricInfo("Distance", "↓", "the model's distance of the pair (AVSL: lower = more similar)"),
    "step": MetricInfo("Step", "", "a stage of the search-and-explain command (search, explanation, total)"),
    "seconds": MetricInfo("Seconds", "↓", "wall time of the step for this query"),
}

#: The colour scales of :func:`write_report`'s maps.
SCALES = ("similarity", "shared")

_SCALE_TEXT = {
    "similarity": "Colour = (value &minus; map minimum) / (map maximum &minus; map minimum) &times; the pair's "
                  "similarity, clipped to [0, 1]: each map's strongest pixel sits at the pair's similarity on the "
                  "bar, so a weak match (similarity 0.1) is dark blue everywhere and only a strong match turns red. "
                  "Maps of different methods are in different units, so each is scaled on its own; the pair's "
                  "similarity is what they share.",
    "shared": "Colour = (value &minus; lo) / (hi &minus; lo), with lo and hi the smallest and largest value of one "
              "method's maps over all references of the query: one scale per query and method, so a reference the "
              "method finds less support for looks weaker than one it finds more. (Methods are in different "
              "units, so each has its own scale.)",
}


def metric_label(key: str) -> str:
    """'Insertion AUC ↑' for 'insertion_auc'; an unknown key is returned as it is."""
    info = METRICS.get(key)
    if info is None:
        return key
    return f"{info.label} {info.direction}".rstrip()


def _fmt(v: object, key: str | None = None) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        info = METRICS.get(key) if key else None
        if info is not None and info.count:
            return str(int(v)) if math.isfinite(v) and v == int(v) else f"{v:.2f}"
        return f"{v:.3f}"
    return "" if v is None else str(v)


def _columns(rows: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def format_table(rows: Sequence[dict]) -> str:
    """Rows of dicts as a markdown table (also readable in a terminal); columns keep their keys."""
    if not rows:
        return "(no rows)"
    cols = _columns(rows)
    cells = [[_fmt(r.get(c), c) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def _metric_legend(keys: Sequence[str]) -> str:
    """A definition list: each known metric's label with its direction and one-line meaning."""
    items = [(metric_label(k), METRICS[k].meaning) for k in dict.fromkeys(keys) if k in METRICS and k != "method"]
    if not items:
        return ""
    return "<dl class='metrics'>" + "".join(
        f"<dt>{html.escape(a)}</dt><dd>{html.escape(b)}</dd>" for a, b in items) + "</dl>"


def html_table(rows: Sequence[dict], legend: bool = False) -> str:
    """Rows of dicts as an HTML table whose headers are the metrics' names in words with their direction
    (the meaning on hover); ``legend`` adds the meanings below it."""
    cols = _columns(rows)
    head = "".join(f"<th title='{html.escape(METRICS[c].meaning if c in METRICS else c)}'>"
                   f"{html.escape(metric_label(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c), c))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    out = f"<div class='twrap'><table><tr>{head}</tr>{body}</table></div>"
    if legend:
        out += "<p class='sub'>↑ higher is better, ↓ lower is better.</p>" + _metric_legend(cols)
    return out


def _png(img, path: Path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def _pair_keys(pi: int, pair: object, keys: tuple[str, ...]) -> None:
    """pairs[pi] must be a dict holding ``keys`` (TypeError / ValueError naming the entry and the keys)."""
    if not isinstance(pair, dict):
        raise TypeError(f"pairs[{pi}] must be a dict, got {type(pair).__name__}")
    missing = [k for k in keys if k not in pair]
    if missing:
        raise ValueError(f"pairs[{pi}] lacks the keys {', '.join(map(repr, missing))}")


def _image_arg(where: str, x: object) -> tuple[int, int]:
    """(H, W) of a (3, H, W) image tensor, or a named error."""
    import torch

    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != 3 or x.shape[1] == 0 or x.shape[2] == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{where} must be a (3, H, W) image tensor, got {got}")
    return int(x.shape[1]), int(x.shape[2])


def _similarities(pi: int, pair: dict, k: int) -> list[float] | None:
    """pairs[pi]['similarity'] as K finite floats (None when absent), or a named error."""
    import torch

    sims = pair.get("similarity")
    if sims is None:
        return None
    try:
        vals = [float(v) for v in (sims.detach().float().cpu().reshape(-1).tolist()
                                   if isinstance(sims, torch.Tensor) else sims)]
    except (TypeError, ValueError):
        raise TypeError(f"pairs[{pi}]['similarity'] must be {k} numbers, got {type(sims).__name__}") from None
    if len(vals) != k or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"pairs[{pi}]['similarity'] must be {k} finite numbers (one per reference), got {vals!r}")
    return vals


def _check_pairs(pairs: Sequence[dict], methods: Sequence[str] | None, scale: str | None) -> str:
    """Every pair of :func:`write_report` well formed, before anything is drawn (named errors, not a traceback
    from the middle of the drawing). Returns the colour scale to use."""
    import torch

    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"pairs must be a sequence of dicts, got {type(pairs).__name__}")
    if scale is not None and scale not in SCALES:
        raise ValueError(f"scale must be None, 'similarity' or 'shared', got {scale!r}")
    all_sims = []
    for pi, pair in enumerate(pairs):
        _pair_keys(pi, pair, ("name", "query", "references", "maps"))
        _image_arg(f"pairs[{pi}]['query']", pair["query"])
        refs = pair["references"]
        for k, r in enumerate(refs):
            _image_arg(f"pairs[{pi}]['references'][{k}]", r)
        maps = pair["maps"]
        if not isinstance(maps, dict):
            raise TypeError(f"pairs[{pi}]['maps'] must be a dict of method -> (K, H, W) maps, "
                            f"got {type(maps).__name__}")
        for m in (methods or maps.keys()):
            if m not in maps:
                raise ValueError(f"pairs[{pi}]['maps'] has no maps of method {m!r} "
                                 f"(it has {', '.join(maps) or 'none'})")
            t = maps[m]
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != len(refs) or 0 in t.shape[1:]:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"pairs[{pi}]['maps'][{m!r}] must be ({len(refs)}, H, W), one map per reference, "
                                 f"got {got}")
            met = (pair.get("metrics") or {}).get(m)
            if met and len(met) != len(refs):
                raise ValueError(f"pairs[{pi}]['metrics'][{m!r}] must have one entry per reference ({len(refs)}), "
                                 f"got {len(met)}")
        for key in ("reference_names", "reference_scores"):
            v = pair.get(key)
            if v is not None and (isinstance(v, (str, bytes)) or len(v) != len(refs)):
                raise ValueError(f"pairs[{pi}][{key!r}] must have one entry per reference ({len(refs)}), "
                                 f"got {v!r}")
        all_sims.append(_similarities(pi, pair, len(refs)))
    have = all(s is not None for s in all_sims)
    if scale == "similarity":
        if not have:
            pi = next(i for i, s in enumerate(all_sims) if s is None)
            raise ValueError(f"scale='similarity' needs every pair's 'similarity' (K values), pairs[{pi}] has none")
        return "similarity"
    if scale == "shared":
        return "shared"
    # auto: relative to the similarity when every pair carries one in [-1, 1] (cosine), else shared per query
    in_range = have and all(-1.0 - 1e-4 <= v <= 1.0 + 1e-4 for s in all_sims for v in s)
    return "similarity" if in_range and pairs else "shared"


def _legend(scale: str, has_key: bool) -> str:
    """The colour bar with its scale stated, and what the marks on the maps mean."""
    marks = "The white cross marks each map's highest pixel"
    marks += "; the white outline is the ground-truth key object." if has_key else "."
    return ("<div class='legend'><div><img class='cbar' src='colorbar.png' alt='colour bar, 0 to 1'>"
            "<div class='ticks'><span>0</span><span>0.25</span><span>0.5</span><span>0.75</span><span>1</span></div>"
            "<div class='sub'>no support &rarr; strongest support</div></div>"
            f"<div><p><b>Colour scale ({scale}).</b> {_SCALE_TEXT[scale]}</p><p>{marks} A map whose values are all "
            "equal is flagged <span class='warn'>&#9888; constant map</span>: the method ranked no pixel above "
            "another, so it explains nothing (for a gradient method, try another target layer).</p></div></div>")


def _map_details(met: dict | None, lo: float, hi: float, scale_note: str, warning: str | None) -> str:
    items = []
    if met:
        for a, b in met.items():
            items.append(f"<li>{html.escape(metric_label(a))}: {html.escape(_fmt(b, a))}</li>")
    items.append(f"<li>map range: {lo:.4g} to {hi:.4g}</li>")
    items.append(f"<li>{html.escape(scale_note)}</li>")
    if warning:
        items.append(f"<li>{html.escape(warning)}</li>")
    return f"<details><summary>details</summary><ul>{''.join(items)}</ul></details>"


def write_report(out_dir: str | Path, pairs: Sequence[dict], summary: Sequence[dict], *,
                 title: str = "whymatch report", methods: Sequence[str] | None = None,
                 scale: str | None = None) -> Path:
    """Write ``out_dir/index.html`` and its PNGs; nothing is left half-written on error.

    The page: a summary table (metric names in words with ↑/↓ and their meanings), a colour bar with
    its scale stated, then for each query a grid that fits the window (query, reference, one column
    per method); the per-map numbers are folded away under "details". Maps are scaled so that a
    weak match looks weak (``scale``):

    - 'similarity': each map min-max scaled, times the pair's similarity clipped to [0, 1], so a
      map's strongest pixel sits at the pair's similarity on the colour bar. For similarities in
      [-1, 1] (cosine).
    - 'shared': one min-max scale per query and method over its K references.
    - None (default): 'similarity' when every pair has a 'similarity' in [-1, 1], else 'shared'.

    A constant map (max - min within :data:`whymatch.viz.overlay.CONSTANT_RTOL`) carries a visible
    warning, as does any message given in 'warnings'.

    The report is built beside ``out_dir`` and swapped in whole (:func:`whymatch.io.atomic_output_dir`):
    at every instant ``out_dir`` is the complete old report or the complete new one. Malformed
    ``pairs`` and unusable ``out_dir`` (:func:`whymatch.io.check_output_dir`) are refused before
    anything is drawn.

    Args:
        out_dir: output directory (created; an existing report there is replaced whole; a
            non-empty directory that is not a whymatch report is refused).
        pairs: one dict per query: 'name' (str), 'query' (3, H, W), 'references'
            (list of (3, H, W)), 'maps' ({method: (K, H, W)}); optional: 'metrics'
            ({method: [dict per reference]}), 'key_mask' ((H, W) bool), 'similarity' ((K,)
            tensor or K numbers), 'reference_names' (K str), 'reference_scores' (K dicts shown
            under each reference), 'warnings' ({method: [str or None per reference]}).
        summary: rows (dicts) of the summary table (keys of :data:`METRICS` are shown in words).
        methods: column order (default: the maps' keys).
        scale: 'similarity', 'shared' or None (see above).

    Returns:
        The path of index.html.
    """
    scale = _check_pairs(pairs, methods, scale)
    has_key = any(p.get("key_mask") is not None for p in pairs)
    n_const = 0
    body = []
    with atomic_output_dir(out_dir) as tmp:
        _png(colorbar(), tmp / "colorbar.png")
        for pi, pair in enumerate(pairs):
            ms = list(methods or pair["maps"].keys())
            q = pair["query"].detach().float().cpu()
            key = pair.get("key_mask")
            refs = pair["references"]
            sims = _similarities(pi, pair, len(refs))
            names = pair.get("reference_names")
            scores = pair.get("reference_scores")
            warns = pair.get("warnings") or {}
            body.append(f"<div class='pair'><h3>{html.escape(str(pair['name']))}</h3>"
                        f"<div class='grid' style='grid-template-columns:repeat({2 + len(ms)},minmax(0,172px))'>")
            body.append("<div class='head'>query</div><div class='head'>reference</div>" + "".join(
                f"<div class='head'>{html.escape(m)}</div>" for m in ms))
            qimg = to_pil(q)
            if key is not None:
                qimg = contour(qimg, key)
            _png(qimg, tmp / f"p{pi}_query.png")
            shared = {}
            for m in ms:
                rng = [map_range(t) for t in pair["maps"][m]]
                shared[m] = (min(r[0] for r in rng), max(r[1] for r in rng))
            for k, ref in enumerate(refs):
                _png(to_pil(ref), tmp / f"p{pi}_ref{k}.png")
                qcell = (f"<div style='grid-row:span {len(refs)}'><img src='p{pi}_query.png' alt='query'></div>"
                         if k == 0 else "")
                ref_txt = []
                if names is not None:
                    ref_txt.append(f"<div>{html.escape(str(names[k]))}</div>")
                if sims is not None:
                    ref_txt.append(f"<div>similarity {sims[k]:.3f}</div>")
                if scores is not None and scores[k]:
                    ref_txt.append("<details><summary>scores</summary><ul>" + "".join(
                        f"<li>{html.escape(metric_label(str(a)))}: {html.escape(_fmt(b, str(a)))}</li>"
                        for a, b in scores[k].items()) + "</ul></details>")
                row = [qcell, f"<div><img src='p{pi}_ref{k}.png' alt='reference {k}'>{''.join(ref_txt)}</div>"]
                for m in ms:
                    sal = pair["maps"][m][k].detach().float().cpu()
                    lo, hi = map_range(sal)
                    const = is_constant(sal)
                    if const:  # at the bottom of the bar whatever the scale: it supports nothing more than anything
                        img = overlay(q, sal, gain=0.0)
                        note = "colour: none (a constant map)"
                    elif scale == "similarity":
                        gain = min(max(sims[k], 0.0), 1.0)
                        img = overlay(q, sal, gain=gain)
                        note = f"colour: map min-max scaled x similarity {gain:.3f}"
                    else:
                        img = overlay(q, sal, vmin=shared[m][0], vmax=shared[m][1])
                        note = (f"colour: shared scale of this query's {m} maps, "
                                f"{shared[m][0]:.4g} to {shared[m][1]:.4g}")
                    if key is not None:
                        img = contour(img, key)
                    flat = int(sal.argmax())
                    sy, sx = divmod(flat, sal.shape[1])
                    img = mark_point(img, (sy * img.height // sal.shape[0], sx * img.width // sal.shape[1]))
                    name = f"p{pi}_ref{k}_{m}.png"
                    _png(img, tmp / name)
                    met = (pair.get("metrics") or {}).get(m)
                    met_k = met[k] if met else None
                    flags = []
                    if const:
                        n_const += 1
                        flags.append(f"constant map (all values {lo:.4g}): explains nothing")
                    given = warns.get(m)
                    if given is not None and k < len(given) and given[k]:
                        flags.append(str(given[k]))
                    visible = "".join(f"<div class='warn' role='alert'>&#9888; {html.escape(f)}</div>"
                                      for f in flags)
                    if met_k and "attribute" in met_k:
                        visible += f"<div>attribute: {html.escape(str(met_k['attribute']))}</div>"
                        if "attribute_terms" in met_k:
                            visible += f"<div>{html.escape(str(met_k['attribute_terms']))}</div>"
                        if "attribute_causal_top" in met_k:
                            ok = "&#10003;" if met_k.get("attribute_causal") else "&#10007;"
                            top = html.escape(str(met_k["attribute_causal_top"]))
                            visible += f"<div>causal top: {top} {ok}</div>"
                    row.append(f"<div><img src='{html.escape(name)}' alt='{html.escape(m)}'>{visible}"
                               f"{_map_details(met_k, lo, hi, note, None)}</div>")
                body.append("".join(row))
            body.append("</div></div>")
        head = [f"<!doctype html><html><head><meta charset='utf-8'>"
                "<meta name='viewport' content='width=device-width,initial-scale=1'>"
                f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
        if summary:
            head += ["<h2>Summary</h2>", html_table(summary, legend=True)]
        if n_const:
            what = f"{n_const} maps in this report are" if n_const > 1 else "1 map in this report is"
            head.append(f"<p class='notice' role='alert'>&#9888; {what} constant (marked below): "
                        "a constant map ranks no pixel above another and carries no explanation.</p>")
        head.append("<h2>Maps</h2>" + _legend(scale, has_key))
        (tmp / "index.html").write_text("".join(head + body) + "</body></html>", encoding="utf-8")
    return Path(out_dir) / "index.html"


def write_ranked_report(out_dir: str | Path, queries: Sequence[dict], *, summary: Sequence[dict] = (),
                        title: str = "whymatch retrieval report", methods: Sequence[str] | None = None,
                        scale: str | None = None) -> Path:
    """Write a ranked retrieval list with an explanation of every item (same page as :func:`write_report`).

    Args:
        out_dir: output directory (as for :func:`write_report`).
        queries: one dict per query: 'name' (str), 'query' ((3, H, W) in [0, 1]), 'results': the
            ranked list, best first, each a dict with 'image' ((3, H, W)), 'maps' ({method: (H, W)
            map over the query}), optional 'name' (str, e.g. the gallery file) and 'scores' (dict,
            e.g. {'similarity': 0.91, 'rank': 1}; a 'similarity' in every item of a query sets the
            colour scale, see ``scale``). Optional per query: 'key_mask' ((H, W) bool).
        summary: rows of the summary table (e.g. latency per query: search and explanation).
        methods: column order (default: the first item's maps' keys).
        scale: 'similarity', 'shared' or None, as for :func:`write_report`.

    Returns:
        The path of index.html.
    """
    import torch

    if isinstance(queries, (str, bytes)) or not isinstance(queries, Sequence):
        raise TypeError(f"queries must be a sequence of dicts, got {type(queries).__name__}")
    pairs = []
    for qi, q in enumerate(queries):
        _pair_keys(qi, q, ("name", "query", "results"))
        results = q["results"]
        if isinstance(results, (str, bytes)) or not isinstance(results, Sequence) or not results:
            raise ValueError(f"queries[{qi}]['results'] must be a non-empty list of dicts, got {results!r:.80}")
        for ri, r in enumerate(results):
            if not isinstance(r, dict) or "image" not in r or not isinstance(r.get("maps"), dict):
                raise ValueError(f"queries[{qi}]['results'][{ri}] must be a dict with 'image' and 'maps' "
                                 f"({{method: (H, W)}}), got {type(r).__name__} with keys "
                                 f"{sorted(r) if isinstance(r, dict) else '-'}")
        ms = list(methods or results[0]["maps"].keys())
        maps = {}
        for m in ms:
            per = []
            for ri, r in enumerate(results):
                t = r["maps"].get(m)
                if not isinstance(t, torch.Tensor) or t.dim() != 2:
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"queries[{qi}]['results'][{ri}]['maps'][{m!r}] must be an (H, W) map, got {got}")
                per.append(t.detach().float().cpu())
            if len({tuple(t.shape) for t in per}) != 1:
                raise ValueError(f"queries[{qi}]: the {m!r} maps of the results must share one (H, W), got "
                                 f"{sorted({tuple(t.shape) for t in per})}")
            maps[m] = torch.stack(per)
        scores = [dict(r.get("scores") or {}) for r in results]
        pair = {"name": q["name"], "query": q["query"], "references": [r["image"] for r in results], "maps": maps,
                "reference_names": [f"#{i + 1}" + (f" {r['name']}" if r.get("name") else "")
                                    for i, r in enumerate(results)],
                "reference_scores": scores, "key_mask": q.get("key_mask")}
        if all("similarity" in s for s in scores):
            pair["similarity"] = [s["similarity"] for s in scores]
        pairs.append(pair)
    return write_report(out_dir, pairs, list(summary), title=title, methods=methods, scale=scale)


def _overlay_png(image, saliency, key, path: Path) -> None:
    img = overlay(image.detach().float().cpu(), saliency.detach().float().cpu())
    if key is not None:
        img = contour(img, key)
    _png(img, path)


def write_avsl_report(out_dir: str | Path, pairs: Sequence[dict], *, title: str = "whymatch AVSL report") -> Path:
    """Write ``out_dir/index.html``: for each pair and each level, the top nodes of an AVSL explanation.

    Each level is a table with one row per top node: its index, sensitivity lambda (Eq. 11), its
    contribution lambda * delta to the distance, and its CAM over each image. The first row of
    every level shows the two images with the lambda-weighted sum of the top nodes' CAMs.
    Nothing is left half-written on error.

    Args:
        out_dir: output directory (created; an existing report there is replaced whole, as for
            :func:`write_report`).
        pairs: one dict per pair: 'name' (str), 'x1', 'x2' ((3, H, W) images in [0, 1]),
            'explanation' (what :meth:`whymatch.avsl.AVSL.explain` returns), optional
            'key_mask1' / 'key_mask2' ((H, W) bool ground truth, outlined in white).

    Returns:
        The path of index.html.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p>For each level (low to high), the similarity nodes that made the distance of the pair, "
             "most important first: lambda = the distance's sensitivity to the node (Eq. 11 of AVSL), "
             "contribution = lambda x node value (the contributions of all nodes add up to the distance). "
             "Red = where the node's CAM is high, each map min-max scaled.</p>"]
    for pi, pair in enumerate(pairs):
        _pair_keys(pi, pair, ("name", "x1", "x2", "explanation"))
        _image_arg(f"pairs[{pi}]['x1']", pair["x1"])
        _image_arg(f"pairs[{pi}]['x2']", pair["x2"])
    with atomic_output_dir(out_dir) as tmp:
        for pi, pair in enumerate(pairs):
            ex = pair["explanation"]
            k1, k2 = pair.get("key_mask1"), pair.get("key_mask2")
            parts.append(f"<div class='pair'><h3>{html.escape(str(pair['name']))}: distance "
                         f"{_fmt(float(ex.distance))}</h3>")
            for li, lv in enumerate(ex.levels):
                parts.append(f"<h4>level {li}: {html.escape(str(lv.level))}</h4><table class='avsl'>"
                             "<tr><th>node</th><th>lambda</th><th>contribution</th><th>image 1</th>"
                             "<th>image 2</th></tr>")
                w = lv.lambdas.float().clamp_min(0)[:, None, None]
                for side, (x, cams, key) in enumerate(((pair["x1"], lv.cam1, k1), (pair["x2"], lv.cam2, k2))):
                    _overlay_png(x, (w * cams.float().clamp_min(0)).sum(0), key, tmp / f"p{pi}_l{li}_sum{side}.png")
                parts.append(f"<tr><td>top {len(lv.nodes)}, lambda-weighted</td><td></td><td></td>"
                             f"<td><img src='p{pi}_l{li}_sum0.png' alt='weighted CAMs, image 1'></td>"
                             f"<td><img src='p{pi}_l{li}_sum1.png' alt='weighted CAMs, image 2'></td></tr>")
                for j in range(len(lv.nodes)):
                    names = []
                    for side, (x, cams, key) in enumerate(((pair["x1"], lv.cam1, k1), (pair["x2"], lv.cam2, k2))):
                        name = f"p{pi}_l{li}_n{j}_{side}.png"
                        _overlay_png(x, cams[j], key, tmp / name)
                        names.append(name)
                    parts.append(f"<tr><td>{int(lv.nodes[j])}</td><td>{_fmt(float(lv.lambdas[j]))}</td>"
                                 f"<td>{_fmt(float(lv.contributions[j]))}</td>"
                                 f"<td><img src='{names[0]}' alt='node CAM, image 1'></td>"
                                 f"<td><img src='{names[1]}' alt='node CAM, image 2'></td></tr>")
                parts.append("</table>")
            parts.append("</div>")
        parts.append("</body></html>")
        (tmp / "index.html").write_text("".join(parts), encoding="utf-8")
    return Path(out_dir) / "index.html"
