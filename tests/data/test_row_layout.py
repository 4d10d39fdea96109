"""The row layout of an activation store: every valid (context, position) pair in exactly one group, once."""
import numpy as np

from crossjax import tokens
from crossjax.row_layout import RowLayout


def test_layout_groups_cover_rows_once():
    valid = np.zeros((7, 6), bool)
    valid[:, 1:] = np.random.default_rng(0).random((7, 5)) < 0.7
    c = tokens.Contexts(np.arange(42, dtype=np.int32).reshape(7, 6), valid, np.arange(7))
    layout = RowLayout.build(c, block_rows=4, group_rows=6, shuffle=True, seed=3)
    assert layout.group_rows == 8 and layout.num_rows == valid.sum()
    seen = []
    for g in range(layout.num_groups):
        local, ctx, pos = layout.group_rows_of(g)
        np.testing.assert_array_equal(layout.group_contexts(g)[local], ctx)
        assert len(ctx) == np.diff(layout.group_range(g))[0]
        seen += list(zip(ctx.tolist(), pos.tolist()))
    assert sorted(seen) == sorted(zip(*map(np.ndarray.tolist, np.nonzero(valid))))
    assert len(seen) == len(set(seen))
