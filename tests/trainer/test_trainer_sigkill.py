"""crossjax.train killed with SIGKILL mid-run and started again with the same command ends where an uninterrupted
run ends: the same parameters (bit for bit), metrics and summary. About 30 s."""
import os
import signal
import subprocess
import sys
import time

import numpy as np

from _procs import child_env
from _trainer_util import ROOT, exported, summary, tiny_config, train_records
from crossjax import checkpoint as ckpt_lib
from crossjax import pipeline


def _cli(store_path, workdir, steps):
    return [sys.executable, "-m", "crossjax.train", "--config=experiments/synthetic.py:tiny",
            f"--config.store.path={store_path}", f"--config.train.steps={steps}", "--config.train.log_every=25",
            "--config.train.checkpoint_every=50", f"--workdir={workdir}"]


def test_sigkill_mid_run_then_same_command_resumes_to_the_same_result(store_path, tmp_path):
    steps = 400
    env = child_env(8)
    killed = str(tmp_path / "killed")
    log = open(tmp_path / "killed.log", "w")  # a file, not a pipe: a full pipe would stall the child
    proc = subprocess.Popen(_cli(store_path, killed, steps), cwd=ROOT, env=env, stdout=log, stderr=log)
    ckdir = os.path.join(killed, "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckdir) and any(d.isdigit() for d in os.listdir(ckdir)):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed: " + (tmp_path / "killed.log").read_text()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert not os.path.exists(os.path.join(killed, "summary.json"))
    done = ckpt_lib.Checkpoints(ckdir, keep=3).latest_step()
    assert done is not None and 0 < done < steps

    r = subprocess.run(_cli(store_path, killed, steps), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from checkpoint step" in r.stderr

    # the uninterrupted run, same devices and mesh, in this process
    whole = str(tmp_path / "whole")
    c = tiny_config(store_path, **{"train.steps": steps, "train.log_every": 25, "train.checkpoint_every": 50})
    pipeline.run(c, whole)
    a, b = exported(whole), exported(killed)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    assert train_records(killed) == train_records(whole)
    assert summary(killed).heldout == summary(whole).heldout


