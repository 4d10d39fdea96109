"""The report's static site: index.html (run facts, figures, the feature table) and feature.html?id=N.

Layout of the report directory (every file small, whatever the number of features F):

    index.html, feature.html, style.css, common.js, table.js, feature.js    the pages and their code
    plots/*.png                                                              the figures (crossjax/report/plots.py)
    data/meta.js                      snapshots, columns, page sizes, notes (loaded by both pages)
    data/table/table_NNNNN.js         the table's rows, TABLE_PAGE features per file, loaded when shown
    data/feature/feature_NNNNN.js     per-feature data (strength curve, facts, contexts), FEATURE_CHUNK per file

The table shows VIEW_ROWS rows at a time in feature order, loading only the file that holds them; sorting or
filtering loads every table file once (F rows of a few numbers each) and works in memory. feature.html reads
its id from the query string and loads the one chunk that holds it, so there is one page for all features.
Data files are scripts (crossjax/report/assets.py), since browsers refuse fetch() from file://.
"""
from __future__ import annotations

import html
import json
import math
import os

import numpy as np

from crossjax.report import assets, sections

TABLE_PAGE = 1000          # rows per table file (about 60 KB)
FEATURE_CHUNK = 250        # features per feature-data file
VIEW_ROWS = 50             # rows on screen; divides TABLE_PAGE


def _num(x) -> float | None:
    """A float for JSON, 4 significant digits (None for NaN and infinities)."""
    x = float(x)
    return float(f"{x:.4g}") if math.isfinite(x) else None


def _script(kind: str, n: int, value) -> str:
    return f"crossjaxData({json.dumps(kind)},{n},{json.dumps(value, separators=(',', ':'), allow_nan=False)});\n"


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def columns(data, collected) -> list[dict]:
    """The feature table's columns: key, label, type (int, num, str, snapshot) and a tooltip."""
    cols = [dict(key="id", label="feature", type="int", help="feature id; opens its page"),
            dict(key="kind", label="kind", type="str", help="initialisation, emergent, transient, persistent, dead"),
            dict(key="emerges", label="emerges at", type="snapshot",
                 help=f"first snapshot whose decoder norm reaches {data.threshold:g} of the feature's peak")]
    if data.steps is not None:
        cols.append(dict(key="step", label="emergence step", type="int", help="training step of that snapshot"))
    cols.append(dict(key="cluster", label="cluster", type="int", help="k-means cluster of the strength curve"))
    if collected is not None:
        cols.append(dict(key="frequency", label="frequency", type="num",
                         help=f"fraction of {collected.rows_scanned} scanned store rows where the feature fires"))
    if data.separability is not None:
        cols.append(dict(key="separability", label="separability rho", type="num",
                         help="Spearman rho between probe AUC and decoder norm over snapshots (sampled features)"))
    for t in data.attribution:
        cols.append(dict(key=t.key, label=f"attr {t.task}", type="num",
                         help=f"largest {t.methods[0]} of the task {t.task} over its {len(t.snapshots)} analyzed "
                         "snapshots (positive: pushes towards the right answer)"))
    for c in data.complexity:
        cols.append(dict(key=f"cx_{c.scorer}", label=f"complexity ({c.scorer})", type="int",
                         help=f"1-5 complexity by the {c.scorer} scorer (a sample of emerging features)"))
    cols.append(dict(key="peak_norm", label="peak norm", type="num", help="largest decoder norm over snapshots"))
    if collected is not None:
        cols.append(dict(key="contexts", label="contexts", type="int", help="top contexts shown on its page"))
    return cols


def table_rows(data, collected, cols: list[dict]) -> list[list]:
    """[F] rows in column order."""
    peak = data.norms.max(axis=0)
    sep = data.separability_by_feature()
    values = {
        "id": range(data.num_features), "kind": data.kinds.tolist(), "emerges": data.emergence.tolist(),
        "step": [None if e < 0 else data.steps[e] for e in data.emergence] if data.steps is not None else None,
        "cluster": [None if c < 0 else int(c) for c in data.clusters],
        "frequency": None if collected is None else [_num(v) for v in collected.frequency],
        "separability": [sep[f][0] if f in sep else None for f in range(data.num_features)],
        "peak_norm": [_num(v) for v in peak],
        **{t.key: [_num(v) for v in t.peak()] for t in data.attribution},
        **{f"cx_{c.scorer}": [c.scores.get(f, {}).get("complexity") for f in range(data.num_features)]
           for c in data.complexity},
        "contexts": None if collected is None else [
            len(collected.contexts[f].examples) if f in collected.contexts else None for f in range(data.num_features)],
    }
    return [list(row) for row in zip(*(values[c["key"]] for c in cols))]


def feature_record(data, collected, sep: dict, f: int) -> dict:
    """What feature.html shows of feature f."""
    peak = float(data.norms[:, f].max())
    rho, auc = sep.get(f, (None, None))
    ctx = collected.contexts.get(f) if collected is not None else None
    return {
        "s": np.round(data.strength[:, f].astype(np.float64), 4).tolist(), "peak": _num(peak), "kind": str(data.kinds[f]),
        "em": int(data.emergence[f]), "cl": int(data.clusters[f]),
        "freq": None if collected is None else _num(collected.frequency[f]),
        "rho": rho, "auc": None if auc is None else [_num(a) for a in auc],
        "ctx": None if ctx is None else {
            "ex": [[c.row, _num(c.value), c.before, c.token, c.after] for c in ctx.examples], "fires": ctx.fires},
        # per task, per method: [S'] attribution at the task's analyzed snapshots (meta.attribution says which)
        "at": [[[_num(v) for v in t.scores[m][:, f]] for m in t.methods] for t in data.attribution],
        # per scorer: [complexity, explanation] or None when the feature was not scored
        "cx": [None if f not in c.scores else [c.scores[f]["complexity"], c.scores[f]["explanation"]
                                               or c.scores[f]["error"] or ""] for c in data.complexity],
    }


def write_site(data, plots, collected, contexts_note: str, out_dir: str, analysis=({}, {})) -> str:
    """Write the pages, their code and data files into out_dir (the figures are already in out_dir/plots;
    analysis: analysis_plots.write_all's figures of the attribution and complexity sections); return the index
    page's path."""
    cols = columns(data, collected)
    rows = table_rows(data, collected, cols)
    for p in range(0, max(len(rows), 1), TABLE_PAGE):
        _write(os.path.join(out_dir, "data", "table", f"table_{p // TABLE_PAGE:05d}.js"),
               _script("table", p // TABLE_PAGE, rows[p:p + TABLE_PAGE]))
    sep = data.separability_by_feature()
    for lo in range(0, data.num_features, FEATURE_CHUNK):
        records = [feature_record(data, collected, sep, f) for f in range(lo, min(lo + FEATURE_CHUNK,
                                                                                    data.num_features))]
        _write(os.path.join(out_dir, "data", "feature", f"feature_{lo // FEATURE_CHUNK:05d}.js"),
               _script("feature", lo // FEATURE_CHUNK, records))
    meta = {
        "num_features": data.num_features, "snapshots": data.snapshots, "steps": data.steps,
        "threshold": data.threshold, "activation": data.activation, "columns": cols,
        "page_size": TABLE_PAGE, "num_pages": max(1, math.ceil(data.num_features / TABLE_PAGE)),
        "view_rows": VIEW_ROWS, "chunk_size": FEATURE_CHUNK, "has_frequency": collected is not None,
        "rows_scanned": None if collected is None else collected.rows_scanned,
        "has_separability": data.separability is not None, "contexts_note": contexts_note,
        "attribution": [{"task": t.task, "key": t.key, "methods": t.methods, "snapshots": t.snapshots}
                        for t in data.attribution],
        "complexity": [{"scorer": c.scorer, "model": c.model} for c in data.complexity],
    }
    _write(os.path.join(out_dir, "data", "meta.js"), _script("meta", 0, meta))
    for name, text in (("style.css", assets.STYLE_CSS), ("common.js", assets.COMMON_JS),
                       ("table.js", assets.TABLE_JS), ("feature.js", assets.FEATURE_JS)):
        _write(os.path.join(out_dir, name), text.lstrip())
    _write(os.path.join(out_dir, "feature.html"), _feature_html(data))
    index = os.path.join(out_dir, "index.html")
    _write(index, _index_html(data, plots, collected, contexts_note, analysis))
    return index


def _head(title: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n<link rel="icon" href="data:,">\n'
            '<link rel="stylesheet" href="style.css">\n<script src="common.js"></script>\n'
            '<script src="data/meta.js"></script>\n</head>\n')


def _title(data) -> str:
    return f"crossjax report: {os.path.basename(data.workdir) or data.workdir}"


def _facts(data, collected) -> str:
    s = data.summary
    kinds = ", ".join(f"{k} {v}" for k, v in (s.evolution.get("kinds") or {}).items() if v)
    ev = s.heldout.get("ev_mean")
    parts = [f"<b>{s.steps}</b> steps, <b>{s.tokens}</b> tokens",
             f"<b>{data.num_features}</b> features ({html.escape(data.activation)})",
             f"<b>{len(data.snapshots)}</b> snapshots: {html.escape(', '.join(data.snapshots))}"]
    if ev is not None and math.isfinite(ev):
        parts.append(f"held-out EV <b>{ev:.4f}</b>")
    if kinds:
        parts.append(f"features by kind: {html.escape(kinds)}")
    if data.separability is not None and data.separability.get("median_spearman") is not None:
        parts.append(f"median Spearman rho of separability against decoder norm: "
                     f"<b>{data.separability['median_spearman']:.3f}</b> over {len(data.separability['features'])} "
                     "sampled features")
    if collected is not None:
        parts.append(f"frequencies and contexts from {collected.rows_scanned} store rows"
                     + ("" if collected.decoded else " (token ids: the run has no tokenizer)"))
    return ('<p class="facts">' + "<br>\n".join(parts) + f"<br>\nrun: <code>{html.escape(data.workdir)}</code></p>\n")


def _index_html(data, plots, collected, contexts_note: str, analysis=({}, {})) -> str:
    out = [_head(_title(data)), "<body>\n", f"<h1>{html.escape(_title(data))}</h1>\n", _facts(data, collected)]
    notes = list(data.notes) + ([contexts_note] if collected is None else [])
    if notes:
        out.append('<h2>Left out</h2>\n<ul class="notes">\n'
                   + "".join(f"<li>{html.escape(n)}</li>\n" for n in notes) + "</ul>\n")
    out.append("<h2>Figures</h2>\n")
    out.extend(sections.figure_html(p) for p in plots)
    out.append(sections.attribution_html(data, analysis[0]))
    out.append(sections.complexity_html(data, analysis[1]))
    out.append(
        "<h2>Features</h2>\n<p>Click a column to sort (again to reverse). Filter with words (matched against kind "
        "and snapshot names) or terms such as <code>kind:emergent</code>, <code>emerges:" +
        html.escape(data.snapshots[-1]) + "</code>, <code>cluster=2</code>"
        + (", <code>freq&gt;0.01</code>" if collected is not None else "")
        + (", <code>rho&gt;0.5</code>" if data.separability is not None else "")
        + "".join(f", <code>{html.escape(t.key)}&gt;0.01</code>" for t in data.attribution[:1])
        + "".join(f", <code>cx_{html.escape(c.scorer)}&gt;=3</code>" for c in data.complexity[:1])
        + ", <code>norm&lt;0.1</code>; all terms must match.</p>\n"
        '<div class="controls"><input id="filter" type="search" placeholder="filter, e.g. kind:emergent cluster=1" '
        'aria-label="filter features"><span id="status"></span></div>\n'
        '<table class="features" id="features" data-state="loading"><thead><tr></tr></thead><tbody></tbody></table>\n'
        '<div class="controls pager"><button id="first">&laquo; first</button><button id="prev">&lsaquo; prev'
        '</button><span id="pageinfo"></span><button id="next">next &rsaquo;</button>'
        '<button id="last">last &raquo;</button></div>\n'
        '<script src="table.js"></script>\n</body></html>\n')
    return "".join(out)


ATTRIBUTION_BLOCK = ("<h2>Attribution per snapshot</h2>\n<p>Its attribution to each attributed task's metric (logit "
                     "of the right answer minus the wrong one) at each analyzed snapshot, by each method.</p>"
                     '<div id="attribution"></div>\n')


def _feature_html(data) -> str:
    return (_head(_title(data)) + "<body>\n"
            '<nav class="controls"><a href="index.html">&larr; all features</a><a id="prev">&lsaquo; previous</a>'
            '<a id="next">next &rsaquo;</a></nav>\n'
            '<main id="feature" data-state="loading"><h1 id="title">Feature</h1><p id="message"></p>\n'
            '<dl class="facts" id="facts"></dl>\n<h2>Strength over training</h2><div id="curve"></div>\n'
            + (ATTRIBUTION_BLOCK if data.attribution else "") +
            '<h2>Top contexts per snapshot</h2>\n<p>The firing token is marked; the number before each context is '
            "the feature's activation on it.</p><div id=\"contexts\"></div></main>\n"
            '<script src="feature.js"></script>\n</body></html>\n')
