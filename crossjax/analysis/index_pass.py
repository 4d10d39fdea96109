"""The FeatureIndex's streaming pass over a range of store rows (crossjax/analysis/index_build.py says what it
collects): one jitted step per batch, the features split over this process's local devices.

`stream` folds the batches of rows [start, stop) into per-feature statistics whose size does not depend on the
number of rows (memory: one batch plus F x k x (20 + S) bytes of top rows and S x F x B histogram counts).
Under jax.distributed every process streams its own share of the batches (crossjax/analysis/index_merge.py) and
the shares are merged exactly; one process streams them all.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from crossjax import console, crosscoder
from crossjax.analysis import activation_histograms, exact_sum
from crossjax.errors import CrossjaxError

# the feature axis of each crosscoder parameter (None: not split); the pass splits features over the local devices
FEATURE_AXIS_OF_PARAM = {"W_enc": 2, "W_dec": 1, "b_enc": 0, "log_threshold": 0, "b_dec": None}
TOP_FIELDS = ("row", "context", "position", "token")  # int32 [F,k] beside value [F,k] and gate [F,k,S]


class Part(NamedTuple):
    """What the pass collected over some rows, on the host. Empty top slots have value -inf."""
    top: dict[str, np.ndarray]   # value float32 [F,k], row/context/position/token int32 [F,k], gate bool [F,k,S]
    hist_counts: np.ndarray      # [S',F,B] int64 (S' = S for JumpReLU, 1 for activations shared by all snapshots)
    hist_exponent: np.ndarray    # [F] int32
    count: np.ndarray            # [F] int64 rows where the feature is active
    act_sum: np.ndarray          # [F, exact_sum.LIMBS] int64: the exact sum of its activations
    per_snapshot: np.ndarray     # [S,F] int64 rows where its gate opens at each snapshot


def _feature_values(params, x, cfg: crosscoder.CrosscoderConfig):
    """x [B,S,D] normalised -> (a [B,F] activation per row, values [B,S',F] per snapshot: S' = S for JumpReLU's
    per-snapshot gates, 1 for activations shared by every snapshot)."""
    h = crosscoder.encode(params, x)
    acts = crosscoder.activate(params, h, cfg)
    if acts.ndim == 3:  # jumprelu, gated per snapshot: [B,S,F]; open gates carry h > 0
        return jnp.where(jnp.any(acts > 0, axis=1), h, 0.0), acts
    return acts, acts[:, None, :]


@functools.partial(jax.jit, static_argnames=("cfg", "k"))
def _scan_step(top, hist, params, acts, scales, rows, context_ids, positions, token_ids, *, cfg, k):
    """Folds one batch (acts [B,S,D] storage dtype, token arrays [B]) into the running top-k `top` ({.. [F,k]},
    gate [F,k,S]) and the histograms `hist` (activation_histograms).

    Returns (top, hist, count [F], act_sum [F], per_snapshot [S,F]) with the batch's own counts and sums.
    """
    a, values = _feature_values(params, crosscoder.normalize(acts, scales), cfg)
    active = a > 0
    gate = jnp.broadcast_to(values > 0, (a.shape[0], cfg.num_snapshots, a.shape[1]))  # [B,S,F]
    cand = jnp.where(active, a, -jnp.inf).T  # [F,B]; inactive rows never enter the top-k
    vals, idx = jax.lax.top_k(cand, min(k, cand.shape[1]))
    batch = {"value": vals, "row": rows[idx], "context": context_ids[idx], "position": positions[idx],
             "token": token_ids[idx],
             "gate": jnp.take_along_axis(jnp.transpose(gate, (2, 0, 1)), idx[:, :, None], axis=1)}
    # running entries first: they hold lower rows, and top_k keeps the lower index among equal values
    merged = {n: jnp.concatenate([top[n], batch[n]], axis=1) for n in top}
    _, pick = jax.lax.top_k(merged["value"], k)
    top = {n: jnp.take_along_axis(v, pick if v.ndim == 2 else pick[:, :, None], axis=1) for n, v in merged.items()}
    hist = activation_histograms.update(hist, values)
    per_snapshot = jnp.sum(gate, axis=0, dtype=jnp.int32)
    return top, hist, jnp.sum(active, axis=0, dtype=jnp.int32), jnp.sum(a, axis=0), per_snapshot


@functools.partial(jax.jit, static_argnames=("cfg",))
def row_values(params, acts, scales, *, cfg):
    """Each row's feature activations a [B,F] of one batch acts [B,S,D] (storage dtype)."""
    return _feature_values(params, crosscoder.normalize(acts, scales), cfg)[0]


def feature_placement(num_features: int):
    """place(array, axis): the array split along `axis` over this process's local devices on one 'feature' mesh
    axis (each device keeps the top rows and histograms of its own features), or left on the default device when
    there is one device or the features do not divide evenly."""
    devices = jax.local_devices()
    if len(devices) == 1 or num_features % len(devices):
        return lambda x, axis: jnp.asarray(x)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("feature",))

    def place(x, axis):
        spec = [None] * x.ndim
        if axis is not None:
            spec[axis] = "feature"
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
    return place


def stream(read_rows, read_tokens, params_np: dict, scales, cfg: crosscoder.CrosscoderConfig, *, start: int,
           stop: int, top_k: int, batch_rows: int, histogram_bins: int, progress: bool) -> Part:
    """The statistics of rows [start, stop) in consecutive batches of `batch_rows` (the last may be shorter).
    read_rows(a, b) -> acts [b-a, S, D] (storage dtype); read_tokens(a, b) -> the store's token arrays."""
    f, s = cfg.num_features, cfg.num_snapshots
    place = feature_placement(f)
    # host arrays placed directly: no device computation (and no compilation) to make them
    params = {name: place(np.asarray(v), FEATURE_AXIS_OF_PARAM[name]) for name, v in params_np.items()}
    scales = jnp.asarray(scales)
    top = {"value": np.full((f, top_k), -np.inf, np.float32),
           **{name: np.full((f, top_k), -1, np.int32) for name in TOP_FIELDS},
           "gate": np.zeros((f, top_k, s), bool)}
    top = {name: place(v, 0) for name, v in top.items()}
    hist = activation_histograms.init(s if cfg.activation == "jumprelu" else 1, f, histogram_bins)
    hist = {"counts": place(hist["counts"], 1), "exponent": place(hist["exponent"], 0)}
    hist_totals = activation_histograms.Totals(hist)
    count, act_sum, per_snapshot = np.zeros(f, np.int64), exact_sum.zeros(f), np.zeros((s, f), np.int64)
    bar = console.progress("index", stop - start, unit="row", unit_scale=True, enabled=progress)
    for a in range(start, stop, batch_rows):
        b = min(a + batch_rows, stop)
        t = read_tokens(a, b)
        top, hist, c, sums, ps = _scan_step(top, hist, params, read_rows(a, b), scales, np.arange(a, b, dtype=np.int32),
                                            t["context_ids"], t["positions"], t["token_ids"], cfg=cfg, k=int(top_k))
        hist = hist_totals.add(hist, b - a, min(batch_rows, stop - b))
        sums = np.asarray(sums)
        if not np.isfinite(sums).all():  # float32 overflow: the exact sum holds finite terms only
            raise CrossjaxError(
                f"FeatureIndex.build: the activations of features {np.flatnonzero(~np.isfinite(sums))[:8].tolist()} "
                f"on rows [{a}, {b}) overflow float32: this crosscoder's weights do not fit the store's activations; "
                "index it over the store it was trained on.")
        count += np.asarray(c)  # host accumulators: exact counts and sums over many batches
        exact_sum.add(act_sum, sums)
        per_snapshot += np.asarray(ps)
        bar.update(b - a)
    bar.close()
    hist_counts, hist_exponent = hist_totals.result(hist)
    return Part({name: np.array(v) for name, v in top.items()}, hist_counts, hist_exponent, count, act_sum,
                per_snapshot)
