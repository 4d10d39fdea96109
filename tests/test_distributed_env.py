"""How a command joins the processes of a multi-host run (crossjax.cli.initialize_distributed): explicit
coordinator flags, a Cloud TPU VM, a SLURM step of several tasks, or nothing on one host; and a real join of two
processes from SLURM's environment variables on loopback (jax's own SLURM detection, gloo)."""
import os
import subprocess
import sys

import jax
import pytest

from _procs import child_env, free_port
from crossjax import cli
from crossjax.errors import CrossjaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_TASK = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
              "SLURM_LOCALID": "1"}


def settings(requested=None, coordinator=None, num_processes=None, process_id=None, environ=(), tpu_vm=False):
    return cli.distributed_settings(requested, coordinator, num_processes, process_id, dict(environ), tpu_vm)


def test_one_host_without_a_cluster_runs_alone():
    assert settings() is None
    assert settings(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None   # a one-task SLURM job
    assert settings(requested=False, environ=SLURM_TASK, tpu_vm=True) is None     # --nodistributed


def test_explicit_flags_are_passed_as_given():
    assert settings(coordinator="10.0.0.1:1234", num_processes=4, process_id=3, environ=SLURM_TASK) == dict(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)   # they win over the environment


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="10.0.0.1:1234"), "--num_processes, --process_id missing"),
    (dict(num_processes=2, process_id=0), "--coordinator missing"),
    (dict(coordinator="10.0.0.1", num_processes=2, process_id=0), "give HOST:PORT"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), "must lie in 0..1"),
    (dict(requested=False, coordinator="h:1", num_processes=2, process_id=0), "contradict"),
    (dict(environ={k: v for k, v in SLURM_TASK.items() if k != "SLURM_PROCID"}), "start the command with srun"),
])
def test_bad_settings_name_the_fix(kwargs, message):
    with pytest.raises(CrossjaxError, match=message):
        settings(**kwargs)


def test_tpu_vm_and_slurm_steps_leave_the_details_to_jax():
    assert settings(tpu_vm=True) == {}               # every TPU VM worker: jax reads the TPU metadata
    assert settings(environ=SLURM_TASK) == {}        # srun's variables: coordinator, count and index
    assert settings(requested=True) == {}            # --distributed elsewhere: jax's other cluster detections


def test_a_failed_join_is_one_clear_error(monkeypatch):
    def refuse(**kwargs):
        raise ValueError("coordinator_address should be defined.")
    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    with pytest.raises(CrossjaxError, match=r"could not join .* from the environment: coordinator_address should "
                                            r"be defined.*--coordinator=HOST:PORT.*--nodistributed"):
        cli.initialize_distributed(True, None, None, None, environ={})
    assert cli.initialize_distributed(None, None, None, None, environ={}) is False   # alone: nothing is called


CHILD = """
import jax
jax.config.update("jax_num_cpu_devices", 2)
from crossjax import cli
import numpy as np
from jax.experimental import multihost_utils
assert cli.initialize_distributed(None, None, None, None)
print("joined", jax.process_index(), jax.process_count(), jax.device_count(),
      multihost_utils.process_allgather(np.asarray([jax.process_index()])).ravel().tolist(), flush=True)
jax.distributed.shutdown()
"""


def test_two_processes_join_from_the_slurm_environment():
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=child_env(None, **{**SLURM_TASK, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
                                            JAX_COORDINATOR_PORT=str(port)))
             for i in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    joined = sorted(line for log in logs for line in log.splitlines() if line.startswith("joined"))
    assert joined == ["joined 0 2 4 [0, 1]", "joined 1 2 4 [0, 1]"]
