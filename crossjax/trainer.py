"""Train a crosscoder on the rows of an activation store: state, jitted step, loop, checkpoints.

    result = trainer.train(config, workdir, TrainData(store, blocks=..., scales=...), evaluate=..., callbacks=[...])

The trainer knows nothing of where the store came from (suite, snapshots, planted data, arrays in memory) nor
what is measured after training: the pipeline (crossjax/pipeline.py) makes the store and runs the evaluators.
Everything here works from a config, a store and a workdir, so a user holding activations can call it directly.

Step numbers count finished updates: checkpoint `t` holds the state after t updates, and the metrics logged at
step t are those of the t-th update. A run resumes from its newest checkpoint that restores with finite numbers
(state and loader position); damaged newer ones are skipped and set aside (crossjax/checkpoint.py).
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from crossjax import checkpoint as ckpt_lib
from crossjax import console, crosscoder, data, memory_plan, optim, sharding
from crossjax import metrics as metrics_lib
from crossjax.errors import CrossjaxError
from crossjax.metrics_log import MetricsLog

STAGE = "crosscoder"
STATE_EXTRA_AXES = {"tokens_since_fired": ("feature",)}
# Held while a training step is launched. A thread that launches other multi-device programs during training (a
# LiveStore's snapshot forwards, from the loader's threads) takes it too, so that every device receives the
# programs in the same order: collectives launched in different orders on different devices can deadlock.
DEVICE_DISPATCH = threading.Lock()


@dataclasses.dataclass(frozen=True)
class TrainData:
    """What the crosscoder trains on: some blocks of a complete store, some (or all) of its snapshots."""
    store: "object"                        # crossjax.store.ActivationStore
    blocks: tuple[int, ...]                # the training blocks (the held-out ones are not among them)
    scales: np.ndarray                     # [S] normalisation scale of each trained snapshot
    snapshots: tuple[int, ...] | None = None   # store indices of the trained snapshots (None: all, in order)
    device_bytes: int = 0                  # per device, held by the store itself (a LiveStore's snapshot models)

    @property
    def num_rows(self) -> int:
        return sum(hi - lo for lo, hi in map(self.store.block_range, self.blocks))


@dataclasses.dataclass(frozen=True)
class StepEvent:
    """What a per-step callback sees. `metrics` are this step's device values (pull with jax.device_get: that
    waits for the step); `seconds` is the host time since the previous step was dispatched."""
    step: int
    total_steps: int
    metrics: dict
    seconds: float


@dataclasses.dataclass
class TrainResult:
    state: dict                    # the final training state (sharded jax.Arrays): params, opt_state, step, ...
    crosscoder: crosscoder.CrosscoderConfig
    shardings: dict                # mesh, batch, params, state
    total_steps: int               # the run's length
    end_step: int                  # where this invocation stopped (== total_steps when finished)
    batch_size: int

    @property
    def finished(self) -> bool:
        return self.end_step >= self.total_steps


# ==================================================================================================
# state


def total_steps(config: ConfigDict, train_rows: int, batches_per_epoch: int) -> int:
    """train.steps, else ceil(train.num_tokens / batch), else one pass: one epoch as the loader cuts it (rows that
    cannot fill a whole batch of a stream are left out, so that no row is seen twice)."""
    t = config.train
    batch = int(t.batch_size)
    if train_rows < batch:
        raise CrossjaxError(f"train.batch_size={batch} exceeds the {train_rows} training rows of the store; "
                            "use a smaller batch or a larger store")
    if int(t.steps) > 0:
        return int(t.steps)
    if int(t.num_tokens) > 0:
        return math.ceil(int(t.num_tokens) / batch)
    return min(train_rows // batch, batches_per_epoch)


def make_optimizer(t: ConfigDict, steps: int) -> optax.GradientTransformation:
    """Adam, no weight decay or clipping; lr warm-up and cool-down; log_threshold at lr * threshold_lr_scale."""
    schedule = optim.warmup_cooldown(t.lr, warmup_steps=t.warmup_steps, total_steps=steps,
                                     cooldown_frac=t.cooldown_frac)
    return optim.adam_with_threshold_rate(schedule, b1=t.b1, b2=t.b2, eps=t.eps,
                                          threshold_lr_scale=t.threshold_lr_scale)


def abstract_train_state(config: ConfigDict, *, num_snapshots: int, d_model: int, total_steps: int):
    """(CrosscoderConfig, optimizer, state shapes as ShapeDtypeStructs): nothing is allocated (jax.eval_shape)."""
    cc_cfg = crosscoder.CrosscoderConfig.from_config(config.crosscoder, num_snapshots=num_snapshots, d_model=d_model)
    tx = make_optimizer(config.train, total_steps)
    return cc_cfg, tx, jax.eval_shape(init_state_fn(cc_cfg, tx, 1.0), jax.random.key(0))


def init_state_fn(cc_cfg, tx, init_norm: float):
    """A function key -> state dict; state['bad_step'] is -1 until a non-finite loss is seen."""
    def init(key):
        params = crosscoder.init_params(key, cc_cfg, init_norm)
        return dict(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            tokens_since_fired=jnp.zeros((cc_cfg.num_features,), jnp.int32),
            bad_step=jnp.full((), -1, jnp.int32),
            init_norm=jnp.asarray(init_norm, jnp.float32),
        )
    return init


def make_shardings(mesh, abstract_state: dict) -> dict:
    """mesh, batch [B,S,D], params and state shardings on `mesh` from the logical-axis rules."""
    return dict(mesh=mesh, batch=sharding.batch_sharding(mesh),
                params=sharding.param_shardings(mesh, abstract_state["params"]),
                state=sharding.state_shardings(mesh, abstract_state, abstract_state["params"], STATE_EXTRA_AXES))


# ==================================================================================================
# the step


def make_train_step(cc_cfg, tx, config: ConfigDict, steps: int, shardings: dict):
    """jit(state, acts [B,S,D] storage dtype, scales [S]) -> (state, metrics); the state buffer is donated."""
    t = config.train
    compute_dtype = jnp.dtype(t.compute_dtype)
    coef_at = optim.linear_ramp(t.sparsity_coef, ramp_steps=float(t.sparsity_warmup_frac) * steps)
    lr_at = optim.warmup_cooldown(t.lr, warmup_steps=t.warmup_steps, total_steps=steps, cooldown_frac=t.cooldown_frac)
    dead_after = int(t.dead_after_tokens)

    def step_fn(state, acts, scales):
        x = crosscoder.normalize(acts.astype(jnp.float32), scales)
        step = state["step"]
        coef = coef_at(step)
        dead_mask = state["tokens_since_fired"] >= dead_after

        def loss(p):
            return crosscoder.loss_fn(p, x, cc_cfg, sparsity_coef=coef, dead_mask=dead_mask,
                                      compute_dtype=compute_dtype)

        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(value) & jnp.isfinite(optax.tree.norm(grads))
        bad_step = jnp.where((state["bad_step"] < 0) & ~finite, step, state["bad_step"])
        since = metrics_lib.update_tokens_since_fired(state["tokens_since_fired"], aux["fired"], x.shape[0])
        new_state = dict(step=step + 1, params=params, opt_state=opt_state, tokens_since_fired=since,
                         bad_step=bad_step, init_norm=state["init_norm"])
        out = dict(loss=value, mse=aux["mse_per_snapshot"], l0=aux["l0_per_snapshot"], sparsity=aux["sparsity"],
                   aux_loss=aux["aux_loss"], sparsity_coef=coef, lr=lr_at(step),
                   dead_frac=jnp.mean((since >= dead_after).astype(jnp.float32)),
                   sums={k: aux[k] for k in metrics_lib.SUM_KEYS})
        return new_state, out

    rep = sharding.replicated(shardings["mesh"])
    return jax.jit(step_fn, in_shardings=(shardings["state"], shardings["batch"], rep),
                   out_shardings=(shardings["state"], rep), donate_argnums=0)


# ==================================================================================================
# the run


def train(config: ConfigDict, workdir: str, source: TrainData, *, evaluate: Callable[[dict], dict] | None = None,
          callbacks: Sequence[Callable[[StepEvent], bool | None]] = (), stop_after: int | None = None) -> TrainResult:
    """Train (resuming from the newest good checkpoint in workdir/checkpoints) and return the final state.

    evaluate(params) -> dict of metrics: called every train.eval_every steps (logged as kind "eval").
    callbacks: called after every step with a StepEvent; one returning True ends the run there, with a
    checkpoint (as stop_after does). stop_after: end this invocation after that many total steps.
    Writes workdir/metrics.jsonl and workdir/tb (process 0). The config must already be validated.
    """
    store = source.store
    snapshots = None if source.snapshots is None else list(source.snapshots)
    t = config.train
    batch_size = int(t.batch_size)
    mesh = sharding.make_mesh(config.mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    make_loader = lambda: data.make_loader(
        store, global_batch=batch_size, seed=int(t.seed), sharding=batch_sharding, blocks=list(source.blocks),
        window_blocks=int(config.data.window_blocks), num_epochs=None, streams=int(config.data.streams) or None,
        snapshots=snapshots)
    batches = make_loader()
    steps = total_steps(config, source.num_rows, batches.batches_per_epoch)
    num_snapshots = len(source.scales)
    cc_cfg, tx, abstract = abstract_train_state(config, num_snapshots=num_snapshots, d_model=store.meta.d_model,
                                                total_steps=steps)
    shard = make_shardings(mesh, abstract)
    train_step = make_train_step(cc_cfg, tx, config, steps, shard)
    try:  # a step that cannot fit is refused before anything is allocated
        memory_plan.check_before_training(train_step, abstract, shard, batch_size=batch_size,
                                          store_dtype=store.meta.dtype, stage=STAGE,
                                          resident_bytes=int(source.device_bytes))
    except BaseException:
        batches.close()
        raise
    scales = jax.device_put(jnp.asarray(np.asarray(source.scales, np.float32)), sharding.replicated(shard["mesh"]))
    checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), keep=int(t.keep_checkpoints),
                                       async_save=bool(t.async_checkpointing))
    try:
        # resume: the state and the data position of the newest checkpoint that restores with finite numbers
        restored = checkpoints.restore_latest(ckpt_lib.abstract_like(abstract, shard["state"]), batches, stage=STAGE)
        if restored is not None:
            start, state = restored.step, restored.state
            console.say(STAGE, f"resuming from checkpoint step {start} of {steps} in {checkpoints.directory}")
        else:
            start = 0
            state = _initial_state(config, cc_cfg, tx, shard, scales, make_loader)
            console.say(STAGE, f"training from scratch: {steps} steps of {batch_size} rows on mesh "
                        f"{dict(shard['mesh'].shape)}, {source.num_rows} training rows")
        end = steps if stop_after is None else min(steps, max(int(stop_after), start))
        log = MetricsLog(workdir, start, steps, _snapshot_names(store, snapshots))
        try:
            loop = _Loop(config, steps, batch_size, checkpoints, log, evaluate, callbacks)
            state, end = loop.run(state, train_step, batches, scales,
                                  start, end)
        finally:
            log.close()
        return TrainResult(state=state, crosscoder=cc_cfg, shardings=shard, total_steps=steps, end_step=end,
                           batch_size=batch_size)
    finally:
        batches.close()
        checkpoints.close()


def _snapshot_names(store, snapshots) -> tuple[str, ...]:
    names = tuple(store.meta.snapshots)
    return names if snapshots is None else tuple(names[i] for i in snapshots)


def _initial_state(config, cc_cfg, tx, shard, scales, make_loader):
    """Fresh state born sharded; init_norm by grid search on the first training batch unless the config gives it."""
    key = jax.random.key(int(config.train.seed))
    init_norm = float(config.crosscoder.init_norm)
    if init_norm <= 0:  # paper: grid search on the first batch
        loader = make_loader()
        try:
            first = next(loader)["acts"]
        finally:
            loader.close()
        x = crosscoder.normalize(first.astype(jnp.float32), scales)
        # the same key as init_params below: the norm is tuned for the very decoder draw the run starts from
        init_norm = float(crosscoder.grid_search_init_norm(key, cc_cfg, x))
    return jax.jit(init_state_fn(cc_cfg, tx, init_norm), out_shardings=shard["state"])(key)


class _Loop:
    """Steps start+1 .. end: logs every log_every, checkpoints every checkpoint_every and at the end."""

    def __init__(self, config, steps: int, batch_size: int, checkpoints: ckpt_lib.Checkpoints, log: MetricsLog,
                 evaluate, callbacks):
        self.t, self.lr = config.train, float(config.train.lr)
        self.steps, self.batch_size = steps, batch_size
        self.checkpoints, self.log, self.evaluate, self.callbacks = checkpoints, log, evaluate, tuple(callbacks)

    def run(self, state, train_step, batches, scales, start: int, end: int):
        t = self.t
        progress = console.progress(STAGE, self.steps, unit="step", initial=start, enabled=bool(t.progress))
        pending: list[dict] = []
        tick, tick_step, last = time.perf_counter(), start, time.perf_counter()
        # XLA:CPU runs each simulated device's part of a program on a shared thread pool; with two steps in flight
        # their all-reduces can wait on each other until the rendezvous times out and aborts the process.
        one_at_a_time = jax.default_backend() == "cpu" and jax.device_count() > 1
        try:
            step = start
            while step < end:
                step += 1
                acts = next(batches)["acts"]               # outside the lock: on the fly, reads launch forwards
                with DEVICE_DISPATCH:
                    state, out = train_step(state, acts, scales)
                if one_at_a_time:
                    out["loss"].block_until_ready()
                pending.append(out)
                progress.update(1)
                now = time.perf_counter()
                stop = any([bool(cb(StepEvent(step, self.steps, out, now - last))) for cb in self.callbacks])
                last = now
                if stop:
                    end = step
                if step % int(t.log_every) == 0 or step == end:
                    self._check_finite(state)   # also syncs: the logged numbers are this step's
                    values = _window_metrics(pending, *np.shape(state["params"]["b_dec"]))
                    pending = []
                    now = time.perf_counter()
                    values["tokens_per_s"] = (step - tick_step) * self.batch_size / max(now - tick, 1e-9)
                    tick, tick_step = now, step
                    self.log.write(step, "train", values)
                    progress.set_postfix(loss=f"{float(values['loss']):.4g}", tok_s=f"{values['tokens_per_s']:.3g}")
                if int(t.checkpoint_every) and step % int(t.checkpoint_every) == 0 and step != end:
                    self._check_finite(state)  # never save a state that saw a NaN
                    self.checkpoints.save(step, state, batches)
                if (self.evaluate is not None and int(t.eval_every) and step % int(t.eval_every) == 0
                        and step != self.steps):
                    self.log.write(step, "eval", self.evaluate(state["params"]))
            self._check_finite(state)
            if self.checkpoints.latest_step() != end:
                self.checkpoints.save(end, state, batches)
            self.checkpoints.wait()
        finally:
            progress.close()
        return state, end

    def _check_finite(self, state) -> None:
        bad = int(jax.device_get(state["bad_step"]))
        if bad >= 0:
            last = self.checkpoints.last_good_step()
            where = (f"the last good checkpoint is step {last} in {self.checkpoints.directory}" if last is not None
                     else "no checkpoint had been written yet")
            raise CrossjaxError(
                f"the loss (or its gradient) became NaN/Inf at training step {bad + 1}; training stopped and the bad "
                f"state was not saved; {where}. Lower train.lr (now {self.lr}) or check the activations.")


def _window_metrics(records: list[dict], num_snapshots: int, d_model: int) -> dict:
    """Means of the per-step metrics since the last log, and the explained variance over those steps' rows."""
    stacked = jax.device_get(records)
    out = {k: np.mean([np.asarray(r[k], np.float64) for r in stacked], axis=0) for k in stacked[0] if k != "sums"}
    ev = metrics_lib.EVAccumulator(num_snapshots, d_model)
    for r in stacked:
        ev.add(r["sums"])
    out["ev"] = ev.result()["ev"]
    return out
