"""Damaged stores are errors, never wrong numbers: a chunk deleted, flipped or truncated under its done marker,
NaN/Inf in a stored row, a bad scales.json; stores written before chunks had checksums still read as before."""
import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from _data_stores import row_values, write_store
from _files import tree_bytes
from crossjax import configs, pipeline, store_format
from crossjax.data import make_loader
from crossjax.errors import CrossjaxError
from crossjax.store import ActivationStore, DamagedStoreError, NotAStoreError, StoreMismatchError
from crossjax.store_integrity import all_finite
import _store_writer_proc as writer

R = 16  # block rows of the _data_stores stores
OLD_CODECS = (store_format.CODECS[0], {"name": "zstd", "configuration": {"level": 3, "checksum": False}})  # before checksums


def chunk(path, block, snapshot=None, name="activations"):
    return os.path.join(path, name, "c", str(block)) if snapshot is None else \
        os.path.join(path, name, "c", str(block), str(snapshot), "0")


def flip_byte(file):
    data = bytearray(open(file, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(file, "wb").write(bytes(data))


def truncate(file):
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])


@pytest.fixture
def store_path(tmp_path):
    path = str(tmp_path / "acts")
    write_store(path, num_rows=64)  # 4 blocks of 16 rows, snapshots step0..step3
    return path


def plant_values(path, rows, snapshot, value):
    """Write ``value`` into stored rows behind the store's back, as a store made elsewhere could hold them."""
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(path, "activations") + "/"}},
                  open=True).result()
    x = arr[rows.start:rows.stop, snapshot].read().result()
    x[:, 1] = value
    arr[rows.start:rows.stop, snapshot].write(x).result()


# ---- missing, changed and truncated chunks ----------------------------------------------------------------


@pytest.mark.parametrize("fault, problem", [(os.remove, "is missing"), (flip_byte, "fails its checksum"),
                                            (truncate, "is truncated or corrupt")])
def test_damaged_chunk_of_a_done_unit_is_an_error_naming_it(store_path, fault, problem):
    st = ActivationStore.open(store_path)
    good = st.read_rows(0, 64)
    fault(chunk(store_path, 2, 1))
    assert st.is_done(2, 1)  # the marker stays: the reader must not trust it blindly
    want = (rf"block 2 snapshot step1: chunk {re.escape(store_path)}/activations/c/2/1/0 {problem}.*"
            rf"delete the done marker\(s\) {re.escape(store_path)}/done/b000002_s001 and run python -m crossjax\.activations")
    for read in (lambda: st.read_rows(40, 50), lambda: st.read_blocks([3, 2, 0]), lambda: st.read_rows(0, 64),
                 lambda: st.estimate_scales()):
        with pytest.raises(DamagedStoreError, match=want):
            read()
    # the other units still read, with the same values as before
    np.testing.assert_array_equal(st.read_blocks([0, 1, 3]), np.concatenate([good[:32], good[48:]]))


def test_damaged_units_reach_the_loader_as_the_same_error(store_path):
    os.remove(chunk(store_path, 1, 3))
    flip_byte(chunk(store_path, 3, 0))
    st = ActivationStore.open(store_path)
    loader = make_loader(st, global_batch=16, seed=0, sharding=None, window_blocks=4, num_epochs=1)
    with pytest.raises(DamagedStoreError, match=r"2 unit\(s\) marked done cannot be read \(block 1 snapshot step3: "
                       r".* is missing; block 3 snapshot step0: .*(checksum|corrupt).*done/b000001_s003, .*done/b000003_s000"):
        next(loader)
    loader.close()


def test_damaged_token_chunk_names_the_tokens_unit(store_path):
    os.remove(chunk(store_path, 1, name="context_ids"))
    st = ActivationStore.open(store_path)
    with pytest.raises(DamagedStoreError, match=r"block 1 tokens: chunk .*/context_ids/c/1 is missing.*done/b000001_tokens"):
        st.read_tokens(10, 20)
    loader = make_loader(st, global_batch=16, seed=0, sharding=None, num_epochs=1, with_tokens=True)
    with pytest.raises(DamagedStoreError, match="block 1 tokens"):
        list(loader)
    st.read_rows(0, 64)  # the activations are intact


def test_the_fix_in_the_message_restores_the_original_bytes(tmp_path):
    path = str(tmp_path / "store")
    writer.write(path, 0, 1)  # writes the missing units, as the activation command does
    ref = tree_bytes(path)
    truncate(chunk(path, 3, 2))
    with pytest.raises(DamagedStoreError) as err:
        ActivationStore.open(path).read_rows(0, writer.META.num_rows)
    for marker_path in re.findall(r"delete the done marker\(s\) (\S+) and run", str(err.value)):
        os.remove(marker_path)
    writer.write(path, 0, 1)
    assert tree_bytes(path) == ref


# ---- stores written before chunks had checksums ------------------------------------------------------------


def test_store_without_checksums_opens_and_reads_as_before(tmp_path, monkeypatch):
    path = str(tmp_path / "old")
    with monkeypatch.context() as m:
        m.setattr(store_format, "CODECS", OLD_CODECS)
        old = write_store(path, num_rows=64)
        want = old.read_rows(0, 64)
    assert '"checksum":false' in open(os.path.join(path, "activations", "zarr.json")).read()
    before = tree_bytes(path)
    # create with the same meta (as every resumed command does) and open both accept it: same layout
    again = ActivationStore.create(path, old.meta)
    np.testing.assert_array_equal(again.read_rows(0, 64), want)
    np.testing.assert_array_equal(ActivationStore.open(path).read_blocks(range(4)), want)
    assert [b["acts"].shape for b in make_loader(again, global_batch=32, seed=0, sharding=None, num_epochs=1)] == [
        (32, 4, 4)] * 2
    assert tree_bytes(path) == before  # nothing rewritten
    # a missing chunk is found in old stores as well
    os.remove(chunk(path, 0, 0))
    with pytest.raises(DamagedStoreError, match="block 0 snapshot step0: .* is missing"):
        again.read_rows(0, 16)


def test_new_stores_carry_checksums_and_another_layout_is_still_refused(store_path, tmp_path):
    for name in ("activations", "token_ids", "context_ids", "positions"):
        codecs = json.load(open(os.path.join(store_path, name, "zarr.json")))["codecs"]
        assert [c["name"] for c in codecs] == ["bytes", "zstd"] and codecs[1]["configuration"]["checksum"] is True
    other = str(tmp_path / "other")
    shutil.copytree(store_path, other)
    meta = ActivationStore.open(other).meta
    zj = os.path.join(other, "activations", "zarr.json")
    d = json.load(open(zj))
    d["chunk_grid"]["configuration"]["chunk_shape"] = [8, 1, 4]
    json.dump(d, open(zj, "w"))
    with pytest.raises(StoreMismatchError, match="activations exists with another layout .*chunks \\[8, 1, 4\\]"):
        ActivationStore.create(other, meta)
    with pytest.raises(NotAStoreError, match="activations does not match meta.json"):
        ActivationStore.open(other)


@pytest.mark.parametrize("where", ["afile", "afile/store"])
def test_a_file_as_store_location_is_not_called_another_layout(tmp_path, where):
    (tmp_path / "afile").write_text("x")
    for make in (lambda url: ActivationStore.create(url, writer.META), ActivationStore.open):
        with pytest.raises(CrossjaxError, match=rf"store location {tmp_path}/{where} cannot be a store directory: "
                           rf"{tmp_path}/afile is a file\. Point store.path at a directory") as err:
            make(str(tmp_path / where))
        assert "another layout" not in str(err.value) and "delete" not in str(err.value)
    assert (tmp_path / "afile").read_text() == "x"


# ---- non-finite values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_are_named_by_block_snapshot_and_row(tmp_path, dtype, bad):
    path = str(tmp_path / "acts")
    st = write_store(path, num_rows=64, dtype=dtype)
    plant_values(path, range(37, 39), 2, bad)  # rows 37, 38 of block 2, snapshot step2
    want = (r"NaN or Inf activations in 2 \(row, snapshot\) pair\(s\): row 37 \(block 2, snapshot step2\), row 38 "
            rf"\(block 2, snapshot step2\)\. The data is bad.*done marker\(s\) {re.escape(path)}/done/b000002_s002 ")
    for read in (lambda: st.read_rows(30, 40), lambda: st.read_blocks([3, 2]), lambda: st.estimate_scales()):
        with pytest.raises(DamagedStoreError, match=want) as err:
            read()
        assert "lr" not in str(err.value)
    np.testing.assert_array_equal(st.read_rows(39, 64)[:, 2, 1], row_values(np.arange(39, 64), 2)[:, 1])


def test_non_finite_held_out_row_stops_the_held_out_loader(store_path):
    # held-out evaluation reads the last blocks with one stream and one epoch (crossjax.evals.heldout)
    plant_values(store_path, range(60, 61), 0, np.inf)
    st = ActivationStore.open(store_path)
    train = make_loader(st, global_batch=16, seed=0, sharding=None, blocks=range(3), num_epochs=1)
    assert len(list(train)) == 3  # the training blocks are clean
    heldout = make_loader(st, global_batch=8, seed=1, sharding=None, blocks=[3], num_epochs=1, streams=1)
    with pytest.raises(DamagedStoreError, match=r"row 60 \(block 3, snapshot step0\)"):
        list(heldout)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_all_finite_agrees_with_isfinite(dtype):
    info = ml_dtypes.finfo(dtype)
    edge = np.array([0.0, -0.0, float(info.max), -float(info.max), float(info.tiny), float(info.smallest_subnormal),
                     -1.5, 3.0], np.float32).astype(dtype)
    x = np.random.default_rng(0).standard_normal(300_000).astype(dtype)
    x[:len(edge)] = edge
    assert all_finite(x.reshape(1000, 300)) and all_finite(edge)
    for bad in (np.inf, -np.inf, np.nan, -np.nan):
        for at in (0, 262_143, 262_144, 299_999):  # first, last of the first scan piece, first of the next, last
            y = x.copy()
            y[at] = bad
            assert not all_finite(y), (bad, at)
            assert bool(np.isfinite(y.astype(np.float32)).all()) is False


# ---- scales.json ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, problem", [
    (b'{"snapshots": ["step0", "step1", "ste', "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[1, 2]", "no list 'scales'"),
    (b'{"snapshots": ["step0", "step1", "step2", "step3"], "scales": [1, 2, 3]}', "3 scales for 4 snapshots"),
    (b'{"snapshots": ["a", "b", "c", "d"], "scales": [1, 2, 3, 4]}', "is for snapshots"),
    (b'{"snapshots": ["step0", "step1", "step2", "step3"], "scales": [1, NaN, 3, 4]}', "step1: nan"),
    (b'{"snapshots": ["step0", "step1", "step2", "step3"], "scales": [1, 2, -3, 4]}', "step2: -3"),
    (b'{"snapshots": ["step0", "step1", "step2", "step3"], "scales": [0, 2, 3, 4]}', "step0: 0"),
    (b'{"snapshots": ["step0", "step1", "step2", "step3"], "scales": [1, "2", 3, 4]}', "step1: '2'"),
    (b'{"snapshots": ["step0", "step1", "step2", "step3"], "scales": [1, 2, 3, 1e300]}', "float32 turns"),
])
def test_bad_scales_json_is_caught_before_training(store_path, content, problem):
    scales_file = os.path.join(store_path, "scales.json")
    with open(scales_file, "wb") as f:
        f.write(content)
    config = configs.base_config()
    with pytest.raises(DamagedStoreError, match=rf"{re.escape(scales_file)} .*{re.escape(problem)}.*derived data: "
                       "delete it and run the same command again"):
        pipeline.ensure_scales(config, ActivationStore.open(store_path))
    os.remove(scales_file)  # the fix the message gives: the scales are estimated and saved again
    st = ActivationStore.open(store_path)
    scales = pipeline.ensure_scales(config, st)
    np.testing.assert_array_equal(ActivationStore.open(store_path).scales, scales)


@pytest.mark.parametrize("scales_saved", [False, True])
def test_inf_in_a_held_out_row_stops_the_run_with_the_row_named(tmp_path, scales_saved):
    from _trainer_util import tiny_config
    from crossjax import planted

    c = tiny_config(tmp_path / "store", **{"train.steps": 2, "train.checkpoint_every": 0, "train.eval_every": 0})
    st = planted.ensure_planted(c.planted, str(tmp_path / "store"))
    if scales_saved:  # the run reads the held-out rows only in the held-out evaluation, after training
        st.set_scales(st.estimate_scales(num_rows=st.block_range(0)[1]))
    last = st.meta.num_blocks - 1  # held out (train.heldout_blocks >= 1)
    row = st.block_range(last)[0] + 3
    plant_values(str(tmp_path / "store"), range(row, row + 1), 1, np.inf)
    with pytest.raises(DamagedStoreError, match=rf"row {row} \(block {last}, snapshot planted_1\).*"
                       "generate_planted") as err:
        pipeline.run(c, str(tmp_path / "run"))
    assert "lr" not in str(err.value)
    assert not (tmp_path / "run" / "summary.json").exists()
    stages = [frame.name for frame in err.traceback]
    assert ("evaluate_params" in stages) == scales_saved and ("estimate_scales" in stages) != scales_saved
