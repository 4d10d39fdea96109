"""The grain pipeline over the activation store: shuffled, per-host batches as global ``jax.Array``s.

Order of rows (a pure function of the seed, the selected blocks, the global batch, ``window_blocks`` and
``streams``; not of timing, and not of the process count once ``streams`` is set):

1. Epoch ``e`` permutes the selected blocks with a generator seeded by ``(seed, e)``.
2. The permuted blocks are dealt round-robin to ``streams`` read streams (stream ``g`` takes every
   ``streams``-th block starting at ``g``), and each stream groups its blocks into windows of
   ``window_blocks`` blocks. A window is read with one ``store.read_blocks`` call (a few large reads).
3. A window's rows are permuted with a generator seeded by ``(seed, e, g, w)``; a stream is its windows'
   permuted rows one after the other, cut into pieces of ``global_batch / streams`` rows (a piece may take the
   tail of one window and the head of the next, so no row is lost between windows).
4. Global batch ``k`` of an epoch is the concatenation of piece ``k`` of every stream, stream 0 first.

Epoch end rule: every epoch has the same number of batches, ``batches_per_epoch``, the number of whole pieces
the shortest stream can hold in any epoch. Rows a stream holds beyond that are skipped for this epoch: fewer
than one piece plus two blocks per stream, and none when every stream holds the same multiple of the piece
size. The next epoch's permutation is new, so other rows are skipped then. Within an epoch no row repeats.

Per-host reading: a process builds only the rows of the global batch that its devices hold (from
``sharding``), so with the usual ``P('data', 'snapshot', None)`` and ``streams`` a multiple of the process
count, process ``p`` reads only the windows of its own streams. With ``streams=None`` there is one stream per
process, so the order then depends on the process count; set ``streams`` explicitly to get the same batches on
any number of hosts (each host then reads ``streams / process_count`` streams).

Background work: a thread pool reads the next window of each stream while the current one is consumed, and
grain's prefetch thread assembles the next ``prefetch`` batches while the training step runs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import math
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from crossjax.errors import CrossjaxError
from crossjax.store import ActivationStore, IncompleteStoreError

TOKEN_KEYS = ("token_ids", "context_ids", "positions")
_STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# The order: which rows form which batch (pure numpy, no I/O)


@dataclasses.dataclass(frozen=True)
class _StreamEpoch:
    windows: tuple[tuple[int, ...], ...]  # block ids of each window, in read order
    offsets: np.ndarray  # [num_windows + 1] first stream position of each window; offsets[-1] = stream rows


class _Order:
    """Maps (epoch, batch, stream, positions in the stream's piece) to (window, row within the window)."""

    def __init__(self, blocks: np.ndarray, block_rows: int, num_rows: int, *, global_batch: int, streams: int,
                 window_blocks: int, seed: int):
        self.blocks = blocks
        self.block_rows = block_rows
        self.num_rows = num_rows
        self.streams = streams
        self.window_blocks = window_blocks
        self.seed = seed
        self.piece = global_batch // streams  # rows each stream gives to one global batch
        self.batches_per_epoch = self._min_stream_rows() // self.piece

    def block_len(self, block: int) -> int:
        return min((block + 1) * self.block_rows, self.num_rows) - block * self.block_rows

    def _min_stream_rows(self) -> int:
        """Rows of the smallest stream in the worst epoch (the store's short last block in the smallest stream)."""
        n = len(self.blocks)
        smallest = n // self.streams  # blocks in the smallest stream
        short = self.block_rows - self.block_len(int(self.blocks.max()))  # > 0 only if the short last block is selected
        return smallest * self.block_rows - (short if smallest else 0)

    @functools.lru_cache(maxsize=4)
    def epoch(self, epoch: int) -> tuple[_StreamEpoch, ...]:
        rng = np.random.default_rng([self.seed, epoch, 0])
        order = self.blocks[rng.permutation(len(self.blocks))]
        out = []
        w = self.window_blocks
        for g in range(self.streams):
            mine = order[g :: self.streams]
            windows = tuple(tuple(int(b) for b in mine[i : i + w]) for i in range(0, len(mine), w))
            sizes = [sum(self.block_len(b) for b in win) for win in windows]
            out.append(_StreamEpoch(windows, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)))
        return tuple(out)

    def window_perm(self, epoch: int, stream: int, window: int, n: int) -> np.ndarray:
        """The shuffle of a window's rows: position j of the window's stream slice is row perm[j] of the window."""
        return np.random.default_rng([self.seed, epoch, 1, stream, window]).permutation(n)

    def locate(self, epoch: int, batch: int, stream: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions ``pos`` [n] of the stream's piece of ``batch`` -> (window index [n], stream offset in it [n])."""
        offsets = self.epoch(epoch)[stream].offsets
        at = batch * self.piece + pos
        win = np.searchsorted(offsets, at, side="right") - 1
        return win, at - offsets[win]

    def describe(self) -> dict:
        """JSON-able settings that fix the order; a saved state only fits a loader with equal settings."""
        digest = hashlib.sha256(np.asarray(self.blocks, np.int64).tobytes()).hexdigest()[:16]
        return {
            "seed": self.seed,
            "global_batch": self.piece * self.streams,
            "streams": self.streams,
            "window_blocks": self.window_blocks,
            "num_rows": self.num_rows,
            "block_rows": self.block_rows,
            "blocks": {"count": len(self.blocks), "first": int(self.blocks[0]), "last": int(self.blocks[-1]),
                       "sha256": digest},
        }


# ----------------------------------------------------------------------------------------------------------
# Windows: read in the background, kept until every batch that needs them is built


@dataclasses.dataclass
class _Window:
    acts: np.ndarray  # [n, S, D] rows of the window's blocks in window order, storage dtype
    tokens: dict[str, np.ndarray] | None  # TOKEN_KEYS -> [n] int32
    perm: np.ndarray  # [n] the window's row shuffle


class _WindowCache:
    """Windows keyed by (epoch, stream, window); reads run on a small thread pool so they overlap training."""

    def __init__(self, store: ActivationStore, order: _Order, with_tokens: bool, threads: int = 2):
        self._store = store
        self._order = order
        self._with_tokens = with_tokens
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="crossjax-window")
        self._lock = threading.Lock()
        self._futures: dict[tuple[int, int, int], concurrent.futures.Future] = {}
        # Block tuples of the windows requested, oldest first (for tests and logs); bounded for endless runs.
        self.reads: collections.deque[tuple[int, ...]] = collections.deque(maxlen=100_000)

    def _read(self, key: tuple[int, int, int]) -> _Window:
        epoch, stream, window = key
        blocks = self._order.epoch(epoch)[stream].windows[window]
        acts = self._store.read_blocks(blocks)
        tokens = None
        if self._with_tokens:
            parts = [self._store.read_tokens(*self._store.block_range(b)) for b in blocks]
            tokens = {k: np.concatenate([p[k] for p in parts]) for k in TOKEN_KEYS}
        return _Window(acts, tokens, self._order.window_perm(epoch, stream, window, len(acts)))

    def request(self, key: tuple[int, int, int]) -> concurrent.futures.Future:
        with self._lock:
            fut = self._futures.get(key)
            if fut is None:
                self.reads.append(self._order.epoch(key[0])[key[1]].windows[key[2]])
                fut = self._futures[key] = self._pool.submit(self._read, key)
            return fut

    def get(self, key: tuple[int, int, int]) -> _Window:
        return self.request(key).result()

    def drop_before(self, stream: int, epoch: int, window: int) -> None:
        """Forget this stream's windows that come before (epoch, window): batches are built in order."""
        with self._lock:
            for key in [k for k in self._futures if k[1] == stream and (k[0], k[2]) < (epoch, window)]:
                del self._futures[key]

    def clear(self) -> None:
        with self._lock:
            for fut in self._futures.values():
                fut.cancel()
            self._futures.clear()

    def close(self) -> None:
        self.clear()
        if not sys.is_finalizing():  # at interpreter exit the pool's own atexit hook joins its threads
            self._pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------------
# One process's part of a batch


class _LocalBatch:
    """Global step -> this process's part of that global batch, as numpy (the grain map function)."""

    def __init__(self, order: _Order, windows: _WindowCache, rows: np.ndarray, snapshots: np.ndarray | None,
                 num_epochs: int | None, with_tokens: bool):
        self._order = order
        self._windows = windows
        self._snapshots = snapshots  # None: all snapshots
        self._num_epochs = num_epochs
        self._with_tokens = with_tokens
        piece = order.piece
        # Local rows grouped by stream: (stream, positions in its piece [n], where they go in the local batch [n]).
        self._parts = []
        for g in np.unique(rows // piece):
            dest = np.flatnonzero(rows // piece == g)
            self._parts.append((int(g), rows[dest] - g * piece, dest))
        self.num_rows = len(rows)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, batch = divmod(int(step), self._order.batches_per_epoch)
        out: dict[str, np.ndarray] | None = None
        for g, pos, dest in self._parts:
            win, at = self._order.locate(epoch, batch, g, pos)
            for w in np.unique(win):
                window = self._windows.get((epoch, g, int(w)))
                sel = win == w
                rows = window.perm[at[sel]]
                acts = window.acts[rows] if self._snapshots is None else window.acts[np.ix_(rows, self._snapshots)]
                if out is None:
                    out = {"acts": np.empty((self.num_rows,) + acts.shape[1:], acts.dtype)}
                    if self._with_tokens:
                        out.update({k: np.empty(self.num_rows, np.int32) for k in TOKEN_KEYS})
                out["acts"][dest[sel]] = acts
                if self._with_tokens:
                    for k in TOKEN_KEYS:
                        out[k][dest[sel]] = window.tokens[k][rows]
            self._windows.drop_before(g, epoch, int(win.min()))
            self._prefetch_after(epoch, batch, g, int(win.max()))
        return out

    def _prefetch_after(self, epoch: int, batch: int, stream: int, window: int) -> None:
        """Start reading the window this stream needs after ``window`` (possibly the next epoch's first)."""
        s = self._order.epoch(epoch)[stream]
        used = self._order.batches_per_epoch * self._order.piece  # stream rows used per epoch
        if window + 1 < len(s.windows) and s.offsets[window + 1] < used:
            self._windows.request((epoch, stream, window + 1))
        elif self._num_epochs is None or epoch + 1 < self._num_epochs:
            self._windows.request((epoch + 1, stream, 0))


# ----------------------------------------------------------------------------------------------------------
# The public iterator


class BatchLoader(grain.DatasetIterator):
    """Iterator of batches ``{"acts": [B, S, D]}`` (+ ``token_ids``/``context_ids``/``positions`` ``[B]``).

    Arrays are global ``jax.Array``s with the loader's sharding (numpy when ``sharding`` is None, then only
    this process's rows). ``get_state()``/``set_state()`` and orbax's ``grain.checkpoint.CheckpointSave/
    CheckpointRestore`` save and restore the position; a restored loader yields exactly the batches that
    would have come next. Build it with :func:`make_loader`.
    """

    def __init__(self, parent: grain.DatasetIterator, *, order: _Order, windows: _WindowCache,
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
        return {"version": _STATE_VERSION, "next_index": self.next_step, "order": self._order.describe()}

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
            raise CrossjaxError(
                f"the saved data position belongs to another batch order ({'; '.join(diff)}): build the loader "
                "with the settings of the run that saved it, or start the data from the beginning."
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


def _check_complete(store: ActivationStore, blocks: np.ndarray, with_tokens: bool) -> None:
    if store.is_complete():
        return
    wanted = set(int(b) for b in blocks)
    missing = [(b, s) for b, s in store.missing_units() if b in wanted and (s is not None or with_tokens)]
    if not missing:
        return
    names = [f"block {b} " + ("tokens" if s is None else f"snapshot {store.meta.snapshots[s]}") for b, s in missing]
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    fill = ("crossjax.planted.generate_planted(url, cfg) again" if store.meta.model == "planted"
            else "python -m crossjax.activations --config=<your config> --workdir=<your workdir>")
    raise IncompleteStoreError(
        f"{store.url} is incomplete: {len(names)} unit(s) of the selected blocks are not written "
        f"({', '.join(names[:8])}{more}). Fill them with {fill}; it redoes only the missing units."
    )


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


def _select_snapshots(meta, snapshots: Sequence[int] | None) -> np.ndarray:
    """Validated indices of the snapshots to deliver (all, in store order, when None)."""
    if snapshots is None:
        return np.arange(meta.num_snapshots)
    subset = np.asarray(list(snapshots), dtype=np.int64)
    if subset.ndim != 1 or subset.size == 0 or len(set(subset.tolist())) != subset.size or \
            subset.min() < 0 or subset.max() >= meta.num_snapshots:
        raise CrossjaxError(f"snapshots={list(snapshots)} must be distinct indices in [0, {meta.num_snapshots}) of the "
                            f"store's snapshots {list(meta.snapshots)}.")
    return subset


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
    snapshots: Sequence[int] | None = None,
) -> BatchLoader:
    """A :class:`BatchLoader` over ``store`` (see the module docstring for the order and the epoch end rule).

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
      streams: independent read streams the global batch is assembled from (default: the process count).
      prefetch: batches grain assembles ahead in a background thread (0: build each batch on demand).
      snapshots: indices of the store's snapshots to deliver, in this order (e.g. ``[3]`` for a one-snapshot SAE);
        all if None. S below is their count.

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
    streams = procs if streams is None else _positive_int("streams", streams, "give a positive number of streams.")
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
    order = _Order(sel, meta.block_rows, meta.num_rows, global_batch=global_batch, streams=streams,
                   window_blocks=window_blocks, seed=seed)
    if order.batches_per_epoch == 0:
        rows = sum(order.block_len(int(b)) for b in sel)
        raise CrossjaxError(
            f"global_batch={global_batch} is larger than the data: {len(sel)} selected block(s) hold {rows} rows, "
            f"and each of the {streams} stream(s) must give {order.piece} rows per batch but the smallest holds "
            f"{order._min_stream_rows()}. Lower global_batch, select more blocks, or use fewer streams."
        )
    _check_complete(store, sel, with_tokens)

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

    windows = _WindowCache(store, order, with_tokens)
    total = sys.maxsize if num_epochs is None else num_epochs * order.batches_per_epoch
    dataset = (
        grain.MapDataset.range(total)
        .map(_LocalBatch(order, windows, rows, snaps, num_epochs, with_tokens))
        .to_iter_dataset(grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch))
    )
    return BatchLoader(iter(dataset), order=order, windows=windows, sharding=sharding, token_sharding=token_sharding,
                       global_shape=shape, local_rows=rows, num_epochs=num_epochs)
