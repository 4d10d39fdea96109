"""Linear separability of sampled features at each snapshot against their decoder norms, on the held-out rows
(crossjax/analysis/separability.py). Settings: eval.separability_features, eval.separability_rows; the seed is
train.seed."""
from __future__ import annotations

from crossjax.analysis import separability


def evaluate(run) -> dict | None:
    e = run.config.eval
    return separability.measure(
        run.store, run.host_params, run.scales, run.crosscoder, blocks=run.heldout_blocks,
        snapshots=run.snapshot_indices, snapshot_names=run.snapshots,
        num_features=int(e.separability_features), num_rows=int(e.separability_rows),
        seed=int(run.config.train.seed))
