"""Crosscoder metrics (PAPER.md "Metrics"): explained variance, and how long each feature has not fired.

Explained variance per snapshot s, over all evaluated rows b (in normalised space):

    EV[s]        = 1 - sum_b ||x[b,s] - xhat[b,s]||^2 / sum_b ||x[b,s] - mean_b x[b,s]||^2

i.e. one minus the residual energy over the energy about the data mean. `EVAccumulator` adds per-batch sums
(sse, sum x, sum ||x||^2, count) in float64 and gives the same number as `explained_variance` over the concatenated
batches, since sum_b ||x - mean||^2 = sum_b ||x||^2 - ||sum_b x||^2 / count.
The legacy figure some libraries report instead is a per-token mean ratio against the uncentred energy:

    EV_legacy[s] = 1 - mean_b ( ||x[b,s] - xhat[b,s]||^2 / ||x[b,s]||^2 )

It is reported only as a second number; it is larger than EV whenever the data has a non-zero mean.

`batch_sums` is the one place the per-batch sums are computed: crosscoder.loss_fn returns them in its aux.

A feature counts as dead for the AuxK loss once it has not fired for `dead_after_tokens` tokens;
`update_tokens_since_fired` keeps that count on device, inside the training step.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from crossjax.errors import CrossjaxError

SUM_KEYS = ("sse", "x_sum", "x_sq_sum", "legacy_sum", "count")


# ----------------------------------------------------------------------------------------------------------------
# Explained variance

def _as3(x, name):
    x = np.asarray(jax.device_get(x), np.float64)
    if x.ndim != 3:
        raise CrossjaxError(f"{name} has shape {x.shape}; expected [B, S, D]")
    return x


def explained_variance(x, xhat) -> np.ndarray:
    """EV [S] (float64) of xhat [B,S,D] against x [B,S,D], one shot (module docstring)."""
    x, xhat = _as3(x, "x"), _as3(xhat, "xhat")
    if x.shape != xhat.shape:
        raise CrossjaxError(f"x {x.shape} and xhat {xhat.shape} must have the same shape")
    sse = np.sum((x - xhat) ** 2, axis=(0, 2))
    var = np.sum((x - x.mean(axis=0, keepdims=True)) ** 2, axis=(0, 2))
    return 1.0 - sse / var


def legacy_explained_variance(x, xhat) -> np.ndarray:
    """EV_legacy [S] (float64): 1 - mean over tokens of ||x - xhat||^2 / ||x||^2 (module docstring)."""
    x, xhat = _as3(x, "x"), _as3(xhat, "xhat")
    if x.shape != xhat.shape:
        raise CrossjaxError(f"x {x.shape} and xhat {xhat.shape} must have the same shape")
    ratio = np.sum((x - xhat) ** 2, axis=2) / np.maximum(np.sum(x ** 2, axis=2), 1e-30)
    return 1.0 - ratio.mean(axis=0)


def batch_sums(x: jax.Array, xhat: jax.Array) -> dict:
    """The sums EVAccumulator adds up, of one batch x, xhat [B,S,D], on device (jit-able), float32:
    sse [S] = sum_b ||x-xhat||^2, x_sum [S,D], x_sq_sum [S] = sum_b ||x||^2, legacy_sum [S] =
    sum_b ||x-xhat||^2 / ||x||^2, count (rows). Keys: SUM_KEYS."""
    x = x.astype(jnp.float32)
    sq = jnp.sum(jnp.square(x - xhat), axis=-1)
    x_sq = jnp.sum(jnp.square(x), axis=-1)
    return {"sse": jnp.sum(sq, 0), "x_sum": jnp.sum(x, 0), "x_sq_sum": jnp.sum(x_sq, 0),
            "legacy_sum": jnp.sum(sq / jnp.maximum(x_sq, 1e-30), 0), "count": jnp.asarray(x.shape[0], jnp.float32)}


def ev_from_sums(sse, x_sum, x_sq_sum, count) -> np.ndarray:
    """EV [S] from accumulated sums: 1 - sse / (x_sq_sum - ||x_sum||^2 / count), in float64."""
    sse, x_sum, x_sq_sum = (np.asarray(v, np.float64) for v in (sse, x_sum, x_sq_sum))
    var = x_sq_sum - np.sum(x_sum ** 2, axis=-1) / float(count)
    return 1.0 - sse / var


class EVAccumulator:
    """Streams explained variance over batches: add() the sums of each batch, result() at the end."""

    def __init__(self, num_snapshots: int, d_model: int):
        self.num_snapshots, self.d_model = int(num_snapshots), int(d_model)
        self.sse = np.zeros(self.num_snapshots)
        self.x_sum = np.zeros((self.num_snapshots, self.d_model))
        self.x_sq_sum = np.zeros(self.num_snapshots)
        self.legacy_sum = np.zeros(self.num_snapshots)
        self.count = 0.0

    def add(self, sums: Mapping) -> None:
        """Add one batch's sums: a mapping with SUM_KEYS (crosscoder.loss_fn's aux or batch_sums())."""
        missing = [k for k in SUM_KEYS if k not in sums]
        if missing:
            raise CrossjaxError(f"batch sums lack {missing}; pass crosscoder.loss_fn's aux or metrics.batch_sums()")
        got = {k: np.asarray(jax.device_get(sums[k]), np.float64) for k in SUM_KEYS}
        if got["x_sum"].shape != self.x_sum.shape or got["sse"].shape != self.sse.shape:
            raise CrossjaxError(f"batch sums for shape x_sum {got['x_sum'].shape} do not fit an accumulator for "
                                f"S={self.num_snapshots}, D={self.d_model}")
        self.sse += got["sse"]
        self.x_sum += got["x_sum"]
        self.x_sq_sum += got["x_sq_sum"]
        self.legacy_sum += got["legacy_sum"]
        self.count += float(got["count"])

    def result(self) -> dict:
        """{ev [S], ev_legacy [S], ev_mean, ev_legacy_mean, count}; raises when nothing was added."""
        if self.count <= 0:
            raise CrossjaxError("EVAccumulator.result() before any batch was added")
        ev = ev_from_sums(self.sse, self.x_sum, self.x_sq_sum, self.count)
        legacy = 1.0 - self.legacy_sum / self.count
        return {"ev": ev, "ev_legacy": legacy, "ev_mean": float(ev.mean()),
                "ev_legacy_mean": float(legacy.mean()), "count": int(self.count)}


# ----------------------------------------------------------------------------------------------------------------
# Dead features (AuxK)

TOKENS_CAP = np.iinfo(np.int32).max


def update_tokens_since_fired(since: jax.Array, fired: jax.Array, tokens) -> jax.Array:
    """Jit-able: since [F] int32 -> 0 where fired [F], else since + tokens (saturating at int32 max)."""
    tokens = jnp.asarray(tokens, since.dtype)
    grown = jnp.minimum(since, TOKENS_CAP - tokens) + tokens          # never wraps past int32 max
    return jnp.where(fired, jnp.zeros_like(since), grown)
