"""The planted-feature generator: ground truth, the generative formula, resumable identical bytes."""
import math

import numpy as np
import pytest

from crossjax import configs, planted
from _files import tree_bytes
from crossjax.errors import CrossjaxError
from crossjax.store import ActivationStore, StoreMismatchError


def small_cfg(**kw):
    cfg = configs.planted_config()
    cfg.update(dict(num_snapshots=6, d_model=16, num_features=40, num_rows=50, block_rows=16,
                    firing_prob=0.1, seed=3))
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def one_go(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("planted") / "store")
    truth = planted.generate_planted(path, small_cfg())
    return path, truth, tree_bytes(path)


def test_truth_shapes_kinds_profiles():
    cfg = small_cfg()
    t = planted.make_truth(cfg)
    S, F, D = 6, 40, 16
    assert t.directions.shape == (S, F, D) and t.strengths.shape == (S, F)
    assert t.kind.shape == t.emergence_snapshot.shape == t.rotation_snapshot.shape == (F,)
    np.testing.assert_allclose(np.linalg.norm(t.directions, axis=-1), 1.0, atol=1e-6)
    # 0.4/0.3/0.15/0.15 of 40 features
    assert {k: int((t.kind == k).sum()) for k in planted.KINDS} == {"persistent": 16, "emergent": 12, "init_decay": 6, "transient": 6}
    st = t.strengths
    for i in range(F):
        k, e = t.kind[i], t.emergence_snapshot[i]
        assert (e >= 1) == (k == "emergent")
        if k == "persistent":
            assert np.all(st[:, i] == st[0, i]) and 0.5 <= st[0, i] <= 1.5
        elif k == "emergent":
            assert np.all(st[:e, i] == 0.0), "emergent features must be absent before their emergence snapshot"
            assert st[e, i] > 0 and np.all(st[e + 1 :, i] >= st[e, i])
        elif k == "init_decay":
            assert st[0, i] >= 0.5 and st[-1, i] < 0.01 * st[0, i] and np.all(np.diff(st[:, i]) < 0)
        else:
            assert st[0, i] == 0 and st[-1, i] == 0 and st[:, i].max() >= 0.5
    # Rotations: only persistent features; a sharp turn by the planted angle, slow drift elsewhere.
    rot = np.flatnonzero(t.rotation_snapshot >= 0)
    assert len(rot) == 4 and set(t.kind[rot]) == {"persistent"}
    cos_step = np.einsum("sfd,sfd->sf", t.directions[1:], t.directions[:-1])  # [S-1, F]
    for i in range(F):
        r = t.rotation_snapshot[i]
        for s in range(1, S):
            if s == r:
                assert abs(cos_step[s - 1, i] - math.cos(math.radians(60))) < 0.05
            else:
                assert cos_step[s - 1, i] > 0.99
    assert planted.make_truth(cfg).to_npz_bytes() == t.to_npz_bytes()  # a pure function of cfg
    assert not np.array_equal(planted.make_truth(small_cfg(seed=4)).directions, t.directions)


def test_truth_bytes_do_not_depend_on_the_clock(monkeypatch):
    import time

    t = planted.make_truth(small_cfg())
    first = t.to_npz_bytes()
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 3e7)  # a year later
    assert t.to_npz_bytes() == first


def test_store_meta_and_truth_file(one_go):
    path, truth, _ = one_go
    st = ActivationStore.open(path)
    m = st.meta
    assert (m.model, m.hook, m.num_rows, m.block_rows, m.d_model, m.num_snapshots) == ("planted", "planted", 50, 16, 16, 6)
    assert st.is_complete()
    loaded = planted.load_truth(path)
    for f in ("directions", "strengths", "kind", "emergence_snapshot", "rotation_snapshot"):
        np.testing.assert_array_equal(getattr(loaded, f), getattr(truth, f))
    t = st.read_tokens(0, 50)
    np.testing.assert_array_equal(t["context_ids"], np.arange(50))


def test_activations_follow_the_generative_formula(one_go):
    path, truth, _ = one_go
    cfg = small_cfg()
    st = ActivationStore.open(path)
    for block in (1, 3):  # block 3 is the short last block: rows 48, 49
        a0, a1 = st.block_range(block)
        # Latents redrawn here with the documented keying, independently of the generator's code.
        rng = np.random.default_rng([3, 1, block])
        fire = rng.random((a1 - a0, 40)) < 0.1
        mags = rng.lognormal(0.0, 0.75, (a1 - a0, 40))
        lat = np.where(fire, mags, 0.0)
        np.testing.assert_array_equal(lat, planted.block_latents(cfg, block))
        got = st.read_rows(a0, a1)
        for s in range(6):
            noise = np.random.default_rng([3, 2, block, s]).standard_normal((a1 - a0, 16), dtype=np.float32) * 0.05
            want = np.zeros((a1 - a0, 16))
            for i in range(40):  # x = sum_i a_i * strength_i * direction_i + noise
                want += lat[:, i : i + 1] * (float(truth.strengths[s, i]) * truth.directions[s, i].astype(np.float64))
            want += noise
            np.testing.assert_array_equal(got[:, s], want.astype(np.float16))


def test_hand_checked_rows_without_noise(tmp_path):
    cfg = small_cfg(noise_std=0.0, num_rows=16, firing_prob=0.05)
    path = str(tmp_path / "s")
    truth = planted.generate_planted(path, cfg)
    lat = planted.block_latents(cfg, 0)
    x = ActivationStore.open(path).read_rows(0, 16).astype(np.float32)
    n_active = (lat > 0).sum(1)
    assert (n_active == 0).any() and (n_active == 1).any()
    for b in range(16):
        if n_active[b] == 0:
            assert np.all(x[b] == 0)  # nothing fires: exactly zero in every snapshot
        elif n_active[b] == 1:
            i = int(np.flatnonzero(lat[b])[0])
            for s in range(6):  # one feature: its magnitude times its strength times its direction
                np.testing.assert_allclose(x[b, s], lat[b, i] * truth.strengths[s, i] * truth.directions[s, i], rtol=2e-3, atol=1e-4)
            e = truth.emergence_snapshot[i]
            if e > 0:
                assert np.all(x[b, :e] == 0)


def test_interrupted_then_resumed_is_byte_identical(tmp_path, one_go, monkeypatch):
    _, _, ref = one_go
    path = str(tmp_path / "store")
    calls = [0]
    real = ActivationStore._mark

    def crash_on_ninth(self, block, snapshot):
        calls[0] += 1
        if calls[0] == 9:  # unit data written, marker not: what a kill at that moment leaves
            raise KeyboardInterrupt
        real(self, block, snapshot)

    monkeypatch.setattr(ActivationStore, "_mark", crash_on_ninth)
    with pytest.raises(KeyboardInterrupt):
        planted.generate_planted(path, small_cfg())
    monkeypatch.setattr(ActivationStore, "_mark", real)
    assert len(ActivationStore.open(path).missing_units()) == 4 * 7 - 8
    st = planted.ensure_planted(small_cfg(), path)
    assert st.is_complete()
    assert tree_bytes(path) == ref


def test_two_processes_disjoint_blocks_equal_one_go(tmp_path, one_go):
    _, _, ref = one_go
    path = str(tmp_path / "store")
    planted.generate_planted(path, small_cfg(), process_index=1, process_count=2)
    st = ActivationStore.open(path)
    assert {b for b, _ in st.missing_units()} == {0, 2}
    planted.generate_planted(path, small_cfg(), process_index=0, process_count=2)
    assert tree_bytes(path) == ref


def test_other_config_refused_and_bad_settings(tmp_path, one_go):
    path, _, ref = one_go
    with pytest.raises(StoreMismatchError, match="extra"):
        planted.ensure_planted(small_cfg(seed=9), path)
    assert tree_bytes(path) == ref
    with pytest.raises(CrossjaxError, match="sum to 1"):
        planted.make_truth(small_cfg(transient_fraction=0.5))
    with pytest.raises(CrossjaxError, match="unknown keys"):
        planted.make_truth({"num_snapshot": 3})
    with pytest.raises(CrossjaxError, match="at least 3 snapshots"):
        planted.make_truth(small_cfg(num_snapshots=2))
    with pytest.raises(CrossjaxError, match="firing_prob"):
        planted.make_truth(small_cfg(firing_prob=0.0))
    with pytest.raises(CrossjaxError, match="ground_truth"):
        ActivationStore.create(str(tmp_path / "plain"), planted.planted_meta(small_cfg()))
        planted.load_truth(str(tmp_path / "plain"))
