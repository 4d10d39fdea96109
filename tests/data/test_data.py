"""The grain data pipeline against the store's own reads, a hand-computed epoch rule, and its own restarts."""

import json
import os
import subprocess
import sys

import grain
import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from _procs import child_env, free_port
from _data_stores import row_values, write_store
from crossjax.data import make_loader
from crossjax.errors import CrossjaxError
from crossjax.store import ActivationStore

R = 16  # block rows of the test stores


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """12 full blocks of 16 rows, 4 snapshots, d_model 4."""
    return write_store(str(tmp_path_factory.mktemp("store") / "acts"))


@pytest.fixture(scope="module")
def short_store(tmp_path_factory):
    """12 blocks, the last one 11 rows long (187 rows)."""
    return write_store(str(tmp_path_factory.mktemp("short") / "acts"), num_rows=187)


def batch_rows(batch):
    """Store rows of a numpy batch, read back from the planted content."""
    return np.asarray(batch["acts"][:, 0, 0], np.float32).astype(np.int64)


def check_rows_match_store(store, batch):
    """Every row of the batch equals the store's own read of that row, in every snapshot."""
    rows = batch_rows(batch)
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(batch["acts"][i], store.read_rows(int(r), int(r) + 1)[0])
    if "token_ids" in batch:
        for i, r in enumerate(rows):
            t = store.read_tokens(int(r), int(r) + 1)
            assert (batch["token_ids"][i], batch["context_ids"][i], batch["positions"][i]) == (
                t["token_ids"][0], t["context_ids"][0], t["positions"][0])


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]))


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_an_epoch_is_a_permutation_of_the_store_rows(store, streams):
    loader = make_loader(store, global_batch=48, seed=0, sharding=None, window_blocks=3, num_epochs=1,
                         with_tokens=True, streams=streams)
    batches = list(loader)
    assert len(batches) == loader.batches_per_epoch == 4  # 192 rows / 48
    for b in batches:
        assert b["acts"].shape == (48, 4, 4) and b["acts"].dtype == np.float16
        check_rows_match_store(store, b)
    rows = np.concatenate([batch_rows(b) for b in batches])
    np.testing.assert_array_equal(np.sort(rows), np.arange(192))
    assert not np.array_equal(rows, np.arange(192))  # shuffled


def test_partial_epochs_skip_the_tail_and_never_repeat_a_row(short_store):
    # 187 rows, blocks of 16, the last of 11. Two streams of 6 blocks: the worst stream holds 5*16 + 11 = 91 rows,
    # so each epoch has 91 // 12 = 7 batches of 24 (12 rows per stream): 168 of the 187 rows.
    loader = make_loader(short_store, global_batch=24, seed=5, sharding=None, window_blocks=2, num_epochs=3,
                         streams=2)
    assert loader.batches_per_epoch == 7
    batches = list(loader)
    assert len(batches) == 21
    epochs = [np.concatenate([batch_rows(b) for b in batches[e * 7:(e + 1) * 7]]) for e in range(3)]
    for rows in epochs:
        assert len(rows) == 168 and len(np.unique(rows)) == 168 and rows.max() < 187
    assert len({tuple(np.sort(r)) for r in epochs}) == 3  # other rows are skipped each epoch
    check_rows_match_store(short_store, batches[6])  # the last batch of an epoch
    # One stream: 187 // 24 = 7 batches as well, here from a single shuffled stream.
    assert make_loader(short_store, global_batch=24, seed=5, sharding=None, streams=1).batches_per_epoch == 7


def test_same_seed_same_order_other_seed_other_order(store):
    def rows(seed, prefetch=2):
        ld = make_loader(store, global_batch=32, seed=seed, sharding=None, window_blocks=3, num_epochs=2,
                         prefetch=prefetch)
        return np.stack([batch_rows(b) for b in ld])

    a = rows(7)
    np.testing.assert_array_equal(a, rows(7, prefetch=0))
    ld = make_loader(store, global_batch=32, seed=7, sharding=None, window_blocks=3, num_epochs=2)
    list(ld)
    windows = ld.blocks_read  # 4 windows per epoch
    assert len(windows) == 8 and windows[:4] != windows[4:]  # each epoch deals the blocks anew
    assert not np.array_equal(a, rows(8))
    assert not np.array_equal(a[:6], a[6:])  # the second epoch has its own order
    np.testing.assert_array_equal(np.sort(a[:6].ravel()), np.sort(a[6:].ravel()))


def test_windows_mix_blocks_and_contexts_into_every_batch(store):
    loader = make_loader(store, global_batch=32, seed=1, sharding=None, window_blocks=4, num_epochs=1,
                         with_tokens=True)
    for b in loader:
        rows = batch_rows(b)
        assert len(np.unique(rows // R)) >= 3  # 32 rows drawn from a 4-block window
        assert len(np.unique(b["context_ids"])) >= 2
        assert not np.all(np.diff(rows) > 0)
    windows = loader.blocks_read
    assert sorted(b for w in windows for b in w) == list(range(12)) and all(len(w) == 4 for w in windows)
    assert any(sorted(w) != list(range(min(w), min(w) + 4)) for w in windows)  # blocks come from all over the store
    # One block per window: every batch of one block's size is that block only.
    for b in make_loader(store, global_batch=16, seed=1, sharding=None, window_blocks=1, num_epochs=1):
        assert len(np.unique(batch_rows(b) // R)) == 1


def test_next_window_is_read_ahead_and_old_windows_released(store):
    loader = make_loader(store, global_batch=16, seed=2, sharding=None, window_blocks=3, num_epochs=2, prefetch=0)
    next(loader)  # first of the 3 batches of window 0
    assert len(loader.blocks_read) == 2  # window 0 and, already, window 1
    for _ in range(10):
        next(loader)
        assert len(loader._windows._futures) <= 2
    assert len(loader.blocks_read) == 5  # 4 windows of epoch 0 and the first of epoch 1


def test_blocks_restrict_the_rows(store):
    loader = make_loader(store, global_batch=16, seed=0, sharding=None, blocks=range(9), window_blocks=2,
                         num_epochs=1)
    rows = np.concatenate([batch_rows(b) for b in loader])
    np.testing.assert_array_equal(np.sort(rows), np.arange(9 * R))
    held_out = make_loader(store, global_batch=16, seed=0, sharding=None, blocks=[9, 10, 11], num_epochs=1)
    rows = np.concatenate([batch_rows(b) for b in held_out])
    np.testing.assert_array_equal(np.sort(rows), np.arange(9 * R, 12 * R))


@pytest.mark.parametrize("k", [2, 4, 5, 9])  # mid-epoch, at the boundary, just after, in the last epoch
def test_restored_state_continues_with_exactly_the_next_batches(store, k):
    def loader():
        return make_loader(store, global_batch=48, seed=4, sharding=None, window_blocks=2, num_epochs=3,
                           with_tokens=True, streams=2)

    reference = list(loader())
    assert len(reference) == 12
    first = loader()
    assert_same_batches(take(first, k), reference[:k])
    state = json.loads(json.dumps(first.get_state()))
    assert state["next_index"] == k
    second = loader()
    second.set_state(state)
    assert second.position == divmod(k, 4)
    assert_same_batches(list(second), reference[k:])
    # Going back on a loader that has run ahead also works.
    first.set_state(json.loads(json.dumps(state)))
    assert_same_batches(list(first), reference[k:])


def test_state_from_another_order_is_refused(store):
    a = make_loader(store, global_batch=32, seed=0, sharding=None, num_epochs=1)
    next(a)
    state = a.get_state()
    other = make_loader(store, global_batch=32, seed=1, sharding=None, num_epochs=1)
    with pytest.raises(CrossjaxError, match="seed: saved 0, now 1"):
        other.set_state(state)
    with pytest.raises(CrossjaxError, match="outside"):
        a.set_state({**state, "next_index": 99})
    with pytest.raises(CrossjaxError, match="not written by"):
        a.set_state({"next_index": 1})
    assert batch_rows(next(other)).shape == (32,)  # the refused loader still works


def test_orbax_round_trip_of_the_iterator_state(store, tmp_path):
    def loader():
        return make_loader(store, global_batch=32, seed=9, sharding=None, window_blocks=3, num_epochs=2)

    reference = list(loader())
    run = loader()
    take(run, 7)
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(run)))
    manager.wait_until_finished()
    saved = json.loads((tmp_path / "ckpt" / "7" / "data" / "process_0-of-1.json").read_text())
    assert saved["next_index"] == 7
    restored = loader()
    manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_same_batches(list(restored), reference[7:])
    manager.close()


def test_batches_are_global_arrays_with_the_requested_sharding(store):
    mesh = jax.make_mesh((4, 2), ("data", "snapshot"), axis_types=(AxisType.Auto,) * 2)
    sharding = NamedSharding(mesh, P("data", "snapshot", None))
    sharded = make_loader(store, global_batch=32, seed=3, sharding=sharding, window_blocks=3, num_epochs=1,
                          with_tokens=True)
    plain = make_loader(store, global_batch=32, seed=3, sharding=None, window_blocks=3, num_epochs=1,
                        with_tokens=True)
    for a, b in zip(sharded, plain, strict=True):
        x = a["acts"]
        assert isinstance(x, jax.Array) and x.shape == (32, 4, 4) and x.dtype == np.float16
        assert x.sharding == sharding
        assert {s.data.shape for s in x.addressable_shards} == {(8, 2, 4)}
        assert a["token_ids"].sharding == NamedSharding(mesh, P("data"))
        assert_same_batches([{k: np.asarray(v) for k, v in a.items()}], [b])


def test_bfloat16_store_keeps_its_dtype(tmp_path):
    st = write_store(str(tmp_path / "bf16"), num_rows=64, dtype="bfloat16")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    batch = next(make_loader(st, global_batch=16, seed=0, sharding=NamedSharding(mesh, P("data")), num_epochs=1))
    assert batch["acts"].dtype == jax.numpy.bfloat16
    rows = np.asarray(batch["acts"][:, 0, 0], np.float32).astype(int)
    expected = np.stack([row_values(rows, s) for s in range(4)], 1).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(batch["acts"]), expected)


def test_bad_settings_raise_clear_errors(store):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    cases = [
        (dict(global_batch=12, sharding=NamedSharding(mesh, P("data", None, None))), "not divisible by the 8 devices"),
        (dict(global_batch=32, streams=3), "not divisible by streams=3"),
        (dict(global_batch=256), "larger than the data"),
        (dict(global_batch=96, streams=3, blocks=range(5)), "larger than the data"),
        (dict(blocks=[99]), "outside this store's blocks 0..11"),
        (dict(blocks=[]), "blocks is empty"),
        (dict(blocks=[1, 1]), "repeats"),
        (dict(blocks=[0.5]), "block indices"),
        (dict(window_blocks=0), "window_blocks=0"),
        (dict(seed=-1), "seed=-1"),
        (dict(num_epochs=0), "num_epochs=0"),
        (dict(sharding="data"), "not a jax.sharding.Sharding"),
    ]
    for overrides, message in cases:
        kwargs = dict(global_batch=16, seed=0, sharding=None) | overrides
        with pytest.raises(CrossjaxError, match=message):
            make_loader(store, **kwargs)
    with pytest.raises(CrossjaxError, match="ActivationStore"):
        make_loader("/some/path", global_batch=16, seed=0, sharding=None)


def test_snapshot_subset_by_name_or_index(store):
    def loader(snapshots):
        return make_loader(store, global_batch=32, seed=0, sharding=None, num_epochs=1, snapshots=snapshots)

    batches = list(loader([3, 1]))
    assert_same_batches(batches, list(loader(["step3", 1])))
    np.testing.assert_array_equal(batches[0]["acts"], next(loader(None))["acts"][:, [3, 1]])
    for bad, why in (([1, "step1"], "listed twice"), (["step9"], "not one of"), ([], "none is given")):
        with pytest.raises(CrossjaxError, match=why):
            loader(bad)


def test_incomplete_store_names_missing_units_and_the_fix(tmp_path):
    st = write_store(str(tmp_path / "partial"), num_rows=96, skip=((3, 1), (4, None)))
    with pytest.raises(CrossjaxError, match=r"block 3 snapshot step1.*python -m crossjax.activations") as e:
        make_loader(st, global_batch=16, seed=0, sharding=None)
    assert "tokens" not in str(e.value)  # token units only matter when tokens are asked for
    with pytest.raises(CrossjaxError, match=r"block 3 snapshot step1, block 4 tokens"):
        make_loader(st, global_batch=16, seed=0, sharding=None, with_tokens=True)
    # The finished blocks alone are usable, and opening the loader wrote nothing.
    ok = make_loader(ActivationStore.open(st.url), global_batch=16, seed=0, sharding=None, blocks=[0, 1, 2, 5],
                     num_epochs=1, with_tokens=True)
    assert len(list(ok)) == 4
    assert st.missing_units() == [(3, 1), (4, None)]


def _merged(a, b):
    """The global value of two processes' views (NaN where the other process holds it); each value held once."""
    mine = [~np.isnan(a), ~np.isnan(b)]
    assert not np.any(mine[0] & mine[1]) and np.all(mine[0] | mine[1])
    return np.where(mine[0], a, b)


def test_two_processes_build_the_single_process_batches(store, tmp_path):
    """Default settings: the same batches on one process and on two (on two meshes), and a loader position saved
    on either process count continues on the other with the batches that come next."""
    script = os.path.join(os.path.dirname(__file__), "_data_two_process.py")

    def default(**kw):  # the settings of _data_two_process.py, no stream count given
        return make_loader(store, global_batch=32, seed=3, sharding=None, window_blocks=2, num_epochs=2, **kw)

    single = list(default(with_tokens=True))
    acts = np.stack([b["acts"] for b in single]).astype(np.float32)
    one = default()
    take(one, 7)
    position = tmp_path / "position.json"
    position.write_text(json.dumps(one.get_state()))   # saved by one process after 7 batches

    port = free_port()
    env = child_env(None)          # each process sets its own 4 devices
    outs = [str(tmp_path / f"p{i}.npz") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, script, str(port), str(i), store.url, outs[i], str(position)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    res = [np.load(o) for o in outs]

    merged = _merged(res[0]["acts"], res[1]["acts"])
    np.testing.assert_array_equal(merged, acts)
    # Split by snapshot instead: each process holds every row of half the snapshots (first epoch only).
    held = [~np.isnan(r["acts_by_snapshot"]) for r in res]
    assert np.all(held[0][:, :, :2]) or np.all(held[0][:, :, 2:])
    np.testing.assert_array_equal(_merged(res[0]["acts_by_snapshot"], res[1]["acts_by_snapshot"]), acts[:6])
    tok = np.where(res[0]["token_ids"] >= 0, res[0]["token_ids"], res[1]["token_ids"])
    np.testing.assert_array_equal(tok, np.stack([b["token_ids"] for b in single]))
    for r in res:
        assert bool(r["shardings_ok"])
        assert "not divisible by the 2 processes" in str(r["odd_batch_error"])
    np.testing.assert_array_equal(np.sort(np.concatenate([r["local_rows"] for r in res])), np.arange(32))

    # 1 -> 2 processes: the position saved above continues with batch 7 on.
    np.testing.assert_array_equal(_merged(res[0]["acts_resumed"], res[1]["acts_resumed"]), acts[7:])
    # 2 -> 1: both processes saved the same position after 5 batches; one process continues from it.
    saved = [json.loads(str(r["position"])) for r in res]
    assert saved[0] == saved[1] and (saved[0]["next_index"], saved[0]["epoch"], saved[0]["batch"]) == (5, 0, 5)
    back = default()
    back.set_state(saved[0])
    np.testing.assert_array_equal(np.stack([b["acts"] for b in back]).astype(np.float32), acts[5:])

    # Two streams, as one process builds them; each process read only its own stream's windows: per epoch,
    # disjoint halves of the store.
    two_streams = list(default(streams=2))
    np.testing.assert_array_equal(_merged(res[0]["acts_streams"], res[1]["acts_streams"]),
                                  np.stack([b["acts"] for b in two_streams]).astype(np.float32))
    reads = [json.loads(str(r["reads"])) for r in res]
    assert [len(x) for x in reads] == [6, 6]  # 3 windows of 2 blocks per stream and epoch, 2 epochs
    for epoch in range(2):
        halves = [{b for w in x[3 * epoch:3 * epoch + 3] for b in w} for x in reads]
        assert not halves[0] & halves[1] and halves[0] | halves[1] == set(range(12))
    # Three streams on two processes (the middle one split between them): the one-process batches.
    uneven = make_loader(store, global_batch=48, seed=3, sharding=None, window_blocks=2, num_epochs=1, streams=3)
    np.testing.assert_array_equal(_merged(res[0]["acts_uneven"], res[1]["acts_uneven"]),
                                  np.stack([b["acts"] for b in uneven]).astype(np.float32))
