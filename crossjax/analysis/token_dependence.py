"""How much of each crosscoder feature's activation the current token explains.

A feature that fires on one token whatever the context is a lookup of the token embedding, not a concept that
forms during training. This module measures it as the share of the feature's activation variance explained by
the identity of the token at that row (a one-way analysis of variance with the token as the group):

    rows      the rows given (held-out rows of a store), restricted to those whose token occurs at least
              `min_count` times among them (rarer tokens give groups too small to estimate a mean from)
    a[r]      the feature's activation at row r (at one snapshot: JumpReLU gates per snapshot)
    SST       sum_r (a[r] - mean a)^2                              total sum of squares,   N kept rows
    SSW       sum_r (a[r] - mean of a over the rows of r's token)^2  within-token sum of squares, K tokens
    share     1 - (SSW / (N - K)) / (SST / (N - 1))                the adjusted ("epsilon squared") share

The plain ratio 1 - SSW / SST (between-token variance over total variance, `adjusted=False`) is biased upwards by
about (K - 1) / (N - 1) for a feature that ignores the token; the adjusted share is ~0 in expectation there (it can
be slightly negative) and exactly 1 for a feature that is a function of the token alone (SSW = 0). A feature gets
NaN where the share is undefined or meaningless: fewer than `min_active` kept rows where it is non-zero (this
includes features that never fire and constant ones, SST = 0), or fewer than two tokens kept, or N - K < 1.

Shapes: N rows, S snapshots, D d_model, F features.
"""
from __future__ import annotations

import numpy as np

from crossjax.analysis import evolution
from crossjax.errors import CrossjaxError

MIN_COUNT = 5     # a token's rows form a group only when it occurs at least this often
MIN_ACTIVE = 10   # a feature's share is computed only when it fires on at least this many kept rows


def token_groups(token_ids: np.ndarray, min_count: int = MIN_COUNT) -> tuple[np.ndarray, np.ndarray]:
    """[N] token ids -> (kept row indices sorted by token [N'], start of each token's run in them [K])."""
    token_ids = np.asarray(token_ids).reshape(-1)
    tokens, inverse, counts = np.unique(token_ids, return_inverse=True, return_counts=True)
    keep = counts[inverse] >= min_count
    rows = np.flatnonzero(keep)
    order = rows[np.argsort(token_ids[rows], kind="stable")]
    if order.size == 0:
        return order, np.zeros((0,), np.int64)
    sorted_tokens = token_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_tokens[1:] != sorted_tokens[:-1]])
    return order, starts


def explained_share(acts: np.ndarray, token_ids: np.ndarray, *, min_count: int = MIN_COUNT,
                    min_active: int = MIN_ACTIVE, adjusted: bool = True) -> np.ndarray:
    """acts [N, F] (one snapshot's activations), token_ids [N] -> [F] share of each feature's activation variance
    explained by the current token (the module docstring's definition; NaN where undefined)."""
    acts = np.asarray(acts)
    token_ids = np.asarray(token_ids).reshape(-1)
    if acts.ndim != 2 or acts.shape[0] != token_ids.shape[0]:
        raise CrossjaxError(f"explained_share needs acts [N, F] and token_ids [N]; got {acts.shape} and "
                            f"{token_ids.shape}")
    order, starts = token_groups(token_ids, min_count)
    n, k = order.size, starts.size
    out = np.full((acts.shape[1],), np.nan)
    if k < 2 or n - k < 1:
        return out
    a = acts[order].astype(np.float64)                                  # [N', F], grouped by token
    sizes = np.diff(np.r_[starts, n]).astype(np.float64)[:, None]        # [K, 1]
    group_sums = np.add.reduceat(a, starts, axis=0)                      # [K, F]
    total = a.sum(axis=0)
    sst = np.square(a).sum(axis=0) - total * total / n
    ssb = (group_sums * group_sums / sizes).sum(axis=0) - total * total / n
    ssw = np.maximum(sst - ssb, 0.0)
    ok = ((a != 0).sum(axis=0) >= min_active) & (sst > 1e-12 * np.maximum(np.square(a).sum(axis=0), 1e-300))
    with np.errstate(divide="ignore", invalid="ignore"):
        share = 1.0 - (ssw / (n - k)) / (sst / (n - 1)) if adjusted else 1.0 - ssw / sst
    out[ok] = share[ok]
    return out


def jumprelu_acts(h: np.ndarray, norms: np.ndarray, theta: np.ndarray, snapshot: int) -> np.ndarray:
    """h [N, F], decoder norms [S, F], thresholds [F] -> [N, F] activations at `snapshot`: h 1[h n[s] > theta]
    (crosscoder.jumprelu_gate's forward)."""
    return np.where(h * norms[snapshot][None, :] > theta[None, :], h, 0.0).astype(np.float32)


def per_snapshot(params: dict, cfg, x: np.ndarray, token_ids: np.ndarray, *, min_count: int = MIN_COUNT,
                 min_active: int = MIN_ACTIVE, adjusted: bool = True,
                 chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exported params (numpy), its CrosscoderConfig, normalised x [N, S, D], token_ids [N] -> (shares [S, F],
    active [S, F]: the number of the N rows where the feature is non-zero at that snapshot).

    JumpReLU activations are gated per snapshot; other activations are shared by every snapshot (one row repeated).
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 3 or x.shape[1:] != (cfg.num_snapshots, cfg.d_model):
        raise CrossjaxError(f"x has shape {x.shape}; expected normalised activations [N, S={cfg.num_snapshots}, "
                            f"D={cfg.d_model}]")
    h = np.concatenate([np.einsum("nsd,sdf->nf", x[i:i + chunk], params["W_enc"]) + params["b_enc"]
                        for i in range(0, x.shape[0], chunk)])
    kw = dict(min_count=min_count, min_active=min_active, adjusted=adjusted)
    if cfg.activation == "jumprelu":
        norms = np.sqrt(np.maximum(np.sum(np.square(params["W_dec"]), axis=-1), 1e-30))
        theta = np.exp(params["log_threshold"])
        shares, active = [], []
        for s in range(cfg.num_snapshots):
            acts = jumprelu_acts(h, norms, theta, s)
            shares.append(explained_share(acts, token_ids, **kw))
            active.append((acts != 0).sum(axis=0))
        return np.stack(shares), np.stack(active)
    import jax.numpy as jnp
    from crossjax import crosscoder
    acts = np.asarray(crosscoder.activate({k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(h), cfg))
    repeat = lambda v: np.repeat(v[None], cfg.num_snapshots, axis=0)   # noqa: E731
    return repeat(explained_share(acts, token_ids, **kw)), repeat((acts != 0).sum(axis=0))


def at_peak(shares: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """[S, F] shares, [S, F] decoder norms -> [F] each feature's share at the snapshot where its norm peaks."""
    peak = np.argmax(np.asarray(norms), axis=0)
    return np.asarray(shares)[peak, np.arange(peak.size)]


def by_kind(values: np.ndarray, kinds: np.ndarray) -> dict[str, dict]:
    """[F] values (NaN: undefined), [F] kind names -> {kind: {features, measured, median, mean, frac_above_0.5}}
    for each kind in evolution.KINDS, and "all" (over the live features)."""
    values, kinds = np.asarray(values, np.float64), np.asarray(kinds)
    out = {}
    groups = [(k, kinds == k) for k in evolution.KINDS] + [("all", kinds != evolution.KIND_DEAD)]
    for name, mask in groups:
        v = values[mask]
        v = v[np.isfinite(v)]
        out[name] = {"features": int(mask.sum()), "measured": int(v.size),
                     "median": float(np.median(v)) if v.size else None,
                     "mean": float(np.mean(v)) if v.size else None,
                     "frac_above_0.5": float(np.mean(v > 0.5)) if v.size else None}
    return out


def from_store(store, blocks, params: dict, scales: np.ndarray, cfg, snapshot_indices=None, *,
               min_count: int = MIN_COUNT, min_active: int = MIN_ACTIVE, threshold: float = evolution.PRESENT) -> dict:
    """The shares over the rows of `blocks` of an ActivationStore, for an exported crosscoder (params, scales [S],
    cfg) trained on the store's snapshots `snapshot_indices` (None: all). JSON-ready: per snapshot (median over
    measured live features), at each feature's peak snapshot by kind (evolution.classify_kinds with `threshold`),
    the kinds of the features that fire on these rows, and the per-feature values at the peak."""
    x = store.read_blocks(blocks)
    if snapshot_indices is not None:
        x = x[:, list(snapshot_indices)]
    x = x.astype(np.float32) * np.asarray(scales, np.float32)[None, :, None]   # crosscoder.normalize
    token_ids = np.concatenate([store.read_tokens(*store.block_range(b))["token_ids"] for b in blocks])
    shares, active = per_snapshot(params, cfg, x, token_ids, min_count=min_count, min_active=min_active)
    norms = evolution.decoder_norms(params["W_dec"])
    kinds = evolution.classify_kinds(norms, present=threshold)
    peak = at_peak(shares, norms)
    order, starts = token_groups(token_ids, min_count)
    live = kinds != evolution.KIND_DEAD

    def median(v):
        v = v[np.isfinite(v)]
        return float(np.median(v)) if v.size else None

    return {
        "definition": "adjusted share of activation variance explained by the current token (epsilon squared)",
        "rows": int(token_ids.size), "rows_kept": int(order.size), "tokens_kept": int(starts.size),
        "min_count": min_count, "min_active": min_active,
        "median_by_snapshot": [median(shares[s][live]) for s in range(shares.shape[0])],
        "at_peak_by_kind": by_kind(peak, kinds),
        # features that never fire on these rows have a decoder (and a kind) but no measured behaviour
        "kinds_firing": {kind: int(np.sum((kinds == kind) & (active.max(axis=0) > 0))) for kind in evolution.KINDS},
        "at_peak": [None if not np.isfinite(v) else round(float(v), 6) for v in peak],
    }
