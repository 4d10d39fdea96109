"""Clusters of strength curves on planted groups, the rotation matrix on a hand-computed decoder, and the
emergence histogram over training steps."""
import numpy as np
import pytest

from crossjax.analysis import evolution, trajectories
from crossjax.errors import CrossjaxError

# Three planted groups of normalised-strength profiles over 6 snapshots (cluster order: when each is present).
PROFILES = np.array([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0],      # present from the start
                     [0.0, 1.0, 1.0, 0.0, 0.0, 0.0],      # transient, present at snapshot 1
                     [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])     # emerges at snapshot 3


def _grouped_norms(per_group=20, dead=3, seed=0):
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(3), per_group)
    rng.shuffle(group)
    level = rng.uniform(0.5, 4.0, size=len(group))               # each feature its own scale
    noise = 1 + 0.05 * rng.standard_normal((6, len(group)))
    norms = np.clip(PROFILES[group].T * noise, 0, None) * level
    return np.concatenate([norms, np.zeros((6, dead))], axis=1), np.concatenate([group, -np.ones(dead, int)])


def test_clusters_recover_planted_groups_in_order_of_formation():
    norms, group = _grouped_norms()
    c = trajectories.cluster_strength_curves(norms, 3, seed=0)
    np.testing.assert_array_equal(c.labels, group)                 # exactly the planted groups, dead as -1
    np.testing.assert_array_equal(c.sizes, [20, 20, 20])
    strength = evolution.normalised_strength(norms)
    for k in range(3):
        np.testing.assert_allclose(c.mean_curves[k], strength[:, group == k].mean(axis=1), atol=1e-6)
        np.testing.assert_allclose(c.mean_curves[k], PROFILES[k] / PROFILES[k].max(), atol=0.08)
    again = trajectories.cluster_strength_curves(norms, 3, seed=0)
    np.testing.assert_array_equal(again.labels, c.labels)
    assert c.to_json()["sizes"] == [20, 20, 20] and len(c.to_json()["mean_curves"]) == 3


def test_cluster_count_is_capped_and_checked():
    norms = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])          # two live features, one dead
    c = trajectories.cluster_strength_curves(norms, 5)
    assert len(c.sizes) == 2 and sorted(c.labels.tolist()) == [-1, 0, 1]
    assert len(trajectories.cluster_strength_curves(np.zeros((2, 3)), 2).sizes) == 0
    for bad in (0, -1, 2.5, "3", True):
        with pytest.raises(CrossjaxError, match="positive integer"):
            trajectories.cluster_strength_curves(norms, bad)
    with pytest.raises(CrossjaxError, match=r"\[S, F\]"):
        trajectories.cluster_strength_curves(np.zeros(3), 2)


def _hand_decoder():
    """S=3, D=2: A stays on e1; B is e1, e1, then turns to e2; C is absent at snapshot 0, then e2 (x2 norm)."""
    e1, e2, zero = np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.zeros(2)
    a = [e1, 3 * e1, e1]
    b = [e1, e1, e2]
    c = [zero, 2 * e2, 2 * e2]
    return np.stack([np.stack([a[s], b[s], c[s]]) for s in range(3)])     # [S=3, F=3, D=2]


def test_rotation_matrix_by_hand():
    w = _hand_decoder()
    want = np.array([[1.0, 1.0, 0.5],            # (0, t): A and B count (C absent at 0)
                     [1.0, 1.0, 2 / 3],          # (1, 2): A 1, B 0, C 1
                     [0.5, 2 / 3, 1.0]])
    np.testing.assert_allclose(trajectories.rotation_matrix(w), want, atol=1e-6)
    np.testing.assert_allclose(trajectories.rotation_matrix(w, chunk=1), want, atol=1e-6)
    only_b = trajectories.rotation_matrix(w, np.array([False, True, False]))
    np.testing.assert_allclose(only_b, [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-6)
    only_c = trajectories.rotation_matrix(w, [2])
    assert np.isnan(only_c[0]).all() and only_c[1, 2] == pytest.approx(1.0)
    kinds = np.array(["persistent", "persistent", "emergent"])
    by_kind = trajectories.rotation_by_kind(w, kinds)
    assert set(by_kind) == {"persistent", "emergent"}
    np.testing.assert_allclose(by_kind["persistent"], trajectories.rotation_matrix(w, [0, 1]))
    with pytest.raises(CrossjaxError, match="mask has shape"):
        trajectories.rotation_matrix(w, np.ones(2, bool))


def test_emergence_by_training_step():
    emergence = np.array([0, 2, 2, -1, 1, 2])
    assert trajectories.emergence_by_step(emergence, ["step0", "step16", "step1000"]) == {"0": 1, "16": 1,
                                                                                           "1000": 3}
    assert trajectories.training_steps(["step0", "final"]) is None
    assert trajectories.emergence_by_step(emergence, ["a", "b", "c"]) == {"a": 1, "b": 1, "c": 3}
