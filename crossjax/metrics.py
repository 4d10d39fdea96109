"""Crosscoder metrics (PAPER.md "Metrics"): explained variance, L0, dead features.

Explained variance per snapshot s, over all evaluated rows b (in normalised space):

    EV[s]        = 1 - sum_b ||x[b,s] - xhat[b,s]||^2 / sum_b ||x[b,s] - mean_b x[b,s]||^2

i.e. one minus the residual energy over the energy about the data mean. `EVAccumulator` adds per-batch sums
(sse, sum x, sum ||x||^2, count) in float64 and gives the same number as `explained_variance` over the concatenated
batches, since sum_b ||x - mean||^2 = sum_b ||x||^2 - ||sum_b x||^2 / count.
The legacy figure some libraries report instead is a per-token mean ratio against the uncentred energy:

    EV_legacy[s] = 1 - mean_b ( ||x[b,s] - xhat[b,s]||^2 / ||x[b,s]||^2 )

It is reported only as a second number; it is larger than EV whenever the data has a non-zero mean.

L0 per snapshot: mean number of features with f > 0 per token. A feature is dead over a set of rows when it
never fired on any of them; `DeadTracker` counts firings (held-out dead fraction) and the tokens since each
feature last fired (the dead mask of the AuxK loss).
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
    """Per-batch sums for EVAccumulator, computed on device (jit-able): sse [S], x_sum [S,D], x_sq_sum [S],
    legacy_sum [S], count (the same keys crosscoder.loss_fn returns in its aux)."""
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

    def add_batch(self, x, xhat) -> None:
        """Add the sums of one batch x, xhat [B,S,D] (float64 on the host)."""
        x, xhat = _as3(x, "x"), _as3(xhat, "xhat")
        sq = np.sum((x - xhat) ** 2, axis=2)
        x_sq = np.sum(x ** 2, axis=2)
        self.add({"sse": sq.sum(0), "x_sum": x.sum(0), "x_sq_sum": x_sq.sum(0),
                  "legacy_sum": (sq / np.maximum(x_sq, 1e-30)).sum(0), "count": x.shape[0]})

    def merge(self, other: "EVAccumulator") -> None:
        self.add({"sse": other.sse, "x_sum": other.x_sum, "x_sq_sum": other.x_sq_sum,
                  "legacy_sum": other.legacy_sum, "count": other.count})

    def result(self) -> dict:
        """{ev [S], ev_legacy [S], ev_mean, ev_legacy_mean, count}; raises when nothing was added."""
        if self.count <= 0:
            raise CrossjaxError("EVAccumulator.result() before any batch was added")
        ev = ev_from_sums(self.sse, self.x_sum, self.x_sq_sum, self.count)
        legacy = 1.0 - self.legacy_sum / self.count
        return {"ev": ev, "ev_legacy": legacy, "ev_mean": float(ev.mean()),
                "ev_legacy_mean": float(legacy.mean()), "count": int(self.count)}


# ----------------------------------------------------------------------------------------------------------------
# L0 and dead features

def l0_per_snapshot(acts, num_snapshots: int | None = None) -> np.ndarray:
    """Mean number of active (f > 0) features per token, per snapshot: acts [B,S,F] -> [S]; shared acts [B,F]
    give the same value for every snapshot and need num_snapshots."""
    a = np.asarray(jax.device_get(acts))
    if a.ndim == 3:
        return (a > 0).sum(axis=2).mean(axis=0).astype(np.float64)
    if a.ndim == 2:
        if num_snapshots is None:
            raise CrossjaxError("shared activations [B,F] need num_snapshots to report L0 per snapshot")
        return np.full(int(num_snapshots), (a > 0).sum(axis=1).mean(), np.float64)
    raise CrossjaxError(f"acts has shape {a.shape}; expected [B,S,F] or [B,F]")


TOKENS_CAP = np.iinfo(np.int32).max


def update_tokens_since_fired(since: jax.Array, fired: jax.Array, tokens) -> jax.Array:
    """Jit-able: since [F] int32 -> 0 where fired [F], else since + tokens (saturating at int32 max)."""
    tokens = jnp.asarray(tokens, since.dtype)
    grown = jnp.minimum(since, TOKENS_CAP - tokens) + tokens          # never wraps past int32 max
    return jnp.where(fired, jnp.zeros_like(since), grown)


class DeadTracker:
    """Per feature: how often it fired, and how many tokens ago it last fired (host-side, numpy).

    update(fired, tokens) once per batch with crosscoder.loss_fn's aux["fired"] [F] and the batch's row count.
    Held-out dead fraction: a fresh tracker over the held-out batches, then dead_fraction().
    AuxK dead mask: dead_mask(after_tokens) on the training tracker.
    """

    def __init__(self, num_features: int):
        self.num_features = int(num_features)
        self.fire_count = np.zeros(self.num_features, np.int64)       # batches in which each feature fired
        self.tokens_since_fired = np.zeros(self.num_features, np.int64)
        self.steps_since_fired = np.zeros(self.num_features, np.int64)
        self.tokens_seen = 0
        self.steps_seen = 0

    def update(self, fired, tokens: int) -> None:
        fired = np.asarray(jax.device_get(fired))
        if fired.shape != (self.num_features,):
            raise CrossjaxError(f"fired has shape {fired.shape}; expected [F={self.num_features}]")
        fired = fired.astype(bool)
        self.fire_count += fired
        self.tokens_since_fired = np.where(fired, 0, self.tokens_since_fired + int(tokens))
        self.steps_since_fired = np.where(fired, 0, self.steps_since_fired + 1)
        self.tokens_seen += int(tokens)
        self.steps_seen += 1

    def dead_mask(self, after_tokens: int) -> np.ndarray:
        """[F] bool: not fired in the last `after_tokens` tokens (a feature needs that many tokens seen first)."""
        return self.tokens_since_fired >= int(after_tokens)

    def dead_fraction(self) -> float:
        """Fraction of features that never fired since this tracker was made."""
        if self.steps_seen == 0:
            raise CrossjaxError("DeadTracker.dead_fraction() before any update")
        return float(np.mean(self.fire_count == 0))

    def state_dict(self) -> dict:
        return {"fire_count": self.fire_count.copy(), "tokens_since_fired": self.tokens_since_fired.copy(),
                "steps_since_fired": self.steps_since_fired.copy(),
                "tokens_seen": np.int64(self.tokens_seen), "steps_seen": np.int64(self.steps_seen)}

    def load_state_dict(self, state: Mapping) -> None:
        if np.asarray(state["fire_count"]).shape != (self.num_features,):
            raise CrossjaxError("DeadTracker state is for a different number of features")
        self.fire_count = np.asarray(state["fire_count"], np.int64).copy()
        self.tokens_since_fired = np.asarray(state["tokens_since_fired"], np.int64).copy()
        self.steps_since_fired = np.asarray(state["steps_since_fired"], np.int64).copy()
        self.tokens_seen = int(state["tokens_seen"])
        self.steps_seen = int(state["steps_seen"])
