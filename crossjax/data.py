"""The grain pipeline over the activation store: shuffled, per-host batches as global ``jax.Array``s.

Which rows form which batch (the seeded order and the epoch end rule) is :mod:`crossjax.batch_order`; reading
windows in the background and building this process's rows of a batch is :mod:`crossjax.batch_assembly`. This
module checks the settings, works out which rows and snapshots this process holds, and yields the batches.

Per-host reading: a process builds only the rows of the global batch that its devices hold (from
``sharding``), reading only the windows of the streams those rows come from. The stream count is part of the
order and never depends on the process count or the mesh (default: one stream), so the same settings give the
same batches on any number of hosts and any mesh, and a saved position restores on any of them. With one stream
every process reads every window (the whole batch's rows, keeping its own); with ``streams`` a multiple of the
process count and the usual ``P('data', 'snapshot', None)``, each process reads only the windows of its own
``streams / process_count`` streams. Other stream counts work on any process count too: a stream whose piece is
split between processes is read by each of them.

Background work: a thread pool reads the next window of each stream while the current one is consumed, and
grain's prefetch thread assembles the next ``prefetch`` batches while the training step runs.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from crossjax.batch_assembly import TOKEN_KEYS, LocalBatch, WindowCache
from crossjax.batch_order import BatchOrder
from crossjax.errors import CrossjaxError
from crossjax.snapshot_names import index_of
from crossjax.store import ActivationStore

_STATE_VERSION = 1
DEFAULT_STREAMS = 1  # not the process count: the order must not change with the number of hosts


# ----------------------------------------------------------------------------------------------------------
# The public iterator


class BatchLoader(grain.DatasetIterator):
    """Iterator of batches ``{"acts": [B, S, D]}`` (+ ``token_ids``/``context_ids``/``positions`` ``[B]``).

    Arrays are global ``jax.Array``s with the loader's sharding (numpy when ``sharding`` is None, then only
    this process's rows). ``get_state()``/``set_state()`` save and restore the position (a JSON dict, the same on
    every process; ``crossjax.checkpoint`` saves it once per checkpoint); a restored loader yields exactly the
    batches that would have come next, on any number of processes and any mesh. Build it with
    :func:`make_loader`.
    """

    def __init__(self, parent: grain.DatasetIterator, *, order: BatchOrder, windows: WindowCache,
                 sharding: jax.sharding.Sharding | None, token_sharding: jax.sharding.Sharding | None,
                 global_shape: tuple[int, int, int], local_rows: np.ndarray, num_epochs: int | None):
        super().__init__(parent)
        self._order = order
        self._windows = windows
        self._sharding = sharding
        self._token_sharding = token_sharding
        self.global_shape = global_shape
        self.local_rows = local_rows  # global batch rows this process builds, in local order
        self.num_epochs = num_epochs

    @property
    def global_batch(self) -> int:
        return self.global_shape[0]

    @property
    def order(self) -> BatchOrder:
        """Which store rows form which batch (and which rows an epoch leaves over)."""
        return self._order

    @property
    def batches_per_epoch(self) -> int:
        return self._order.batches_per_epoch

    @property
    def num_batches(self) -> int | None:
        """Batches in all epochs, or None when the loader repeats without end."""
        return None if self.num_epochs is None else self.num_epochs * self.batches_per_epoch

    @property
    def next_step(self) -> int:
        """Index of the next batch, counted over all epochs."""
        return int(self._parent.get_state()["next_index"])

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batch within the epoch) of the next batch."""
        return divmod(self.next_step, self.batches_per_epoch)

    @property
    def blocks_read(self) -> list[tuple[int, ...]]:
        """Block tuples of every window this process has requested so far (prefetches included)."""
        return list(self._windows.reads)

    def __next__(self) -> dict[str, Any]:
        local = next(self._parent)
        if self._sharding is None:
            return local
        out = {"acts": jax.make_array_from_process_local_data(self._sharding, local["acts"], self.global_shape)}
        for k in TOKEN_KEYS:
            if k in local:
                out[k] = jax.make_array_from_process_local_data(self._token_sharding, local[k], self.global_shape[:1])
        return out

    def get_state(self) -> dict[str, Any]:
        """The position, the same on every process: next batch (over all epochs; also as epoch and batch) and the
        settings that fix the order. It restores on any process count and any mesh."""
        epoch, batch = self.position
        return {"version": _STATE_VERSION, "next_index": self.next_step, "epoch": epoch, "batch": batch,
                "order": self._order.describe()}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION or "next_index" not in state:
            raise CrossjaxError(
                f"data iterator state {state!r} was not written by this version of crossjax.data: restore from a "
                "checkpoint written by the same code, or start the data from the beginning."
            )
        mine = self._order.describe()
        theirs = state.get("order")
        if theirs != mine:
            diff = [f"{k}: saved {theirs.get(k) if isinstance(theirs, dict) else None!r}, now {v!r}"
                    for k, v in mine.items() if not isinstance(theirs, dict) or theirs.get(k) != v]
            fix = "build the loader with the settings of the run that saved it"
            if isinstance(theirs, dict) and {k for k in mine if theirs.get(k) != mine[k]} == {"streams"}:
                # runs of earlier versions with data.streams=0 had one stream per process
                fix += (f" (streams={theirs['streams']}: for crossjax.train, --config.data.streams="
                        f"{theirs['streams']}; earlier versions read data.streams=0 as one stream per process)")
            raise CrossjaxError(
                f"the saved data position belongs to another batch order ({'; '.join(diff)}): {fix}, or start the "
                "data from the beginning."
            )
        step = state["next_index"]
        limit = self.num_batches
        if not isinstance(step, int) or step < 0 or (limit is not None and step > limit):
            raise CrossjaxError(
                f"the saved data position {step!r} is outside this loader's {limit} batches: raise num_epochs "
                "to at least the run's, or start the data from the beginning."
            )
        self._windows.clear()
        self._parent.set_state({"next_index": step})

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._windows.close()

    def __repr__(self) -> str:
        d = self._order.describe()
        return (f"BatchLoader(global_batch={self.global_batch}, streams={d['streams']}, "
                f"window_blocks={d['window_blocks']}, seed={d['seed']}, blocks={d['blocks']['count']}, "
                f"batches_per_epoch={self.batches_per_epoch}, next={self.position})")


# ----------------------------------------------------------------------------------------------------------
# Building a loader


def _positive_int(name: str, value: Any, fix: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if allow_zero else 1):
        raise CrossjaxError(f"{name}={value!r}: {fix}")
    return int(value)


def _select_blocks(store: ActivationStore, blocks: Iterable[int] | None) -> np.ndarray:
    nb = store.meta.num_blocks
    if blocks is None:
        return np.arange(nb, dtype=np.int64)
    try:
        given = list(blocks)
        sel = [int(b) for b in given if not isinstance(b, (bool, np.bool_)) and int(b) == b]
        ok = len(sel) == len(given)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise CrossjaxError(f"blocks={blocks!r}: give a range or list of block indices (integers).")
    if not sel:
        raise CrossjaxError("blocks is empty: select at least one block (e.g. blocks=range(n_train_blocks)).")
    bad = [b for b in sel if not 0 <= b < nb]
    if bad:
        raise CrossjaxError(f"blocks {bad[:8]} are outside this store's blocks 0..{nb - 1}: select existing blocks.")
    if len(set(sel)) != len(sel):
        raise CrossjaxError("blocks repeats some block indices: list each block once.")
    return np.array(sorted(sel), dtype=np.int64)


def _axis_size(sharding: jax.sharding.Sharding, dim: int) -> int:
    spec = sharding.spec
    entry = spec[dim] if dim < len(spec) else None
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(sharding.mesh.shape[n] for n in names)


def _check_sharding(sharding: Any, shape: tuple[int, int, int], with_tokens: bool):
    """Validate ``sharding`` for [B, S, D]; return the matching sharding of the [B] token arrays."""
    if isinstance(sharding, NamedSharding):
        if len(sharding.spec) > 3:
            raise CrossjaxError(f"sharding spec {sharding.spec} has more than 3 entries: batches are [B, S, D].")
        for dim, what in enumerate(("global_batch", "the store's snapshot count", "the store's d_model")):
            size = _axis_size(sharding, dim)
            if shape[dim] % size:
                raise CrossjaxError(
                    f"{what} = {shape[dim]} is not divisible by the {size} devices of mesh axis "
                    f"{sharding.spec[dim]!r} that split it: choose a multiple of {size} or another mesh shape."
                )
        token = NamedSharding(sharding.mesh, PartitionSpec(sharding.spec[0] if len(sharding.spec) else None))
        return token
    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    if isinstance(sharding, jax.sharding.Sharding):
        if with_tokens:
            raise CrossjaxError(
                f"with_tokens=True needs a NamedSharding or SingleDeviceSharding (got {type(sharding).__name__}): "
                "pass NamedSharding(mesh, P('data', 'snapshot', None))."
            )
        try:
            sharding.shard_shape(shape)
        except ValueError as e:
            raise CrossjaxError(f"sharding {sharding} cannot split a batch of shape {shape} ({e}).") from e
        return None
    raise CrossjaxError(
        f"sharding={sharding!r} is not a jax.sharding.Sharding: pass NamedSharding(mesh, P('data', 'snapshot', None)) "
        "or None for numpy batches."
    )


def _process_indices(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Per dimension, the global indices this process holds, in the order jax expects its local data.

    Mirrors ``jax.make_array_from_process_local_data``: the local array along each dimension is the process's
    distinct device slices, sorted by start.
    """
    index_map = sharding.addressable_devices_indices_map(shape)
    shard = sharding.shard_shape(shape)
    out = []
    for d in range(len(shape)):
        starts = sorted({idx[d].start or 0 for idx in index_map.values()})
        out.append(np.concatenate([np.arange(s, s + shard[d]) for s in starts]).astype(np.int64))
    return out


def _select_snapshots(meta, snapshots: Sequence[int | str] | None) -> np.ndarray:
    """Validated indices of the snapshots to deliver (all, in store order, when None)."""
    if snapshots is None:
        return np.arange(meta.num_snapshots)
    given = list(snapshots)
    subset, unknown = [], []
    for s in given:
        try:
            subset.append(index_of(s, meta.snapshots))
        except CrossjaxError:
            unknown.append(s)
    problem = ("none is given" if not given else f"{unknown} are not one of them" if unknown
               else "some snapshot is listed twice" if len(set(subset)) != len(subset) else "")
    if problem:
        raise CrossjaxError(f"snapshots={given} must be distinct indices in [0, {meta.num_snapshots}) or names of "
                            f"the store's snapshots {list(meta.snapshots)}: {problem}.")
    return np.asarray(subset, dtype=np.int64)


def make_loader(
    store: ActivationStore,
    *,
    global_batch: int,
    seed: int,
    sharding: jax.sharding.Sharding | None,
    blocks: Iterable[int] | None = None,
    window_blocks: int = 8,
    num_epochs: int | None = None,
    with_tokens: bool = False,
    streams: int | None = None,
    prefetch: int = 2,
    snapshots: Sequence[int | str] | None = None,
) -> BatchLoader:
    """A :class:`BatchLoader` over ``store`` (the order and the epoch end rule: :mod:`crossjax.batch_order`).

    Args:
      store: a complete (at least over ``blocks``) :class:`~crossjax.store.ActivationStore`.
      global_batch: B, rows per global batch; divisible by the process count, by ``streams`` and by the mesh
        axes that split the batch dimension.
      seed: non-negative integer; the same seed and settings give the same batches.
      sharding: sharding of the ``acts [B, S, D]`` batches, normally ``NamedSharding(mesh, P('data',
        'snapshot', None))``; token arrays ``[B]`` take its first axis. None: numpy batches holding this
        process's contiguous ``B / process_count`` rows.
      blocks: block indices (range or list) to draw from, e.g. ``range(n - heldout)``; all blocks if None.
      window_blocks: blocks read together and shuffled together. A process holds two windows per stream it
        reads (the current one and the next, read ahead), each ``window_blocks * block_rows * S * D`` storage
        bytes, plus a window's worth in transit while ``store.read_blocks`` assembles it.
      num_epochs: passes over the data; None repeats without end.
      with_tokens: also yield ``token_ids``, ``context_ids``, ``positions`` ``[B]`` int32.
      streams: independent read streams the global batch is assembled from (default: one). Part of the order;
        any process count works with any stream count, and a multiple of the process count lets each process
        read only its share of the store.
      prefetch: batches grain assembles ahead in a background thread (0: build each batch on demand).
      snapshots: the store's snapshots to deliver (indices or names), in this order (e.g. ``[3]`` for a
        one-snapshot SAE); all if None. S below is their count.

    Returns:
      BatchLoader yielding ``{"acts": [B, S, D]}`` in the storage dtype (+ token arrays ``[B]``).
    """
    if not isinstance(store, ActivationStore):
        raise CrossjaxError(f"make_loader needs an ActivationStore, got {type(store).__name__}: open one with "
                            "crossjax.store.ActivationStore.open(url).")
    meta = store.meta
    procs, proc = jax.process_count(), jax.process_index()
    global_batch = _positive_int("global_batch", global_batch, "give a positive number of rows per batch.")
    seed = _positive_int("seed", seed, "give a non-negative integer seed.", allow_zero=True)
    window_blocks = _positive_int("window_blocks", window_blocks, "give a positive number of blocks per window.")
    prefetch = _positive_int("prefetch", prefetch, "give a non-negative number of batches.", allow_zero=True)
    if num_epochs is not None:
        num_epochs = _positive_int("num_epochs", num_epochs, "give a positive number of epochs, or None to repeat.")
    streams = (DEFAULT_STREAMS if streams is None
               else _positive_int("streams", streams, "give a positive number of streams."))
    if global_batch % procs:
        raise CrossjaxError(f"global_batch={global_batch} is not divisible by the {procs} processes: "
                            f"use a multiple of {procs}.")
    if global_batch % streams:
        raise CrossjaxError(f"global_batch={global_batch} is not divisible by streams={streams}: every stream gives "
                            f"the same number of rows to a batch; use a multiple of {streams}.")
    subset = _select_snapshots(meta, snapshots)
    shape = (global_batch, len(subset), meta.d_model)
    token_sharding = None if sharding is None else _check_sharding(sharding, shape, with_tokens)

    sel = _select_blocks(store, blocks)
    order = BatchOrder(sel, meta.block_rows, meta.num_rows, global_batch=global_batch, streams=streams,
                       window_blocks=window_blocks, seed=seed)
    if order.batches_per_epoch == 0:
        rows = sum(order.block_len(int(b)) for b in sel)
        raise CrossjaxError(
            f"global_batch={global_batch} is larger than the data: {len(sel)} selected block(s) hold {rows} rows, "
            f"and each of the {streams} stream(s) must give {order.piece} rows per batch but the smallest holds "
            f"{order.min_stream_rows()}. Lower global_batch, select more blocks, or use fewer streams."
        )
    store.require_complete(sel, tokens=with_tokens)

    if sharding is None:
        per = global_batch // procs
        rows, snaps = np.arange(proc * per, (proc + 1) * per, dtype=np.int64), subset
    else:
        rows, snaps, dims = _process_indices(sharding, shape)
        if len(dims) != meta.d_model:
            raise CrossjaxError(f"sharding {sharding} splits d_model across processes: keep the last axis unsplit.")
        snaps = subset[snaps]
        if token_sharding is not None and not np.array_equal(_process_indices(token_sharding, shape[:1])[0], rows):
            raise CrossjaxError(f"sharding {sharding}: token arrays would land on other processes than their rows.")
    if np.array_equal(snaps, np.arange(meta.num_snapshots)):
        snaps = None  # every snapshot in store order: no gather needed

    windows = WindowCache(store, order, with_tokens)
    total = sys.maxsize if num_epochs is None else num_epochs * order.batches_per_epoch
    dataset = (
        grain.MapDataset.range(total)
        .map(LocalBatch(order, windows, rows, snaps, num_epochs, with_tokens))
        .to_iter_dataset(grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch))
    )
    return BatchLoader(iter(dataset), order=order, windows=windows, sharding=sharding, token_sharding=token_sharding,
                       global_shape=shape, local_rows=rows, num_epochs=num_epochs)
