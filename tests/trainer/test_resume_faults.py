"""Resuming from a damaged workdir: a torn or damaged metrics.jsonl, a truncated, emptied or partly missing latest
checkpoint, no checkpoint that restores, a checkpoint holding NaN. Each test damages a copy of one run stopped at
step 6 (checkpoints 2, 4, 6) and resumes it; a run that recovers must end bit for bit where an uninterrupted run
ends. A few seconds each (in-memory store, one device)."""
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _trainer_util import experiment
from crossjax import checkpoint as ckpt_lib
from crossjax import trainer
from crossjax.array_store import store_from_arrays
from crossjax.errors import CrossjaxError
from crossjax.metrics_log import MetricsLog

STEPS, STOP = 8, 6

# orbax leaves the reads of a failed restore's other arrays unfinished; pytest reports each as unraisable
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _config(**train):
    c = experiment("synthetic", "tiny")
    c.mesh.data, c.mesh.snapshot, c.mesh.feature = 1, 1, 1
    c.train.steps, c.train.log_every, c.train.checkpoint_every, c.train.progress = STEPS, 1, 2, False
    for k, v in train.items():
        c.train[k] = v
    return c


@pytest.fixture(scope="module")
def source():
    acts = np.random.default_rng(0).normal(size=(2048, 2, 16)).astype(np.float16)
    store = store_from_arrays(acts, block_rows=512)
    return trainer.TrainData(store, blocks=(0, 1, 2), scales=store.estimate_scales())


@pytest.fixture(scope="module")
def whole(source, tmp_path_factory):
    """The uninterrupted run: (its workdir, its final params on the host)."""
    workdir = str(tmp_path_factory.mktemp("whole"))
    result = trainer.train(_config(), workdir, source)
    return workdir, jax.device_get(result.state["params"])


@pytest.fixture(scope="module")
def stopped(source, tmp_path_factory):
    """A run stopped after step 6, with checkpoints 2, 4 and 6 (copied by each test before it damages it)."""
    workdir = str(tmp_path_factory.mktemp("stopped"))
    result = trainer.train(_config(), workdir, source, stop_after=STOP)
    assert result.end_step == STOP
    assert ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), keep=3).all_steps() == [2, 4, 6]
    return workdir


@pytest.fixture
def workdir(stopped, tmp_path):
    path = str(tmp_path / "run")
    shutil.copytree(stopped, path)
    return path


def _records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    for r in records:
        r.pop("tokens_per_s", None)
    return records


def _assert_same_run(result, workdir, whole):
    whole_dir, whole_params = whole
    assert result.finished
    for k, v in whole_params.items():
        np.testing.assert_array_equal(np.asarray(result.state["params"][k]), v, err_msg=k)
    assert _records(workdir) == _records(whole_dir)


# -------------------------------------------------------------------------------------------------- metrics.jsonl


def test_torn_last_metrics_record_is_dropped_and_the_run_resumes(source, whole, workdir, capsys):
    """A kill while appending the step-7 record leaves half a line; the same call again resumes."""
    with open(os.path.join(whole[0], "metrics.jsonl")) as f:
        step7 = next(line for line in f if json.loads(line)["step"] == 7)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(step7[: len(step7) // 2])                      # no newline: the write was cut
    result = trainer.train(_config(), workdir, source)
    err = capsys.readouterr().err
    assert "dropped the torn last record" in err and "metrics.jsonl (line 7)" in err
    _assert_same_run(result, workdir, whole)


def test_complete_last_record_without_newline_is_kept_on_its_own_line(tmp_path):
    lines = [json.dumps({"step": s, "kind": "train", "loss": float(s)}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2])   # cut before "\n"
    log = MetricsLog(str(tmp_path), resume_step=3, final_step=9, snapshots=("a",))
    log.write(4, "train", {"loss": 4.0})
    log.close()
    got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [1, 2, 3, 4]


def test_damaged_metrics_line_before_the_last_is_an_error_naming_file_and_line(source, workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        lines = f.readlines()
    lines[2] = lines[2][:10] + "\x00garbage" + lines[2][10:]   # line 3 of 6: bytes changed after it was written
    with open(path, "w") as f:
        f.writelines(lines)
    before = open(path, "rb").read()
    with pytest.raises(CrossjaxError) as e:
        trainer.train(_config(), workdir, source)
    msg = str(e.value)
    assert path in msg and "line 3" in msg and "Repair or remove that line" in msg
    assert open(path, "rb").read() == before                   # nothing rewritten


def test_fresh_run_over_a_damaged_old_log_starts_a_new_one(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n{"ste\n{"step": 2, "kind": "train"}\n')
    MetricsLog(str(tmp_path), resume_step=0, final_step=9, snapshots=("a",)).close()   # nothing of it is kept
    assert (tmp_path / "metrics.jsonl").read_text() == ""


# -------------------------------------------------------------------------------------------------- checkpoints


def _truncate_largest_file(step_dir):
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if os.path.isfile(p)]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)


def _empty(step_dir):
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)


def _delete_iterator_state(step_dir):
    os.remove(os.path.join(step_dir, ckpt_lib.LOADER_ITEM, ckpt_lib.LOADER_FILE))


def _as_earlier_version(checkpoints_dir, process_count: int, **order):
    """Rewrite every step's loader position in the layout of earlier versions: grain's per-process files in
    `data/`, as `process_count` processes wrote them; `order` changes fields of the saved batch order."""
    for step_dir in glob.glob(os.path.join(checkpoints_dir, "[0-9]*")):
        path = os.path.join(step_dir, ckpt_lib.LOADER_ITEM, ckpt_lib.LOADER_FILE)
        position = json.load(open(path))
        position = {"version": 1, "next_index": position["next_index"], "order": {**position["order"], **order}}
        shutil.rmtree(os.path.dirname(path))
        os.mkdir(os.path.join(step_dir, ckpt_lib.LEGACY_LOADER_ITEM))
        for i in range(process_count):
            with open(os.path.join(step_dir, ckpt_lib.LEGACY_LOADER_ITEM,
                                   f"process_{i}-of-{process_count}.json"), "w") as f:
                json.dump(position, f)


def _delete_an_array_file(step_dir):
    os.remove(max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize))


@pytest.mark.parametrize("damage", [_truncate_largest_file, _empty, _delete_iterator_state, _delete_an_array_file],
                         ids=["truncated", "emptied", "iterator-state-missing", "array-file-missing"])
def test_damaged_latest_checkpoint_is_skipped_and_the_run_ends_as_uninterrupted(source, whole, workdir, damage,
                                                                                 capsys):
    ckdir = os.path.join(workdir, "checkpoints")
    damage(os.path.join(ckdir, "6"))
    result = trainer.train(_config(), workdir, source)
    err = capsys.readouterr().err
    assert f"skipping checkpoint step 6 in {ckdir}: it does not restore" in err
    assert "resuming from checkpoint step 4" in err
    _assert_same_run(result, workdir, whole)
    # the damaged step was set aside, so step 6 could be saved anew; the new one is intact
    assert os.listdir(ckdir + ckpt_lib.SKIPPED_SUFFIX) == ["6"]
    assert f"moved the skipped checkpoint step 6 to {ckdir}{ckpt_lib.SKIPPED_SUFFIX}/6" in err
    assert ckpt_lib.Checkpoints(ckdir, keep=3).all_steps() == [4, 6, 8]
    again = trainer.train(_config(), workdir, source, stop_after=STEPS)   # resumes from 8: nothing skipped
    assert "skipping" not in capsys.readouterr().err and again.end_step == STEPS


def test_checkpoint_of_an_earlier_version_resumes_on_another_process_count(source, whole, workdir, capsys):
    """Its per-process position files (here of two processes) hold one global position: one process resumes."""
    _as_earlier_version(os.path.join(workdir, "checkpoints"), process_count=2)
    result = trainer.train(_config(), workdir, source)
    assert "resuming from checkpoint step 6" in capsys.readouterr().err
    _assert_same_run(result, workdir, whole)


def test_position_of_another_batch_order_stops_the_run_and_moves_nothing(source, workdir, capsys):
    """An earlier version's run with data.streams=0 on two processes had two streams: the fix names them."""
    ckdir = os.path.join(workdir, "checkpoints")
    _as_earlier_version(ckdir, process_count=2, streams=2)
    before = sorted(glob.glob(os.path.join(ckdir, "**"), recursive=True))
    with pytest.raises(CrossjaxError) as e:
        trainer.train(_config(), workdir, source)
    msg = str(e.value)
    assert "another batch order (streams: saved 2, now 1)" in msg and "--config.data.streams=2" in msg
    assert "skipping" not in capsys.readouterr().err
    assert sorted(glob.glob(os.path.join(ckdir, "**"), recursive=True)) == before
    assert not os.path.exists(ckdir + ckpt_lib.SKIPPED_SUFFIX)


def test_no_checkpoint_that_restores_is_an_error_that_changes_nothing(source, workdir):
    ckdir = os.path.join(workdir, "checkpoints")
    _empty(os.path.join(ckdir, "6"))
    for step in ("2", "4"):
        _truncate_largest_file(os.path.join(ckdir, step))
    with pytest.raises(CrossjaxError) as e:
        trainer.train(_config(), workdir, source)
    msg = str(e.value)
    assert f"none of the checkpoints in {ckdir} restores" in msg and f"mv {ckdir} {ckdir}.broken" in msg
    assert all(f"step {s}: it does not restore" in msg for s in (6, 4, 2)) and "Traceback" not in msg
    assert sorted(os.listdir(ckdir)) == ["2", "4", "6"] and not os.path.exists(ckdir + ckpt_lib.SKIPPED_SUFFIX)


def test_nan_stop_names_the_checkpoint_resumed_from_not_the_damaged_one(source, workdir):
    """Step 6 is damaged, the run resumes from 4 and the loss blows up before it saves again."""
    ckdir = os.path.join(workdir, "checkpoints")
    _truncate_largest_file(os.path.join(ckdir, "6"))
    with pytest.raises(CrossjaxError) as e:
        trainer.train(_config(lr=1e30, checkpoint_every=0), workdir, source)
    msg = str(e.value)
    assert "NaN/Inf at training step" in msg and f"the last good checkpoint is step 4 in {ckdir}" in msg


# -------------------------------------------------------------------------------------------------- Checkpoints


def _tree(value: float):
    return {"w": jnp.full((4,), value, jnp.float32), "count": jnp.int32(3)}


def test_checkpoint_holding_nan_is_skipped_and_its_step_can_be_saved_again(tmp_path, capsys):
    directory = str(tmp_path / "ck")
    ck = ckpt_lib.Checkpoints(directory, keep=3, async_save=False)
    ck.save(1, _tree(1.0))
    ck.save(2, _tree(float("nan")))
    ck.close()
    target = ckpt_lib.abstract_like(_tree(0.0), jax.tree.map(lambda x: x.sharding, _tree(0.0)))
    for attempt in range(2):   # the same damage twice: the second copy is kept beside the first
        ck = ckpt_lib.Checkpoints(directory, keep=3, async_save=False)
        restored = ck.restore_latest(target, stage="test")
        assert restored.step == 1 and float(restored.state["w"][0]) == 1.0
        assert ck.all_steps() == [1] and ck.last_good_step() == 1
        assert "skipping checkpoint step 2" in (err := capsys.readouterr().err) and "holds NaN/Inf in w" in err
        ck.save(2, _tree(float("nan") if attempt == 0 else 2.0))   # orbax refuses a step whose directory exists
        ck.close()
    assert sorted(os.listdir(directory + ckpt_lib.SKIPPED_SUFFIX)) == ["2", "2.1"]
    ck = ckpt_lib.Checkpoints(directory, keep=3, async_save=False)
    assert ck.restore_latest(target, stage="test").step == 2 and ck.last_good_step() == 2
    ck.close()


def test_nonfinite_leaves_names_each_bad_leaf():
    tree = {"a": jnp.array([1.0, jnp.inf]), "b": {"c": jnp.array([jnp.nan]), "d": jnp.ones(2)}, "n": jnp.int32(1)}
    assert ckpt_lib.nonfinite_leaves(tree) == ["a", "b.c"]
    assert ckpt_lib.nonfinite_leaves({"n": jnp.int32(1)}) == []
