"""What a report is made of: a finished run's summary, its exported decoder and, when present, compare.json.

`load(workdir)` reads them once into a `RunData`, with the analyses that have run (task attribution, complexity:
crossjax/report/analyses.py); the plots and the site read only that. The per-feature arrays
are recomputed from the exported decoder with the same functions and settings the run's summary used
(crossjax.analysis.evolution, trajectories), so the table agrees with summary.json: the emergence threshold
from the summary, the clusters' k from its `clusters.sizes` and their seed from the run's train.seed.

Missing optional inputs (compare.json, the separability evaluation) are not errors: the field is None and
`notes` says why, for the index page. Missing or damaged required ones (summary.json, the export) are
CrossjaxErrors naming the fix.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from crossjax import crosscoder_export, paths
from crossjax import workdir as workdir_lib
from crossjax.analysis import evolution, trajectories
from crossjax.errors import CrossjaxError
from crossjax.report import analyses
from crossjax.summary import RunSummary

COMPARE_FILE = "compare.json"


@dataclasses.dataclass
class RunData:
    """One finished run, as the report needs it. S snapshots, F features."""
    workdir: str
    summary: RunSummary
    export_dir: str
    snapshots: list[str]               # [S] in store order
    steps: list[int] | None            # [S] training step of each snapshot (names stepN), None otherwise
    activation: str                    # the crosscoder's activation (jumprelu gates per snapshot)
    norms: np.ndarray                  # [S, F] decoder norms
    strength: np.ndarray               # [S, F] norms / each feature's peak
    theta: np.ndarray | None           # [F] JumpReLU thresholds exp(log_threshold); None for other activations
    emergence: np.ndarray              # [F] first snapshot where strength >= threshold, -1 for dead features
    kinds: np.ndarray                  # [F] evolution.KINDS
    clusters: np.ndarray               # [F] cluster of each feature's strength curve, -1 for dead features
    compare: dict | None               # compare.json (crossjax.compare), None when it has not run
    separability: dict | None          # summary.evals["separability"], None when not measured
    notes: list[str] = dataclasses.field(default_factory=list)   # what was left out, and why
    attribution: list = dataclasses.field(default_factory=list)  # [analyses.TaskAttribution] tasks attributed
    complexity: list = dataclasses.field(default_factory=list)   # [analyses.Complexity] scorers that have run

    @property
    def num_features(self) -> int:
        return int(self.norms.shape[1])

    @property
    def threshold(self) -> float:
        return float(self.summary.evolution.get("emergence_threshold", evolution.PRESENT))

    def separability_by_feature(self) -> dict[int, tuple[float | None, list[float]]]:
        """{feature: (Spearman rho or None, AUC [S])} for the features the separability evaluation sampled."""
        sep = self.separability or {}
        rho = sep.get("spearman") or []
        return {int(f): (None if r is None or not np.isfinite(r) else float(r), list(a))
                for f, r, a in zip(sep.get("features", []), rho, sep.get("auc", []))}


def load(workdir: str) -> RunData:
    """Read the run in `workdir` (module docstring)."""
    workdir = paths.absolute(paths.check_supported(os.fspath(workdir), "--workdir"))
    summary = RunSummary.read(workdir)
    export_dir = _export_dir(workdir, summary)
    params, _, cfg = crosscoder_export.load_exported(export_dir)
    if cfg.num_snapshots != len(summary.snapshots):
        raise CrossjaxError(f"{export_dir} holds a crosscoder over {cfg.num_snapshots} snapshots but "
                            f"{workdir}/summary.json names {len(summary.snapshots)} ({summary.snapshots}): they come "
                            "from different runs; rerun the training command in this workdir to export and "
                            "summarise the same run again")
    norms = evolution.decoder_norms(params["W_dec"])
    notes: list[str] = []
    threshold = float(summary.evolution.get("emergence_threshold", evolution.PRESENT))
    kinds = evolution.classify_kinds(norms, present=threshold)
    theta = np.exp(params["log_threshold"]).astype(np.float32) if cfg.activation == "jumprelu" else None
    return RunData(
        workdir=workdir, summary=summary, export_dir=export_dir, snapshots=list(summary.snapshots),
        steps=trajectories.training_steps(summary.snapshots), activation=cfg.activation, norms=norms,
        strength=evolution.normalised_strength(norms), theta=theta,
        emergence=evolution.emergence_snapshot(norms, threshold), kinds=kinds,
        clusters=_cluster_labels(workdir, summary, norms, notes), compare=_compare(workdir, summary, notes),
        separability=_separability(summary, notes), notes=notes,
        attribution=analyses.load_attribution(workdir, export_dir, list(summary.snapshots), cfg.num_features, notes,
                                              has_model=_has_model(workdir)),
        complexity=analyses.load_complexity(workdir, export_dir, cfg.num_features, notes))


def _has_model(workdir: str) -> bool:
    """Whether the run is over model snapshots (attribution needs them), from its config.json."""
    try:
        model = (workdir_lib.read_recorded(workdir) or {}).get("model") or {}
    except CrossjaxError:
        return False
    return bool(model.get("hook") and (model.get("path_template") or model.get("repo")))


def _export_dir(workdir: str, summary: RunSummary) -> str:
    """The workdir's export/ (it moves with the workdir), else the directory summary.json recorded."""
    local = paths.join(workdir, "export")
    if paths.isfile(paths.join(local, crosscoder_export.EXPORT_WEIGHTS)):
        return local
    if summary.export and paths.isfile(paths.join(summary.export, crosscoder_export.EXPORT_WEIGHTS)):
        return summary.export
    raise CrossjaxError(f"no exported crosscoder in {local} (nor at {summary.export}, where summary.json says it "
                        "was written): rerun the training command with the same --config and --workdir (a finished "
                        "run exports its last checkpoint again)")


def _cluster_labels(workdir: str, summary: RunSummary, norms: np.ndarray, notes: list[str]) -> np.ndarray:
    """[F] labels of the summary's clusters: k-means again with its k and the run's seed (deterministic)."""
    recorded = summary.evolution.get("clusters") or {}
    sizes = list(recorded.get("sizes") or [])
    if not sizes:
        notes.append("clusters: summary.json has none (no live feature, or a run from before clusters existed)")
        return np.full(norms.shape[1], -1, np.int64)
    config = workdir_lib.read_recorded(workdir) or {}
    seed = (config.get("train") or {}).get("seed")
    if not isinstance(seed, int):
        notes.append(f"clusters: {workdir}/config.json records no train.seed; clustered with seed 0")
        seed = 0
    found = trajectories.cluster_strength_curves(norms, len(sizes), seed=seed)
    if found.sizes.tolist() != sizes:
        notes.append(f"clusters: recomputed sizes {found.sizes.tolist()} differ from summary.json's {sizes} (the "
                     "export and the summary are from different runs?); the table shows the recomputed ones")
    return found.labels


def _compare(workdir: str, summary: RunSummary, notes: list[str]) -> dict | None:
    path = paths.join(workdir, COMPARE_FILE)
    rerun = "run python -m crossjax.compare with the run's --config and --workdir"
    if not paths.exists(path):
        notes.append(f"crosscoder against per-snapshot SAEs: no {COMPARE_FILE} ({rerun} to add it)")
        return None
    try:
        result = json.loads(paths.read_bytes(path))
        cc, sae, names = result["crosscoder"], result["sae"], result["snapshots"]
        if not all(len(side[key]) == len(names) for side in (cc, sae) for key in ("ev", "l0")):
            raise ValueError("ev/l0 lists do not match its snapshots")
    except (OSError, ValueError, KeyError, TypeError) as e:
        notes.append(f"crosscoder against per-snapshot SAEs: {path} is unreadable ({type(e).__name__}: {e}); {rerun} "
                     "to write it again")
        return None
    if result.get("store") not in (None, summary.store) or result.get("steps") not in (None, summary.steps):
        notes.append(f"crosscoder against per-snapshot SAEs: {path} is from another run (store {result.get('store')}, "
                     f"{result.get('steps')} steps; this run: {summary.store}, {summary.steps} steps); {rerun}")
        return None
    return result


def _separability(summary: RunSummary, notes: list[str]) -> dict | None:
    sep = summary.evals.get("separability")
    if not sep:
        notes.append("separability against decoder norm: not measured (add separability to config.evals, e.g. "
                     "--config.evals=heldout,separability, and run the training command again)")
        return None
    if not sep.get("features"):
        notes.append("separability against decoder norm: no feature had enough firing and non-firing rows "
                     "(raise eval.separability_rows)")
        return None
    return sep
