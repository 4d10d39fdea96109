import numpy as np
import pytest

from crossjax.analysis import evolution
from crossjax.errors import CrossjaxError


def _decoder_from_norms(norms, d=3, seed=0):
    """Builds W_dec [S, F, D] whose row norms are `norms`, one fixed direction per feature."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(norms.shape[1], d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return norms[:, :, None] * directions[None]


# Columns: persistent, initialisation, emergent at snapshot 2, transient (peaks at 1), dead.
NORMS = np.array(
    [
        [2.0, 4.0, 0.0, 0.1, 0.0],
        [2.0, 3.0, 0.1, 1.0, 0.0],
        [2.0, 1.0, 3.0, 0.5, 0.0],
        [2.0, 0.4, 3.0, 0.1, 0.0],
    ]
)


def test_norms_and_normalised_strength_by_hand():
    w = _decoder_from_norms(NORMS)
    np.testing.assert_allclose(evolution.decoder_norms(w), NORMS, atol=1e-6)
    strength = evolution.normalised_strength(NORMS)
    np.testing.assert_allclose(strength[:, 1], [1.0, 0.75, 0.25, 0.1])
    np.testing.assert_allclose(strength[:, 4], 0.0)


def test_emergence_snapshot_by_hand():
    np.testing.assert_array_equal(evolution.emergence_snapshot(NORMS, 0.5), [0, 0, 2, 1, -1])


def test_kinds_by_hand():
    kinds = evolution.classify_kinds(NORMS)
    assert list(kinds) == ["persistent", "initialisation", "emergent", "transient", "dead"]


def test_rotation_cosines_closed_form():
    # One feature rotating by 90 degrees between snapshots 1 and 2, one fixed feature.
    w = np.zeros((3, 2, 2))
    w[0, 0] = w[1, 0] = [1.0, 0.0]
    w[2, 0] = [0.0, 2.0]
    w[:, 1] = [3.0, 4.0]
    np.testing.assert_allclose(evolution.consecutive_cosine(w), [[1.0, 1.0], [0.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(evolution.cosine_to_snapshot(w, reference=0)[:, 0], [1.0, 1.0, 0.0], atol=1e-6)


def test_summary_counts_emergent_by_snapshot():
    summary = evolution.summarise(_decoder_from_norms(NORMS), ["step0", "step1", "step2", "step3"])
    assert summary["kinds"]["emergent"] == 1
    assert summary["emergent_features_by_snapshot"] == {"step0": 0, "step1": 0, "step2": 1, "step3": 0}
    assert summary["emergent_features_by_step"] == {"0": 0, "1": 0, "2": 1, "3": 0}
    # one fixed direction per feature: every live feature's cosine is 1 where both norms are non-zero
    rotation = np.array(summary["rotation"], dtype=float)
    assert rotation.shape == (4, 4) and np.allclose(rotation, 1.0)
    assert set(summary["rotation_by_kind"]) == {"persistent", "initialisation", "emergent", "transient"}
    assert summary["clusters"]["k"] == 4 and sum(summary["clusters"]["sizes"]) == 4     # k capped: 4 live features
    assert evolution.summarise(_decoder_from_norms(NORMS), ["a", "b", "c", "d"])["emergent_features_by_step"] is None
    with pytest.raises(CrossjaxError, match="snapshot names"):
        evolution.summarise(_decoder_from_norms(NORMS), ["a"])
