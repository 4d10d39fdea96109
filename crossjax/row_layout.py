"""Where each stored row of an activation store comes from: a valid (context, position) pair, in groups of blocks.

With ``shuffle``: contexts are put in one seeded random order and their valid positions are enumerated in that
order; consecutive ``group_rows`` rows (rounded up to whole blocks) form a group, and the rows of each group are
permuted by a seeded permutation of their own. So each block mixes the rows of every context of its group (about
``group_rows / context_len`` contexts), every context is run once per snapshot (a context cut by a group boundary is
run by both groups), and a group is computed in memory and written as contiguous blocks. The layout depends only on
the contexts and the seed, so it is the same for every snapshot and every process. Without shuffling the rows are
the valid positions in (context, position) order.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from crossjax import tokens as tokens_lib
from crossjax.errors import CrossjaxError


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Where each valid (context, position) pair lives in the store.

    contexts: the Contexts; order: [C] the order in which contexts are enumerated; cum: [C+1] valid-row offsets
    along ``order``; group_rows: rows per group (a multiple of block_rows); shuffle and seed fix the permutations.
    """

    contexts: tokens_lib.Contexts
    order: np.ndarray
    cum: np.ndarray
    block_rows: int
    group_rows: int
    shuffle: bool
    seed: int

    @classmethod
    def build(cls, contexts: tokens_lib.Contexts, *, block_rows: int, group_rows: int, shuffle: bool,
              seed: int) -> "RowLayout":
        if block_rows <= 0:
            raise CrossjaxError(f"store.block_rows={block_rows} must be positive.")
        if group_rows <= 0:
            raise CrossjaxError(f"activations.shuffle_group_rows={group_rows} must be positive.")
        C = contexts.num_contexts
        order = (np.random.default_rng((seed, 1)).permutation(C) if shuffle else np.arange(C)).astype(np.int64)
        counts = contexts.valid.sum(axis=1)[order]
        cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        group_rows = math.ceil(group_rows / block_rows) * block_rows
        return cls(contexts, order, cum, int(block_rows), int(group_rows), bool(shuffle), int(seed))

    @property
    def num_rows(self) -> int:
        return int(self.cum[-1])

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_rows / self.block_rows)

    @property
    def blocks_per_group(self) -> int:
        return self.group_rows // self.block_rows

    @property
    def num_groups(self) -> int:
        return math.ceil(self.num_rows / self.group_rows)

    def group_range(self, g: int) -> tuple[int, int]:
        return g * self.group_rows, min((g + 1) * self.group_rows, self.num_rows)

    def group_blocks(self, g: int) -> range:
        return range(g * self.blocks_per_group, min((g + 1) * self.blocks_per_group, self.num_blocks))

    def group_contexts(self, g: int) -> np.ndarray:
        """Context indices [c] holding the rows of group g, in enumeration order."""
        start, stop = self.group_range(g)
        a = int(np.searchsorted(self.cum, start, side="right")) - 1
        b = int(np.searchsorted(self.cum, stop, side="left"))
        return self.order[a:b]

    def group_rows_of(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of group g in stored order: (local context index into group_contexts(g), context, position), [n]."""
        start, stop = self.group_range(g)
        ctxs = self.group_contexts(g)
        a = int(np.searchsorted(self.cum, start, side="right")) - 1
        local, pos = [], []
        for i, c in enumerate(ctxs):
            p = np.flatnonzero(self.contexts.valid[c])
            local.append(np.full(len(p), i, np.int64))
            pos.append(p)
        local_all, pos_all = np.concatenate(local), np.concatenate(pos)
        skip = start - int(self.cum[a])  # rows of the first context that belong to the previous group
        local_all, pos_all = local_all[skip:skip + stop - start], pos_all[skip:skip + stop - start]
        if self.shuffle:
            perm = np.random.default_rng((self.seed, 2, g)).permutation(stop - start)
            local_all, pos_all = local_all[perm], pos_all[perm]
        return local_all, ctxs[local_all], pos_all

    def fingerprint(self) -> dict:
        return dict(shuffle=self.shuffle, seed=self.seed, group_rows=self.group_rows,
                    contexts_sha256=self.contexts.fingerprint(), num_contexts=self.contexts.num_contexts)
