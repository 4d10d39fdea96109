"""The stages of a run, in order: the only module that knows every stage.

    summary = pipeline.run(config, workdir)

0. checks   the config's values (config_checks.validate) and the evaluators' names, before any stage runs
1. workdir  held by this run alone (crossjax/locks.py: a second run on it stops at once, naming the first);
            workdir/config.json guards it: the same config resumes, another config is refused
2. data     the activation store, made if it is missing: planted data (crossjax/planted.py), or the offline suite
            (crossjax/suite) and then the activation stage (crossjax/activations.py); checked against the config.
            With data.on_the_fly, only the held-out blocks are written and the training rows are computed by the
            snapshots as the loader reads them (crossjax/live_store.py)
3. train    crossjax/trainer.py on the store's training blocks (resuming from the latest checkpoint)
4. export   the weights, with the normalisation scales, to workdir/export (safetensors + config.json)
5. evals    the evaluators named in config.evals (crossjax/evals/: held-out EV/L0, planted recovery, spliced loss)
6. summary  workdir/summary.json (crossjax/summary.py)

The same call again resumes an interrupted run, or re-evaluates a finished one.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Callable, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from crossjax import config_checks, configs, crosscoder_export, evals, locks, sharding, snapshot_names, trainer
from crossjax import workdir as workdir_lib
from crossjax import store as store_lib
from crossjax.analysis import evolution
from crossjax.errors import CrossjaxError
from crossjax.evals import heldout
from crossjax.metrics_log import MetricsLog
from crossjax.summary import RunSummary


@dataclasses.dataclass(frozen=True)
class Stopped:
    """What run() returns when it ended before the last step (stop_after, or a callback): resume with run()."""
    step: int
    total_steps: int
    workdir: str


def run(config: ConfigDict, workdir: str, *, stop_after: int | None = None,
        store: store_lib.ActivationStore | None = None,
        callbacks: Sequence[Callable[[trainer.StepEvent], bool | None]] = ()) -> RunSummary | Stopped:
    """Run the missing stages, train, export, evaluate, and write workdir/summary.json.

    stop_after: end this invocation after that many total steps, with a checkpoint (a time-boxed job).
    store: the opened, complete store at store.path, when another run has just made it (the data stages are then
    skipped; the store is still checked against the config). callbacks: per-step, see trainer.train.
    """
    config = bind_suite(config)
    config_checks.validate(config)
    evals.check(config.evals, config)              # a typo or a bad setting fails before any stage runs
    workdir = workdir_lib.prepare(workdir)
    with locks.hold_workdir(workdir):              # before anything in the workdir is read or written
        workdir_lib.check(config, workdir, configs.base_config())
        return _run_stages(config, workdir, stop_after, store, callbacks)


def _run_stages(config: ConfigDict, workdir: str, stop_after: int | None, store: store_lib.ActivationStore | None,
                callbacks: Sequence[Callable[[trainer.StepEvent], bool | None]]) -> RunSummary | Stopped:
    """run() past its checks, with the workdir locked."""
    store = prepare_store(config, workdir) if store is None else given_store(config, workdir, store)
    scales = ensure_scales(config, store)
    names, subset = snapshot_names.select(config.data.snapshots, store.meta.snapshots)
    if subset is not None:
        scales = scales[subset]
    train_blocks, heldout_blocks = split_blocks(config, store)
    workdir_lib.record(config, workdir)

    # the evaluators' view of the run: shapes and shardings are those the trainer will build (the mesh and the
    # logical-axis rules depend only on the config and the store)
    cc_cfg, _, abstract = trainer.abstract_train_state(config, num_snapshots=len(names), d_model=store.meta.d_model,
                                                       total_steps=1)
    context = evals.RunContext(config=config, workdir=workdir, store=store, snapshots=tuple(names),
                               snapshot_indices=subset, scales=scales, heldout_blocks=heldout_blocks,
                               crosscoder=cc_cfg,
                               shardings=trainer.make_shardings(sharding.make_mesh(config.mesh), abstract))
    source = trainer.TrainData(store=store, blocks=train_blocks, scales=scales,
                               snapshots=None if subset is None else tuple(subset),
                               device_bytes=getattr(store, "device_bytes", 0))  # a LiveStore's snapshot models
    result = trainer.train(config, workdir, source, evaluate=lambda params: heldout.evaluate_params(context, params),
                           callbacks=callbacks, stop_after=stop_after)
    if not result.finished:
        return Stopped(step=result.end_step, total_steps=result.total_steps, workdir=workdir)

    context.params = result.state["params"]
    context.export_dir = os.path.join(workdir, "export")
    host_params = context.host_params              # a collective on several hosts: every process gathers
    if jax.process_index() == 0:
        crosscoder_export.export_params(host_params, scales, result.crosscoder, context.export_dir)
    results = evals.run_all(config.evals, context)
    if "heldout" in results:
        log = MetricsLog(workdir, result.total_steps, result.total_steps, tuple(names))
        log.write(result.total_steps, "eval", results["heldout"])
        log.close()
    summary = RunSummary(
        workdir=workdir, store=store.url, steps=result.total_steps, tokens=result.total_steps * result.batch_size,
        snapshots=list(names), num_features=result.crosscoder.num_features,
        init_norm=float(jax.device_get(result.state["init_norm"])), scales=np.asarray(scales).tolist(),
        export=context.export_dir,
        evolution=evolution.summarise(host_params["W_dec"], list(names), float(config.eval.emergence_threshold),
                                      clusters=int(config.eval.clusters), cluster_seed=int(config.train.seed)),
        evals=results)
    if jax.process_index() == 0:
        summary.write()
    return summary


# ==================================================================================================
# the data stage


def bind_suite(config: ConfigDict) -> ConfigDict:
    """A copy of the config whose model.path_template points at the offline suite's snapshots when the suite is
    enabled and no path is given (the suite's directory depends on its settings and $CROSSJAX_CACHE)."""
    if not config.suite.enabled or config.model.path_template:
        return config
    from crossjax.suite import pretrain
    bound = copy.deepcopy(config)
    bound.model.path_template = str(pretrain.suite_dir(config.suite) / "{snapshot}")
    pretrain.check_model_section(bound)       # the snapshots must be ones the suite saves
    return bound


def make_activation_store(config: ConfigDict, workdir: str) -> store_lib.ActivationStore:
    """The activation stage alone (`python -m crossjax.activations`): the suite if enabled, then the store of the
    model snapshots' activations, each made if missing. The data sections' cheap checks come first."""
    config = bind_suite(config)
    config_checks.validate_data(config, source="snapshots")
    workdir = workdir_lib.prepare(workdir)
    check_store_location(store_lib.resolve_url(config.store.path, workdir))
    return activation_store(config, workdir, live=False)


def prepare_store(config: ConfigDict, workdir: str) -> store_lib.ActivationStore:
    """Run the missing data stages and return the opened, complete store that matches the config."""
    url = store_lib.resolve_url(config.store.path, workdir)
    check_store_location(url)
    if config.data.source == "planted":
        store = planted_store(config, url)
    else:
        store = activation_store(config, workdir)
    check_store(config, store)
    return store


def check_store_location(url: str) -> None:
    """A local store path must be a directory (or not exist yet)."""
    path = locks.local_directory(url)
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise CrossjaxError(f"store.path={url} is a file, not a directory: point store.path at a directory "
                            "(a missing one is created)")


def planted_store(config: ConfigDict, url: str) -> store_lib.ActivationStore:
    """The planted store of config.planted at url, its missing blocks written first: process p of P writes the
    blocks b with b % P == p, under a writer's claim, then all wait for the store to be complete."""
    from crossjax import planted
    pi, pc = jax.process_index(), jax.process_count()
    store = store_lib.ActivationStore.create(url, planted.planted_meta(config.planted))
    if not store.is_complete() or store.read_file(planted.TRUTH_FILE) is None:
        with locks.claim_store_units(url, index=pi, count=pc, num_units=store.meta.num_blocks, unit="block",
                                     stage="planted"):
            planted.generate_planted(url, config.planted, process_index=pi, process_count=pc)
    if pc > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("crossjax.pipeline.planted")
    return store_lib.ActivationStore.open(url)


def activation_store(config: ConfigDict, workdir: str, *, live: bool = True) -> store_lib.ActivationStore:
    """The store of the model snapshots' activations: the offline suite first when it is enabled, then the
    activation stage (each resumes; a finished one is reused). `config` has been through bind_suite.

    With data.on_the_fly only the held-out blocks' activations (and every block's tokens) are written, and the
    store returned is a live_store.LiveStore that computes the training blocks' rows as they are read (with
    `live` False: the store as written, no snapshot loaded)."""
    if config.suite.enabled:
        from crossjax.suite import pretrain
        pretrain.ensure_suite(config)
    if config.data.on_the_fly:
        from crossjax import live_store
        heldout = int(config.train.heldout_blocks)
        prepared = live_store.write_stored_part(config, workdir, stored_tail_blocks=heldout)
        if not live:
            return store_lib.ActivationStore.open(prepared.store.url)
        return live_store.open_live(prepared, config, stored_tail_blocks=heldout)
    from crossjax import activations
    return store_lib.ActivationStore.open(activations.ensure_activations(config, workdir))


def given_store(config: ConfigDict, workdir: str, store: store_lib.ActivationStore) -> store_lib.ActivationStore:
    """An already made store passed to run(): it must be the one store.path names, and match the config."""
    url = store_lib.resolve_url(config.store.path, workdir)
    if store.url != url:
        raise CrossjaxError(f"the store passed to run() is {store.url} but store.path names {url}; set store.path "
                            "to the store's location so that the run's config.json records what it trained on")
    from crossjax import live_store
    if config.data.on_the_fly and not isinstance(store, live_store.LiveStore):  # the written part: compute the rest
        store = activation_store(config, workdir)
    check_store(config, store)
    return store


def check_store(config: ConfigDict, store: store_lib.ActivationStore) -> None:
    """The store must hold what the config describes, completely; say which side to change otherwise."""
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
    store.require_complete()
    if int(config.train.heldout_blocks) >= meta.num_blocks:
        raise CrossjaxError(f"train.heldout_blocks={config.train.heldout_blocks} leaves no training data: the store "
                            f"has {meta.num_blocks} blocks; hold out fewer blocks or make a larger store")


def split_blocks(config: ConfigDict, store: store_lib.ActivationStore) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(training blocks, held-out blocks): the store's last train.heldout_blocks blocks are never trained on."""
    nb, held = store.meta.num_blocks, int(config.train.heldout_blocks)
    return tuple(range(0, nb - held)), tuple(range(nb - held, nb))


def ensure_scales(config: ConfigDict, store: store_lib.ActivationStore) -> np.ndarray:
    """Per-snapshot normalisation scales [S], estimated once from the first rows and saved with the store."""
    scales = store.scales
    if scales is None:
        scales = store.estimate_scales(num_rows=min(int(config.data.scale_rows), store.meta.num_rows))
        if jax.process_index() == 0:
            store.set_scales(scales)
    return np.asarray(scales, np.float32)
