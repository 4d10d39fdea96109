"""metrics.py on hand-computed cases, and the streaming accumulators against the one-shot formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crossjax import crosscoder as cc
from crossjax import metrics
from crossjax.errors import CrossjaxError

# B=3 rows, S=2 snapshots, D=2
X = np.array([[[1, 0], [2, 0]], [[3, 2], [0, 2]], [[2, 4], [1, 1]]], np.float64)
XHAT = np.array([[[1, 1], [1, 0]], [[2, 2], [0, 1]], [[2, 2], [1, 1]]], np.float64)
# snapshot 0: sse = 1 + 1 + 4 = 6; mean (2, 2); energy about the mean 5 + 1 + 4 = 10 -> EV 0.4
#             legacy ratios 1/1, 1/13, 4/20 -> 1 - mean
# snapshot 1: sse = 1 + 1 + 0 = 2; mean (1, 1); energy about the mean 2 + 2 + 0 = 4 -> EV 0.5
#             legacy ratios 1/4, 1/4, 0/2 -> 1 - 1/6
EV = [0.4, 0.5]
EV_LEGACY = [1 - (1 + 1 / 13 + 0.2) / 3, 1 - 1 / 6]


def test_explained_variance_hand_case():
    np.testing.assert_allclose(metrics.explained_variance(X, XHAT), EV, rtol=1e-12)
    np.testing.assert_allclose(metrics.legacy_explained_variance(X, XHAT), EV_LEGACY, rtol=1e-12)


def test_ev_about_the_mean_not_zero():
    # predicting the mean exactly scores EV 0 even though it captures most of the uncentred energy
    x = np.array([[[10.0, 1.0]], [[10.0, -1.0]]])
    xhat = np.broadcast_to(x.mean(0, keepdims=True), x.shape)
    np.testing.assert_allclose(metrics.explained_variance(x, xhat), [0.0], atol=1e-12)
    np.testing.assert_allclose(metrics.legacy_explained_variance(x, xhat), [1 - 1 / 101], rtol=1e-12)


def test_accumulator_hand_case_in_two_batches():
    acc = metrics.EVAccumulator(2, 2)
    acc.add_batch(X[:1], XHAT[:1])
    acc.add(metrics.batch_sums(jnp.asarray(X[1:], jnp.float32), jnp.asarray(XHAT[1:], jnp.float32)))
    res = acc.result()
    np.testing.assert_allclose(res["ev"], EV, rtol=1e-6)
    np.testing.assert_allclose(res["ev_legacy"], EV_LEGACY, rtol=1e-6)
    assert res["count"] == 3
    np.testing.assert_allclose(res["ev_mean"], 0.45, rtol=1e-6)


def test_accumulator_equals_one_shot_over_concatenated_batches():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 1.0, (50, 3, 4))            # a large mean makes the centring matter
    xhat = x + rng.normal(0, 0.4, x.shape)
    acc, other = metrics.EVAccumulator(3, 4), metrics.EVAccumulator(3, 4)
    for lo, hi in ((0, 7), (7, 30)):
        acc.add_batch(x[lo:hi], xhat[lo:hi])
    other.add_batch(x[30:], xhat[30:])
    acc.merge(other)
    np.testing.assert_allclose(acc.result()["ev"], metrics.explained_variance(x, xhat), rtol=1e-12)
    np.testing.assert_allclose(acc.result()["ev_legacy"], metrics.legacy_explained_variance(x, xhat), rtol=1e-12)


def test_accumulator_from_loss_aux_matches_one_shot():
    cfg = cc.CrosscoderConfig(num_snapshots=2, d_model=4, num_features=6, activation="relu")
    params = cc.init_params(jax.random.key(0), cfg, 0.5)
    x = np.random.default_rng(1).normal(1.0, 1.0, (24, 2, 4)).astype(np.float32)
    acc = metrics.EVAccumulator(2, 4)
    xhats = []
    for lo in range(0, 24, 8):
        _, aux = cc.loss_fn(params, x[lo:lo + 8], cfg, sparsity_coef=0.0)
        acc.add(aux)
        xhats.append(np.asarray(cc.forward(params, x[lo:lo + 8], cfg)["xhat"]))
    xhat = np.concatenate(xhats)
    np.testing.assert_allclose(acc.result()["ev"], metrics.explained_variance(x, xhat), rtol=1e-5)
    np.testing.assert_allclose(acc.result()["ev_legacy"], metrics.legacy_explained_variance(x, xhat), rtol=1e-5)


def test_accumulator_errors():
    acc = metrics.EVAccumulator(2, 2)
    with pytest.raises(CrossjaxError, match="before any batch"):
        acc.result()
    with pytest.raises(CrossjaxError, match="lack"):
        acc.add({"sse": np.zeros(2)})
    with pytest.raises(CrossjaxError, match="do not fit"):
        acc.add_batch(np.ones((2, 3, 2)), np.ones((2, 3, 2)))


def test_l0_per_snapshot_hand_case():
    acts = np.array([[[1, 0, 2], [0, 0, 0]], [[0.5, 0.1, 0], [3, 0, -1]]])   # [B=2, S=2, F=3]
    np.testing.assert_allclose(metrics.l0_per_snapshot(acts), [(2 + 2) / 2, (0 + 1) / 2])
    shared = np.array([[1, 0, 2], [0, 0, 0], [1, 1, 1]])                   # [B=3, F=3]
    np.testing.assert_allclose(metrics.l0_per_snapshot(shared, 4), [5 / 3] * 4)
    with pytest.raises(CrossjaxError, match="num_snapshots"):
        metrics.l0_per_snapshot(shared)


def test_dead_tracker_hand_case():
    t = metrics.DeadTracker(4)
    t.update(np.array([True, False, False, False]), 100)
    t.update(np.array([False, True, False, False]), 100)
    t.update(np.array([True, False, False, False]), 50)
    np.testing.assert_array_equal(t.tokens_since_fired, [0, 50, 250, 250])
    np.testing.assert_array_equal(t.steps_since_fired, [0, 1, 3, 3])
    np.testing.assert_array_equal(t.fire_count, [2, 1, 0, 0])
    np.testing.assert_array_equal(t.dead_mask(60), [False, False, True, True])
    np.testing.assert_array_equal(t.dead_mask(50), [False, True, True, True])
    assert t.dead_fraction() == 0.5
    state = t.state_dict()
    u = metrics.DeadTracker(4)
    u.load_state_dict(state)
    np.testing.assert_array_equal(u.tokens_since_fired, t.tokens_since_fired)
    assert u.tokens_seen == 250 and u.steps_seen == 3
    with pytest.raises(CrossjaxError, match="expected"):
        t.update(np.ones(3, bool), 10)


def test_jittable_tokens_since_fired_matches_tracker_and_saturates():
    t = metrics.DeadTracker(3)
    since = jnp.zeros(3, jnp.int32)
    step = jax.jit(metrics.update_tokens_since_fired)
    for fired, n in (([True, False, False], 7), ([False, False, True], 5), ([False, False, False], 9)):
        t.update(np.array(fired), n)
        since = step(since, jnp.asarray(fired), n)
    np.testing.assert_array_equal(np.asarray(since), t.tokens_since_fired)
    big = step(jnp.array([metrics.TOKENS_CAP - 3, 5, 0], jnp.int32), jnp.array([False, False, True]), 10)
    np.testing.assert_array_equal(np.asarray(big), [metrics.TOKENS_CAP, 15, 0])
