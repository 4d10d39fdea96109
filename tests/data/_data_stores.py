"""Tiny activation stores whose values name their own row and snapshot, for the data pipeline tests.

Row r of snapshot s holds [r, s, -r, r % 7]; tokens are token_id 3r, context r // CONTEXT, position r % CONTEXT.
"""

from __future__ import annotations

import numpy as np

from crossjax.store import ActivationStore, StoreMeta

CONTEXT = 32  # rows per context: two 16-row blocks


def row_values(rows: np.ndarray, snapshot: int) -> np.ndarray:
    """The planted content of ``rows`` [n] in ``snapshot``: [n, 4] float32."""
    r = np.asarray(rows, np.float32)
    return np.stack([r, np.full_like(r, snapshot), -r, r % 7], axis=1)


def write_store(path: str, *, num_rows: int = 192, block_rows: int = 16, snapshots: int = 4,
                dtype: str = "float16", skip: tuple = ()) -> ActivationStore:
    """A complete store (except the units in ``skip``: (block, snapshot or None for tokens))."""
    meta = StoreMeta(snapshots=tuple(f"step{i}" for i in range(snapshots)), d_model=4, num_rows=num_rows,
                     block_rows=block_rows, dtype=dtype, model="test", hook="blocks.0.hook_resid_post",
                     context_len=CONTEXT)
    store = ActivationStore.create(path, meta)
    for b in range(meta.num_blocks):
        start, stop = store.block_range(b)
        rows = np.arange(start, stop)
        for s in range(snapshots):
            if (b, s) not in skip:
                store.write_block(b, s, row_values(rows, s))
        if (b, None) not in skip:
            store.write_tokens(b, rows * 3, rows // CONTEXT, rows % CONTEXT)
    return store
