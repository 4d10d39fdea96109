"""The trainer as a library: arrays in memory, per-step callbacks, and a trainer that imports no stage."""
import json
import subprocess
import sys

import numpy as np
import pytest

from _procs import child_env
from _trainer_util import ROOT, experiment
from crossjax import trainer
from crossjax.array_store import store_from_arrays
from crossjax.errors import CrossjaxError


def _arrays(n=2048, s=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, s, d)).astype(np.float16)


def _config(steps=6):
    c = experiment("synthetic", "tiny")
    c.train.steps, c.train.log_every, c.train.checkpoint_every, c.train.progress = steps, 1, 0, False
    c.mesh.data, c.mesh.snapshot, c.mesh.feature = 1, 1, 1
    return c


def test_arrays_train_with_callbacks_that_time_and_stop(tmp_path):
    acts = _arrays()
    store = store_from_arrays(acts, block_rows=512)
    np.testing.assert_array_equal(store.read_rows(0, len(acts)), acts)     # the rows, in order
    source = trainer.TrainData(store, blocks=(0, 1, 2), scales=store.estimate_scales())
    seen = []

    def stop_at_three(event):
        seen.append((event.step, event.total_steps, float(event.metrics["loss"]), event.seconds))
        return event.step == 3

    result = trainer.train(_config(), str(tmp_path), source, callbacks=[stop_at_three])
    assert [s[0] for s in seen] == [1, 2, 3] and all(s[1] == 6 for s in seen)
    assert all(np.isfinite(s[2]) and s[3] >= 0 for s in seen)
    assert result.end_step == 3 and not result.finished and int(result.state["step"]) == 3
    with open(tmp_path / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert [r["loss"] for r in logged] == pytest.approx([s[2] for s in seen], rel=1e-6)  # the same step's loss

    # the same call without the callback resumes at step 4 and ends where an uninterrupted run ends
    resumed = trainer.train(_config(), str(tmp_path), source)
    whole = trainer.train(_config(), str(tmp_path / "whole"), source)
    assert resumed.finished and resumed.end_step == 6
    for k in ("W_enc", "W_dec", "b_enc", "b_dec", "log_threshold"):
        np.testing.assert_array_equal(np.asarray(resumed.state["params"][k]), np.asarray(whole.state["params"][k]))


def test_store_from_arrays_refuses_bad_shapes():
    with pytest.raises(CrossjaxError, match="rows, snapshots, d_model"):
        store_from_arrays(np.zeros((4, 8), np.float16))
    with pytest.raises(CrossjaxError, match="snapshot names"):
        store_from_arrays(_arrays(n=16), snapshots=["a"])


def test_the_trainer_imports_no_stage_or_analysis_module():
    stages = ["crossjax.activations", "crossjax.tokens", "crossjax.suite", "crossjax.planted", "crossjax.models",
              "crossjax.analysis", "crossjax.evals", "crossjax.pipeline"]
    code = ("import sys; import crossjax.trainer; "
            f"print([m for m in sys.modules if any(m == s or m.startswith(s + '.') for s in {stages!r})])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=child_env(1))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
