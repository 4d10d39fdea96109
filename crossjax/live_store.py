"""Activations on the fly: a store whose training rows are computed from the snapshots as the loader reads them.

    prepared = live_store.write_stored_part(config, workdir, stored_tail_blocks=heldout)   # tokens, held-out rows
    store = live_store.open_live(prepared, config, stored_tail_blocks=heldout)              # loads the snapshots
    store = live_store.reopen(run_config, store_url)          # after training: the run's store, for the FeatureIndex

With ``data.on_the_fly`` the pipeline trains from a :class:`LiveStore` instead of a fully written store.

On disk (``store.path``) is the very store the activation stage would write (same meta, row layout, tokens), of
which only the activations of the last ``stored_tail_blocks`` blocks are written (the held-out split the
evaluators read), plus ``scales.json``: a few blocks instead of ``N x S x D``. The other blocks' activations are
never written; ``read_blocks`` computes them: every snapshot is loaded once, resident on this process's devices
(``activations.local_mesh``, its weights hash checked as the activation stage checks it), and the rows of the
requested blocks come from running their contexts with the activation stage's forward (``activations.hook_forward``:
to the hook, cast to ``store.dtype`` on the device), then taking the (context, position) of each row from the
row layout. So a row holds the values the activation stage would have stored for it (the forward batches contexts
differently, which on CPU leaves the bits as they are; float tolerance in general).

Nothing downstream changes: the loader, the trainer, the scales (``pipeline.ensure_scales``) and the evaluators
read this store through the ``ActivationStore`` interface. The loader's windows (``data.window_blocks`` blocks per
stream, :mod:`crossjax.batch_order`) are the in-memory shuffle buffer, so the batch sequence is the stored
path's, a batch mixes many contexts as there, and a checkpoint's loader position (and the seed) resumes it.
A later run with ``data.on_the_fly=False`` on the same ``store.path`` writes just the missing activations.
After training, the readers that open the run's store by its URL (the FeatureIndex of the report and of complexity
scoring) find the training blocks unfinished; ``reopen`` gives them this store again, from the run's config (its
workdir's config.json), so they read the rows the crosscoder was trained on; that needs the snapshots again.

Cost: a block's rows come from every context holding one of them. With ``activations.shuffle_group_rows`` larger
than ``store.block_rows`` a block mixes all the contexts of its group, so reading it runs about blocks-per-group
times the tokens it serves: on the fly, set ``activations.shuffle_group_rows = store.block_rows`` (the loader's
windows already mix contexts). Memory: the S snapshots' weights stay on the devices (``device_bytes``, counted
by the trainer's memory plan); on the host, the contexts and the loader's windows, as on the stored path.

Threads: the loader computes windows on its own threads while the training step runs. One forward runs at a time,
and each is launched under ``trainer.DEVICE_DISPATCH`` (which the trainer holds while it launches a step), so every
device receives the forwards and the steps in one order.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Sequence

import jax
import numpy as np

from crossjax import activations, console, trainer
from crossjax import store as store_lib
from crossjax.errors import CrossjaxError
from crossjax.store_integrity import all_finite

_MAX_NAMED = 8  # bad rows an error names one by one


def write_stored_part(config, workdir: str | None, *, stored_tail_blocks: int,
                      progress: bool = True) -> activations.PreparedStore:
    """What an on-the-fly run keeps on disk, written if missing: every block's tokens and the activations of
    the last `stored_tail_blocks` blocks (the held-out split). Returns the prepared store."""
    prepared = activations.prepare_store(config, workdir)
    nb = prepared.store.meta.num_blocks
    activations.write_store(prepared, config, activation_blocks=_stored_blocks(nb, stored_tail_blocks),
                            progress=progress)
    return prepared


def open_live(prepared: activations.PreparedStore, config, *, stored_tail_blocks: int,
              progress: bool = True) -> "LiveStore":
    """The prepared store as a LiveStore that computes every block but the last `stored_tail_blocks`."""
    nb = prepared.store.meta.num_blocks
    stored = _stored_blocks(nb, stored_tail_blocks)
    live = LiveStore.over(prepared, config, live_blocks=[b for b in range(nb) if b not in stored])
    console.say("activations", f"on the fly: blocks {stored.start}..{nb - 1} stored, the activations of the "
                f"other {len(live.live_blocks)} computed as they are read, by {live.meta.num_snapshots} snapshots "
                f"resident on {1 if prepared.mesh is None else prepared.mesh.size} device(s) "
                f"({live.device_bytes / 2 ** 20:.1f} MiB per device)", enabled=progress)
    if prepared.layout.blocks_per_group > 1:
        console.say("activations", f"on the fly: activations.shuffle_group_rows={prepared.layout.group_rows} holds "
                    f"{prepared.layout.blocks_per_group} blocks, so reading one block runs the contexts of all of "
                    f"them; set activations.shuffle_group_rows={prepared.layout.block_rows} (= store.block_rows) to "
                    "run each context about once per epoch", enabled=progress)
    return live


def reopen(config, url: str, *, progress: bool = True) -> "LiveStore":
    """The on-the-fly store at `url` as the LiveStore a run of `config` trained from (for readers after training:
    `config` is the run's, read back from its workdir's config.json). Writes nothing: the held-out blocks are read
    from disk, the others computed by the run's snapshots, loaded again (hash checked against the store's meta).
    CrossjaxError naming the snapshot and the fix when one is gone or is not one the store was computed from."""
    config = copy.deepcopy(config)
    config.store.path = url        # where the store is now (a moved workdir's), not where the run wrote it
    on_disk = store_lib.ActivationStore.open(url)
    try:
        activations.snapshot_dirs(config.model, list(config.model.snapshots))
    except CrossjaxError as e:
        raise CrossjaxError(f"{_needs_snapshots(on_disk)}, but they cannot be found: {e} {_restore(config)}") from e
    try:
        prepared = activations.prepare_store(config, None)   # opens the store: its meta equals the one recomputed
    except store_lib.StoreMismatchError as e:
        raise _inputs_changed(config, on_disk, e) from None
    return open_live(prepared, config, stored_tail_blocks=int(config.train.heldout_blocks), progress=progress)


def _needs_snapshots(store: store_lib.ActivationStore) -> str:
    return (f"the store {store.url} was written by a run with data.on_the_fly=True: it keeps the activations of the "
            "held-out blocks only, the training rows are computed by the run's snapshots")


def _restore(config) -> str:
    """The fix for snapshots that are gone or changed."""
    where = (f"model.path_template={config.model.path_template!r}" if config.model.path_template
             else f"model.repo={config.model.repo!r}")
    rebuild = (" (with suite.enabled, the run's training command rebuilds the suite's snapshots bit for bit)"
               if config.suite.enabled else "")
    return (f"Put the run's snapshots {list(config.model.snapshots)} back where its config.json names them "
            f"({where}){rebuild}, then read the store again.")


def _inputs_changed(config, store: store_lib.ActivationStore, error: CrossjaxError) -> CrossjaxError:
    """The error for snapshots (or tokens) that are no longer those `store` was computed from; only built then."""
    from crossjax.models import load as load_lib

    names, specs = activations.snapshot_specs(config.model)
    cache_dir = config.model.get("cache_dir") or None
    recorded = dict(zip(store.meta.snapshots, store.meta.snapshot_hashes or ()))
    changed = []
    for name, (spec, rev) in zip(names, specs):
        info = load_lib.inspect_snapshot(spec, rev, cache_dir=cache_dir)
        if recorded.get(name) not in (None, info.content_hash):
            changed.append(f"{name} ({info.path}: weights hash {info.content_hash[:12]}, the store's "
                           f"{recorded[name][:12]})")
    if changed:
        return CrossjaxError(f"{_needs_snapshots(store)}, and these are not the snapshots it was computed from: "
                             f"{', '.join(changed)}. {_restore(config)}")
    # the store's recorded fields against the ones recomputed now; the advice after them is for a writer
    differences = str(error).split(": use another store.path")[0]
    return CrossjaxError(f"{_needs_snapshots(store)} over the run's tokens, and the run's inputs now give another "
                         f"store: {differences}. Restore the snapshots and the corpus the run used, then read it "
                         "again.")


def _stored_blocks(num_blocks: int, tail: int) -> range:
    return range(max(num_blocks - int(tail), 0), num_blocks)


class LiveStore(store_lib.ActivationStore):
    """An ActivationStore whose `live_blocks` have no stored activations: reads compute them (thread-safe: the
    loader reads windows from a thread pool; one forward runs at a time). Build it with open_live."""

    @classmethod
    def over(cls, prepared: activations.PreparedStore, config, *, live_blocks: Iterable[int]) -> "LiveStore":
        """The prepared store reopened as a LiveStore; loads every snapshot onto prepared.mesh."""
        store = cls.open(prepared.store.url)
        store.live_blocks = frozenset(int(b) for b in live_blocks)
        store._layout = prepared.layout
        store._batch = activations.forward_batch(config, prepared.mesh)
        out_dtype = store_lib.DTYPES[store.meta.dtype]
        models = [activations.load_checked(config, prepared.plan, s, prepared.mesh).model
                  for s in range(store.meta.num_snapshots)]
        store.device_bytes = _device_bytes(models)
        store._forwards = [activations.hook_forward(m, config.model.hook, out_dtype, prepared.mesh,
                                                    dispatch_lock=trainer.DEVICE_DISPATCH) for m in models]
        store._forward_lock = threading.Lock()
        store._recent, store._recent_lock = {}, threading.Lock()    # read_rows: the blocks of its last call
        return store

    # ---- the reads the loader, the trainer, the scales and the evaluators make ---------------------------

    def read_blocks(self, blocks: Sequence[int]) -> np.ndarray:
        """The rows of ``blocks`` in the given order, ``[sum R_b, S, D]`` in the store dtype: stored blocks read,
        live ones computed."""
        blocks = [int(b) for b in blocks]
        live = [b in self.live_blocks for b in blocks]
        if not any(live):
            return super().read_blocks(blocks)
        ranges = [self.block_range(b) for b in blocks]
        starts = np.cumsum([0] + [hi - lo for lo, hi in ranges])
        out = np.empty((int(starts[-1]), self.meta.num_snapshots, self.meta.d_model), store_lib.DTYPES[self.meta.dtype])
        for is_live in (False, True):
            which = [i for i, x in enumerate(live) if x == is_live]
            if not which:
                continue
            picked = [blocks[i] for i in which]
            rows = self._compute(picked) if is_live else super().read_blocks(picked)
            at = 0
            for i in which:   # back into the requested order
                n = int(starts[i + 1] - starts[i])
                out[starts[i]:starts[i + 1]] = rows[at:at + n]
                at += n
        return out

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of every snapshot: ``[n, S, D]`` in the store dtype. The blocks of the last call are
        kept: sequential readers (the FeatureIndex's pass, the scales) whose reads do not end at block boundaries
        compute each block once."""
        self._check_rows(start, stop)
        r = self.meta.block_rows
        blocks = list(range(start // r, (stop - 1) // r + 1))
        if not any(b in self.live_blocks for b in blocks):
            return super().read_rows(start, stop)
        with self._recent_lock:
            recent = self._recent
            need = [b for b in blocks if b not in recent]
            computed = self.read_blocks(need) if need else None
            at = np.cumsum([0] + [hi - lo for lo, hi in map(self.block_range, need)])
            got = {**{b: recent[b] for b in blocks if b in recent},
                   **{b: computed[at[i]:at[i + 1]] for i, b in enumerate(need)}}
            self._recent = got
        return np.concatenate([got[b] for b in blocks])[start - blocks[0] * r: stop - blocks[0] * r]

    def require_complete(self, blocks: Iterable[int] | None = None, *, activations: bool = True,
                         tokens: bool = True) -> None:
        """As ActivationStore.require_complete, the live blocks' activations counting as present."""
        blocks = range(self.meta.num_blocks) if blocks is None else [int(b) for b in blocks]
        if tokens:
            super().require_complete(blocks, activations=False, tokens=True)
        stored = [b for b in blocks if b not in self.live_blocks]
        if activations and stored:
            super().require_complete(stored, activations=True, tokens=False)

    # ---- computing rows ----------------------------------------------------------------------------------

    def _compute(self, blocks: Sequence[int]) -> np.ndarray:
        """The rows of live `blocks`, in order: [n, S, D]. Each context holding some of them runs once per
        snapshot, in forward batches of activations.contexts_per_batch (the last padded with context 0)."""
        layout = self._layout
        ctx_parts, pos_parts = [], []
        for b in blocks:
            g = b // layout.blocks_per_group
            _, ctx, pos = layout.group_rows_of(g)
            g0 = layout.group_range(g)[0]
            lo, hi = (r - g0 for r in self.block_range(b))
            ctx_parts.append(ctx[lo:hi])
            pos_parts.append(pos[lo:hi])
        ctx, pos = np.concatenate(ctx_parts), np.concatenate(pos_parts)
        ids = layout.contexts.input_ids
        needed, which = np.unique(ctx, return_inverse=True)       # which[i]: row i's context among `needed`
        by_ctx = np.argsort(which, kind="stable")
        sorted_which = which[by_ctx]
        out = np.empty((len(ctx), self.meta.num_snapshots, self.meta.d_model), store_lib.DTYPES[self.meta.dtype])
        batch = self._batch
        for k in range(0, len(needed), batch):
            inputs = ids[needed[k:k + batch]]
            if len(inputs) < batch:
                inputs = np.concatenate([inputs, np.repeat(ids[:1], batch - len(inputs), axis=0)])
            lo, hi = np.searchsorted(sorted_which, [k, k + batch])
            rows = by_ctx[lo:hi]
            for s, forward in enumerate(self._forwards):
                with self._forward_lock:
                    acts = forward(inputs)                        # [batch, T, D] on the host, store dtype
                out[rows, s] = acts[which[rows] - k, pos[rows]]
        if not all_finite(out):
            raise self._non_finite(blocks, out)
        return out

    def _non_finite(self, blocks: Sequence[int], out: np.ndarray) -> CrossjaxError:
        """The error for NaN/Inf rows among `out` [n, S, D], the rows of `blocks`; only built on failure."""
        rows = np.concatenate([np.arange(*self.block_range(b)) for b in blocks])
        bad_rows, bad_snaps = np.nonzero(~np.isfinite(out.astype(np.float32)).all(axis=2))
        named = [f"row {rows[i]} (block {rows[i] // self.meta.block_rows}, snapshot {self.meta.snapshots[s]})"
                 for i, s in zip(bad_rows[:_MAX_NAMED], bad_snaps[:_MAX_NAMED])]
        more = f" and {len(bad_rows) - _MAX_NAMED} more" if len(bad_rows) > _MAX_NAMED else ""
        return CrossjaxError(
            f"computing activations on the fly for {self.url}: {len(bad_rows)} (row, snapshot) pair(s) are NaN or "
            f"Inf in {self.meta.dtype}: {', '.join(named)}{more}. Check that snapshot's weights (diverged?); if its "
            "activations only exceed float16's range (|x| > 65504), use store.dtype='bfloat16'.")

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", {len(self.live_blocks)} blocks computed on the fly)"


def _device_bytes(models) -> int:
    """Bytes of the models' weights on the device that holds the most of them (per-device resident memory)."""
    from flax import nnx

    per_device: dict = {}
    for model in models:
        for leaf in jax.tree.leaves(nnx.state(model)):
            for shard in getattr(leaf, "addressable_shards", ()):
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)
