"""Linear separability: is a feature's decoder norm at a snapshot a measure of how present its concept is there?

The paper validates decoder norms this way: for a feature and a snapshot, a linear probe on that snapshot's raw
activations tries to tell the tokens the feature fires on from the others; where the norm is large the probe
should do well. This module measures it on the store, per sampled feature and snapshot.

- Rows: `num_rows` rows drawn (seeded) from `blocks` (a run uses its held-out blocks), read one block at a time;
  memory is O(num_rows * S * D) whatever the store's size.
- Which rows fire: a row fires feature f when the crosscoder activates f on it at some snapshot (activation > 0;
  with the per-snapshot JumpReLU gate h_f n[s,f] > theta_f that is the gate at f's peak-norm snapshot, with shared
  activations (relu, topk) the one activation). The same labels serve every snapshot: the probe at snapshot s asks
  whether those tokens are linearly separable in what snapshot s computes, which stays defined where the feature
  is weak (labels read per snapshot would have no firing rows exactly where the norm is small).
- Features: `num_features` drawn (seeded) among those with at least `min_rows` firing and `min_rows` non-firing
  rows in each half of the split.
- Probe: per (feature, snapshot), L2 logistic regression with balanced class weights (scikit-learn, C=1) on that
  snapshot's raw activations standardised with the training half's mean and deviation; trained on a seeded half
  of the rows, AUC (area under the ROC curve) on the other half.
- Per feature: Spearman's rho between AUC[s] and decoder norm n[s, f] over the snapshots; over features: the
  median and quartiles of rho (the paper's claim: positive).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from crossjax import crosscoder
from crossjax.errors import CrossjaxError


def sample_rows(store, blocks: Sequence[int], num_rows: int, seed: int) -> np.ndarray:
    """Sorted store row ids [n <= num_rows] drawn without replacement from `blocks`."""
    ranges = [store.block_range(int(b)) for b in blocks]
    all_rows = np.concatenate([np.arange(lo, hi) for lo, hi in ranges]) if ranges else np.zeros(0, np.int64)
    if len(all_rows) == 0:
        raise CrossjaxError("separability needs rows: no block was given (train.heldout_blocks = 0?)")
    rng = np.random.default_rng([seed, 0])
    return np.sort(rng.choice(all_rows, size=min(int(num_rows), len(all_rows)), replace=False))


def read_rows(store, rows: np.ndarray, snapshots: Sequence[int] | None = None) -> np.ndarray:
    """The stored activations of sorted `rows` [n]: [n, S, D] float32 (S: `snapshots` of the store, or all),
    read one block at a time."""
    r = store.meta.block_rows
    parts = []
    for block in np.unique(rows // r):
        chosen = rows[rows // r == block] - block * r
        acts = store.read_blocks([int(block)])[chosen]
        parts.append(acts if snapshots is None else acts[:, np.asarray(snapshots)])
    return np.concatenate(parts).astype(np.float32)


def firing(params: dict, x: np.ndarray, scales: np.ndarray, cfg) -> np.ndarray:
    """[n, F] bool: the rows x [n, S, D] (raw) on which each feature fires at some snapshot (module docstring)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def fires(p, xb, sc):
        acts = crosscoder.activate(p, crosscoder.encode(p, crosscoder.normalize(xb, sc)), cfg)
        return jnp.any(acts > 0, axis=1) if acts.ndim == 3 else acts > 0

    p = {k: jnp.asarray(v) for k, v in params.items()}
    chunk = max(1, 2 ** 24 // max(cfg.num_snapshots * cfg.num_features, 1))   # bounds the [chunk, S, F] tensor
    sc = jnp.asarray(scales, jnp.float32)
    return np.concatenate([np.asarray(fires(p, jnp.asarray(x[i:i + chunk]), sc)) for i in range(0, len(x), chunk)])


def probe_auc(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int) -> float:
    """Held-out AUC of a balanced L2 logistic regression on standardised features ([n, D] inputs, bool labels)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    mean, std = x_train.mean(0), x_train.std(0)
    std = np.where(std > 0, std, 1.0)
    probe = LogisticRegression(class_weight="balanced", C=1.0, max_iter=1000, random_state=seed)
    probe.fit((x_train - mean) / std, y_train)
    return float(roc_auc_score(y_test, probe.decision_function((x_test - mean) / std)))


def measure(store, params: dict, scales: np.ndarray, cfg, *, blocks: Sequence[int],
            snapshots: Sequence[int] | None = None, snapshot_names: Sequence[str] | None = None,
            num_features: int = 32, num_rows: int = 4096, min_rows: int = 10, seed: int = 0) -> dict:
    """Separability of `num_features` sampled features at each snapshot (module docstring), JSON-ready:
    {features [k], auc [k][S], norm [k][S], spearman [k], median_spearman, quartiles, fraction_positive, rows,
    firing_rows [k], skipped}. params: host numpy crosscoder parameters; snapshots: the store indices the
    crosscoder was trained on (None: all)."""
    for name, value in (("num_features", num_features), ("num_rows", num_rows), ("min_rows", min_rows)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise CrossjaxError(f"separability {name}={value!r} must be a positive integer")
    rows = sample_rows(store, blocks, num_rows, seed)
    x = read_rows(store, rows, snapshots)                                   # [n, S, D]
    labels = firing(params, x, scales, cfg)                                 # [n, F]
    half = np.random.default_rng([seed, 1]).permutation(len(rows)) < len(rows) // 2
    counts = [labels[half].sum(0), (~labels[half]).sum(0), labels[~half].sum(0), (~labels[~half]).sum(0)]
    eligible = np.flatnonzero(np.all([c >= min_rows for c in counts], axis=0))
    chosen = np.sort(np.random.default_rng([seed, 2]).choice(eligible, size=min(num_features, len(eligible)),
                                                             replace=False))
    norms = np.linalg.norm(np.asarray(params["W_dec"], np.float64), axis=-1)       # [S, F]
    auc = np.array([[probe_auc(x[half, s], labels[half, f], x[~half, s], labels[~half, f], seed)
                     for s in range(x.shape[1])] for f in chosen]).reshape(len(chosen), x.shape[1])
    rho = np.array([spearman(auc[i], norms[:, f]) for i, f in enumerate(chosen)])
    finite = rho[np.isfinite(rho)]
    names = list(snapshot_names) if snapshot_names is not None else [str(s) for s in range(x.shape[1])]
    return {
        "features": chosen.tolist(), "snapshots": names, "rows": int(len(rows)),
        "firing_rows": labels[:, chosen].sum(0).astype(int).tolist(),
        "auc": np.round(auc, 6).tolist(), "norm": np.round(norms[:, chosen].T, 6).tolist(),
        "spearman": [round(float(r), 6) for r in rho],          # NaN where a curve is constant
        "median_spearman": float(np.median(finite)) if len(finite) else None,
        "quartiles": np.percentile(finite, [25, 75]).tolist() if len(finite) else None,
        "fraction_positive": float(np.mean(finite > 0)) if len(finite) else None,
        "eligible_features": int(len(eligible)),
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two curves [S]; NaN when either is constant (it has no rank order)."""
    from scipy.stats import spearmanr
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)
