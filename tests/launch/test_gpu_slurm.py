"""launch/gpu_slurm.sbatch submitted through a fake sbatch that runs the job at once with the SLURM variables a batch
step sees, a fake srun and a fake scontrol: the srun command (one process per GPU, --distributed, the same workdir),
a finished run that ends at once, the requeue before the time limit, and the settings that fail fast."""
import os
import signal
import subprocess
import time

import pytest

from _launch_fakes import LAUNCH, REPO, FakeCloud

SCRIPT = "launch/gpu_slurm.sbatch"
CONFIG = "experiments/pythia160m.py:x32"
NODES = ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8"]


@pytest.fixture
def cloud(tmp_path):
    return FakeCloud(tmp_path)


@pytest.fixture
def settings(tmp_path, cloud):
    return dict(CROSSJAX_CONFIG=CONFIG, CROSSJAX_WORKDIR=str(tmp_path / "shared" / "run"),
                CROSSJAX_VENV=str(cloud.venv(tmp_path / "venv")))


def sbatch(cloud, *args, **env):
    """The recipe's submission, from the checkout; the job's exit status and its log."""
    r = subprocess.run(["sbatch", *args], cwd=REPO, env={**cloud.env, **env}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "Submitted batch job 4242", r.stderr
    return int((cloud.state / "job.exit").read_text()), (cloud.state / "crossjax-4242.log").read_text()


def test_srun_starts_one_distributed_process_per_gpu_from_the_checkout(cloud, settings):
    status, log = sbatch(cloud, *NODES, SCRIPT, "--config.train.lr=0.001", **settings)
    assert status == 0, log
    (srun,) = cloud.calls("srun")
    assert srun[1:] == ["--kill-on-bad-exit=1", f"{settings['CROSSJAX_VENV']}/bin/python", "-m", "crossjax.train",
                        f"--config={CONFIG}", f"--workdir={settings['CROSSJAX_WORKDIR']}", "--distributed",
                        "--config.train.lr=0.001"]
    assert (cloud.state / "srun.cwd").read_text().strip() == str(REPO)  # the config path is the checkout's
    env = (cloud.state / "srun.env").read_text().splitlines()
    assert "SLURM_JOB_ID=4242" in env and "SLURM_NTASKS_PER_NODE=8" in env
    assert f"job 4242 (start 0) on 2 nodes: python -m crossjax.train --config={CONFIG}" in log
    assert cloud.calls("scontrol") == []


def test_a_job_on_a_finished_run_ends_without_training(cloud, settings):
    os.makedirs(settings["CROSSJAX_WORKDIR"])
    with open(os.path.join(settings["CROSSJAX_WORKDIR"], "summary.json"), "w") as f:
        f.write("{}")
    status, log = sbatch(cloud, *NODES, SCRIPT, **settings, FAKE_RESTART_COUNT="1")
    assert status == 0 and "is finished already: finished: 10 steps" in log
    assert cloud.calls("srun") == []


def test_the_job_requeues_itself_before_its_time_limit_and_waits_for_the_training(cloud, settings, tmp_path):
    release = tmp_path / "release"
    submit = subprocess.Popen(["sbatch", *NODES, SCRIPT], cwd=REPO, env={**cloud.env, **settings,
                              "FAKE_SRUN_HOLD": str(release)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (cloud.state / "srun.started").exists():
            assert time.monotonic() < deadline and submit.poll() is None, "srun did not start"
            time.sleep(0.05)
        os.kill(int((cloud.state / "job.pid").read_text()), signal.SIGUSR1)  # as --signal=B:USR1@300 does
        while not cloud.calls("scontrol"):
            assert time.monotonic() < deadline, "no scontrol requeue after USR1"
            time.sleep(0.05)
        assert submit.poll() is None  # the job still waits for its training
        release.touch()
        submit.wait(timeout=30)
    finally:
        release.touch()
        submit.wait(timeout=30)
    assert cloud.calls("scontrol") == [["scontrol", "requeue", "4242"]]
    assert (cloud.state / "job.exit").read_text().strip() == "0"  # srun's status, once it ended
    log = (cloud.state / "crossjax-4242.log").read_text()
    assert "the time limit is near: requeueing job 4242" in log


def test_the_script_asks_slurm_to_requeue_it_and_to_append_to_its_log():
    directives = [line.split(None, 1)[1] for line in (LAUNCH / "gpu_slurm.sbatch").read_text().splitlines()
                  if line.startswith("#SBATCH ")]
    assert "--requeue" in directives  # a preempted job goes back to the queue
    assert any(d.startswith("--signal=B:USR1@") for d in directives)  # the trap above
    assert "--open-mode=append" in directives  # a requeued start keeps the log of the earlier ones


def test_unset_settings_fail_at_once_naming_each_with_an_example(cloud):
    status, log = sbatch(cloud, *NODES, SCRIPT)
    assert status == 2
    assert "launch/gpu_slurm.sbatch needs settings that are not set; export them, then sbatch again" in log
    assert f"export CROSSJAX_CONFIG={CONFIG}" in log and "export CROSSJAX_WORKDIR=/shared/runs/p160m" in log
    assert cloud.calls("srun") == []


@pytest.mark.parametrize("options,message", [
    (["--nodes=2", "--ntasks-per-node=8", "--gpus-per-task=1"], "submit with --ntasks-per-node=G --gpus-per-node=G"),
    (["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8"], "submit with --ntasks-per-node=8 --gpus-per-node=8"),
])
def test_a_task_layout_jax_distributed_cannot_use_is_refused_with_the_fix(cloud, settings, options, message):
    status, log = sbatch(cloud, *options, SCRIPT, **settings)
    assert status == 2 and message in log
    assert cloud.calls("srun") == []


@pytest.mark.parametrize("variable,value,message", [
    ("CROSSJAX_CONFIG", "experiments/nope.py", "there is no experiments/nope.py in"),
    ("CROSSJAX_WORKDIR", "runs/p160m", "is relative: give the absolute path of a directory on the shared"),
    ("CROSSJAX_VENV", "/nonexistent/venv", "no Python environment at /nonexistent/venv: make it"),
])
def test_bad_settings_fail_at_once_with_the_fix(cloud, settings, variable, value, message):
    status, log = sbatch(cloud, *NODES, SCRIPT, **{**settings, variable: value})
    assert status == 2 and message in log
    assert cloud.calls("srun") == []


def test_outside_slurm_the_script_says_how_to_submit_it(cloud, settings):
    r = subprocess.run(["bash", SCRIPT], cwd=REPO, env={**cloud.env, **settings}, capture_output=True, text=True)
    assert r.returncode == 2 and "this is not a SLURM job: submit it, e.g. sbatch --nodes=2" in r.stderr
