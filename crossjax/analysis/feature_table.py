"""Every feature of a FeatureIndex in one pandas DataFrame (FeatureIndex.table), indexed by feature id.

Columns:
- kind, emergence (snapshot name, missing if dead), emergence_step (its training step when the names are `stepN`):
  the index's, from the decoder norms (crossjax.analysis.evolution, the index's emergence threshold);
- cluster: the k-means cluster of the feature's strength curve, as in the run summary's evolution["clusters"]
  (recomputed with trajectories.cluster_strength_curves, that k and the run's train.seed; -1 for dead features);
- frequency, mean_activation: over the rows the index scanned;
- separability_auc (the probe's held-out AUC at the last snapshot) and separability_spearman (AUC against decoder
  norm over the snapshots) for the features the summary's evals["separability"] measured, NaN for the others.

Without the run's summary.json (an index built from an export directory alone) or its config.json, the cluster
and separability columns are missing values.
"""
from __future__ import annotations

import os

import numpy as np

from crossjax import console
from crossjax.analysis import trajectories


def _run_files(workdir):
    """(RunSummary or None, the recorded config dict or None) of the run in `workdir`."""
    from crossjax import workdir as workdir_lib
    from crossjax.summary import SUMMARY_FILE, RunSummary

    if not workdir or not os.path.isfile(os.path.join(workdir, SUMMARY_FILE)):
        return None, None
    return RunSummary.read(workdir), workdir_lib.read_recorded(str(workdir))


def clusters(norms: np.ndarray, summary, recorded: dict | None) -> np.ndarray | None:
    """[F] cluster labels as the run summary made them (-1: dead), or None when the run does not say how."""
    k = ((summary.evolution or {}).get("clusters") or {}).get("k") if summary is not None else None
    seed = ((recorded or {}).get("train") or {}).get("seed")
    if not isinstance(k, int) or k < 1 or not isinstance(seed, int):
        return None
    got = trajectories.cluster_strength_curves(norms, k, seed=seed)
    recorded_sizes = summary.evolution["clusters"].get("sizes")
    if recorded_sizes is not None and list(got.sizes) != list(recorded_sizes):
        console.say("index", f"the clusters recomputed from the export have sizes {got.sizes.tolist()}, the run "
                    f"summary's {recorded_sizes}: the summary was written for other weights; rerun the training "
                    "command to rewrite it.")
    return got.labels


def separability(summary, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    """([F] AUC at the last snapshot, [F] Spearman rho): NaN for features the evaluation did not measure."""
    auc, rho = np.full(num_features, np.nan), np.full(num_features, np.nan)
    result = (summary.evals or {}).get("separability") if summary is not None else None
    if not result:
        return auc, rho
    for i, f in enumerate(result.get("features") or []):
        if 0 <= f < num_features:
            auc[f] = np.nan if result["auc"][i][-1] is None else result["auc"][i][-1]
            rho[f] = np.nan if result["spearman"][i] is None else result["spearman"][i]
    return auc, rho


def table(index, workdir=None):
    """The DataFrame of every feature of `index` (module docstring); workdir: the run's (default: the index's)."""
    import pandas as pd

    summary, recorded = _run_files(os.fspath(workdir) if workdir is not None else index.info.get("workdir"))
    f = index.num_features
    emergence = np.asarray(index.emergence)
    steps = trajectories.training_steps(index.snapshots)
    labels = clusters(index.norms, summary, recorded)
    auc, rho = separability(summary, f)
    return pd.DataFrame({
        "kind": pd.Categorical(index.kinds),
        "emergence": [None if e < 0 else index.snapshots[e] for e in emergence],
        "emergence_step": pd.array([None if e < 0 or steps is None else steps[e] for e in emergence], dtype="Int64"),
        "cluster": pd.array([None] * f if labels is None else labels.tolist(), dtype="Int64"),
        "frequency": index.frequency, "mean_activation": index.mean_activation,
        "separability_auc": auc, "separability_spearman": rho,
    }, index=pd.RangeIndex(f, name="feature"))
