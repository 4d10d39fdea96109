"""A planted run with --workdir on gs:// (the local GCS emulator): its store, checkpoints, metrics, export and
summary are all objects in the bucket (nothing local, no directory named "gs:"); stopped and resumed, or SIGKILLed
and run again with the same command, it ends with the weights of an uninterrupted run on a local workdir."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from _gcs_util import objects_under, wait_for
from _procs import child_env, reaped, sigkill
from _trainer_util import ROOT, exported, tiny_config
from crossjax import crosscoder_export, paths, pipeline
from crossjax.pipeline import Stopped
from crossjax.summary import RunSummary

STEPS = 40  # the tiny config, checkpointed every 8 steps


def _config(store, **overrides):
    return tiny_config(store, **{"train.steps": STEPS, "train.checkpoint_every": 8, "train.log_every": 2,
                                 **overrides})


@pytest.fixture(scope="module")
def local_run(gcs_store, tmp_path_factory):
    """The reference: the same run, uninterrupted, on a local workdir (reading the same store)."""
    workdir = str(tmp_path_factory.mktemp("local_run"))
    pipeline.run(_config(gcs_store), workdir)
    return workdir


def _gcs_weights(workdir):
    params, _, _ = crosscoder_export.load_exported(workdir + "/export")
    return params


def test_run_on_gcs_workdir_checkpoints_resumes_and_matches_a_local_run(gcs_store, local_run, gcs_url, tmp_path,
                                                                         monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # anything written to a local path by mistake would land here
    config = _config(gcs_store)
    stopped = pipeline.run(config, gcs_url + "/run", stop_after=8)
    assert isinstance(stopped, Stopped) and stopped.step == 8 and stopped.workdir == gcs_url + "/run"
    assert "8" in paths.listdir(gcs_url + "/run/checkpoints")
    assert not paths.isfile(gcs_url + "/run/summary.json")
    summary = pipeline.run(config, gcs_url + "/run")
    assert "resuming from checkpoint step 8" in capfd.readouterr().err
    assert isinstance(summary, RunSummary) and summary.steps == STEPS and summary.workdir == gcs_url + "/run"
    assert os.listdir(tmp_path) == []

    objects = objects_under(gcs_url + "/run")
    assert {"config.json", "summary.json", "metrics.jsonl", "export/model.safetensors",
            "export/config.json"} <= set(objects)
    assert any(k.startswith(f"checkpoints/{STEPS}/") for k in objects) and any(k.startswith("tb/") for k in objects)
    back = RunSummary.read(gcs_url + "/run")
    assert back.export == gcs_url + "/run/export" and back.heldout == RunSummary.read(local_run).heldout
    steps = [json.loads(line)["step"] for line in objects["metrics.jsonl"].decode().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(2, STEPS + 1, 2))
    ref = exported(local_run)
    for k, v in _gcs_weights(gcs_url + "/run").items():
        np.testing.assert_array_equal(v, ref[k], err_msg=k)


def _cli(store, workdir):
    return [sys.executable, "-m", "crossjax.train", "--config=experiments/synthetic.py:tiny",
            f"--config.store.path={store}", f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=8",
            "--config.train.log_every=2", "--config.train.progress=False", f"--workdir={workdir}"]


@pytest.mark.slow   # about 22 s; the store writer and the uploads are SIGKILLed on gs:// in the default run
def test_sigkill_mid_run_on_gcs_then_same_command_resumes(gcs_emulator, gcs_store, local_run, gcs_url, tmp_path):
    workdir = gcs_url + "/run"
    env = child_env(8, **gcs_emulator["env"])
    log = str(tmp_path / "killed.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(_cli(gcs_store, workdir), cwd=ROOT, env=env, stdout=out, stderr=out)
        with reaped(proc):
            ckpts = workdir + "/checkpoints"
            # a committed checkpoint (orbax writes a step's objects in place on gs://, commit_success.txt last)
            wait_for(lambda: paths.isfile(ckpts + "/8/commit_success.txt"), 240, "a first checkpoint", proc, log)
            assert proc.poll() is None, open(log).read()[-3000:]
            sigkill(proc)
    assert not paths.isfile(workdir + "/summary.json")
    r = subprocess.run(_cli(gcs_store, workdir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from checkpoint step" in r.stderr and "took over the lock" in r.stderr
    assert RunSummary.read(workdir).steps == STEPS
    ref = exported(local_run)
    for k, v in _gcs_weights(workdir).items():
        np.testing.assert_array_equal(v, ref[k], err_msg=k)
