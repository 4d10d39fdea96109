"""Separability on a planted concept: invisible at snapshot 0, faint at 1, plain at 2, and a hand-built
crosscoder feature that reads it from snapshot 2 with decoder norms rising the same way."""
import numpy as np
import pytest

from crossjax import crosscoder
from crossjax.analysis import separability
from crossjax.array_store import store_from_arrays
from crossjax.errors import CrossjaxError

N, S, D = 2400, 3, 8


def _planted(seed=0):
    rng = np.random.default_rng(seed)
    concept = rng.random(N) < 0.3
    u = np.zeros(D)
    u[0] = 1.0
    x = rng.standard_normal((N, S, D))
    x[:, 1] += 0.6 * concept[:, None] * u                 # faint at snapshot 1
    x[:, 2] += 4.0 * concept[:, None] * u                 # plain at snapshot 2; snapshot 0 carries nothing
    return x.astype(np.float16).astype(np.float32), concept     # as a float16 store holds them


def _crosscoder():
    """F=2 JumpReLU: feature 0 reads u at snapshot 2 (fires where x[b,2,0] > 2), decoder norms 0.01, 0.3, 2;
    feature 1 never fires (its threshold is out of reach)."""
    cfg = crosscoder.CrosscoderConfig(num_snapshots=S, d_model=D, num_features=2)
    w_enc = np.zeros((S, D, 2), np.float32)
    w_enc[2, 0, 0] = 1.0
    w_dec = np.zeros((S, 2, D), np.float32)
    w_dec[:, 0, 1] = [0.01, 0.3, 2.0]
    w_dec[:, 1, 2] = 1.0
    params = {"W_enc": w_enc, "b_enc": np.zeros(2, np.float32), "W_dec": w_dec, "b_dec": np.zeros((S, D), np.float32),
              "log_threshold": np.log(np.array([4.0, 1e6], np.float32))}    # h n[2] > theta: x > 2 for feature 0
    return params, np.ones(S, np.float32), cfg


def test_auc_follows_the_planted_concept_and_the_decoder_norm():
    x, concept = _planted()
    store = store_from_arrays(x, block_rows=512)
    params, scales, cfg = _crosscoder()
    out = separability.measure(store, params, scales, cfg, blocks=range(store.meta.num_blocks), num_features=4,
                               num_rows=2000, seed=3)
    assert out["features"] == [0] and out["eligible_features"] == 1        # feature 1 never fires
    rows = separability.sample_rows(store, range(store.meta.num_blocks), 2000, 3)
    assert out["rows"] == 2000 and out["firing_rows"] == [int((x[rows, 2, 0] > 2).sum())]
    auc = out["auc"][0]
    assert 0.4 < auc[0] < 0.6                      # nothing to find at snapshot 0
    assert auc[0] + 0.1 < auc[1] < auc[2]          # faint, then plain
    assert auc[2] > 0.99
    assert out["spearman"] == [1.0] and out["median_spearman"] == 1.0 and out["fraction_positive"] == 1.0
    again = separability.measure(store, params, scales, cfg, blocks=range(store.meta.num_blocks), num_features=4,
                                 num_rows=2000, seed=3)
    assert again == out                              # seeded


def test_rows_are_read_block_by_block_as_stored():
    x, _ = _planted()
    store = store_from_arrays(x, block_rows=512)
    rows = separability.sample_rows(store, [1, 3], 300, 0)
    assert len(rows) == 300 and np.all((rows // 512 == 1) | (rows // 512 == 3)) and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(separability.read_rows(store, rows), x[rows])
    np.testing.assert_array_equal(separability.read_rows(store, rows, [2, 0]), x[rows][:, [2, 0]])


def test_bad_settings():
    x, _ = _planted()
    store = store_from_arrays(x, block_rows=512)
    params, scales, cfg = _crosscoder()
    for bad in (0, -2, "8", 1.5):
        with pytest.raises(CrossjaxError, match="num_features"):
            separability.measure(store, params, scales, cfg, blocks=[0], num_features=bad)
    with pytest.raises(CrossjaxError, match="no block"):
        separability.measure(store, params, scales, cfg, blocks=[])
