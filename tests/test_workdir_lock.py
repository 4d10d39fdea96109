"""One run per workdir: a second trainer on a workdir in use stops at once with an error naming the first (before it
touches checkpoints or metrics), a lock left by a killed run is taken over, and a run of several processes
(one workdir) still starts; every process of a refused multi-process run stops."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from _files import tree_bytes
from _procs import child_env, free_port
from _trainer_util import ROOT, tiny_config
from crossjax import locks, pipeline
from crossjax.errors import CrossjaxError

TRAIN = [sys.executable, "-m", "crossjax.train", "--config=experiments/synthetic.py:tiny"]


def _train(workdir, *extra, timeout=120):
    return subprocess.run(TRAIN + [f"--workdir={workdir}", *extra], cwd=ROOT, env=child_env(1), capture_output=True,
                          text=True, timeout=timeout)


def _holder_process(workdir):
    """A child holding workdir's lock until killed (it prints 'held' once it holds it)."""
    code = ("import sys; from crossjax import locks\n"
            "with locks.hold_workdir(sys.argv[1]):\n"
            "    print('held', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(workdir)], cwd=ROOT, env=child_env(1),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def test_a_second_trainer_on_a_running_workdir_stops_at_once_and_touches_nothing(tmp_path):
    workdir = tmp_path / "run"
    seen = {}

    def files():  # tensorboard's thread may flush the first run's events meanwhile: only its file names count
        tree = tree_bytes(workdir)
        return {k: (None if k.startswith("tb") else v) for k, v in tree.items()}

    def second_trainer(event):  # runs inside the first trainer, between two steps, with checkpoints on disk
        if event.step == 5 and not seen:
            before = files()
            start = time.monotonic()
            seen["proc"] = _train(workdir)
            seen["seconds"] = time.monotonic() - start
            seen["unchanged"] = files() == before
        return None

    config = tiny_config("store", **{"train.async_checkpointing": False})  # checkpoint 4 complete before step 5
    summary = pipeline.run(config, str(workdir), callbacks=[second_trainer])
    proc = seen["proc"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"is in use by another run: pid {os.getpid()} on host {socket.gethostname()}" in proc.stderr
    assert "another --workdir" in proc.stderr and "Traceback" not in proc.stderr
    assert seen["unchanged"]  # no checkpoint, metric or tmp directory of the second run
    assert seen["seconds"] < 60  # immediate: no wait for the first run's checkpoints
    assert summary.steps == 8 and not (workdir / locks.WORKDIR_LOCK).exists()  # the first run went on; lock gone


def test_a_killed_runs_lock_is_taken_over_with_a_message(tmp_path, capsys):
    holder = _holder_process(tmp_path)
    with pytest.raises(locks.LockHeldError, match=f"pid {holder.pid} on host {socket.gethostname()}.*"
                                                  f"kill {holder.pid}"):
        with locks.hold_workdir(str(tmp_path)):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / locks.WORKDIR_LOCK).exists()  # SIGKILL leaves the file, but not the lock
    with locks.hold_workdir(str(tmp_path)):
        assert f"took over the lock of {tmp_path} from pid {holder.pid}" in capsys.readouterr().err
    assert not (tmp_path / locks.WORKDIR_LOCK).exists()


def test_the_same_process_may_enter_its_own_workdir_again(tmp_path):
    with locks.hold_workdir(str(tmp_path)):
        with locks.hold_workdir(str(tmp_path)):  # e.g. compare around its crosscoder run
            assert (tmp_path / locks.WORKDIR_LOCK).exists()
        assert (tmp_path / locks.WORKDIR_LOCK).exists()
    assert not (tmp_path / locks.WORKDIR_LOCK).exists()


def test_an_unwritable_workdir_is_named_with_the_fix(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, *args, **kwargs):
        if str(path).endswith(locks.WORKDIR_LOCK):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(CrossjaxError, match=r"cannot create the lock file .*\.lock \(Permission denied\).*--workdir"):
        pipeline.run(tiny_config("store"), str(tmp_path / "w"))
    assert os.listdir(tmp_path / "w") == []  # nothing written before the lock


def test_every_process_of_a_refused_two_process_run_stops(tmp_path):
    """Process 0 cannot take the lock; process 1 must not wait for it in a collective: both end with exit code 2."""
    holder = _holder_process(tmp_path)
    cmd = TRAIN + [f"--workdir={tmp_path}", "--distributed", f"--coordinator=127.0.0.1:{free_port()}",
                   "--num_processes=2"]
    try:
        procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=ROOT, env=child_env(2), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        holder.kill()
        holder.wait()
    assert [p.returncode for p in procs] == [2, 2], [o[1][-2000:] for o in outs]
    assert f"pid {holder.pid}" in outs[0][1]
    assert "process 0 of this run could not lock" in outs[1][1]
    assert os.listdir(tmp_path) == [locks.WORKDIR_LOCK]  # the holder's file only: no store, no checkpoint
