"""The HTML reports: every method side by side for each pair with a summary table on top
(:func:`write_report`), and AVSL's node-level explanations (:func:`write_avsl_report`)."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path

from ..io import atomic_output_dir
from .overlay import contour, mark_point, overlay, to_pil

__all__ = ["write_report", "write_avsl_report", "format_table", "html_table"]

_CSS = """body{font-family:sans-serif;margin:20px;color:#222}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f0f0f0}
.pair{margin:24px 0;border-top:2px solid #888}.grid td{text-align:center;vertical-align:top;font-size:12px}
img{image-rendering:pixelated;width:160px;height:160px}"""


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


def _columns(rows: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def format_table(rows: Sequence[dict]) -> str:
    """Rows of dicts as a markdown table (also readable in a terminal)."""
    if not rows:
        return "(no rows)"
    cols = _columns(rows)
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def html_table(rows: Sequence[dict]) -> str:
    cols = _columns(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


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


def _check_pairs(pairs: Sequence[dict], methods: Sequence[str] | None) -> None:
    """Every pair of :func:`write_report` well formed, before anything is drawn (named errors, not a traceback
    from the middle of the drawing)."""
    import torch

    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"pairs must be a sequence of dicts, got {type(pairs).__name__}")
    for pi, pair in enumerate(pairs):
        _pair_keys(pi, pair, ("name", "query", "references", "maps"))
        _image_arg(f"pairs[{pi}]['query']", pair["query"])
        refs = pair["references"]
        for k, r in enumerate(refs):
            _image_arg(f"pairs[{pi}]['references'][{k}]", r)
        maps = pair["maps"]
        if not isinstance(maps, dict):
            raise TypeError(f"pairs[{pi}]['maps'] must be a dict of method -> (K, H, W) maps, got {type(maps).__name__}")
        for m in (methods or maps.keys()):
            if m not in maps:
                raise ValueError(f"pairs[{pi}]['maps'] has no maps of method {m!r} (it has {', '.join(maps) or 'none'})")
            t = maps[m]
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != len(refs) or 0 in t.shape[1:]:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"pairs[{pi}]['maps'][{m!r}] must be ({len(refs)}, H, W), one map per reference, "
                                 f"got {got}")
            met = (pair.get("metrics") or {}).get(m)
            if met and len(met) != len(refs):
                raise ValueError(f"pairs[{pi}]['metrics'][{m!r}] must have one entry per reference ({len(refs)}), "
                                 f"got {len(met)}")


def write_report(out_dir: str | Path, pairs: Sequence[dict], summary: Sequence[dict], *,
                 title: str = "whymatch report", methods: Sequence[str] | None = None) -> Path:
    """Write ``out_dir/index.html`` and its PNGs; nothing is left half-written on error.

    The report is built beside ``out_dir`` and swapped in whole (:func:`whymatch.io.atomic_output_dir`):
    at every instant ``out_dir`` is the complete old report or the complete new one. Malformed
    ``pairs`` and unusable ``out_dir`` (:func:`whymatch.io.check_output_dir`) are refused before
    anything is drawn.

    Args:
        out_dir: output directory (created; an existing report there is replaced whole; a
            non-empty directory that is not a whymatch report is refused).
        pairs: one dict per query: 'name' (str), 'query' (3, H, W), 'references'
            (list of (3, H, W)), 'maps' ({method: (K, H, W)}), optional 'metrics'
            ({method: [dict per reference]}) and 'key_mask' ((H, W) bool).
        summary: rows (dicts) of the summary table.
        methods: column order (default: the maps' keys).

    Returns:
        The path of index.html.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<h2>Summary</h2>", html_table(summary),
             "<p>Saliency overlays: red = pixels that support the similarity most (each map min-max scaled); "
             "the cross marks the peak; a white outline marks the ground-truth key object when known.</p>"]
    _check_pairs(pairs, methods)
    with atomic_output_dir(out_dir) as tmp:
        for pi, pair in enumerate(pairs):
            ms = list(methods or pair["maps"].keys())
            q = pair["query"]
            key = pair.get("key_mask")
            parts.append(f"<div class='pair'><h3>{html.escape(str(pair['name']))}</h3><table class='grid'>")
            parts.append("<tr><th>query</th><th>reference</th>" + "".join(
                f"<th>{html.escape(m)}</th>" for m in ms) + "</tr>")
            qimg = to_pil(q)
            if key is not None:
                qimg = contour(qimg, key)
            _png(qimg, tmp / f"p{pi}_query.png")
            for k, ref in enumerate(pair["references"]):
                _png(to_pil(ref), tmp / f"p{pi}_ref{k}.png")
                row = [f"<td><img src='p{pi}_query.png' alt='query'></td>",
                       f"<td><img src='p{pi}_ref{k}.png' alt='reference {k}'></td>"]
                for m in ms:
                    sal = pair["maps"][m][k].detach().float().cpu()
                    img = overlay(q.cpu(), sal)
                    if key is not None:
                        img = contour(img, key)
                    flat = int(sal.argmax())
                    sy, sx = divmod(flat, sal.shape[1])
                    img = mark_point(img, (sy * img.height // sal.shape[0], sx * img.width // sal.shape[1]))
                    name = f"p{pi}_ref{k}_{m}.png"
                    _png(img, tmp / name)
                    met = (pair.get("metrics") or {}).get(m)
                    txt = ""
                    if met:
                        txt = "<br>".join(f"{html.escape(a)}: {html.escape(_fmt(b))}" for a, b in met[k].items())
                    row.append(f"<td><img src='{html.escape(name)}' alt='{html.escape(m)}'><br>{txt}</td>")
                parts.append("<tr>" + "".join(row) + "</tr>")
            parts.append("</table></div>")
        parts.append("</body></html>")
        (tmp / "index.html").write_text("".join(parts), encoding="utf-8")
    return Path(out_dir) / "index.html"


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
                parts.append(f"<h4>level {li}: {html.escape(str(lv.level))}</h4><table class='grid'>"
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
