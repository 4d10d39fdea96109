"""Ablation and retention curves at one spliced snapshot: the task metric when the top-k attributed features are
set to 0 in the spliced reconstruction (ablation) or are the only ones kept (retention), the error term kept at
its clean value, for k over a log grid, against k random features.

- ranking: the features by a method's score, largest first (those that push the metric towards the right answer);
- random: k features drawn (seeded, `draws` draws averaged) from the features active on the task's prompts at
  this snapshot (a feature that never fires on the task changes nothing, so drawing from all F would make the
  comparison meaningless);
- the grid: k = 1, 2, 4, ... below the number of active features (or max_k), then that number itself; at the end
  the random sets are all the active features (ablated: the reconstruction reduced to b_dec, plus the error
  term; retained: the clean metric), while the top-k set may hold inactive features in place of active ones whose
  scores are negative.

Every point is one forward of the P pairs; `curves` returns the mean metric for each.
"""
from __future__ import annotations

import numpy as np

from crossjax.errors import CrossjaxError


def log_grid(n: int, max_k: int | None = None) -> list[int]:
    """1, 2, 4, ... < min(n, max_k), then min(n, max_k) itself (empty for n = 0)."""
    top = n if max_k is None else min(n, int(max_k))
    grid = [k for k in (2 ** i for i in range(64)) if k < top]
    return grid + [top] if top > 0 else []


def _keep_metric(splice, keep: np.ndarray) -> float:
    """The mean metric with features outside `keep` [F] bool set to 0 (clean error and base)."""
    return splice.metric(splice.f_clean * keep.astype(np.float32))[0]


def curves(splice, scores: np.ndarray, active: np.ndarray, *, draws: int = 3, seed: int = 0,
           max_k: int | None = None) -> dict:
    """Ablation and retention of the top-k features by `scores` [F] against k random active ones.

    active: [F] bool, the features the random draws come from (Attribution.active). Returns
    {k: [...], ablate_top, ablate_random, retain_top, retain_random: [len(k)] mean metrics,
     ablate_random_std, retain_random_std, metric_spliced, draws, active_features}.
    """
    scores = np.asarray(scores, np.float64)
    active = np.asarray(active, bool)
    f = splice.num_features
    if scores.shape != (f,) or active.shape != (f,):
        raise CrossjaxError(f"scores {scores.shape} and active {active.shape} must both be [F={f}].")
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 1:
        raise CrossjaxError(f"draws={draws!r} must be a positive integer.")
    pool = np.flatnonzero(active)
    ks = log_grid(pool.size, max_k)
    order = np.argsort(-scores, kind="stable")
    rng = np.random.default_rng(seed)
    out = {key: [] for key in ("ablate_top", "retain_top", "ablate_random", "retain_random", "ablate_random_std",
                               "retain_random_std")}
    for k in ks:
        top = np.zeros(f, bool)
        top[order[:k]] = True
        out["ablate_top"].append(_keep_metric(splice, ~top))
        out["retain_top"].append(_keep_metric(splice, top))
        ablated, retained = [], []
        for _ in range(draws):
            chosen = np.zeros(f, bool)
            chosen[rng.choice(pool, size=k, replace=False)] = True
            ablated.append(_keep_metric(splice, ~chosen))
            retained.append(_keep_metric(splice, chosen))
        for name, values in (("ablate", ablated), ("retain", retained)):
            out[f"{name}_random"].append(float(np.mean(values)))
            out[f"{name}_random_std"].append(float(np.std(values)))
    return dict(k=ks, **out, metric_spliced=splice.metric(splice.f_clean)[0], draws=int(draws),
                active_features=int(pool.size))
