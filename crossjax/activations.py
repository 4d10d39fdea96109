"""Snapshots x contexts -> activation store, resumable, in bounded memory.

    python -m crossjax.activations --config=experiments/tiny.py --workdir=runs/tiny

Pipeline (``ensure_activations``), every check before anything is written, cheap checks first:

1. Resolve every snapshot (``model.path_template`` with ``{snapshot}``, or ``model.repo`` at revision = snapshot
   name); check the hook and the context length against the first one's config.json.
2. Build the contexts once with the first snapshot's tokenizer (``crossjax.tokens``).
3. Hash each snapshot's weights from its files (``models.load.inspect_snapshot``: streamed, no model built); check
   they are one architecture with one tokenizer and no duplicated weights (``models.load.check_snapshots_consistent``).
   This runs on every call, also when the store is complete, because the hashes are part of the store's metadata.
4. Derive the row layout (row = a valid (context, position) pair, the same for every snapshot); create the store,
   or reopen it when its metadata is equal; write token ids, context ids and positions.
5. For each snapshot (one model in memory at a time; its hash checked again as it loads): run the
   jitted forward to the hook (``models.Runner``) over the contexts of each group of blocks, place the valid
   positions into the group's rows and write its blocks (in a background thread, while the next group is computed:
   ``write_groups``).

With several local devices, the forward batch is split over them and large weight matrices are sharded over them
(``load_snapshot(mesh=...)``); ``contexts_per_batch`` is rounded up to a multiple of the device count.

Row layout (``crossjax.row_layout``): row = a valid (context, position) pair; with ``activations.shuffle`` the
contexts are put in one seeded order and the rows of each group of ``shuffle_group_rows`` (whole blocks) are
permuted, the same for every snapshot and every process. A group is computed in memory and written as contiguous
blocks.

Memory bound while writing: two group buffers ``group_rows x d_model`` in the store dtype (one being written, one
being filled), one forward batch ``contexts_per_batch x context_len x d_model``, one model, and the contexts
themselves (5 bytes per context position: int32 ids and a bool mask); never the whole ``[N, S, D]``.

Resuming: a (group, snapshot) unit whose blocks all carry done markers is skipped; a partly written group is
recomputed with the same batches (same bytes) and only its missing blocks are written. With several processes
(``jax.process_count() > 1``), process p writes the groups g with g % process_count == p (tokens included), so no
context is run by two processes; with groups of one block this is block % process_count == p. A process with
units to write first claims its groups (``locks.claim_store_units``, local stores): a second writer whose groups
overlap those of a live one stops with an error naming it, before it writes anything.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crossjax import console, documents, locks, token_cache
from crossjax import store as store_lib
from crossjax import tokens as tokens_lib
from crossjax.activations_plan import fmt_bytes, print_plan, store_size_bytes
from crossjax.errors import CrossjaxError
from crossjax.row_layout import RowLayout

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------------------------------------------
# Snapshots


@dataclasses.dataclass
class _SnapshotPlan:
    names: list[str]
    specs: list[tuple[str, str | None]]  # (spec, revision) for load_snapshot
    infos: list  # LoadedSnapshot per snapshot without its model (hash, config, paths)
    neox: object  # NeoXConfig shared by all snapshots


def snapshot_specs(model_cfg) -> tuple[list[str], list[tuple[str, str | None]]]:
    """model section -> (snapshot names, (spec, revision) per snapshot for models.load.resolve_snapshot)."""
    names = [str(s) for s in model_cfg.snapshots]
    if not names:
        raise CrossjaxError("model.snapshots is empty; list the snapshot names, e.g. ['step0', 'step1000'].")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CrossjaxError(f"model.snapshots repeats {dup}; list each snapshot once.")
    if model_cfg.path_template:
        if "{snapshot}" not in model_cfg.path_template:
            raise CrossjaxError(f"model.path_template={model_cfg.path_template!r} has no '{{snapshot}}' field; "
                                f"write it like '/data/pythia-160m/{{snapshot}}'.")
        return names, [(model_cfg.path_template, n) for n in names]  # load.py fills {snapshot}
    if model_cfg.repo:
        return names, [(model_cfg.repo, n) for n in names]
    raise CrossjaxError("neither model.path_template nor model.repo is set; give local snapshot directories "
                        "(path_template with '{snapshot}') or a Hub repo whose revisions are the snapshot names.")


def snapshot_dirs(model_cfg, names: Sequence[str]) -> dict:
    """{name: local directory} of the model section's snapshots `names` (downloaded from the Hub if need be)."""
    from crossjax.models import snapshot_files

    all_names, specs = snapshot_specs(model_cfg)
    unknown = [n for n in names if n not in all_names]
    if unknown:
        raise CrossjaxError(f"snapshots {unknown} are not among model.snapshots {all_names}")
    cache_dir = model_cfg.get("cache_dir") or None
    return {n: snapshot_files.resolve_snapshot(*specs[all_names.index(n)], cache_dir=cache_dir) for n in names}


def _load(config, plan_or_specs, s: int, mesh):
    from crossjax.models import load as load_lib

    spec, rev = plan_or_specs[s]
    return load_lib.load_snapshot(spec, rev, dtype=model_dtype(config.model.dtype), mesh=mesh,
                                  cache_dir=config.model.get("cache_dir") or None)


def _resolve_snapshots(config):
    """(names, specs, paths, NeoXConfig of the first): finds every snapshot and checks the hook and context
    length against the first one's config.json, before any weights are read."""
    from crossjax.models import gpt_neox, snapshot_files

    names, specs = snapshot_specs(config.model)
    cache_dir = config.model.get("cache_dir") or None
    paths = [snapshot_files.resolve_snapshot(spec, rev, cache_dir=cache_dir) for spec, rev in specs]
    neox = snapshot_files.read_config(paths[0])
    gpt_neox.validate_hook(neox, config.model.hook)
    gpt_neox.validate_context_len(neox, int(config.tokens.context_len))
    return names, specs, paths, neox


def _inspect_snapshots(config, names, specs) -> _SnapshotPlan:
    """Hashes each snapshot's weights from its files (no model is built); checks they belong together."""
    from crossjax.models import load as load_lib

    cache_dir = config.model.get("cache_dir") or None
    infos = [load_lib.inspect_snapshot(spec, rev, cache_dir=cache_dir) for spec, rev in specs]
    load_lib.check_snapshots_consistent(dict(zip(names, infos)),
                                        allow_duplicates=bool(config.model.allow_duplicate_weights))
    return _SnapshotPlan(names, specs, infos, infos[0].config)


def model_dtype(name: str):
    if name not in _DTYPES:
        raise CrossjaxError(f"model.dtype={name!r} is not one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def local_mesh():
    """A 1-axis mesh over this process's devices (None with one device): the forward batch is split over it and
    large weight matrices are sharded over it, so a model larger than one device's memory still loads."""
    devices = jax.local_devices()
    if len(devices) == 1:
        return None
    return jax.sharding.Mesh(np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def hook_forward(model, hook: str, out_dtype, mesh, dispatch_lock=None) -> Callable[[np.ndarray], np.ndarray]:
    """fn(input_ids [B, T] int32) -> hook activations [B, T, D] on the host, in the store dtype (cast on device).

    With a mesh the batch is split over its 'data' axis (B must be a multiple of its size). dispatch_lock: held
    while the forward is launched (not while its result is fetched), when other threads launch programs too."""
    from crossjax.models.runner import Runner

    sharding = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    runner = Runner(model, input_sharding=sharding)
    out_dtype = jnp.dtype(out_dtype)
    lock = contextlib.nullcontext() if dispatch_lock is None else dispatch_lock

    def forward(ids):
        with lock:
            out = runner.hook(ids, hook, dtype=out_dtype)
        return np.asarray(out)
    return forward


# ----------------------------------------------------------------------------------------------------------------
# Generation


@dataclasses.dataclass
class PreparedStore:
    """The opened store a config describes and what fills it (``prepare_store``)."""
    store: store_lib.ActivationStore
    layout: RowLayout
    plan: _SnapshotPlan
    contexts: object  # tokens.Contexts
    mesh: object      # local_mesh()


def ensure_activations(config, workdir: str | None, *, process_index: int | None = None,
                       process_count: int | None = None, progress: bool = True) -> str:
    """Writes whatever is missing of the activation store that ``config`` describes; returns the store url.

    config: the full ConfigDict (sections model, tokens, activations, store). Relative ``store.path`` is under
    ``workdir``. Each process writes only its own groups; with several processes all of them wait for each other
    at the end.
    """
    prepared = prepare_store(config, workdir)
    write_store(prepared, config, process_index=process_index, process_count=process_count, progress=progress)
    return prepared.store.url


def prepare_store(config, workdir: str | None) -> PreparedStore:
    """Every check before anything is written, cheap ones first; then the store, opened or created."""
    acfg, tcfg, scfg = config.activations, config.tokens, config.store
    if int(acfg.contexts_per_batch) <= 0:
        raise CrossjaxError(f"activations.contexts_per_batch={acfg.contexts_per_batch} must be positive.")
    if scfg.dtype not in store_lib.DTYPES:
        raise CrossjaxError(f"store.dtype={scfg.dtype!r} is not one of {sorted(store_lib.DTYPES)}.")
    url = store_lib.resolve_url(scfg.path, workdir)

    names, specs, paths, neox = _resolve_snapshots(config)
    tokenizer = tokens_lib.load_tokenizer(paths[0])
    if documents.is_streamed(tcfg):  # each process tokenizes its share of the stream; a rerun resumes it
        contexts = tokens_lib.contexts_for(tcfg, tokenizer, cache_dir=token_cache.cache_beside(url),
                                           process_index=jax.process_index(), process_count=jax.process_count(),
                                           progress=True)
    else:
        contexts = tokens_lib.contexts_for(tcfg, tokenizer)
    if int(contexts.input_ids.max()) >= neox.vocab_size:
        raise CrossjaxError(f"the tokenizer in {paths[0]} produced id {int(contexts.input_ids.max())} but the "
                            f"model's vocab_size is {neox.vocab_size}; the snapshot's tokenizer does not fit its model.")
    mesh = local_mesh()
    plan = _inspect_snapshots(config, names, specs)  # hashes, architecture, tokenizer, duplicates

    # 2. rows
    layout = RowLayout.build(contexts, block_rows=int(scfg.block_rows), group_rows=int(acfg.shuffle_group_rows),
                             shuffle=bool(acfg.shuffle), seed=int(acfg.seed))

    # 3. the store
    meta = store_lib.StoreMeta(
        snapshots=tuple(plan.names), d_model=plan.neox.hidden_size, num_rows=layout.num_rows,
        block_rows=layout.block_rows, dtype=scfg.dtype, model=config.model.repo or config.model.path_template,
        hook=config.model.hook, context_len=int(tcfg.context_len),
        snapshot_hashes=tuple(i.content_hash for i in plan.infos),
        extra=dict(generator="crossjax.activations", tokenizer=tokenizer.describe(),
                   tokens=dict(source=tcfg.source, path=tcfg.path, text_field=tcfg.text_field, split=tcfg.split,
                               packing=bool(tcfg.packing), seed=int(tcfg.seed)),
                   layout=layout.fingerprint()))
    return PreparedStore(store_lib.ActivationStore.create(url, meta), layout, plan, contexts, mesh)


def write_store(prepared: PreparedStore, config, *, process_index: int | None = None,
                process_count: int | None = None, progress: bool = True,
                activation_blocks: Sequence[int] | None = None) -> None:
    """Write this process's missing units (see ensure_activations); activation_blocks: the blocks whose
    activations are written (None: all; the tokens of every block are written)."""
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    store, layout, url = prepared.store, prepared.layout, prepared.store.url
    wanted = None if activation_blocks is None else {int(b) for b in activation_blocks}

    def missing_units() -> set:
        return {(b, s) for b, s in store.missing_units() if s is None or wanted is None or b in wanted}

    my_groups = [g for g in range(layout.num_groups) if g % pc == pi]
    claim = contextlib.nullcontext()
    if _units_to_write(store, layout, my_groups, missing_units()):
        claim = locks.claim_store_units(url, index=pi, count=pc, num_units=layout.num_groups,
                                        unit="group of blocks")
    with claim:
        # one listing of the done markers, after the claim: a writer that has just ended may have written some
        _write_missing(store, layout, prepared.plan, my_groups, missing_units(), prepared.contexts, prepared.mesh,
                       config, pi, pc, progress)

    if jax.process_count() > 1:  # the store is complete only once every process has written its groups
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("crossjax.activations.done")


def _units_to_write(store, layout: RowLayout, groups: Sequence[int], missing: set) -> bool:
    """Whether any unit (tokens or a snapshot) of these groups' blocks is missing."""
    return any((b, s) in missing for g in groups for b in layout.group_blocks(g)
               for s in (None, *range(store.meta.num_snapshots)))


def _write_missing(store, layout: RowLayout, plan: _SnapshotPlan, my_groups: Sequence[int], missing: set, contexts,
                   mesh, config, pi: int, pc: int, progress: bool) -> None:
    """Write this process's missing units: the tokens, then each snapshot's groups (one model at a time)."""
    meta = store.meta
    todo = {s: [g for g in my_groups if any((b, s) in missing for b in layout.group_blocks(g))]
            for s in range(meta.num_snapshots)}
    ndev = 1 if mesh is None else mesh.size
    batch = _batch_size(int(config.activations.contexts_per_batch), ndev)
    print_plan(meta, layout, contexts, batch, ndev, todo, pi, pc)

    _write_tokens(store, layout, [g for g in my_groups if any((b, None) in missing for b in layout.group_blocks(g))],
                  missing)
    total = sum(np.diff(layout.group_range(g))[0] for gs in todo.values() for g in gs)
    # rows written, summed over snapshots (rows/s = tokens/s)
    bar = console.progress("activations", int(total), unit="tok", unit_scale=True, enabled=progress)
    bar.set_postfix_str(f"store when complete ~{fmt_bytes(store_size_bytes(meta))}", refresh=False)
    for s in range(meta.num_snapshots):
        if todo[s]:
            _write_snapshot(store, layout, plan, s, todo[s], missing, config, mesh, bar)
    bar.close()


def _written_meanwhile(store, block: int, snapshot: int | None) -> CrossjaxError:
    """A unit this process was to write was finished by another writer while it ran (a store without locks)."""
    what = "tokens" if snapshot is None else f"snapshot {store.meta.snapshots[snapshot]}"
    return CrossjaxError(f"block {block} {what} of {store.url} was written by another writer while this one ran: "
                         "two activation writers overlap on this store. Let one of them end, then run the same "
                         "command again: it writes only the units still missing.")


def _write_tokens(store, layout: RowLayout, groups: Sequence[int], missing: set) -> None:
    ids = layout.contexts.input_ids
    for g in groups:
        blocks = [b for b in layout.group_blocks(g) if (b, None) in missing]
        if not blocks:
            continue
        _, ctx, pos = layout.group_rows_of(g)
        g0 = layout.group_range(g)[0]
        for b in blocks:
            lo, hi = (r - g0 for r in store.block_range(b))
            try:
                store.write_tokens(b, ids[ctx[lo:hi], pos[lo:hi]].astype(np.int32), ctx[lo:hi].astype(np.int32),
                                   pos[lo:hi].astype(np.int32))
            except store_lib.UnitDoneError:
                raise _written_meanwhile(store, b, None) from None


def load_checked(config, plan: _SnapshotPlan, s: int, mesh):
    """Snapshot s loaded onto `mesh` (models.load.LoadedSnapshot), its hash checked against the one inspected."""
    loaded = _load(config, plan.specs, s, mesh)
    if loaded.content_hash != plan.infos[s].content_hash:
        raise CrossjaxError(f"snapshot {plan.names[s]} changed on disk while activations were generated "
                            f"(hash {loaded.content_hash[:12]} != {plan.infos[s].content_hash[:12]}); run again.")
    return loaded


def forward_batch(config, mesh) -> int:
    """Contexts per forward call for this config on `mesh` (see _batch_size)."""
    return _batch_size(int(config.activations.contexts_per_batch), 1 if mesh is None else mesh.size)


def _write_snapshot(store, layout: RowLayout, plan: _SnapshotPlan, s: int, groups: Sequence[int], missing: set,
                    config, mesh, bar) -> None:
    loaded = load_checked(config, plan, s, mesh)
    out_dtype = store_lib.DTYPES[store.meta.dtype]
    forward = hook_forward(loaded.model, config.model.hook, out_dtype, mesh)
    batch = forward_batch(config, mesh)
    bar.set_description(f"activations {plan.names[s]}")
    write_groups(store, layout, s, groups, forward, batch, missing=missing, on_rows=bar.update)


def group_activations(layout: RowLayout, g: int, forward, batch: int, d_model: int, dtype) -> np.ndarray:
    """The rows of group g in stored order, [group rows, d_model] in `dtype`: its contexts run by `forward` in
    batches of `batch` (the last one padded with copies of context 0, whose outputs are discarded)."""
    ids = layout.contexts.input_ids
    local, _, pos = layout.group_rows_of(g)
    ctxs = layout.group_contexts(g)
    g0, g1 = layout.group_range(g)
    buf = np.empty((g1 - g0, d_model), dtype)
    # rows sorted by local context index, so each batch fills a contiguous run of them
    by_ctx = np.argsort(local, kind="stable")
    sorted_local = local[by_ctx]
    for k in range(0, len(ctxs), batch):
        inputs = ids[ctxs[k:k + batch]]
        if len(inputs) < batch:
            inputs = np.concatenate([inputs, np.repeat(ids[:1, :], batch - len(inputs), axis=0)])
        acts = forward(inputs)  # [B, T, D]
        lo, hi = np.searchsorted(sorted_local, [k, k + batch])
        rows = by_ctx[lo:hi]
        buf[rows] = acts[local[rows] - k, pos[rows]]
    return buf


def write_group(store, layout: RowLayout, s: int, g: int, buf: np.ndarray, missing: set) -> None:
    """Writes the blocks of group g that `missing` lists for snapshot s, from the group's rows buf."""
    g0 = layout.group_range(g)[0]
    for b in layout.group_blocks(g):
        if (b, s) in missing:
            lo, hi = (r - g0 for r in store.block_range(b))
            try:
                store.write_block(b, s, buf[lo:hi])
            except store_lib.UnitDoneError:
                raise _written_meanwhile(store, b, s) from None


def write_groups(store, layout: RowLayout, s: int, groups: Sequence[int], forward, batch: int, *, missing: set,
                 on_rows: Callable[[int], object] | None = None) -> None:
    """Computes snapshot s's rows of each group and writes the group's missing blocks.

    The blocks of one group are written by a background thread while the next group is computed: at most two
    group buffers exist at once. on_rows(n) is called as each group's n rows are handed to the writer."""
    dtype = store_lib.DTYPES[store.meta.dtype]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for g in groups:
            buf = group_activations(layout, g, forward, batch, store.meta.d_model, dtype)
            if pending is not None:
                pending.result()
            pending = writer.submit(write_group, store, layout, s, g, buf, missing)
            if on_rows is not None:
                on_rows(len(buf))
        if pending is not None:
            pending.result()


def _batch_size(contexts_per_batch: int, ndev: int) -> int:
    """Contexts per forward call: a multiple of the device count, one fixed shape (one compilation)."""
    return math.ceil(contexts_per_batch / ndev) * ndev


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _main() -> None:
    """`python -m crossjax.activations --config=... --workdir=...`: the data stages of crossjax.train alone."""
    from crossjax import cli

    def make_store() -> None:
        from crossjax import pipeline
        store = pipeline.make_activation_store(cli.CONFIG.value, cli.WORKDIR.value)
        print(f"activation store ready: {store.url}", flush=True)

    cli.main("activations", make_store)


if __name__ == "__main__":
    _main()
