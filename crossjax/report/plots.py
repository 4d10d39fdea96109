"""The report's figures as PNG files (matplotlib, no display: Figure objects rendered by Agg, no pyplot state).

Each `plot_*` takes an inputs.RunData and the output directory and returns a `Plot`: its file name, title and
caption, or, when its input is missing, no file and the reason (shown on the index page instead of the figure).
Snapshots are placed at their training step on a symlog axis (linear below step 1, so step 0 has a place) when
their names carry it (stepN), else at their index.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from crossjax.analysis import evolution

_DPI = 110
_MAX_COLUMNS = 4000     # heat map columns: more features are subsampled evenly (the picture is the same)


@dataclasses.dataclass(frozen=True)
class Plot:
    name: str                 # file stem, e.g. "strength"
    title: str
    caption: str              # what it shows, or why it was skipped
    file: str | None = None   # the PNG's name in the report directory; None when skipped


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(fig, out_dir: str, name: str) -> str:
    fig.savefig(os.path.join(out_dir, f"{name}.png"))
    return f"{name}.png"


def _snapshot_axis(ax, data, axis: str = "x") -> np.ndarray:
    """Positions [S] of the snapshots on `axis`, with that axis scaled and labelled."""
    set_scale = ax.set_xscale if axis == "x" else ax.set_yscale
    set_label = ax.set_xlabel if axis == "x" else ax.set_ylabel
    if data.steps is not None:
        set_scale("symlog", linthresh=1.0)
        set_label("training step (symlog)")
        return np.asarray(data.steps, np.float64)
    ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    positions = np.arange(len(data.snapshots))
    ticks(positions, data.snapshots, **({"rotation": 45, "ha": "right"} if axis == "x" else {}))
    set_label("snapshot")
    return positions


def _skip(name: str, title: str, reason: str) -> Plot:
    return Plot(name, title, reason)


def emergence_order(data) -> np.ndarray:
    """Live feature ids sorted by emergence snapshot, then peak snapshot, then final strength (strongest first)."""
    live = np.flatnonzero(data.kinds != evolution.KIND_DEAD)
    peak = np.argmax(data.strength[:, live], axis=0)
    return live[np.lexsort((-data.strength[-1, live], peak, data.emergence[live]))]


def plot_strength(data, out_dir: str) -> Plot:
    name, title = "strength", "Feature strength over training"
    order = emergence_order(data)
    if len(order) == 0:
        return _skip(name, title, "skipped: every feature is dead (zero decoder norm)")
    shown = order[np.linspace(0, len(order) - 1, _MAX_COLUMNS).astype(int)] if len(order) > _MAX_COLUMNS else order
    fig = _figure(10, 0.28 * len(data.snapshots) + 2.2)
    ax = fig.add_subplot()
    im = ax.imshow(data.strength[:, shown], aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(data.snapshots)), data.snapshots)
    ax.set_ylabel("snapshot")
    ax.set_xlabel(f"{len(order)} live features, sorted by emergence snapshot"
                  + (f" ({len(shown)} shown, evenly spaced)" if len(shown) < len(order) else ""))
    fig.colorbar(im, ax=ax, label="decoder norm / its peak")
    return Plot(name, title, "Normalised decoder norm n[s, f] / max_s n[s, f] of every live feature (columns) at each "
                "snapshot (rows), features sorted by the snapshot where they first reach "
                f"{data.threshold:g} of their peak.", _save(fig, out_dir, name))


def plot_emergence(data, out_dir: str) -> Plot:
    name, title = "emergence", "When emergent features form"
    evo = data.summary.evolution
    by_step, by_snapshot = evo.get("emergent_features_by_step"), evo.get("emergent_features_by_snapshot")
    if not by_snapshot:
        return _skip(name, title, "skipped: summary.json has no emergence histogram")
    counts = np.asarray(list(by_snapshot.values()), np.float64)
    fig = _figure(7, 3.4)
    ax = fig.add_subplot()
    if by_step and data.steps is not None:
        x = np.asarray(data.steps, np.float64)
        counts = np.asarray([by_step.get(str(s), 0) for s in data.steps], np.float64)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.vlines(x, 0, counts, linewidth=5, color="tab:blue")
        ax.plot(x, counts, "o", color="tab:blue")
        ax.set_xlabel("training step of the snapshot (symlog; step 0 on the linear part)")
        where = "training step"
    else:
        x = np.arange(len(counts))
        ax.bar(x, counts, color="tab:blue")
        ax.set_xticks(x, list(by_snapshot), rotation=45, ha="right")
        ax.set_xlabel("snapshot (the names carry no training step)")
        where = "snapshot"
    ax.set_ylabel("emergent features")
    ax.set_ylim(0, max(1.0, counts.max() * 1.1))
    return Plot(name, title, f"How many emergent features first reach {data.threshold:g} of their peak decoder norm "
                f"at each {where} ({int(counts.sum())} emergent features).", _save(fig, out_dir, name))


def plot_clusters(data, out_dir: str) -> Plot:
    name, title = "clusters", "Clusters of strength curves"
    cl = data.summary.evolution.get("clusters") or {}
    curves, sizes = np.asarray(cl.get("mean_curves") or [], np.float64), list(cl.get("sizes") or [])
    if not sizes:
        return _skip(name, title, "skipped: summary.json has no clusters (no live feature)")
    fig = _figure(7, 3.8)
    ax = fig.add_subplot()
    x = _snapshot_axis(ax, data)
    for c, (curve, size) in enumerate(zip(curves, sizes)):
        ax.plot(x, curve, "o-", markersize=3, label=f"cluster {c} ({size})")
    ax.set_ylabel("mean decoder norm / peak")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="best")
    return Plot(name, title, f"Mean normalised strength curve of each of the {len(sizes)} k-means clusters of the "
                "live features' curves (numbered by when they form; feature counts in brackets).",
                _save(fig, out_dir, name))


def plot_rotation(data, out_dir: str) -> Plot:
    name, title = "rotation", "How decoder directions turn"
    evo = data.summary.evolution
    if not evo.get("rotation"):
        return _skip(name, title, "skipped: summary.json has no rotation matrix")
    panels = [("all live features", evo["rotation"])] + sorted((evo.get("rotation_by_kind") or {}).items())
    s = len(data.snapshots)
    fig = _figure(3.4 * len(panels) + 0.8, 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, matrix) in zip(axes, panels):
        m = np.asarray([[np.nan if v is None else v for v in row] for row in matrix], np.float64)
        im = ax.imshow(np.ma.masked_invalid(m), vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
        ax.set_title(label, fontsize=9)
        step = max(1, s // 8)
        ax.set_xticks(range(0, s, step), data.snapshots[::step], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(0, s, step), data.snapshots[::step], fontsize=7)
    fig.colorbar(im, ax=list(axes), label="mean cosine")
    return Plot(name, title, "Mean cosine between a feature's decoder directions at two snapshots (S x S), over the "
                "live features and per kind: a sharp turn shows as a block edge.", _save(fig, out_dir, name))


def plot_heldout(data, out_dir: str) -> Plot:
    name, title = "heldout", "Explained variance and L0 per snapshot"
    h = data.summary.heldout
    if h.get("ev") is None or h.get("l0") is None:
        return _skip(name, title, "skipped: no held-out evaluation (add heldout to config.evals)")
    fig = _figure(9, 3.4)
    ax_ev, ax_l0 = fig.subplots(1, 2)
    for ax, key, label in ((ax_ev, "ev", "explained variance"), (ax_l0, "l0", "L0 (active features per token)")):
        x = _snapshot_axis(ax, data)
        ax.plot(x, h[key], "o-")
        ax.set_ylabel(label)
    return Plot(name, title, f"Held-out explained variance (variance about the mean) and L0 of the crosscoder at "
                f"each snapshot, over {h.get('rows', '?')} held-out rows.", _save(fig, out_dir, name))


def plot_ev_l0(data, out_dir: str) -> Plot:
    name, title = "ev_l0", "Crosscoder against per-snapshot SAEs"
    if data.compare is None:
        return _skip(name, title, "skipped: no compare.json (run python -m crossjax.compare with the run's "
                     "--config and --workdir)")
    cc, sae, names = data.compare["crosscoder"], data.compare["sae"], data.compare["snapshots"]
    fig = _figure(6, 4.2)
    ax = fig.add_subplot()
    for a, b, n in zip(zip(cc["l0"], cc["ev"]), zip(sae["l0"], sae["ev"]), names):
        ax.plot([a[0], b[0]], [a[1], b[1]], color="0.8", linewidth=0.8, zorder=1)
        ax.annotate(n, a, fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.scatter(cc["l0"], cc["ev"], label="crosscoder", zorder=2)
    ax.scatter(sae["l0"], sae["ev"], marker="s", label="per-snapshot SAE", zorder=2)
    ax.set_xlabel("L0")
    ax.set_ylabel("held-out explained variance")
    ax.legend()
    return Plot(name, title, "Held-out EV against L0 at each snapshot for the crosscoder and an SAE trained on that "
                "snapshot alone with the same settings (grey lines join the same snapshot).",
                _save(fig, out_dir, name))


def plot_separability(data, out_dir: str) -> Plot:
    name, title = "separability", "Linear separability against decoder norm"
    sep = data.separability
    if sep is None:
        return _skip(name, title, "skipped: separability was not measured (add separability to config.evals)")
    auc, norm = np.asarray(sep["auc"], np.float64), np.asarray(sep["norm"], np.float64)     # [k, S]
    peak = norm.max(axis=1, keepdims=True)
    rel = np.divide(norm, peak, out=np.zeros_like(norm), where=peak > 0)
    rho = np.asarray([np.nan if r is None else r for r in sep["spearman"]], np.float64)
    fig = _figure(9, 3.6)
    ax, hist = fig.subplots(1, 2)
    for i in range(len(auc)):
        ax.plot(rel[i], auc[i], "o", markersize=3, alpha=0.7)
    ax.set_xlabel("decoder norm / feature's peak")
    ax.set_ylabel("probe AUC (held-out half)")
    finite = rho[np.isfinite(rho)]
    hist.hist(finite, bins=np.linspace(-1, 1, 21), color="tab:green")
    hist.set_xlabel("Spearman rho (AUC vs norm, over snapshots)")
    hist.set_ylabel("features")
    median = sep.get("median_spearman")
    med = "n/a" if median is None else f"{median:.3f}"
    hist.set_title(f"median {med}", fontsize=9)
    return Plot(name, title, f"For {len(auc)} sampled features: each snapshot's linear-probe AUC against the "
                f"feature's normalised decoder norm there (left), and the Spearman correlation per feature (right; "
                f"median {med}).", _save(fig, out_dir, name))


def plot_phases(data, out_dir: str) -> Plot:
    name, title = "phases", "Two phases: n-gram statistics, then features"
    phases = data.summary.evals.get("phases")
    if not phases:
        return _skip(name, title, "skipped: the two phases were not measured (model snapshots with phases in "
                     "config.evals and eval.phases_tokens > 0)")
    curves = phases["curves"]
    names = [n for n in data.snapshots if n in curves]
    fig = _figure(9, 3.6)
    ax, hist = fig.subplots(1, 2, sharex=True)
    x = _snapshot_axis(ax, data)[[data.snapshots.index(n) for n in names]]
    for key, label in (("kl_unigram", "KL(unigram || model)"), ("kl_bigram", "KL(bigram || model)"),
                       ("loss", "loss")):
        ax.plot(x, [curves[n][key] for n in names], "o-", markersize=3, label=label)
    t = phases["transition"]
    if t["snapshot"] in names:
        ax.axvline(x[names.index(t["snapshot"])], color="grey", linestyle=":", label="transition")
    ax.set_ylabel("nats")
    ax.legend(fontsize=8)
    by_step = data.summary.evolution.get("emergent_features_by_step")
    by_snapshot = data.summary.evolution.get("emergent_features_by_snapshot") or {}
    counts = ([by_step.get(str(s), 0) for s in data.steps] if by_step and data.steps is not None
              else [by_snapshot.get(n, 0) for n in data.snapshots])
    _snapshot_axis(hist, data)
    hist.vlines(_snapshot_axis(hist, data), 0, counts, linewidth=5, color="tab:blue")
    hist.set_ylabel("emergent features")
    return Plot(name, title, "Left: each snapshot's held-out loss and the KL from the corpus unigram and bigram "
                f"statistics to its next-token distribution; the transition (dotted) is where the KL to the bigram "
                f"statistics is smallest ({t['snapshot']}). Right: when the emergent features form.",
                _save(fig, out_dir, name))


PLOTS: tuple[Callable, ...] = (plot_strength, plot_emergence, plot_phases, plot_clusters, plot_rotation,
                               plot_heldout, plot_ev_l0, plot_separability)


def write_all(data, out_dir: str) -> list[Plot]:
    """Every figure into out_dir, in the index page's order."""
    return [plot(data, out_dir) for plot in PLOTS]
