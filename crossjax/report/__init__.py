"""A finished run as a browsable report: PNG figures and a static site that opens from the file system.

    python -m crossjax.report --workdir=DIR            # or: crossjax.report.write_report("DIR")

writes DIR/report/index.html (open it in a browser; no network, no server) with

- figures (plots/*.png): the normalised decoder norms of every live feature sorted by emergence, the emergence
  histogram over training steps (symlog axis), the clusters' mean strength curves, the S x S rotation matrix
  (all live features and per kind), held-out EV and L0 per snapshot, EV against L0 for the crosscoder and the
  per-snapshot SAEs (when `python -m crossjax.compare` has run), separability AUC against decoder norm (when
  config.evals has separability). A figure whose input is missing is listed with the reason instead;
- a feature table (kind, emergence snapshot and step, cluster, frequency, separability, peak norm), sortable
  and filterable, paged so that 100,000 features stay a few MB in files of about 60 KB;
- feature.html?id=N for every feature: its strength curve (and probe AUC when sampled), kind, cluster,
  separability, its attribution per snapshot and complexity score when those analyses have run, and its top
  contexts at each snapshot with the firing token marked;
- when `python -m crossjax.analyze` (or the attribution evaluator) has run: a task attribution section (the task
  metric per snapshot, ablation/retention curves of the top-k features against k random ones, the top attributed
  features per snapshot linking to their pages) and a complexity section (complexity against emergence step,
  Spearman with p and n, the scorer), and their columns in the feature table (crossjax/report/sections.py).

Inputs: DIR/summary.json, DIR/export (crossjax/report/inputs.py), DIR/compare.json, DIR/attribution/ and
DIR/complexity_*.json when present (crossjax/report/analyses.py), and a FeatureIndex over the run's store for
frequencies and contexts (crossjax/report/contexts.py: the run's one index in DIR/index, shared with
`crossjax.analyze --complexity` and reused while it fits the same weights). Contexts are kept for the
`context_features` most frequent features plus the separability sample; the other features' pages say so.
Layout of the site: crossjax/report/site.py. The new report replaces the old one only once it is complete. DIR may
be on gs:// (the report is then built in a local temporary directory and uploaded, index.html last).
"""
from __future__ import annotations

import os
import shutil
import tempfile

import jax

from crossjax import console, paths
from crossjax.errors import CrossjaxError

REPORT_DIR = "report"


def write_report(workdir: str | os.PathLike, *, contexts: bool = True, context_features: int = 200,
                 contexts_per_snapshot: int = 10, index_rows: int = 131072, progress: bool = True) -> str:
    """Write workdir/report/ from a finished run and return the path of its index.html (module docstring).

    contexts: collect frequencies and top contexts (one pass of a FeatureIndex over up to `index_rows` store rows;
    False leaves them out). context_features: how many of the most frequent features get contexts (plus the
    separability sample). contexts_per_snapshot: examples kept per feature. Call it on every process of a multi-host run (they
    share the index's pass; process 0 writes).
    CrossjaxError when the run is unfinished or its files are damaged."""
    from crossjax.report import contexts as contexts_lib
    from crossjax.report import inputs

    for name, value in (("context_features", context_features), ("contexts_per_snapshot", contexts_per_snapshot),
                        ("index_rows", index_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "context_features" else 1):
            raise CrossjaxError(f"report option {name}={value!r} must be a "
                                f"{'non-negative' if name == 'context_features' else 'positive'} integer")
    data = inputs.load(os.fspath(workdir))
    report = paths.join(data.workdir, REPORT_DIR)
    collected, note = None, "frequencies and top contexts: left out (contexts=False)"
    if contexts:   # first: every process takes part in the feature index's pass over the store
        try:
            collected = contexts_lib.collect(data, features=context_features, per_snapshot=contexts_per_snapshot,
                                             rows=index_rows, progress=progress)
            note = (f"Top contexts were collected for the {context_features} most frequent features and the "
                    "features sampled for separability (python -m crossjax.report --context_features=N for more); "
                    "this feature is not among them.")
        except CrossjaxError as e:
            note = f"frequencies and top contexts: left out, no feature index over the run's store ({e})"
            console.say("report", note, enabled=progress)
    if jax.process_index() != 0:                 # the report is written once, by process 0
        return paths.join(report, "index.html")
    if not paths.is_gcs(report):
        staging = report + ".partial"            # a report stopped half way: ours to clear
        shutil.rmtree(staging, ignore_errors=True)
        _write_site(data, collected, note, staging, progress)
        _replace(staging, report)
    else:                                        # built here, uploaded once complete
        staging = tempfile.mkdtemp(prefix="crossjax-report-")
        try:
            _write_site(data, collected, note, staging, progress)
            _upload(staging, report)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    index = paths.join(report, "index.html")
    console.say("report", f"wrote {index}", enabled=progress)
    return index


def _write_site(data, collected, note: str, staging: str, progress: bool) -> None:
    """The whole site in the local directory `staging` (plots/, data/, the pages)."""
    from crossjax.report import analysis_plots, plots, site
    os.makedirs(os.path.join(staging, "plots"))
    console.say("report", f"figures for {data.num_features} features over {len(data.snapshots)} snapshots",
                enabled=progress)
    figures = plots.write_all(data, os.path.join(staging, "plots"))
    analysis = analysis_plots.write_all(data, os.path.join(staging, "plots"))
    site.write_site(data, figures, collected, note, staging, analysis)


def _upload(local: str, report: str) -> None:
    """Put the finished local site `local` at the gs:// prefix `report`: every file uploaded, index.html last (a
    reader gets the new index.html only once every page and figure it links to is there), then the objects of
    the previous report that the new one does not have are removed."""
    new = paths.list_files(local)
    old = set(paths.list_files(report)) - set(new)
    for rel in sorted(new, key=lambda name: name == "index.html"):
        with open(os.path.join(local, *rel.split("/")), "rb") as f:
            paths.write_bytes(paths.join(report, rel), f.read())
    for rel in sorted(old):
        paths.remove(paths.join(report, rel))


def _replace(new: str, old: str) -> None:
    """Put the finished directory `new` where `old` is; the old report is removed only after the swap."""
    previous = old + ".old"
    shutil.rmtree(previous, ignore_errors=True)
    if os.path.exists(old):
        os.replace(old, previous)
    os.replace(new, old)
    shutil.rmtree(previous, ignore_errors=True)
