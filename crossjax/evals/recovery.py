"""Planted-feature recovery (planted data only): learned decoder directions against the planted truth.

Returns analysis.recovery.planted_recovery's dict (mean_max_cos, frac_above, emergence accuracy, ...); None on
model snapshots.
"""
from __future__ import annotations


def evaluate(run) -> dict | None:
    if run.config.data.source != "planted":
        return None
    from crossjax import planted
    from crossjax.analysis.recovery import planted_recovery
    e = run.config.eval
    return planted_recovery(run.host_params["W_dec"], planted.load_truth(run.store.url),
                            snapshots=run.snapshot_indices, threshold=float(e.recovery_threshold),
                            emergence_threshold=float(e.emergence_threshold), presence=float(e.presence))
