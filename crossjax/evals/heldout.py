"""Held-out evaluation: explained variance (PAPER.md), legacy EV, L0 per snapshot and dead fraction over every
row of the store's held-out blocks, computed on the mesh with the training batch's sharding.

The loader serves whole batches; the rows its epoch end rule leaves over (fewer than one batch) are evaluated
as one more batch, padded with copies of its rows that a row mask keeps out of every sum. eval.max_batches > 0 limits the
evaluation to that many whole batches (a quick look during training; `rows` says how many counted).

Returns ev [S], ev_legacy [S], ev_mean, ev_legacy_mean, l0 [S], l0_mean, mse [S], dead_frac, rows. The pipeline
also calls `evaluate_params` every train.eval_every steps during training.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from crossjax import crosscoder, data, sharding
from crossjax import metrics as metrics_lib
from crossjax.errors import CrossjaxError



def evaluate(run) -> dict:
    return evaluate_params(run, run.params)


def evaluate_params(run, params) -> dict:
    """The held-out figures of `params` (sharded like run.shardings["params"])."""
    config, store = run.config, run.store
    step = run.cache.get("heldout_step")
    if step is None:
        step = run.cache["heldout_step"] = _make_eval_step(run.crosscoder, config, run.shardings)
    scales = jax.device_put(jnp.asarray(np.asarray(run.scales, np.float32)), sharding.replicated(run.shardings["mesh"]))
    batch = batch_size(config, store, run.heldout_blocks, run.shardings["mesh"])
    # one read stream: the held-out split may be a single block, and its batches do not depend on the host count
    loader = data.make_loader(store, global_batch=batch, seed=int(config.train.seed) + 1,
                              sharding=run.shardings["batch"], blocks=list(run.heldout_blocks),
                              window_blocks=int(config.data.window_blocks), num_epochs=1, streams=1,
                              snapshots=run.snapshot_indices)
    ev = metrics_lib.EVAccumulator(len(run.scales), store.meta.d_model)
    fired = np.zeros(run.crosscoder.num_features, bool)
    limit = int(config.eval.max_batches) or None
    l0_sum, mse_sum = 0.0, 0.0
    mesh = run.shardings["mesh"]
    whole = jax.device_put(jnp.ones((batch,), jnp.float32), sharding.replicated(mesh))

    def add(acts, mask):
        nonlocal fired, l0_sum, mse_sum
        sums = jax.device_get(step(params, acts, scales, mask))
        ev.add(sums)
        fired |= np.asarray(sums["fired"], bool)
        l0_sum = l0_sum + np.asarray(sums["l0_sum"], np.float64)
        mse_sum = mse_sum + np.asarray(sums["sse"], np.float64)

    try:
        for i, b in enumerate(loader):
            if limit is not None and i >= limit:
                break
            add(b["acts"], whole)
    finally:
        loader.close()
    if limit is None or loader.num_batches < limit:
        tail = loader.order.unserved_rows(0)
        if len(tail):
            add(*_padded_batch(store, tail, batch, run.snapshot_indices, run.shardings["batch"], mesh))
    result = ev.result()
    l0 = l0_sum / result["count"]
    return dict(ev=result["ev"].tolist(), ev_legacy=result["ev_legacy"].tolist(), ev_mean=result["ev_mean"],
                ev_legacy_mean=result["ev_legacy_mean"], l0=l0.tolist(), l0_mean=float(np.mean(l0)),
                mse=(mse_sum / result["count"]).tolist(), dead_frac=float(np.mean(~fired)), rows=result["count"])


def batch_size(config, store, heldout_blocks, mesh) -> int:
    """eval.batch_size (or the training batch), capped to the held-out rows, a multiple of the data axis."""
    data_ax = mesh.shape["data"]
    rows = sum(hi - lo for lo, hi in map(store.block_range, heldout_blocks))
    want = int(config.eval.batch_size) or int(config.train.batch_size)
    cap = (rows // data_ax) * data_ax
    if cap == 0:
        raise CrossjaxError(f"the {rows} held-out rows cannot fill one batch over the {data_ax}-way data "
                            "axis; raise train.heldout_blocks")
    return min(want, cap)


def _padded_batch(store, rows: np.ndarray, batch: int, snapshots, acts_sharding, mesh):
    """The store rows `rows` [n <= batch] as one global batch [batch, S, D] padded with copies of them, and its row
    mask [batch] (1 for real rows). Every process reads the same rows and keeps its own part of the batch."""
    rows = np.sort(rows)
    blocks = np.unique(rows // store.meta.block_rows)
    read = store.read_blocks(blocks)
    starts = {int(b): i * store.meta.block_rows for i, b in enumerate(blocks)}
    local = np.array([starts[int(r // store.meta.block_rows)] + int(r % store.meta.block_rows) for r in rows])
    acts = read[local] if snapshots is None else read[np.ix_(local, np.asarray(snapshots))]
    # padding repeats the real rows: a batch-dependent activation (BatchTopK) then sees the tail's own rows
    padded = acts[np.arange(batch) % len(rows)]
    mask = np.zeros(batch, np.float32)
    mask[: len(rows)] = 1.0
    global_acts = jax.make_array_from_callback(padded.shape, acts_sharding, lambda index: padded[index])
    return global_acts, jax.device_put(jnp.asarray(mask), sharding.replicated(mesh))


def _make_eval_step(cc_cfg, config, shardings: dict):
    """jit(params, acts [B,S,D], scales [S], mask [B]) -> the sums over the batch's rows with mask 1: EV sums
    (metrics.SUM_KEYS), l0_sum [S] (active features summed over rows), fired [F] (active on some row)."""
    compute_dtype = jnp.dtype(config.train.compute_dtype)

    def eval_fn(params, acts, scales, mask):
        x = crosscoder.normalize(acts.astype(jnp.float32), scales)
        out = crosscoder.forward(params, x, cc_cfg, compute_dtype=compute_dtype)
        xhat, active = out["xhat"], out["acts"] > 0        # acts [B,S,F] (per-snapshot gate) or [B,F]
        w = mask.astype(jnp.float32)
        sq = jnp.sum(jnp.square(x - xhat), axis=-1)         # [B,S]
        x_sq = jnp.sum(jnp.square(x), axis=-1)
        per_row = jnp.sum(active, axis=-1, dtype=jnp.float32)    # [B,S] or [B]
        if per_row.ndim == 1:
            per_row = jnp.broadcast_to(per_row[:, None], sq.shape)
        row_active = active if active.ndim == 2 else jnp.any(active, axis=1)    # [B,F]
        return {"sse": w @ sq, "x_sum": jnp.einsum("b,bsd->sd", w, x), "x_sq_sum": w @ x_sq,
                "legacy_sum": w @ (sq / jnp.maximum(x_sq, 1e-30)), "count": jnp.sum(w),
                "l0_sum": w @ per_row, "fired": jnp.any(row_active & (w[:, None] > 0), axis=0)}

    rep = sharding.replicated(shardings["mesh"])
    return jax.jit(eval_fn, in_shardings=(shardings["params"], shardings["batch"], rep, rep), out_shardings=rep)
