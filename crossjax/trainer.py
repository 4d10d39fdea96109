"""Train a crosscoder: `run(config, workdir) -> summary`.

Read top to bottom, the sections follow one run:
  1. stages      make the activation store if it is missing (planted data, or suite -> activations), check it
  2. workdir     config.json guards the workdir: same config resumes, another config is refused
  3. state       mesh, optimizer, schedules, training state born sharded
  4. step        the jitted update (normalise, loss, grads, adam, NaN flag)
  5. eval        held-out explained variance, L0, dead features
  6. loop        batches, logging (metrics.jsonl, tensorboard, tqdm), checkpoints, resume
  7. end         export, planted-feature recovery, summary.json

Step numbers count finished updates: checkpoint `t` holds the state after t updates, and the metrics logged at
step t are those of the t-th update.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from crossjax import checkpoint as ckpt_lib
from crossjax import configs, crosscoder, snapshot_names, metrics as metrics_lib, sharding
from crossjax import store as store_lib
from crossjax.analysis import evolution
from crossjax.errors import CrossjaxError
from crossjax.files import atomic_write_text

# Keys that may change between a run and its resumption: they move work around, not the numbers trained.
RESUME_SAFE_KEYS = ("mesh.", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                    "train.async_checkpointing", "train.progress", "train.eval_every", "eval.")


# ==================================================================================================
# 1. stages: the activation store


def prepare_store(config: ConfigDict, workdir: str) -> store_lib.ActivationStore:
    """Run the missing data stages and return the opened, complete store that matches the config."""
    source = config.data.source
    if source == "planted":
        from crossjax import planted
        url = store_lib.resolve_url(config.store.path, workdir)
        if jax.process_count() == 1:
            store = planted.ensure_planted(config.planted, url)
        else:  # each process writes its own blocks, then all wait for the store to be complete
            from jax.experimental import multihost_utils
            planted.generate_planted(url, config.planted, process_index=jax.process_index(),
                                     process_count=jax.process_count())
            multihost_utils.sync_global_devices("crossjax.trainer.planted")
            store = store_lib.ActivationStore.open(url)
    else:
        if config.suite.enabled:
            from crossjax.suite import pretrain
            pretrain.ensure_suite(config)
        from crossjax import activations
        url = activations.ensure_activations(config, workdir)
        store = store_lib.ActivationStore.open(url)
    check_store(config, store)
    return store


def check_store(config: ConfigDict, store: store_lib.ActivationStore) -> None:
    """The store must hold what the config describes; say which side to change otherwise."""
    meta = store.meta
    problems = []
    if config.data.source == "planted":
        if meta.model != "planted":
            problems.append(f"data.source='planted' but the store holds activations of model {meta.model!r}")
        if meta.d_model != int(config.planted.d_model):
            problems.append(f"planted.d_model={config.planted.d_model} but the store has d_model={meta.d_model}")
        if meta.num_snapshots != int(config.planted.num_snapshots):
            problems.append(f"planted.num_snapshots={config.planted.num_snapshots} but the store has "
                            f"{meta.num_snapshots} snapshots {list(meta.snapshots)}")
    else:
        wanted = tuple(config.model.snapshots)
        if tuple(meta.snapshots) != wanted:
            problems.append(f"model.snapshots={list(wanted)} but the store holds snapshots {list(meta.snapshots)}")
        if meta.hook != config.model.hook:
            problems.append(f"model.hook={config.model.hook!r} but the store holds hook {meta.hook!r}")
    if int(config.data.d_model) and meta.d_model != int(config.data.d_model):
        problems.append(f"data.d_model={config.data.d_model} but the store has d_model={meta.d_model}")
    if problems:
        raise CrossjaxError(f"the activation store at {store.url} does not match the config:\n  - "
                            + "\n  - ".join(problems)
                            + "\nPoint store.path at another location (or delete the old store), or fix the config.")
    missing = store.missing_units()
    if missing:
        raise CrossjaxError(f"the store at {store.url} is incomplete: {len(missing)} unit(s) (block, snapshot) missing, "
                            f"e.g. {missing[:4]}; rerun the same command (generation resumes)")
    if int(config.train.heldout_blocks) >= meta.num_blocks:
        raise CrossjaxError(f"train.heldout_blocks={config.train.heldout_blocks} leaves no training data: the store "
                            f"has {meta.num_blocks} blocks; hold out fewer blocks or make a larger store")


def selected_snapshots(config: ConfigDict, store: store_lib.ActivationStore) -> tuple[tuple[str, ...], list | None]:
    """The snapshots to train on (data.snapshots, default all) as (names, store indices or None for all)."""
    return snapshot_names.select(config.data.snapshots, store.meta.snapshots)


def given_store(config: ConfigDict, workdir: str, store: store_lib.ActivationStore) -> store_lib.ActivationStore:
    """An already made store passed to run(): it must be the one store.path names, and match the config."""
    url = store_lib.resolve_url(config.store.path, workdir)
    if store.url != url:
        raise CrossjaxError(f"the store passed to run() is {store.url} but store.path names {url}; set store.path "
                            "to the store's location so that the run's config.json records what it trained on")
    check_store(config, store)
    return store


def ensure_scales(config: ConfigDict, store: store_lib.ActivationStore) -> np.ndarray:
    """Per-snapshot normalisation scales [S], estimated once from the first rows and saved with the store."""
    scales = store.scales
    if scales is None:
        scales = store.estimate_scales(num_rows=min(int(config.data.scale_rows), store.meta.num_rows))
        if jax.process_index() == 0:
            store.set_scales(scales)
    return np.asarray(scales, np.float32)


# ==================================================================================================
# 2. workdir guard


def _config_json(config: ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def config_differences(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts, ignoring RESUME_SAFE_KEYS."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    a, b = flat(old), flat(new)
    # a key added to crossjax after the run started reads, in the old run, as its default
    defaults = flat(_config_json(configs.base_config()))
    a.update({k: defaults[k] for k in b.keys() - a.keys() if k in defaults})
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys
            if a.get(k, "<absent>") != b.get(k, "<absent>") and not k.startswith(RESUME_SAFE_KEYS)]


def check_workdir(config: ConfigDict, workdir: str) -> bool:
    """True when workdir holds a run of this same config (resume); raise when it holds another config's run."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        old = json.load(f)
    diff = config_differences(old, _config_json(config))
    if diff:
        raise CrossjaxError(
            f"{workdir} holds a run of another config ({len(diff)} key(s) differ):\n  "
            + "\n  ".join(diff[:20]) + ("\n  ..." if len(diff) > 20 else "")
            + "\nUse another --workdir, or delete this one to start over.")
    return True


def record_config(config: ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        atomic_write_text(os.path.join(workdir, "config.json"), json.dumps(_config_json(config), indent=1) + "\n")


# ==================================================================================================
# 3. state: mesh, schedules, optimizer, sharded init


@dataclasses.dataclass(frozen=True)
class Plan:
    """Numbers derived once from the config and the store."""
    total_steps: int
    batch_size: int
    train_blocks: tuple[int, ...]
    heldout_blocks: tuple[int, ...]
    train_rows: int
    heldout_rows: int


def make_plan(config: ConfigDict, store: store_lib.ActivationStore) -> Plan:
    t = config.train
    nb = store.meta.num_blocks
    held = tuple(range(nb - int(t.heldout_blocks), nb))
    train = tuple(range(0, nb - int(t.heldout_blocks)))
    rows = lambda blocks: sum(store.block_range(b)[1] - store.block_range(b)[0] for b in blocks)
    train_rows, heldout_rows = rows(train), rows(held)
    batch = int(t.batch_size)
    if train_rows < batch:
        raise CrossjaxError(f"train.batch_size={batch} exceeds the {train_rows} training rows of the store; "
                            "use a smaller batch or a larger store")
    if int(t.steps) > 0:
        steps = int(t.steps)
    elif int(t.num_tokens) > 0:
        steps = math.ceil(int(t.num_tokens) / batch)
    else:
        steps = train_rows // batch  # one pass over the training rows, as in the paper
    return Plan(total_steps=steps, batch_size=batch, train_blocks=train, heldout_blocks=held,
                train_rows=train_rows, heldout_rows=heldout_rows)


def lr_schedule(t: ConfigDict, total_steps: int):
    """Linear warm-up from 0, constant, then linear decay to 0 over the last cooldown_frac of the steps."""
    warmup = int(t.warmup_steps)
    cool_start = int(round(total_steps * (1.0 - float(t.cooldown_frac))))
    cool_len = max(1, total_steps - cool_start)
    lr = float(t.lr)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(1.0, (count + 1.0) / warmup) if warmup > 0 else 1.0
        cool = jnp.clip((total_steps - count) / cool_len, 0.0, 1.0) if cool_start < total_steps else 1.0
        return lr * warm * cool
    return schedule


def sparsity_schedule(t: ConfigDict, total_steps: int):
    """lambda grows linearly from 0 to sparsity_coef over the first sparsity_warmup_frac of the steps."""
    n = float(t.sparsity_warmup_frac) * total_steps
    coef = float(t.sparsity_coef)

    def schedule(step):
        if n <= 0:
            return jnp.float32(coef)
        return coef * jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / n)
    return schedule


def make_optimizer(t: ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Adam without weight decay or clipping; log_threshold learns at lr * threshold_lr_scale."""
    main = lr_schedule(t, total_steps)
    scale = float(t.threshold_lr_scale)
    adam = lambda sched: optax.adam(sched, b1=float(t.b1), b2=float(t.b2), eps=float(t.eps))
    labels = lambda params: {k: ("threshold" if k == "log_threshold" else "main") for k in params}
    return optax.multi_transform(
        {"main": adam(main), "threshold": adam(lambda c: main(c) * scale)}, labels)


STATE_EXTRA_AXES = {"tokens_since_fired": ("feature",)}


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


# ==================================================================================================
# 4. the step


def make_train_step(cc_cfg, tx, config: ConfigDict, plan: Plan, shardings: dict):
    """jit(state, acts [B,S,D] storage dtype, scales [S]) -> (state, metrics); the state buffer is donated."""
    t = config.train
    compute_dtype = jnp.dtype(t.compute_dtype)
    coef_at = sparsity_schedule(t, plan.total_steps)
    lr_at = lr_schedule(t, plan.total_steps)
    dead_after = int(t.dead_after_tokens)
    ev_keys = metrics_lib.SUM_KEYS

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
                   sums={k: aux[k] for k in ev_keys})
        return new_state, out

    rep = sharding.replicated(shardings["mesh"])
    return jax.jit(step_fn, in_shardings=(shardings["state"], shardings["batch"], rep),
                   out_shardings=(shardings["state"], rep), donate_argnums=0)


# ==================================================================================================
# 5. evaluation on the held-out blocks


def make_eval_step(cc_cfg, config: ConfigDict, shardings: dict):
    """jit(params, acts [B,S,D], scales [S]) -> this batch's sums for EV, legacy EV, L0 and firing."""
    compute_dtype = jnp.dtype(config.train.compute_dtype)
    keep = ("sse", "x_sum", "x_sq_sum", "legacy_sum", "count", "l0_per_snapshot", "fired", "mse_per_snapshot")

    def eval_fn(params, acts, scales):
        x = crosscoder.normalize(acts.astype(jnp.float32), scales)
        _, aux = crosscoder.loss_fn(params, x, cc_cfg, sparsity_coef=0.0, compute_dtype=compute_dtype)
        return {k: aux[k] for k in keep}

    rep = sharding.replicated(shardings["mesh"])
    return jax.jit(eval_fn, in_shardings=(shardings["params"], shardings["batch"], rep), out_shardings=rep)


def evaluate(eval_step, params, store, scales, config: ConfigDict, plan: Plan, shardings: dict, *,
             snapshots: list | None = None) -> dict:
    """Explained variance (PAPER.md), legacy EV, L0 per snapshot and dead fraction over the held-out blocks.

    Returns ev [S], ev_legacy [S], ev_mean, l0 [S], l0_mean, mse [S], dead_frac, rows.
    """
    from crossjax import data
    batch = eval_batch_size(config, plan, shardings["mesh"])
    # one read stream: the held-out split may be a single block, and its batches do not depend on the host count
    loader = data.make_loader(store, global_batch=batch, seed=int(config.train.seed) + 1,
                              sharding=shardings["batch"], blocks=list(plan.heldout_blocks),
                              window_blocks=int(config.data.window_blocks), num_epochs=1, streams=1,
                              snapshots=snapshots)
    ev = metrics_lib.EVAccumulator(int(scales.shape[0]), store.meta.d_model)
    dead = metrics_lib.DeadTracker(int(params["b_enc"].shape[0]))
    limit = int(config.eval.max_batches) or None
    l0_sum, mse_sum = 0.0, 0.0
    try:
        for i, b in enumerate(loader):
            if limit is not None and i >= limit:
                break
            sums = jax.device_get(eval_step(params, b["acts"], scales))
            n = float(sums["count"])
            ev.add(sums)
            dead.update(sums["fired"], int(n))
            l0_sum = l0_sum + np.asarray(sums["l0_per_snapshot"], np.float64) * n
            mse_sum = mse_sum + np.asarray(sums["mse_per_snapshot"], np.float64) * n
    finally:
        loader.close()
    result = ev.result()
    l0 = l0_sum / result["count"]
    return dict(ev=result["ev"], ev_legacy=result["ev_legacy"], ev_mean=result["ev_mean"],
                ev_legacy_mean=result["ev_legacy_mean"], l0=l0, l0_mean=float(np.mean(l0)),
                mse=mse_sum / result["count"], dead_frac=dead.dead_fraction(), rows=result["count"])


def eval_batch_size(config: ConfigDict, plan: Plan, mesh) -> int:
    """The eval batch: eval.batch_size (or the training batch), capped to the held-out rows, a multiple of 'data'."""
    data_ax = mesh.shape["data"]
    want = int(config.eval.batch_size) or plan.batch_size
    cap = (plan.heldout_rows // data_ax) * data_ax
    if cap == 0:
        raise CrossjaxError(f"the {plan.heldout_rows} held-out rows cannot fill one batch over the {data_ax}-way data "
                            "axis; raise train.heldout_blocks")
    return min(want, cap)


# ==================================================================================================
# 6. the loop: logging, checkpoints, resume


class MetricsLog:
    """metrics.jsonl (one JSON object per record) and tensorboard scalars under workdir/tb; process 0 only."""

    def __init__(self, workdir: str, resume_step: int, final_step: int, snapshots: tuple[str, ...]):
        self.enabled = jax.process_index() == 0
        self.snapshots = snapshots
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        # Records past the restored checkpoint are written again by this run (and the final evaluation, when
        # the run had finished): drop the old ones.
        if os.path.exists(self.path):
            def kept(r):
                redone = r["kind"] == "eval" and r["step"] == resume_step == final_step
                return r["step"] <= resume_step and not redone
            with open(self.path) as f:
                records = [line for line in f if line.strip()]
            atomic_write_text(self.path, "".join(line for line in records if kept(json.loads(line))))
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, **_jsonable(values)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, v in record.items():
            if key in ("step", "kind"):
                continue
            if isinstance(v, list) and len(v) == len(self.snapshots):
                for name, x in zip(self.snapshots, v):
                    self._tb.add_scalar(f"{kind}/{key}/{name}", x, step)
            elif isinstance(v, (int, float)):
                self._tb.add_scalar(f"{kind}/{key}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _jsonable(values: dict) -> dict:
    out = {}
    for k, v in values.items():
        a = np.asarray(v)
        out[k] = a.tolist() if a.ndim else (float(a) if a.dtype.kind == "f" else a.item())
    return out


def _window_metrics(records: list[dict], num_snapshots: int, d_model: int) -> dict:
    """Means of the per-step metrics since the last log, and the explained variance over those steps' rows."""
    stacked = jax.device_get(records)
    out = {k: np.mean([np.asarray(r[k], np.float64) for r in stacked], axis=0) for k in stacked[0] if k != "sums"}
    ev = metrics_lib.EVAccumulator(num_snapshots, d_model)
    for r in stacked:
        ev.add(r["sums"])
    out["ev"] = ev.result()["ev"]
    return out


def _check_finite(state, checkpoints: ckpt_lib.Checkpoints, config: ConfigDict) -> None:
    bad = int(jax.device_get(state["bad_step"]))
    if bad >= 0:
        checkpoints.wait()
        last = checkpoints.latest_step()
        where = (f"the last good checkpoint is step {last} in {checkpoints.directory}" if last is not None
                 else "no checkpoint had been written yet")
        raise CrossjaxError(
            f"the loss (or its gradient) became NaN/Inf at training step {bad + 1}; training stopped and the bad "
            f"state was not saved; {where}. Lower train.lr (now {config.train.lr}) or check the activations.")


def _say(message: str) -> None:
    """One line for the person running the job (process 0, stderr, beside the progress bar)."""
    if jax.process_index() == 0:
        print(f"crossjax.trainer: {message}", file=sys.stderr, flush=True)


def _process_local(tree):
    """Host numpy copies of (possibly multi-process) global arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def run(config: ConfigDict, workdir: str, *, stop_after: int | None = None,
        store: store_lib.ActivationStore | None = None) -> dict:
    """Run the missing stages, then train (resuming from the latest checkpoint), evaluate and export.

    stop_after: end this invocation after that many total steps, with a checkpoint (a time-boxed job); the same
    call later resumes. store: the opened, complete store at store.path, when another run has just made it
    (the data stages are then skipped; the store is still checked against the config). Returns the summary dict
    also written to workdir/summary.json (when stopped early: {"stopped_at": step, "workdir": ...}).
    """
    configs.validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    check_workdir(config, workdir)

    # 1. stages
    store = prepare_store(config, workdir) if store is None else given_store(config, workdir, store)
    scales_np = ensure_scales(config, store)
    names, subset = selected_snapshots(config, store)
    if subset is not None:
        scales_np = scales_np[subset]
    plan = make_plan(config, store)
    record_config(config, workdir)
    meta = store.meta

    # 3. state
    mesh = sharding.make_mesh(config.mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    from crossjax import data
    make_train_loader = lambda: data.make_loader(
        store, global_batch=plan.batch_size, seed=int(config.train.seed), sharding=batch_sharding,
        blocks=list(plan.train_blocks), window_blocks=int(config.data.window_blocks), num_epochs=None,
        streams=int(config.data.streams) or None, snapshots=subset)
    batches = make_train_loader()
    if int(config.train.steps) <= 0 and int(config.train.num_tokens) <= 0:
        # one pass = one epoch as the loader cuts it (rows that cannot fill a whole batch of a stream are left
        # out), so that no row is seen twice
        plan = dataclasses.replace(plan, total_steps=min(plan.total_steps, batches.batches_per_epoch))
    cc_cfg, tx, abstract = abstract_train_state(config, num_snapshots=len(names), d_model=meta.d_model,
                                                total_steps=plan.total_steps)
    shard = dict(mesh=mesh, batch=batch_sharding,
                 params=sharding.param_shardings(mesh, abstract["params"]),
                 state=sharding.state_shardings(mesh, abstract, abstract["params"], STATE_EXTRA_AXES))
    scales = jax.device_put(jnp.asarray(scales_np), sharding.replicated(mesh))

    checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), keep=int(config.train.keep_checkpoints),
                                       async_save=bool(config.train.async_checkpointing))
    try:
        start = checkpoints.latest_step()
        if start is not None:  # resume: the state and the data position of the latest checkpoint
            state = checkpoints.restore(start, ckpt_lib.abstract_like(abstract, shard["state"]), batches)
            _say(f"resuming from checkpoint step {start} of {plan.total_steps} in {checkpoints.directory}")
        else:
            start = 0
            state = _initial_state(config, cc_cfg, tx, shard, scales, make_train_loader)
            _say(f"training from scratch: {plan.total_steps} steps of {plan.batch_size} rows on mesh "
                 f"{dict(mesh.shape)}, {plan.train_rows} training and {plan.heldout_rows} held-out rows")

        # 6. the loop
        eval_step = make_eval_step(cc_cfg, config, shard)
        evaluate_now = lambda st: evaluate(eval_step, st["params"], store, scales, config, plan, shard,
                                           snapshots=subset)
        log = MetricsLog(workdir, start, plan.total_steps, names)
        end = plan.total_steps if stop_after is None else min(plan.total_steps, max(int(stop_after), start))
        state = _train_loop(state, make_train_step(cc_cfg, tx, config, plan, shard), batches, scales, config, plan,
                            start, end, checkpoints, log, evaluate_now)
        if end < plan.total_steps:
            log.close()
            return dict(stopped_at=end, workdir=workdir)

        # 7. end
        final = evaluate_now(state)
        log.write(plan.total_steps, "eval", final)
        log.close()
        return _finish(config, workdir, store, names, subset, scales_np, cc_cfg, plan, state, final)
    finally:
        batches.close()
        checkpoints.close()


def _initial_state(config, cc_cfg, tx, shard, scales, make_train_loader):
    """Fresh state born sharded; init_norm by grid search on the first training batch unless the config gives it."""
    key = jax.random.key(int(config.train.seed))
    init_norm = float(config.crosscoder.init_norm)
    if init_norm <= 0:  # paper: grid search on the first batch
        loader = make_train_loader()
        try:
            first = next(loader)["acts"]
        finally:
            loader.close()
        x = crosscoder.normalize(first.astype(jnp.float32), scales)
        # the same key as init_params below: the norm is tuned for the very decoder draw the run starts from
        init_norm = float(crosscoder.grid_search_init_norm(key, cc_cfg, x))
    return jax.jit(init_state_fn(cc_cfg, tx, init_norm), out_shardings=shard["state"])(key)


def _train_loop(state, train_step, batches, scales, config, plan: Plan, start: int, end: int,
                checkpoints: ckpt_lib.Checkpoints, log: MetricsLog, evaluate_now):
    """Steps start+1 .. end; logs every log_every, checkpoints every checkpoint_every and at `end`."""
    t = config.train
    progress = _progress(t, plan, start)
    pending: list[dict] = []
    tick, tick_step = time.perf_counter(), start
    # XLA:CPU runs each simulated device's part of a program on a shared thread pool; with two steps in flight
    # their all-reduces can wait on each other until the rendezvous times out and aborts the process.
    one_at_a_time = jax.default_backend() == "cpu" and jax.device_count() > 1
    try:
        for step in range(start + 1, end + 1):
            state, out = train_step(state, next(batches)["acts"], scales)
            if one_at_a_time:
                out["loss"].block_until_ready()
            pending.append(out)
            progress.update(1)
            if step % int(t.log_every) == 0 or step == end:
                _check_finite(state, checkpoints, config)   # also syncs: the logged numbers are this step's
                values = _window_metrics(pending, *np.shape(state["params"]["b_dec"]))
                pending = []
                now = time.perf_counter()
                values["tokens_per_s"] = (step - tick_step) * plan.batch_size / max(now - tick, 1e-9)
                tick, tick_step = now, step
                log.write(step, "train", values)
                progress.set_postfix(loss=f"{float(values['loss']):.4g}", tok_s=f"{values['tokens_per_s']:.3g}")
            if int(t.checkpoint_every) and step % int(t.checkpoint_every) == 0 and step != end:
                _check_finite(state, checkpoints, config)  # never save a state that saw a NaN
                checkpoints.save(step, state, batches)
            if int(t.eval_every) and step % int(t.eval_every) == 0 and step != plan.total_steps:
                log.write(step, "eval", evaluate_now(state))
        _check_finite(state, checkpoints, config)
        if checkpoints.latest_step() != end:
            checkpoints.save(end, state, batches)
        checkpoints.wait()
    finally:
        progress.close()
    return state


def _finish(config, workdir, store, names, subset, scales_np, cc_cfg, plan: Plan, state, final: dict) -> dict:
    """Export the weights, measure planted recovery, write summary.json."""
    params = _process_local(state["params"])
    summary = dict(
        workdir=workdir, store=store.url, steps=plan.total_steps, tokens=plan.total_steps * plan.batch_size,
        snapshots=list(names), num_features=cc_cfg.num_features,
        init_norm=float(jax.device_get(state["init_norm"])), scales=scales_np.tolist(),
        eval=_jsonable(final), export=os.path.join(workdir, "export"))
    summary["evolution"] = evolution.summarise(params["W_dec"], list(names))
    if config.data.source == "planted":
        from crossjax import planted
        summary["recovery"] = planted_recovery(params["W_dec"], planted.load_truth(store.url), snapshots=subset,
                                               threshold=float(config.eval.recovery_threshold),
                                               emergence_threshold=float(config.eval.emergence_threshold),
                                               presence=float(config.eval.presence))
    if jax.process_index() == 0:
        crosscoder.export_params(params, scales_np, cc_cfg, summary["export"])
        if config.data.source == "snapshots" and int(config.eval.spliced_tokens) > 0:
            summary["spliced"] = spliced_eval(config, names, summary["export"])
        atomic_write_text(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=1) + "\n")
    return summary


def spliced_eval(config: ConfigDict, names, export_dir: str) -> dict:
    """Per snapshot: the LM's next-token loss clean, with the reconstruction spliced in at the hook, and with the
    hook zero-ablated (PAPER.md "Spliced-in loss"), over eval.spliced_tokens tokens of tokens.split =
    eval.spliced_split (the text and jsonl sources have no splits: their documents are drawn with another seed)."""
    import copy
    from crossjax import activations, tokens
    from crossjax.analysis.spliced import spliced_loss
    from crossjax.models import load as model_load
    all_names, specs = activations.snapshot_specs(config.model)
    dirs = {n: model_load.resolve_snapshot(*specs[all_names.index(n)], cache_dir=config.model.cache_dir or None)
            for n in names}
    section = copy.deepcopy(config.tokens)
    section.split = str(config.eval.spliced_split)
    section.num_tokens = int(config.eval.spliced_tokens)
    section.seed = int(section.seed) + 1
    contexts = tokens.contexts_for(section, tokens.load_tokenizer(dirs[names[0]]))
    _say(f"spliced-in loss over {int(contexts.valid.sum())} tokens of {len(contexts.input_ids)} contexts")
    return spliced_loss(dirs, export_dir, config.model.hook, contexts)


def _progress(t: ConfigDict, plan: Plan, start: int):
    from tqdm.auto import tqdm
    return tqdm(total=plan.total_steps, initial=start, unit="step", dynamic_ncols=True,
                disable=not bool(t.progress) or jax.process_index() != 0)


# ==================================================================================================
# 7. planted-feature recovery


def planted_recovery(W_dec: np.ndarray, truth, *, snapshots=None, threshold: float = 0.9,
                     emergence_threshold: float = 0.5, presence: float = 0.1) -> dict:
    """How well learned decoder directions W_dec [S,F,D] recover the planted truth.

    snapshots: the store indices of W_dec's S snapshots when the run trained on a subset (data.snapshots); the
    truth of those snapshots is used, presence is still judged against each feature's peak over all snapshots,
    and emergence (a property of the whole snapshot sequence) is not measured.

    A true feature counts as present at a snapshot where its strength is at least `presence` times its peak
    strength over snapshots (a feature decayed to a few percent of its peak is buried in the noise there).
    - mean_max_cos: for each snapshot, the mean over true features present there of the best cosine
      similarity to any learned decoder row of that snapshot; then averaged over snapshots.
    - frac_above: fraction of present (snapshot, true feature) pairs whose best cosine exceeds `threshold`.
    - emergence: each emergent true feature is matched to the learned feature with the highest mean cosine over
      the snapshots where it is present; its predicted emergence snapshot is the first where the learned decoder
      norm, divided by its maximum over snapshots, reaches `emergence_threshold`. Reported: exact and within-one
      accuracy against the planted emergence snapshot.
    """
    W = np.asarray(W_dec, np.float64)
    true_dirs = np.asarray(truth.directions, np.float64)         # [S, T, D]
    strengths = np.asarray(truth.strengths, np.float64)          # [S, T]
    present = (strengths > 0) & (strengths >= presence * strengths.max(0, keepdims=True))
    if snapshots is not None:
        sel = np.asarray(list(snapshots), np.int64)
        true_dirs, strengths, present = true_dirs[sel], strengths[sel], present[sel]
    if W.shape[:1] != true_dirs.shape[:1] or W.shape[-1] != true_dirs.shape[-1]:
        raise CrossjaxError(f"W_dec {W.shape} and the planted truth {true_dirs.shape} (snapshots={snapshots}) "
                            "differ in snapshots or d_model; pass the store indices of W_dec's snapshots")
    learned = W / np.maximum(np.linalg.norm(W, axis=-1, keepdims=True), 1e-12)
    true_unit = true_dirs / np.maximum(np.linalg.norm(true_dirs, axis=-1, keepdims=True), 1e-12)
    cos = np.einsum("std,sfd->stf", true_unit, learned)          # [S, T, F]
    best = cos.max(-1)                                           # [S, T]
    per_snapshot = [float(best[s][present[s]].mean()) if present[s].any() else float("nan")
                    for s in range(best.shape[0])]
    out = dict(mean_max_cos=float(np.nanmean(per_snapshot)), mean_max_cos_per_snapshot=per_snapshot,
               frac_above=float((best[present] > threshold).mean()), threshold=threshold, presence=presence)

    if snapshots is not None:
        out["snapshots"] = [int(i) for i in snapshots]
        out["note"] = "trained on a subset of the snapshots: emergence is not measured"
        return out
    emergent = np.flatnonzero(np.asarray(truth.emergence_snapshot) >= 0)
    if emergent.size:
        mean_cos = (cos * present[:, :, None]).sum(0) / np.maximum(present.sum(0), 1)[:, None]   # [T, F]
        match = mean_cos.argmax(-1)                              # [T]
        # the same rule the analyses use: first snapshot where the normalised decoder norm reaches the threshold
        predicted = evolution.emergence_snapshot(evolution.decoder_norms(W)[:, match[emergent]], emergence_threshold)
        target = np.asarray(truth.emergence_snapshot)[emergent]
        out.update(emergence_accuracy=float(np.mean(predicted == target)),
                   emergence_within_one=float(np.mean(np.abs(predicted - target) <= 1)),
                   emergence_threshold=emergence_threshold, num_emergent=int(emergent.size))
    return out
