"""Linear separability of sampled features at each snapshot against their decoder norms, on the held-out rows
(crossjax/analysis/separability.py). Settings: eval.separability_features, eval.separability_rows; the seed is
train.seed. On planted data it also correlates each probed feature's AUC with the planted strength of the true
feature it matches (the best mean cosine over the snapshots where that true feature is present): the paper's
validation against a known truth."""
from __future__ import annotations

import numpy as np

from crossjax.analysis import recovery, separability


def evaluate(run) -> dict | None:
    if len(run.snapshots) < 2:      # a correlation over snapshots needs several (not a per-snapshot SAE)
        return None
    e = run.config.eval
    out = separability.measure(
        run.store, run.host_params, run.scales, run.crosscoder, blocks=run.heldout_blocks,
        snapshots=run.snapshot_indices, snapshot_names=run.snapshots,
        num_features=int(e.separability_features), num_rows=int(e.separability_rows),
        seed=int(run.config.train.seed))
    if run.config.data.source == "planted" and run.snapshot_indices is None and out["features"]:
        out.update(_against_planted_strength(run, out))
    return out


def _against_planted_strength(run, out: dict) -> dict:
    from crossjax import planted
    truth = planted.load_truth(run.store.url)
    w = np.asarray(run.host_params["W_dec"], np.float64)[:, out["features"]]            # [S, k, D]
    strengths = np.asarray(truth.strengths, np.float64)                                  # [S, T]
    cos = recovery.direction_cosines(np.asarray(truth.directions, np.float64), w)      # [S, T, k]
    match = recovery.mean_cosine_where_present(cos, strengths > 0).argmax(0)           # [k]
    rho = [separability.spearman(np.asarray(out["auc"][i]), strengths[:, t]) for i, t in enumerate(match)]
    finite = np.array([r for r in rho if np.isfinite(r)])
    return {"matched_true_features": match.tolist(),
            "spearman_planted_strength": [round(r, 6) for r in rho],       # NaN: a constant curve
            "median_spearman_planted_strength": float(np.median(finite)) if len(finite) else None}
