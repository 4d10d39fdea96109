"""Resuming: a run stopped after a checkpoint and restored onto another mesh ends where an uninterrupted
single-device run ends (tests/trainer/test_trainer_sigkill.py kills a run instead)."""
import os

import numpy as np

from _trainer_util import STEPS, exported, mesh_overrides, tiny_config, train_records
from crossjax import checkpoint as ckpt_lib
from crossjax import pipeline


def test_resume_onto_another_mesh_continues_the_same_run(store_path, one_device_run, tmp_path):
    """Half the run on (8, 1, 1), the rest restored onto (2, 2, 2): the single-device numbers again."""
    over = {"train.steps": STEPS, "train.log_every": 1, "train.checkpoint_every": 3}
    stopped = pipeline.run(tiny_config(store_path, **mesh_overrides(8, 1, 1), **over), str(tmp_path), stop_after=4)
    assert isinstance(stopped, pipeline.Stopped) and stopped.step == 4 and not os.path.exists(tmp_path / "summary.json")
    assert ckpt_lib.Checkpoints(tmp_path / "checkpoints", keep=3).all_steps() == [3, 4]
    pipeline.run(tiny_config(store_path, **mesh_overrides(2, 2, 2), **over), str(tmp_path))  # mesh keys may change
    ref, got = train_records(one_device_run), train_records(tmp_path)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # no duplicated records after the resume
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=2e-5)
    a, b = exported(one_device_run), exported(tmp_path)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
