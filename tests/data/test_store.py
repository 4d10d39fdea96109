"""The activation store: round trip, crash safety, concurrent writers, bad input, scales."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import uuid

import ml_dtypes
import numpy as np
import pytest

from _procs import child_env, reaped, sigkill
from crossjax import configs
from crossjax import store as store_lib
from _files import tree_bytes
from crossjax.errors import CrossjaxError
from crossjax.store import (
    ActivationStore,
    IncompleteStoreError,
    NotAStoreError,
    StoreMeta,
    StoreMismatchError,
    UnitDoneError,
)

HERE = os.path.dirname(os.path.abspath(__file__))
WRITER = os.path.join(HERE, "_store_writer_proc.py")
sys.path.insert(0, HERE)
import _store_writer_proc as writer  # noqa: E402

META = writer.META


def run_writer(url, *args, check=True):
    env = child_env(1, PYTHONPATH=os.path.dirname(os.path.dirname(HERE)))
    return subprocess.run([sys.executable, WRITER, url, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, check=check)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A store written in one go by one process, and its file bytes."""
    path = str(tmp_path_factory.mktemp("ref") / "store")
    writer.write(path, 0, 1)
    return path, tree_bytes(path)


def small_meta(**kw):
    base = dict(snapshots=("a", "b"), d_model=4, num_rows=10, block_rows=4, dtype="float16", model="m", hook="h")
    base.update(kw)
    return StoreMeta(**base)


def mem_url():
    return f"memory://t{uuid.uuid4().hex}"


# ---- round trip -----------------------------------------------------------------------------------------


def test_round_trip_rows_blocks_tokens(reference):
    path, _ = reference
    st = ActivationStore.open(path)
    assert st.meta == META and st.is_complete() and st.missing_units() == []
    n, r = META.num_rows, META.block_rows
    # Independent reference: rebuild every row from the unit generator, cast like the store.
    want = np.zeros((n, META.num_snapshots, META.d_model), np.float16)
    tok = np.zeros((3, n), np.int64)
    for b in range(META.num_blocks):
        a, z = b * r, min((b + 1) * r, n)
        for s in range(META.num_snapshots):
            want[a:z, s] = writer.unit_acts(b, s, z - a).astype(np.float16)
        tok[:, a:z] = writer.unit_tokens(b, a, z)
    got = st.read_rows(0, n)
    assert got.dtype == np.float16 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    # Alignment across snapshots: row k of snapshot s is row k of unit (k // R, s).
    np.testing.assert_array_equal(st.read_rows(13, 30), want[13:30])
    blocks = [5, 0, 3]  # block 5 is the short last block (rows 40..44)
    assert st.block_range(5) == (40, 45)
    np.testing.assert_array_equal(st.read_blocks(blocks), np.concatenate([want[40:45], want[0:8], want[24:32]]))
    t = st.read_tokens(3, 20)
    assert all(v.dtype == np.int32 for v in t.values())
    np.testing.assert_array_equal(t["token_ids"], tok[0, 3:20])
    np.testing.assert_array_equal(t["context_ids"], np.arange(3, 20) // 9)
    np.testing.assert_array_equal(t["positions"], np.arange(3, 20) % 9)


def test_bfloat16_memory_url_and_reopen():
    url = mem_url()
    meta = small_meta(dtype="bfloat16")
    st = ActivationStore.create(url, meta)
    x = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    st.write_block(0, "b", x)
    st.write_block(0, "a", -x)
    got = ActivationStore.open(url).read_rows(0, 4)[:, 1]
    assert got.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got, x.astype(ml_dtypes.bfloat16))
    assert ActivationStore.create(url, meta).is_done(0, 1)  # create on an equal meta reopens it


def test_file_url_same_store_as_path(tmp_path):
    st = ActivationStore.create(str(tmp_path / "s"), small_meta())
    st.write_block(2, 0, np.full((2, 4), 3.0, np.float32))
    st.write_block(2, 1, np.zeros((2, 4), np.float32))
    again = ActivationStore.open("file://" + str(tmp_path / "s"))
    assert again.is_done(2, "a") and again.is_done(2, "b") and not again.is_done(2) and not again.is_done(1, 0)
    np.testing.assert_array_equal(again.read_rows(8, 10)[:, 0], np.full((2, 4), 3.0, np.float16))


# ---- crash safety and concurrency ---------------------------------------------------------------------


def test_sigkill_before_marker_then_resume_is_byte_identical(tmp_path, reference):
    _, ref = reference
    path = str(tmp_path / "store")
    # The 6th unit's chunk is written, then the process dies before its marker.
    res = run_writer(path, 0, 1, "--die-before-marker", 5, check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert res.stdout.count("unit ") == 5
    st = ActivationStore.open(path)
    assert len(st.missing_units()) == META.num_blocks * 4 - 5
    # The unmarked unit's chunk is on disk: the resume must redo it, not trust it.
    assert os.path.exists(os.path.join(path, "activations", "c", "1", "0", "0"))
    with pytest.raises(IncompleteStoreError, match="unfinished"):
        st.read_rows(8, 16)
    # What a kill inside the kvstore's write leaves: a partly written lock file beside the chunk.
    os.makedirs(os.path.join(path, "activations", "c", "1", "1"))
    with open(os.path.join(path, "activations", "c", "1", "1", "0.__lock"), "wb") as f:
        f.write(b"\x28\xb5torn")
    run_writer(path, 0, 1)
    assert tree_bytes(path) == ref


def test_sigkill_from_outside_mid_run_then_resume(tmp_path, reference):
    _, ref = reference
    path = str(tmp_path / "store")
    env = child_env(1, PYTHONPATH=os.path.dirname(os.path.dirname(HERE)))
    proc = subprocess.Popen([sys.executable, WRITER, path, "0", "1", "--sleep", "0.02"], stdout=subprocess.PIPE,
                            text=True, env=env)
    with reaped(proc):
        for _ in range(7):
            assert proc.stdout.readline().startswith("unit ")
        sigkill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not ActivationStore.open(path).is_complete()
    run_writer(path, 0, 1)
    assert tree_bytes(path) == ref


def test_two_processes_disjoint_blocks_equal_one_process(tmp_path, reference):
    _, ref = reference
    path = str(tmp_path / "store")
    env = child_env(1, PYTHONPATH=os.path.dirname(os.path.dirname(HERE)))
    procs = [subprocess.Popen([sys.executable, WRITER, path, str(i), "2"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    blocks = [{int(line.split()[1]) for line in out.splitlines()} for out, _ in outs]
    assert blocks == [{0, 2, 4}, {1, 3, 5}]
    assert tree_bytes(path) == ref


# ---- bad input ------------------------------------------------------------------------------------------


def test_open_not_a_store(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(NotAStoreError, match="no meta.json"):
        ActivationStore.open(str(tmp_path))
    with pytest.raises(NotAStoreError):
        ActivationStore.open(str(tmp_path / "does_not_exist"))
    # create refuses a non-empty location that is not a store, and writes nothing there.
    with pytest.raises(CrossjaxError, match="not empty"):
        ActivationStore.create(str(tmp_path), small_meta())
    assert os.listdir(tmp_path) == ["x.txt"]


def test_create_over_other_meta_touches_nothing(tmp_path):
    path = str(tmp_path / "s")
    st = ActivationStore.create(path, small_meta())
    st.write_block(0, 0, np.ones((4, 4), np.float32))
    before = tree_bytes(path)
    with pytest.raises(StoreMismatchError, match=r"d_model: stored 4, requested 8.*another store.path"):
        ActivationStore.create(path, small_meta(d_model=8))
    with pytest.raises(StoreMismatchError, match="snapshots"):
        ActivationStore.create(path, small_meta(snapshots=("a", "c")))
    assert tree_bytes(path) == before


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused_and_nothing_written(tmp_path, bad):
    path = str(tmp_path / "s")
    st = ActivationStore.create(path, small_meta())
    good = np.ones((4, 4), np.float32)
    st.write_block(1, 1, good, overwrite=False)
    before = tree_bytes(path)
    x = np.zeros((4, 4), np.float32)
    x[1, 2] = x[3, 0] = bad
    with pytest.raises(CrossjaxError, match=r"block 0 snapshot 1 \(b\): 2 of 16 values are NaN or Inf"):
        st.write_block(0, 1, x)
    with pytest.raises(CrossjaxError, match="block 1 snapshot 1"):
        st.write_block(1, 1, x, overwrite=True)  # even with overwrite, the finished unit stays as it was
    assert tree_bytes(path) == before
    assert not st.is_done(0, 1) and st.is_done(1, 1)


def test_float16_overflow_refused(tmp_path):
    st = ActivationStore.create(str(tmp_path / "s"), small_meta())
    with pytest.raises(CrossjaxError, match="overflow float16.*bfloat16"):
        st.write_block(0, 0, np.full((4, 4), 1e5, np.float32))
    assert not st.is_done(0, 0)


def test_wrong_shape_and_indices(tmp_path):
    st = ActivationStore.create(str(tmp_path / "s"), small_meta())
    with pytest.raises(CrossjaxError, match=r"shape \(4, 5\), expected \(4, 4\)"):
        st.write_block(0, 0, np.zeros((4, 5), np.float32))
    with pytest.raises(CrossjaxError, match=r"expected \(2, 4\)"):
        st.write_block(2, 0, np.zeros((4, 4), np.float32))  # last block holds 2 rows
    with pytest.raises(CrossjaxError, match="out of range"):
        st.write_block(3, 0, np.zeros((4, 4), np.float32))
    with pytest.raises(CrossjaxError, match="'zz' is not one of the snapshots of the store"):
        st.write_block(0, "zz", np.zeros((4, 4), np.float32))
    with pytest.raises(CrossjaxError, match="token_ids has shape"):
        st.write_tokens(0, np.zeros(3, np.int64), np.zeros(4, np.int64), np.zeros(4, np.int64))
    with pytest.raises(CrossjaxError, match="int32"):
        st.write_tokens(0, np.full(4, 2**40), np.zeros(4, np.int64), np.zeros(4, np.int64))
    assert len(st.missing_units()) == 9


def test_rewrite_done_unit_needs_overwrite(tmp_path):
    st = ActivationStore.create(str(tmp_path / "s"), small_meta())
    st.write_block(0, 0, np.ones((4, 4), np.float32))
    st.write_tokens(0, np.arange(4), np.zeros(4, int), np.arange(4))
    with pytest.raises(UnitDoneError, match="overwrite=True"):
        st.write_block(0, 0, np.zeros((4, 4), np.float32))
    with pytest.raises(UnitDoneError):
        st.write_tokens(0, np.arange(4), np.zeros(4, int), np.arange(4))
    st.write_block(0, 0, np.full((4, 4), 2.0, np.float32), overwrite=True)
    st.write_block(0, 1, np.zeros((4, 4), np.float32))
    np.testing.assert_array_equal(st.read_rows(0, 4)[:, 0], np.full((4, 4), 2.0, np.float16))


def test_empty_and_incomplete_reads(tmp_path):
    st = ActivationStore.create(str(tmp_path / "s"), small_meta())
    with pytest.raises(IncompleteStoreError, match="empty"):
        st.read_rows(0, 4)
    with pytest.raises(IncompleteStoreError, match="empty"):
        st.estimate_scales(4)
    st.write_block(0, 0, np.ones((4, 4), np.float32))
    with pytest.raises(IncompleteStoreError, match="block 0 snapshot b"):
        st.read_rows(0, 4)
    with pytest.raises(IncompleteStoreError, match="unfinished"):
        st.read_tokens(0, 4)
    # the whole store: every missing unit by name, in block order, and the command that writes them
    with pytest.raises(IncompleteStoreError, match=r"8 unfinished unit\(s\) \(block 0 tokens, block 0 snapshot b, "
                       r"block 1 tokens, .*, block 2 snapshot b\)\. Fill them with python -m crossjax\.activations"):
        st.require_complete()
    st.require_complete([0], tokens=False, activations=False)  # asks for nothing
    with pytest.raises(CrossjaxError, match="non-empty range"):
        st.read_rows(4, 4)
    with pytest.raises(CrossjaxError, match="num_rows=0"):
        small_meta(num_rows=0)


def test_meta_validation():
    with pytest.raises(CrossjaxError, match="repeats"):
        small_meta(snapshots=("a", "a"))
    with pytest.raises(CrossjaxError, match="non-empty"):
        small_meta(snapshots=("a", ""))
    with pytest.raises(CrossjaxError, match="d_model"):
        small_meta(d_model=0)
    with pytest.raises(CrossjaxError, match="dtype"):
        small_meta(dtype="float32")
    with pytest.raises(CrossjaxError, match="block_rows"):
        small_meta(block_rows=-1)
    m = small_meta(snapshot_hashes=("h1", "h2"), extra={"tok": [1, 2]}, context_len=5)
    assert StoreMeta.from_json(m.to_json()) == m
    assert m.num_blocks == 3 and m.num_snapshots == 2


# ---- scales ---------------------------------------------------------------------------------------------


def test_scales_estimate_and_persist(tmp_path):
    path = str(tmp_path / "s")
    meta = small_meta(num_rows=10, block_rows=4)
    st = ActivationStore.create(path, meta)
    rng = np.random.default_rng(1)
    full = rng.standard_normal((10, 2, 4)).astype(np.float16) * np.array([1.0, 5.0], np.float16)[None, :, None]
    for b in range(3):
        a, z = st.block_range(b)
        for s in range(2):
            st.write_block(b, s, full[a:z, s])
        st.write_tokens(b, np.arange(a, z), np.arange(a, z), np.zeros(z - a, int))
    assert st.scales is None
    est = st.estimate_scales(num_rows=6)
    # Closed form over the first 6 rows.
    want = 2.0 / np.mean(np.linalg.norm(full[:6].astype(np.float64), axis=-1), axis=0)
    np.testing.assert_allclose(est, want, rtol=1e-5)
    np.testing.assert_allclose(st.estimate_scales(), 2.0 / np.mean(np.linalg.norm(full.astype(np.float64), axis=-1), 0), rtol=1e-5)
    st.set_scales(est)
    np.testing.assert_array_equal(ActivationStore.open(path).scales, est.astype(np.float32))
    assert json.loads(open(os.path.join(path, "scales.json")).read())["snapshots"] == ["a", "b"]
    with pytest.raises(CrossjaxError, match="one scale per snapshot"):
        st.set_scales([1.0])
    with pytest.raises(CrossjaxError, match="finite and positive"):
        st.set_scales([1.0, 0.0])


def test_config_and_url_resolution():
    cfg = configs.store_config()
    assert (cfg.path, cfg.block_rows, cfg.dtype) == ("store", 4096, "float16")
    assert store_lib.resolve_url("store", "/w") == "/w/store"
    assert store_lib.resolve_url("gs://b/x", "/w") == "gs://b/x"
    assert store_lib.resolve_url("/abs/x", "/w") == "/abs/x"
    assert dataclasses.replace(small_meta(), num_rows=9).num_blocks == 3
    assert dataclasses.replace(small_meta(), num_rows=8).num_blocks == 2
