"""crossjax.trainer: schedules, mesh independence, resume onto another mesh, guards, NaN stop, recovery."""
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _trainer_util import STEPS, experiment, exported, mesh_overrides, summary, tiny_config, train_records
from crossjax import checkpoint as ckpt_lib
from crossjax import store as store_lib
from crossjax import optim, pipeline, trainer
from crossjax.analysis import recovery
from crossjax.errors import CrossjaxError

# -------------------------------------------------------------------------------------------------- schedules


def test_lr_and_sparsity_schedules_follow_the_paper():
    c = experiment("synthetic", "tiny").train
    c.lr, c.warmup_steps, c.cooldown_frac, c.sparsity_coef, c.sparsity_warmup_frac = 1.0, 10, 0.2, 0.3, 0.1
    lr = optim.warmup_cooldown(c.lr, warmup_steps=c.warmup_steps, total_steps=100, cooldown_frac=c.cooldown_frac)
    # warm-up (t+1)/10, flat, then linear to 0 over the last 20 steps: (100 - t) / 20
    for t, want in [(0, 0.1), (4, 0.5), (9, 1.0), (50, 1.0), (80, 1.0), (90, 0.5), (99, 0.05)]:
        assert float(lr(t)) == pytest.approx(want, rel=1e-6), t
    lam = optim.linear_ramp(c.sparsity_coef, ramp_steps=c.sparsity_warmup_frac * 100)
    for t, want in [(0, 0.03), (4, 0.15), (9, 0.3), (60, 0.3)]:
        assert float(lam(t)) == pytest.approx(want, rel=1e-6), t


def test_threshold_learns_at_a_scaled_rate():
    c = experiment("synthetic", "tiny").train
    c.lr, c.warmup_steps, c.cooldown_frac, c.threshold_lr_scale = 0.01, 0, 0.0, 0.1
    tx = trainer.make_optimizer(c, 10)
    params = {"W_enc": jnp.zeros((2, 3, 4)), "log_threshold": jnp.zeros((4,))}
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step moves each coordinate by lr * g / (|g| + eps): lr for weights, lr * scale for thresholds
    np.testing.assert_allclose(updates["W_enc"], -0.01, rtol=1e-5)
    np.testing.assert_allclose(updates["log_threshold"], -0.001, rtol=1e-5)


# -------------------------------------------------------------------------------------------------- meshes


@pytest.mark.parametrize("mesh", [(1, 1, 8), (2, 2, 2), (8, 1, 1)])
def test_meshes_give_the_single_device_numbers(mesh, store_path, one_device_run, tmp_path):
    c = tiny_config(store_path, **mesh_overrides(*mesh), **{"train.steps": STEPS, "train.log_every": 1,
                                                   "train.checkpoint_every": 0})
    pipeline.run(c, str(tmp_path))
    ref, got = train_records(one_device_run), train_records(tmp_path)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=2e-5)
    np.testing.assert_allclose([r["l0"] for r in got], [r["l0"] for r in ref], rtol=1e-5)
    a, b = exported(one_device_run), exported(tmp_path)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert summary(tmp_path).heldout["ev"] == pytest.approx(summary(one_device_run).heldout["ev"], rel=1e-4)


# -------------------------------------------------------------------------------------------------- guards


def test_workdir_of_another_config_is_refused(store_path, one_device_run):
    c = tiny_config(store_path, **mesh_overrides(1, 1, 1), **{"train.steps": STEPS, "train.log_every": 1,
                                                     "train.checkpoint_every": 3, "train.lr": 0.5})
    before = sorted(os.listdir(os.path.join(one_device_run, "checkpoints")))
    with pytest.raises(CrossjaxError) as e:
        pipeline.run(c, one_device_run)
    msg = str(e.value)
    assert "train.lr: 0.001 -> 0.5" in msg and "another --workdir" in msg
    assert sorted(os.listdir(os.path.join(one_device_run, "checkpoints"))) == before


def test_finished_run_reruns_without_training_again(store_path, one_device_run):
    before = summary(one_device_run)
    c = tiny_config(store_path, **mesh_overrides(1, 1, 1), **{"train.steps": STEPS, "train.log_every": 1,
                                                     "train.checkpoint_every": 3})
    again = pipeline.run(c, one_device_run)
    assert again.heldout == before.heldout and len(train_records(one_device_run)) == STEPS
    with open(os.path.join(one_device_run, "metrics.jsonl")) as f:
        kinds = [json.loads(line)["kind"] for line in f]
    assert kinds == ["train"] * STEPS + ["eval"]  # the final evaluation is not duplicated


def test_store_disagreeing_with_the_config_is_refused(store_path, tmp_path):
    with pytest.raises(CrossjaxError, match="data.d_model=32 but the store has d_model=16"):
        pipeline.run(tiny_config(store_path, **{"data.d_model": 32}), str(tmp_path / "a"))
    # another planted width at the same store path: the store itself refuses, and stays intact
    with pytest.raises(CrossjaxError, match="d_model"):
        pipeline.run(tiny_config(store_path, **{"planted.d_model": 32}), str(tmp_path / "b"))
    assert store_lib.ActivationStore.open(store_path).is_complete()
    assert store_lib.ActivationStore.open(store_path).meta.d_model == 16


def test_snapshot_store_must_hold_the_configured_snapshots(tmp_path):
    url = str(tmp_path / "store")
    meta = store_lib.StoreMeta(snapshots=("step0", "step8"), d_model=8, num_rows=16, block_rows=8,
                               dtype="float16", model="m", hook="blocks.1.hook_resid_post")
    st = store_lib.ActivationStore.create(url, meta)
    c = experiment("synthetic", "tiny")
    c.data.source = "snapshots"
    c.model.snapshots = ["step0", "step4"]
    c.model.hook = "blocks.1.hook_resid_post"
    with pytest.raises(CrossjaxError) as e:
        pipeline.check_store(c, st)
    assert "['step0', 'step4']" in str(e.value) and "['step0', 'step8']" in str(e.value)
    c.model.snapshots = ["step0", "step8"]
    with pytest.raises(CrossjaxError, match="incomplete"):  # nothing written yet
        pipeline.check_store(c, st)


# -------------------------------------------------------------------------------------------------- NaN


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(store_path, tmp_path):
    c = tiny_config(store_path, **{"train.lr": 1e30, "train.warmup_steps": 0, "train.checkpoint_every": 1,
                                   "train.log_every": 100, "train.async_checkpointing": False})
    with pytest.raises(CrossjaxError) as e:
        pipeline.run(c, str(tmp_path))
    msg = str(e.value)
    assert "NaN/Inf at training step" in msg and "Lower train.lr" in msg
    bad = int(msg.split("training step ")[1].split(";")[0])
    steps = ckpt_lib.Checkpoints(tmp_path / "checkpoints", keep=3).all_steps()
    assert steps and max(steps) == bad - 1 and f"last good checkpoint is step {bad - 1}" in msg
    # the kept checkpoint holds finite numbers
    import orbax.checkpoint as ocp
    state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(max(steps)) / "state")
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))
    assert not os.path.exists(tmp_path / "summary.json")


# -------------------------------------------------------------------------------------------------- recovery


def _truth(S=4, T=3, D=8):
    dirs = np.zeros((S, T, D), np.float32)
    dirs[:, np.arange(T), np.arange(T)] = 1.0                                  # true feature i points along e_i
    strengths = np.ones((S, T), np.float32)
    strengths[:, 2] = [0.0, 0.0, 0.5, 1.0]                                     # feature 2 emerges at snapshot 2
    return types.SimpleNamespace(directions=dirs, strengths=strengths,
                                 emergence_snapshot=np.array([-1, -1, 2], np.int32),
                                 kind=np.array(["persistent", "persistent", "emergent"]),
                                 rotation_snapshot=np.array([-1, -1, -1], np.int32))


def test_planted_recovery_on_a_hand_made_case():
    truth = _truth()
    S, T, D = truth.directions.shape
    a = np.deg2rad(30.0)
    W = np.zeros((S, 5, D))
    for i in range(T):   # learned feature i+1 = cos(a) e_i + sin(a) e_{i+4}; learned 0 and 4: unrelated
        W[:, i + 1, i], W[:, i + 1, i + 4] = np.cos(a), np.sin(a)
    W[:, 0, 7] = W[:, 4, 3] = 1.0
    W[:, 3] *= np.array([0.01, 0.3, 0.6, 1.0])[:, None]  # emergent feature's decoder norm crosses 0.5 at snapshot 2
    r = recovery.planted_recovery(W, truth, threshold=0.9, emergence_threshold=0.5)
    assert r["mean_max_cos"] == pytest.approx(np.cos(a))                     # feature 2 absent at 0, 1: skipped
    assert r["frac_above"] == 0.0                                            # cos 30 deg = 0.866 < 0.9
    assert r["emergence_accuracy"] == 1.0 and r["num_emergent"] == 1
    assert r["kind_agreement"] == 1.0 and "rotation" not in r             # the matches are persistent, emergent
    r = recovery.planted_recovery(W, truth, threshold=0.8, emergence_threshold=0.25)
    assert r["frac_above"] == 1.0 and r["emergence_accuracy"] == 0.0 and r["emergence_within_one"] == 1.0


def test_planted_rotation_and_kinds_by_hand():
    """True feature 1 turns from e1 to e2 at snapshot 2; feature 2 decays from the start (init_decay)."""
    S, D = 4, 4
    dirs = np.zeros((S, 3, D))
    dirs[:, 0, 0] = 1.0
    dirs[:2, 1, 1] = dirs[2:, 1, 2] = 1.0
    dirs[:, 2, 3] = 1.0
    strengths = np.ones((S, 3))
    strengths[:, 2] = [1.0, 0.3, 0.1, 0.05]
    truth = types.SimpleNamespace(directions=dirs, strengths=strengths, emergence_snapshot=np.full(3, -1),
                                  kind=np.array(["persistent", "persistent", "init_decay"]),
                                  rotation_snapshot=np.array([-1, 2, -1]))
    W = dirs * strengths[:, :, None]                     # the crosscoder learned the truth exactly
    r = recovery.planted_recovery(W, truth)
    assert r["kind_agreement"] == 1.0 and r["kind_agreement_by_kind"] == {"persistent": 1.0, "init_decay": 1.0}
    rot = r["rotation"]
    assert list(rot["by_planted_snapshot"]) == ["2"] and rot["by_planted_snapshot"]["2"]["sharpest_turn_at"] == 2
    assert rot["found"] == 1.0
    np.testing.assert_allclose(rot["by_planted_snapshot"]["2"]["consecutive_cosine"], [1.0, 0.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(rot["steady_consecutive_cosine"], [1.0, 1.0, 1.0], atol=1e-9)
    W[:, 2] = W[0, 2]                                    # now it does not decay: found persistent, planted init_decay
    assert recovery.planted_recovery(W, truth)["kind_agreement_by_kind"]["init_decay"] == 0.0
