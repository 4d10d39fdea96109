"""Activations already in memory as an activation store, so the trainer and the analyses read them as any other.

    store = store_from_arrays(acts)                        # acts [N, S, D], e.g. from another library
    trainer.train(config, workdir, trainer.TrainData(store, blocks=range(store.meta.num_blocks - 1),
                                                     scales=store.estimate_scales()))

The default location is a `memory://` store (in this process, gone when it ends); pass `url` (a local path or
gs://) to keep it. Rows are the arrays' rows in order: shuffle them first if they are grouped by context (the
loader shuffles within windows of blocks, not across the whole store).
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from crossjax.errors import CrossjaxError
from crossjax.store import ActivationStore, StoreMeta

_counter = itertools.count()


def store_from_arrays(acts: np.ndarray, *, url: str | None = None, block_rows: int = 4096,
                      snapshots: Sequence[str] | None = None, dtype: str = "float16",
                      token_ids: np.ndarray | None = None) -> ActivationStore:
    """A complete store holding acts [N, S, D] (cast to `dtype`); snapshots default to s0..s{S-1}, token ids
    (shown by the lookup API) to the row index."""
    acts = np.asarray(acts)
    if acts.ndim != 3 or 0 in acts.shape:
        raise CrossjaxError(f"acts has shape {acts.shape}; give a non-empty [rows, snapshots, d_model] array")
    n, s, d = acts.shape
    names = tuple(snapshots) if snapshots is not None else tuple(f"s{i}" for i in range(s))
    if len(names) != s:
        raise CrossjaxError(f"{len(names)} snapshot names for {s} snapshots in acts")
    ids = np.arange(n) if token_ids is None else np.asarray(token_ids)
    meta = StoreMeta(snapshots=names, d_model=d, num_rows=n, block_rows=min(int(block_rows), n), dtype=dtype,
                     model="arrays", hook="arrays")
    store = ActivationStore.create(url or f"memory://crossjax_arrays_{next(_counter)}", meta)
    for block in range(meta.num_blocks):
        lo, hi = store.block_range(block)
        store.write_tokens(block, ids[lo:hi], np.arange(lo, hi), np.zeros(hi - lo, np.int64))
        for i in range(s):
            store.write_block(block, i, acts[lo:hi, i])
    return store
