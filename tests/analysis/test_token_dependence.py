"""The share of a feature's activation variance explained by the current token, on planted cases with a closed form."""
import jax.numpy as jnp
import numpy as np
import pytest

from crossjax import crosscoder
from crossjax.analysis import token_dependence as td
from crossjax.array_store import store_from_arrays
from crossjax.crosscoder_config import CrosscoderConfig
from crossjax.errors import CrossjaxError


def _tokens(rng, n=20000, vocab=20):
    return rng.integers(0, vocab, size=n)


def _plain_share_by_loop(a, tokens, min_count):
    """Between-token variance over total variance, one token at a time (a second code path)."""
    ids, counts = np.unique(tokens, return_counts=True)
    keep = np.isin(tokens, ids[counts >= min_count])
    a, tokens = a[keep], tokens[keep]
    mean = a.mean()
    between = sum(np.sum(tokens == t) * (a[tokens == t].mean() - mean) ** 2 for t in np.unique(tokens))
    return between / np.sum((a - mean) ** 2)


def test_a_function_of_the_token_gives_one_and_an_independent_feature_about_zero():
    rng = np.random.default_rng(0)
    tokens = _tokens(rng)
    table = rng.exponential(size=20) * (rng.random(20) < 0.5)          # sparse, token -> value
    of_token = table[tokens]
    independent = rng.exponential(size=tokens.size) * (rng.random(tokens.size) < 0.3)
    share = td.explained_share(np.stack([of_token, independent], 1), tokens)
    assert share[0] == pytest.approx(1.0, abs=1e-9)
    assert abs(share[1]) < 0.005
    plain = td.explained_share(np.stack([of_token, independent], 1), tokens, adjusted=False)
    assert plain[0] == pytest.approx(1.0, abs=1e-9)
    # the plain ratio of an independent feature is biased up by about (K - 1) / (N - 1); the adjusted one is not
    assert plain[1] == pytest.approx(19 / (tokens.size - 1), abs=0.003)
    assert plain[1] > share[1]


def test_a_token_effect_plus_noise_gives_the_closed_form_share():
    rng = np.random.default_rng(1)
    tokens = _tokens(rng, n=40000, vocab=8)
    means = np.array([0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0])          # variance 1.25 over equally likely tokens
    a = means[tokens] + rng.normal(scale=np.sqrt(1.25), size=tokens.size)   # noise variance 1.25: share 1/2
    share = td.explained_share(a[:, None], tokens)[0]
    assert share == pytest.approx(0.5, abs=0.02)
    assert td.explained_share(a[:, None], tokens, adjusted=False)[0] == pytest.approx(
        _plain_share_by_loop(a, tokens, td.MIN_COUNT), rel=1e-9)


def test_rare_tokens_are_left_out_and_undefined_features_are_nan():
    rng = np.random.default_rng(2)
    tokens = np.r_[_tokens(rng, n=2000, vocab=10), [100, 100, 101, 102]]     # 100, 101, 102 are rare
    of_token = np.r_[(tokens[:2000] % 3).astype(float), [5.0, -7.0, 9.0, 1.0]]   # rare rows would break it
    never = np.zeros(tokens.size)
    only_rare = np.r_[np.zeros(2000), [1.0, 2.0, 3.0, 4.0]]
    few = np.zeros(tokens.size)
    few[:td.MIN_ACTIVE - 1] = 1.0 + rng.random(td.MIN_ACTIVE - 1)
    share = td.explained_share(np.stack([of_token, never, only_rare, few], 1), tokens)
    assert share[0] == pytest.approx(1.0, abs=1e-9)
    assert np.isnan(share[1:]).all()
    order, starts = td.token_groups(tokens)
    assert order.size == 2000 and starts.size == 10
    # one token kept: no between-token variance to speak of
    assert np.isnan(td.explained_share(rng.random((50, 1)), np.zeros(50, int))).all()
    with pytest.raises(CrossjaxError, match=r"acts \[N, F\] and token_ids \[N\]"):
        td.explained_share(np.zeros((5, 2)), np.zeros(4))


def test_jumprelu_activations_match_the_crosscoder():
    cfg = CrosscoderConfig(num_snapshots=3, d_model=4, num_features=6, activation="jumprelu")
    rng = np.random.default_rng(3)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in crosscoder.param_shapes(cfg).items()}
    params["log_threshold"] = np.full((6,), np.log(0.5), np.float32)
    x = rng.normal(size=(16, 3, 4)).astype(np.float32)
    reference = np.asarray(crosscoder.forward({k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(x),
                                              cfg)["acts"])                     # [B, S, F]
    h = np.einsum("nsd,sdf->nf", x, params["W_enc"]) + params["b_enc"]
    norms = np.linalg.norm(params["W_dec"], axis=-1)
    for s in range(3):
        np.testing.assert_allclose(td.jumprelu_acts(h, norms, np.exp(params["log_threshold"]), s), reference[:, s],
                                   rtol=1e-5, atol=1e-5)


def _planted_crosscoder(rng, tokens):
    """S=2, D=4, F=2: feature 0 reads dimension 0 (the token's embedding value), feature 1 dimension 1 (noise)."""
    cfg = CrosscoderConfig(num_snapshots=2, d_model=4, num_features=2, activation="jumprelu")
    x = np.zeros((tokens.size, 2, 4), np.float32)
    x[:, :, 0] = (np.arange(20) % 4 + 1.0)[tokens][:, None]
    x[:, :, 1] = rng.exponential(size=tokens.size)[:, None]
    w_enc = np.zeros((2, 4, 2), np.float32)
    w_enc[0, 0, 0] = w_enc[0, 1, 1] = 1.0
    w_dec = np.zeros((2, 2, 4), np.float32)
    w_dec[:, 0, 0] = w_dec[:, 1, 1] = 1.0
    w_dec[1] *= 2.0                      # both peak at snapshot 1
    params = {"W_enc": w_enc, "b_enc": np.zeros(2, np.float32), "W_dec": w_dec, "b_dec": np.zeros((2, 4), np.float32),
              "log_threshold": np.full((2,), np.log(0.1), np.float32)}
    return params, cfg, x


def test_per_snapshot_and_from_store_on_a_planted_crosscoder():
    rng = np.random.default_rng(4)
    tokens = _tokens(rng, n=4096)
    params, cfg, x = _planted_crosscoder(rng, tokens)
    shares, active = td.per_snapshot(params, cfg, x, tokens)
    assert shares.shape == (2, 2)
    # feature 0 reads values >= 1 (always open); feature 1 passes the gate h n[s] > 0.1 where h > 0.1 / n[s]
    noise = x[:, 0, 1]
    np.testing.assert_array_equal(active, [[tokens.size, np.sum(noise > 0.1)], [tokens.size, np.sum(noise > 0.05)]])
    np.testing.assert_allclose(shares[:, 0], 1.0, atol=1e-9)
    assert np.all(np.abs(shares[:, 1]) < 0.02)
    # from a store: raw activations x / scale, normalised back by the export's scales
    scales = np.array([2.0, 0.5], np.float32)
    store = store_from_arrays(x / scales[None, :, None], block_rows=1024, dtype="float16", token_ids=tokens)
    out = td.from_store(store, [2, 3], params, scales, cfg)
    assert out["rows"] == 2048 and out["tokens_kept"] == 20
    assert out["at_peak"][0] == pytest.approx(1.0, abs=1e-6) and abs(out["at_peak"][1]) < 0.03
    assert out["at_peak_by_kind"]["persistent"]["features"] == 2
    assert out["at_peak_by_kind"]["all"]["measured"] == 2
    assert out["kinds_firing"]["persistent"] == 2
    # a feature that never fires on the rows keeps its kind but is not counted as firing
    params["b_enc"][1] = -1e3
    silent = td.from_store(store, [2, 3], params, scales, cfg)
    assert silent["kinds_firing"]["persistent"] == 1 and silent["at_peak"][1] is None


def test_at_peak_and_by_kind():
    shares = np.array([[0.1, 0.9, np.nan], [0.7, 0.2, np.nan]])
    norms = np.array([[1.0, 3.0, 0.0], [2.0, 1.0, 0.0]])
    np.testing.assert_array_equal(td.at_peak(shares, norms)[:2], [0.7, 0.9])
    out = td.by_kind(np.array([0.7, 0.9, np.nan]), np.array(["emergent", "emergent", "dead"]))
    assert out["emergent"] == {"features": 2, "measured": 2, "median": pytest.approx(0.8), "mean": pytest.approx(0.8),
                               "frac_above_0.5": 1.0}
    assert out["all"]["features"] == 2 and out["dead"]["measured"] == 0 and out["dead"]["median"] is None


def test_shared_activations_give_one_share_for_every_snapshot():
    rng = np.random.default_rng(5)
    tokens = _tokens(rng, n=2048)
    params, cfg, x = _planted_crosscoder(rng, tokens)
    relu = CrosscoderConfig(num_snapshots=2, d_model=4, num_features=2, activation="relu")
    shares, active = td.per_snapshot(params, relu, x, tokens)
    h = np.einsum("nsd,sdf->nf", x, params["W_enc"])
    np.testing.assert_allclose(shares, np.repeat(td.explained_share(np.maximum(h, 0), tokens)[None], 2, 0))
    np.testing.assert_array_equal(active, np.repeat((h > 0).sum(0)[None], 2, 0))
    assert shares[0, 0] == pytest.approx(1.0, abs=1e-9)
