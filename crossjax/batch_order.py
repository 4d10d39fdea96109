"""Which store rows form which batch: a pure function of the seed and the loader's settings (numpy, no I/O).

Order of rows (a pure function of the seed, the selected blocks, the global batch, ``window_blocks`` and
``streams``; not of timing, the process count or the mesh: processes only choose which rows of each batch they
build):

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
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class StreamEpoch:
    windows: tuple[tuple[int, ...], ...]  # block ids of each window, in read order
    offsets: np.ndarray  # [num_windows + 1] first stream position of each window; offsets[-1] = stream rows


class BatchOrder:
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
        self.batches_per_epoch = self.min_stream_rows() // self.piece

    def block_len(self, block: int) -> int:
        return min((block + 1) * self.block_rows, self.num_rows) - block * self.block_rows

    def min_stream_rows(self) -> int:
        """Rows of the smallest stream in the worst epoch (the store's short last block in the smallest stream)."""
        n = len(self.blocks)
        smallest = n // self.streams  # blocks in the smallest stream
        short = self.block_rows - self.block_len(int(self.blocks.max()))  # > 0 only if the short last block is selected
        return smallest * self.block_rows - (short if smallest else 0)

    @functools.lru_cache(maxsize=4)
    def epoch(self, epoch: int) -> tuple[StreamEpoch, ...]:
        rng = np.random.default_rng([self.seed, epoch, 0])
        order = self.blocks[rng.permutation(len(self.blocks))]
        out = []
        w = self.window_blocks
        for g in range(self.streams):
            mine = order[g :: self.streams]
            windows = tuple(tuple(int(b) for b in mine[i : i + w]) for i in range(0, len(mine), w))
            sizes = [sum(self.block_len(b) for b in win) for win in windows]
            out.append(StreamEpoch(windows, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)))
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

    def unserved_rows(self, epoch: int) -> np.ndarray:
        """Store row ids [n] of the rows the epoch end rule skips in `epoch` (the tail of each stream), in stream
        order: evaluation reads them after the last whole batch so that every row counts."""
        out = []
        served = self.batches_per_epoch * self.piece
        for g, stream in enumerate(self.epoch(epoch)):
            for w, blocks in enumerate(stream.windows):
                lo, hi = int(stream.offsets[w]), int(stream.offsets[w + 1])
                if hi <= served:
                    continue
                rows = np.concatenate([np.arange(b * self.block_rows, b * self.block_rows + self.block_len(b))
                                       for b in blocks])
                perm = self.window_perm(epoch, g, w, hi - lo)
                out.append(rows[perm[max(served - lo, 0):]])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

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
