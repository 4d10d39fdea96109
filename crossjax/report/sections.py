"""The index page's sections of the analyses that have run: task attribution and feature complexity.

Attribution, per task: what was measured, a table per analyzed snapshot (metric on the clean and corrupted prompts,
active features, the metric with the top-k features by the first method ablated against k random ones, the top
attributed features linking to their pages) and the two figures of analysis_plots. Complexity, per scorer: the
correlation of complexity with emergence (Spearman with p and n, Pearson), the scorer used and its figure.
"""
from __future__ import annotations

import html

from crossjax.report.analysis_plots import corrupted_label, correlation_text, k_index

TOP_SHOWN = 5          # top attributed features listed per snapshot


def figure_html(p) -> str:
    """A figure of plots.Plot, or the reason it was skipped."""
    if p.file is None:
        return (f'<section class="plot" id="plot-{p.name}"><h3>{html.escape(p.title)}</h3>'
                f'<p class="skipped">{html.escape(p.caption)}</p></section>\n')
    return (f'<figure class="plot" id="plot-{p.name}"><h3>{html.escape(p.title)}</h3>'
            f'<img src="plots/{html.escape(p.file)}" alt="{html.escape(p.title)}">'
            f"<figcaption>{html.escape(p.caption)}</figcaption></figure>\n")


def _cell(v) -> str:
    return "" if v is None else f"{v:+.3f}"


def _feature_links(top: list) -> str:
    return " ".join(f'<a href="feature.html?id={int(f)}" title="{v:+.4g}">{int(f)}</a>' for f, v in top[:TOP_SHOWN])


def attribution_html(data, figures: dict) -> str:
    """The attribution section (empty when no task was attributed)."""
    if not data.attribution:
        return ""
    out = ['<h2 id="attribution">Task attribution</h2>\n<p>Which features carry a behaviour at each snapshot: the '
           "task's prompt pairs (clean and corrupted) through each snapshot with the crosscoder spliced in at the "
           "hook, the reconstruction error kept as a term so the output is the model's own; each feature's "
           "attribution to the metric (logit of the right answer minus the wrong one), and the metric when the "
           "top attributed features are ablated against as many random active features.</p>\n"]
    for t in data.attribution:
        r, method = t.result, t.methods[0]
        out.append(f'<section class="analysis" id="attribution-{html.escape(t.key)}">'
                   f"<h3>Task {html.escape(t.task)}</h3>\n"
                   f'<p class="facts"><b>{r["pairs"]}</b> pairs at <code>{html.escape(str(r["hook"]))}</code>; '
                   f"methods {html.escape(', '.join(t.methods))} (integrated gradients: {r.get('ig_steps')} steps); "
                   f"random sets: {r.get('draws')} draws, seed {r.get('seed')}; the table ranks by "
                   f"<b>{html.escape(method)}</b>; <i>corrupted</i> is the metric with the "
                   f"{html.escape(corrupted_label(str(r['hook'])))}. Sort the feature table by its "
                   f"<i>attr {html.escape(t.task)}</i> column for every feature.</p>\n"
                   '<table class="analysis"><thead><tr><th class="str">snapshot</th><th>clean</th>'
                   "<th>corrupted</th><th>active</th><th>k</th><th>top-k ablated</th><th>random k ablated</th>"
                   f'<th class="str">top features by {html.escape(method)}</th></tr></thead><tbody>\n')
        for name in t.snapshots:
            s = r["snapshots"][name]
            c = s["curves"][method]
            i = k_index(c["k"])
            out.append(f'<tr><td class="str">{html.escape(name)}</td><td>{_cell(s["metric_clean"])}</td>'
                       f'<td>{_cell(s["metric_corrupted"])}</td><td>{s.get("active_features") or 0}</td>'
                       f'<td>{"" if i is None else c["k"][i]}</td>'
                       f'<td>{"" if i is None else _cell(c["ablate_top"][i])}</td>'
                       f'<td>{"" if i is None else _cell(c["ablate_random"][i])}</td>'
                       f'<td class="str">{_feature_links(s["top"][method])}</td></tr>\n')
        out.append("</tbody></table>\n")
        out.extend(figure_html(p) for p in figures.get(t.task, []))
        out.append("</section>\n")
    return "".join(out)


def complexity_html(data, figures: dict) -> str:
    """The complexity section (empty when no scorer has run)."""
    if not data.complexity:
        return ""
    out = ['<h2 id="complexity">Feature complexity against emergence</h2>\n<p>Do the features that form late '
           "do more complex things? A sample of emerging features scored 1-5 from their top contexts, against the "
           "training step where each emerges.</p>\n"]
    for c in data.complexity:
        scored = sum(s["complexity"] is not None for s in c.scores.values())
        failed = len(c.scores) - scored
        out.append(f'<section class="analysis" id="complexity-{html.escape(c.scorer)}">'
                   f"<h3>Scorer {html.escape(c.scorer)}" + (f" ({html.escape(c.model)})" if c.model else "")
                   + f'</h3>\n<p class="facts"><b>{scored}</b> features scored of {len(c.scores)} drawn among '
                   f"{c.eligible} emerging ones" + (f" ({failed} failed)" if failed else "")
                   + f". {html.escape(correlation_text(c))} Each feature's score and explanation is on its page; "
                   f"the feature table's <i>complexity ({html.escape(c.scorer)})</i> column sorts by it.</p>\n")
        if c.scorer in figures:
            out.append(figure_html(figures[c.scorer]))
        out.append("</section>\n")
    return "".join(out)
