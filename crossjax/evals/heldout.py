"""Held-out evaluation: explained variance (PAPER.md), legacy EV, L0 per snapshot and dead fraction over the
store's held-out blocks, computed on the mesh with the training batch's sharding.

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

_KEEP = ("sse", "x_sum", "x_sq_sum", "legacy_sum", "count", "l0_per_snapshot", "fired", "mse_per_snapshot")


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
    try:
        for i, b in enumerate(loader):
            if limit is not None and i >= limit:
                break
            sums = jax.device_get(step(params, b["acts"], scales))
            n = float(sums["count"])
            ev.add(sums)
            fired |= np.asarray(sums["fired"], bool)
            l0_sum = l0_sum + np.asarray(sums["l0_per_snapshot"], np.float64) * n
            mse_sum = mse_sum + np.asarray(sums["mse_per_snapshot"], np.float64) * n
    finally:
        loader.close()
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


def _make_eval_step(cc_cfg, config, shardings: dict):
    """jit(params, acts [B,S,D], scales [S]) -> this batch's sums for EV, legacy EV, L0 and firing."""
    compute_dtype = jnp.dtype(config.train.compute_dtype)

    def eval_fn(params, acts, scales):
        x = crosscoder.normalize(acts.astype(jnp.float32), scales)
        _, aux = crosscoder.loss_fn(params, x, cc_cfg, sparsity_coef=0.0, compute_dtype=compute_dtype)
        return {k: aux[k] for k in _KEEP}

    rep = sharding.replicated(shardings["mesh"])
    return jax.jit(eval_fn, in_shardings=(shardings["params"], shardings["batch"], rep), out_shardings=rep)
