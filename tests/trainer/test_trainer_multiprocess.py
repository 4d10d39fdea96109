"""Two processes joined by jax.distributed on localhost (4 CPU devices each) and one process with 8 devices train
the same run, with default loader settings: `python -m crossjax.train --coordinator=...`, same config, same
numbers; and a checkpoint written by either resumes on the other (on another mesh too), with the batches and the
final parameters of the uninterrupted run. About a minute: two runs of two processes."""
import json
import os
import shutil
import sys

import numpy as np
import pytest

from _procs import child_env, free_port, run_together
from _trainer_util import ROOT, exported, mesh_overrides, summary, tiny_config, train_records
from crossjax import checkpoint as ckpt_lib
from crossjax import pipeline
from crossjax.data import make_loader
from crossjax.store import ActivationStore

STEPS, EVERY, RESUME = 8, 3, 3   # checkpoints 3, 6 and 8; the resumed copies keep only step 3
OVER = {"train.steps": STEPS, "train.log_every": 1, "train.checkpoint_every": EVERY}


def _two_processes(tmp_path, store, workdir, *flags):
    """`python -m crossjax.train` in two processes of 4 devices each, joined on loopback."""
    port = free_port()
    cmd = [sys.executable, "-m", "crossjax.train", "--config=experiments/synthetic.py:tiny",
           f"--config.store.path={store}", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
           f"--config.train.checkpoint_every={EVERY}", f"--workdir={workdir}", f"--coordinator=127.0.0.1:{port}",
           "--num_processes=2", *flags]
    run_together([cmd + [f"--process_id={i}"] for i in range(2)], tmp_path, os.path.basename(workdir),
                 env=child_env(4), cwd=ROOT, timeout=400)


def _stopped_copy(workdir, dest) -> str:
    """A copy of a finished workdir as if its run had stopped after checkpoint RESUME."""
    shutil.copytree(workdir, dest, ignore=shutil.ignore_patterns(".lock", "summary.json", "export"))
    for step in os.listdir(os.path.join(dest, "checkpoints")):
        if int(step) > RESUME:
            shutil.rmtree(os.path.join(dest, "checkpoints", step))
    return str(dest)


def _assert_same_run(workdir, reference):
    got, ref = train_records(workdir), train_records(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=2e-5)
    a, b = exported(reference), exported(workdir)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert summary(workdir).heldout["ev"] == pytest.approx(summary(reference).heldout["ev"], rel=1e-4)


def test_two_processes_match_one_process_and_resume_each_other(tmp_path, capsys):
    store = str(tmp_path / "store")
    one = str(tmp_path / "one")
    pipeline.run(tiny_config(store, **OVER), one)  # also writes the store, so the two processes only read it

    two = str(tmp_path / "two")
    _two_processes(tmp_path, store, two)
    _assert_same_run(two, one)
    step_dir = os.path.join(two, "checkpoints", str(RESUME))
    # the state written by both processes together, the loader position once for both
    assert sorted(n for n in os.listdir(os.path.join(step_dir, "state")) if n.startswith("ocdbt.process_")) == [
        "ocdbt.process_0", "ocdbt.process_1"]
    assert os.listdir(os.path.join(step_dir, ckpt_lib.LOADER_ITEM)).count(ckpt_lib.LOADER_FILE) == 1
    position = json.load(open(os.path.join(step_dir, ckpt_lib.LOADER_ITEM, ckpt_lib.LOADER_FILE)))
    assert (position["next_index"], position["epoch"], position["batch"]) == (RESUME, 0, RESUME)

    # The position of two processes continues, in one, with the batches an uninterrupted loader gives next.
    def loader():
        c = tiny_config(store)
        return make_loader(ActivationStore.open(store), global_batch=int(c.train.batch_size), seed=int(c.train.seed),
                           sharding=None, blocks=pipeline.split_blocks(c, ActivationStore.open(store))[0],
                           window_blocks=int(c.data.window_blocks))
    uninterrupted, resumed = loader(), loader()
    expected = [next(uninterrupted)["acts"] for _ in range(STEPS)][RESUME:]
    resumed.set_state(position)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["acts"], want)
    uninterrupted.close()
    resumed.close()

    # Two processes' checkpoint resumed by one process on mesh (2, 2, 2) ...
    back = _stopped_copy(two, tmp_path / "back")
    capsys.readouterr()
    pipeline.run(tiny_config(store, **OVER, **mesh_overrides(2, 2, 2)), back)
    assert f"resuming from checkpoint step {RESUME}" in capsys.readouterr().err
    _assert_same_run(back, one)
    # ... and one process's checkpoint by two processes on mesh (2, 2, 2).
    forth = _stopped_copy(one, tmp_path / "forth")
    _two_processes(tmp_path, store, forth, "--config.mesh.data=2", "--config.mesh.snapshot=2",
                   "--config.mesh.feature=2")
    assert f"resuming from checkpoint step {RESUME}" in (tmp_path / "forth0.log").read_text()
    _assert_same_run(forth, one)
