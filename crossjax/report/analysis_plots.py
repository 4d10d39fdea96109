"""The figures of the report's attribution and complexity sections (PNG, matplotlib Agg, as plots.py).

Per attributed task: the task metric per snapshot (clean and corrupted prompts, and with the top-k features
ablated against k random active ones), and the ablation/retention curves over k, one panel per snapshot. Per
complexity scorer: each scored feature's complexity against the training step where it emerges.
"""
from __future__ import annotations

import math

import numpy as np

from crossjax.report.plots import Plot, _figure, _save, _snapshot_axis

CURVE_K = 16       # the k of the per-snapshot figure's top-k against random line (or the largest k below it)


def k_index(ks: list[int], want: int = CURVE_K) -> int | None:
    below = [i for i, k in enumerate(ks) if k <= want]
    return below[-1] if below else None


def _positions(data, names: list[str], ax) -> np.ndarray:
    return _snapshot_axis(ax, data)[[data.snapshots.index(n) for n in names]]


def corrupted_label(hook: str) -> str:
    """What an attribution's "corrupted" metric is at this hook: the model always runs the clean prompts, so only at a
    residual hook is the corrupted activation patched in the corrupted run itself (crossjax/attribution/splice.py)."""
    if hook.rsplit(".", 1)[-1] in ("hook_attn_out", "hook_mlp_out"):
        return "corrupted activation patched in at the hook"
    return "corrupted prompts"


def plot_attribution_metric(data, task, out_dir: str) -> Plot:
    name = f"attribution_{task.key[len('attr_'):]}_metric"
    title = f"Task {task.task}: its metric at each snapshot"
    r, method = task.result, task.methods[0]
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    x = _positions(data, task.snapshots, ax)
    per = [r["snapshots"][n] for n in task.snapshots]
    ax.plot(x, [s["metric_clean"] for s in per], "o-", label="clean prompts")
    ax.plot(x, [s["metric_corrupted"] for s in per], "s--", label=corrupted_label(str(r["hook"])))
    ks = [k_index(s["curves"][method]["k"]) for s in per]
    top = [np.nan if i is None else s["curves"][method]["ablate_top"][i] for s, i in zip(per, ks)]
    rnd = [np.nan if i is None else s["curves"][method]["ablate_random"][i] for s, i in zip(per, ks)]
    shown = sorted({s["curves"][method]["k"][i] for s, i in zip(per, ks) if i is not None})
    k_label = "k=" + "/".join(map(str, shown)) if shown else "k"
    ax.plot(x, top, "v-", label=f"top-{k_label} by {method} ablated")
    ax.plot(x, rnd, "^:", label=f"{k_label} random active features ablated")
    ax.axhline(0, color="0.7", linewidth=0.8)
    ax.set_ylabel("logit(right) - logit(wrong)")
    ax.legend(fontsize=7, loc="best")
    return Plot(name, title, f"Mean logit difference between the right and the wrong answer over the task's "
                f"{r['pairs']} prompt pairs at {r['hook']}, with the crosscoder spliced in (the error term kept, so "
                f"the clean metric is the model's own), and with the {k_label} features of largest {method} set to "
                "zero against as many random features active on the prompts.", _save(fig, out_dir, name))


def plot_attribution_curves(data, task, out_dir: str) -> Plot:
    name = f"attribution_{task.key[len('attr_'):]}_curves"
    title = f"Task {task.task}: ablating and keeping the top-k features"
    method = task.methods[0]
    n = len(task.snapshots)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = _figure(3.0 * cols + 0.4, 2.4 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True, squeeze=False)).ravel()
    for ax, snap in zip(axes, task.snapshots):
        s = task.result["snapshots"][snap]
        c = s["curves"][method]
        k = np.asarray(c["k"], np.float64)
        ax.set_title(snap, fontsize=9)
        ax.axhline(s["metric_clean"], color="0.6", linewidth=0.8, linestyle=":")
        if len(k) == 0:
            ax.text(0.5, 0.5, "no active feature", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            continue
        ax.set_xscale("log", base=2)
        for key, style, color in (("ablate", "-", "tab:red"), ("retain", "-", "tab:blue")):
            ax.plot(k, c[f"{key}_top"], style, color=color, marker="o", markersize=2.5, label=f"{key} top-k")
            mean, std = np.asarray(c[f"{key}_random"], np.float64), np.asarray(c[f"{key}_random_std"], np.float64)
            ax.plot(k, mean, "--", color=color, alpha=0.6, label=f"{key} k random")
            ax.fill_between(k, mean - std, mean + std, color=color, alpha=0.12, linewidth=0)
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6, loc="best")
    fig.supxlabel("k features (log scale)", fontsize=9)
    fig.supylabel("task metric", fontsize=9)
    return Plot(name, title, f"At each snapshot, the task metric with the top-k features by {method} ablated (red) "
                "or alone kept (blue), solid, against k random active features (dashed, the band one standard "
                f"deviation over {task.result.get('draws', '?')} draws); dotted: the clean metric.",
                _save(fig, out_dir, name))


def plot_complexity(data, cx, out_dir: str) -> Plot:
    name, title = f"complexity_{cx.scorer}", f"Complexity ({cx.scorer}) against emergence"
    feats = [f for f, s in sorted(cx.scores.items()) if s["complexity"] is not None and data.emergence[f] >= 0]
    fig = _figure(7, 3.8)
    ax = fig.add_subplot()
    if data.steps is not None:
        x = np.asarray([data.steps[data.emergence[f]] for f in feats], np.float64)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("training step where the feature emerges (symlog)")
    else:
        x = np.asarray([data.emergence[f] for f in feats], np.float64)
        ax.set_xticks(range(len(data.snapshots)), data.snapshots, rotation=45, ha="right")
        ax.set_xlabel("snapshot where the feature emerges")
    y = np.asarray([cx.scores[f]["complexity"] for f in feats], np.float64)
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(y))     # scores are integers: spread the dots
    ax.scatter(x, y + jitter, s=12, alpha=0.6)
    for at in np.unique(x):
        ax.plot([at], [y[x == at].mean()], "_", color="tab:red", markersize=18, markeredgewidth=2)
    ax.set_ylabel("complexity (1 simple - 5 complex)")
    ax.set_ylim(0.5, 5.5)
    ax.set_title(correlation_text(cx), fontsize=8)
    return Plot(name, title, f"{len(feats)} scored emerging features: complexity by the {cx.scorer} scorer"
                + (f" ({cx.model})" if cx.model else "") + " against when each emerges (dots jittered vertically; "
                "red: the mean at each step). " + correlation_text(cx), _save(fig, out_dir, name))


def correlation_text(cx) -> str:
    c = cx.correlation
    if c.get("spearman_r") is None:
        return f"No correlation: {c.get('note') or 'too few scored features'}."

    def fig(key: str, fmt: str) -> str:
        return "n/a" if c.get(key) is None else format(c[key], fmt)
    return (f"Spearman r {fig('spearman_r', '+.3f')} (p {fig('spearman_p', '.3g')}), Pearson r "
            f"{fig('pearson_r', '+.3f')} (p {fig('pearson_p', '.3g')}), n = {c.get('features')} features.")


def write_all(data, out_dir: str) -> tuple[dict[str, list[Plot]], dict[str, Plot]]:
    """({task: [metric, curves]}, {scorer: scatter}) for every loaded analysis, into out_dir."""
    tasks = {t.task: [plot_attribution_metric(data, t, out_dir), plot_attribution_curves(data, t, out_dir)]
             for t in data.attribution}
    scorers = {c.scorer: plot_complexity(data, c, out_dir) for c in data.complexity}
    return tasks, scorers
