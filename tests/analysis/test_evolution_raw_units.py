"""Decoder norms in raw activation units (per-snapshot normalisation undone) and the kinds they give."""
import jax.numpy as jnp
import numpy as np
import pytest

from crossjax import crosscoder
from crossjax.analysis import evolution
from crossjax.crosscoder_config import CrosscoderConfig
from crossjax.errors import CrossjaxError


def test_raw_unit_norms_by_hand():
    w_dec = np.array([[[3.0, 4.0], [0.0, 1.0]],       # snapshot 0: norms 5, 1
                      [[0.0, 1.0], [6.0, 8.0]]])      # snapshot 1: norms 1, 10
    scales = np.array([2.0, 0.25])
    raw = evolution.raw_unit_norms(evolution.decoder_norms(w_dec), scales)
    np.testing.assert_allclose(raw, [[2.5, 0.5], [4.0, 40.0]])
    with pytest.raises(CrossjaxError, match="S finite positive scales"):
        evolution.raw_unit_norms(evolution.decoder_norms(w_dec), np.array([1.0, 0.0]))


def test_raw_unit_norm_is_the_decoder_vector_the_store_sees():
    """The crosscoder reconstructs normalised x * scale; in the store's units feature i adds f * W_dec[s, i] / scale."""
    cfg = CrosscoderConfig(num_snapshots=3, d_model=4, num_features=5, activation="relu")
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in crosscoder.param_shapes(cfg).items()}
    scales = np.array([8.0, 1.0, 0.3], np.float32)
    acts = np.zeros((5, 5), np.float32)
    acts[np.arange(5), np.arange(5)] = 2.0                      # row i: feature i alone at activation 2
    contribution = np.asarray(crosscoder.decode(params, jnp.asarray(acts))) - np.asarray(params["b_dec"])  # [F,S,D]
    # back to raw units: the inverse of crosscoder.normalize
    raw = contribution / scales[None, :, None]
    np.testing.assert_allclose(np.asarray(crosscoder.normalize(jnp.asarray(raw), scales)), contribution, rtol=1e-5)
    expected = np.linalg.norm(raw, axis=-1).T / 2.0             # [S, F]
    got = evolution.raw_unit_norms(evolution.decoder_norms(np.asarray(params["W_dec"])), scales)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_compare_raw_units_counts_the_changes():
    # normalised norms [S=3, F=3]; scales fall 4 -> 1 -> 1 (the raw activations grow early in training)
    norms = np.array([[1.0, 0.1, 1.0],
                      [1.0, 1.0, 1.0],
                      [1.0, 1.0, 0.1]])
    w_dec = norms[:, :, None] * np.array([1.0, 0.0])[None, None, :]
    scales = np.array([4.0, 1.0, 1.0])
    # raw: feature 0 [0.25, 1, 1] persistent -> emergent at step 10; feature 1 stays emergent at step 10;
    # feature 2 [0.25, 1, 0.1]: initialisation -> transient
    out = evolution.compare_raw_units(w_dec, scales, ["step0", "step10", "step20"])
    assert out["kinds_raw"] == {"initialisation": 0, "emergent": 2, "transient": 1, "persistent": 0, "dead": 0}
    assert out["emergent_features_by_step"] == {"0": 0, "10": 2, "20": 0}
    assert out["changed"] == 2
    assert out["changes"] == {"initialisation->transient": 1, "persistent->emergent": 1}
    assert out["emergent_in_both"] == {"features": 1, "same": 1, "earlier_raw": 0, "later_raw": 0}
    # a feature forming gradually while the scale falls reaches half its raw-unit peak later
    gradual = np.array([[0.1], [0.6], [1.0]])[:, :, None] * np.ones((1, 1, 2))
    moved = evolution.compare_raw_units(gradual, np.array([1.0, 0.5, 0.25]))
    # normalised [0.1, 0.6, 1.0]: emerges at 1; raw [0.1, 1.2, 4.0] / 4.0 = [0.025, 0.3, 1.0]: emerges at 2
    assert moved["emergent_in_both"] == {"features": 1, "same": 0, "earlier_raw": 0, "later_raw": 1}
    # unit scales change nothing
    same = evolution.compare_raw_units(w_dec, np.ones(3))
    assert same["changed"] == 0 and same["changes"] == {}
    assert same["kinds_raw"] == {k: int(np.sum(evolution.classify_kinds(norms) == k)) for k in evolution.KINDS}
