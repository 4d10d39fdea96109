"""metrics.py on hand-computed cases, and the streaming accumulators against the one-shot formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crossjax import crosscoder as cc
from crossjax import metrics
from crossjax.errors import CrossjaxError


def host_sums(x, xhat):
    """The per-batch sums of the module docstring in float64 on the host: the oracle for EVAccumulator's algebra."""
    sq = np.sum((x - xhat) ** 2, axis=2)
    x_sq = np.sum(x ** 2, axis=2)
    return {"sse": sq.sum(0), "x_sum": x.sum(0), "x_sq_sum": x_sq.sum(0),
            "legacy_sum": (sq / np.maximum(x_sq, 1e-30)).sum(0), "count": x.shape[0]}


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
    acc.add(host_sums(X[:1], XHAT[:1]))
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
    acc = metrics.EVAccumulator(3, 4)
    for lo, hi in ((0, 7), (7, 30), (30, 50)):
        acc.add(host_sums(x[lo:hi], xhat[lo:hi]))
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
        acc.add(metrics.batch_sums(jnp.ones((2, 3, 2)), jnp.ones((2, 3, 2))))


def test_jittable_tokens_since_fired_hand_case_and_saturates():
    since = jnp.zeros(3, jnp.int32)
    step = jax.jit(metrics.update_tokens_since_fired)
    for fired, n in (([True, False, False], 7), ([False, False, True], 5), ([False, False, False], 9)):
        since = step(since, jnp.asarray(fired), n)
    # feature 0 last fired in batch 1 (5 + 9 tokens since), feature 1 never (7 + 5 + 9), feature 2 in batch 2 (9)
    np.testing.assert_array_equal(np.asarray(since), [14, 21, 9])
    big = step(jnp.array([metrics.TOKENS_CAP - 3, 5, 0], jnp.int32), jnp.array([False, False, True]), 10)
    np.testing.assert_array_equal(np.asarray(big), [metrics.TOKENS_CAP, 15, 0])
