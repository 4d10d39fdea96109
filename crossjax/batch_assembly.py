"""Reading a loader's windows in the background and building this process's part of each batch from them.

A window (``window_blocks`` blocks of one stream, see :mod:`crossjax.batch_order`) is read with one
``store.read_blocks`` call on a small thread pool while the current one is consumed, and kept until every batch
that needs it is built. :class:`LocalBatch` is the grain map function: global step -> this process's rows of
that global batch, as numpy.

Every row of a batch comes from a window, and ``store.read_blocks`` has checked each window once as it was
read (chunks present and intact, values finite; otherwise a DamagedStoreError naming block, snapshot and row),
so assembling a batch needs no check of its own. An error in a background read reaches the caller of next().
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import sys
import threading

import numpy as np

from crossjax.batch_order import BatchOrder
from crossjax.store import ActivationStore

TOKEN_KEYS = ("token_ids", "context_ids", "positions")


@dataclasses.dataclass
class Window:
    acts: np.ndarray  # [n, S, D] rows of the window's blocks in window order, storage dtype
    tokens: dict[str, np.ndarray] | None  # TOKEN_KEYS -> [n] int32
    perm: np.ndarray  # [n] the window's row shuffle


class WindowCache:
    """Windows keyed by (epoch, stream, window); reads run on a small thread pool so they overlap training."""

    def __init__(self, store: ActivationStore, order: BatchOrder, with_tokens: bool, threads: int = 2):
        self._store = store
        self._order = order
        self._with_tokens = with_tokens
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="crossjax-window")
        self._lock = threading.Lock()
        self._futures: dict[tuple[int, int, int], concurrent.futures.Future] = {}
        # Block tuples of the windows requested, oldest first (for tests and logs); bounded for endless runs.
        self.reads: collections.deque[tuple[int, ...]] = collections.deque(maxlen=100_000)

    def _read(self, key: tuple[int, int, int]) -> Window:
        epoch, stream, window = key
        blocks = self._order.epoch(epoch)[stream].windows[window]
        acts = self._store.read_blocks(blocks)
        tokens = None
        if self._with_tokens:
            parts = [self._store.read_tokens(*self._store.block_range(b)) for b in blocks]
            tokens = {k: np.concatenate([p[k] for p in parts]) for k in TOKEN_KEYS}
        return Window(acts, tokens, self._order.window_perm(epoch, stream, window, len(acts)))

    def request(self, key: tuple[int, int, int]) -> concurrent.futures.Future:
        with self._lock:
            fut = self._futures.get(key)
            if fut is None:
                self.reads.append(self._order.epoch(key[0])[key[1]].windows[key[2]])
                fut = self._futures[key] = self._pool.submit(self._read, key)
            return fut

    def get(self, key: tuple[int, int, int]) -> Window:
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


class LocalBatch:
    """Global step -> this process's part of that global batch, as numpy (the grain map function)."""

    def __init__(self, order: BatchOrder, windows: WindowCache, rows: np.ndarray, snapshots: np.ndarray | None,
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
