"""launch/tpu_vm.sh against a fake gcloud whose slices are directories: the whole babysat run (create, setup on
every worker, the same command on all workers, a preemption, the re-created slice resuming in the same workdir,
completion, delete), setup run twice, the provisioning flags, a crash loop, and every missing setting."""
import re
import subprocess

import pytest

from _launch_fakes import FakeCloud, scratch_checkout

NAME, ZONE = "xj-test", "us-west4-a"
CONFIG = "experiments/tiny.py:smoke"


@pytest.fixture
def cloud(tmp_path):
    return FakeCloud(tmp_path)


@pytest.fixture
def checkout(tmp_path):
    return scratch_checkout(tmp_path / "checkout")


@pytest.fixture
def settings(tmp_path):
    return dict(CROSSJAX_TPU_NAME=NAME, CROSSJAX_TPU_ZONE=ZONE, CROSSJAX_TPU_TYPE="v5litepod-16",
                CROSSJAX_TPU_PROVISIONING="spot", CROSSJAX_CONFIG=CONFIG,
                CROSSJAX_WORKDIR=str(tmp_path / "shared" / "run"), CROSSJAX_TPU_POLL_SECONDS="0.05")


def tpu_vm(cloud, checkout, *args, timeout=60, **env):
    return subprocess.run(["bash", str(checkout / "launch" / "tpu_vm.sh"), *args], env={**cloud.env, **env},
                          capture_output=True, text=True, timeout=timeout)


def step(call: list[str]) -> str:
    """A gcloud call as the step it is: create, delete, scp, or the worker subcommand an ssh runs."""
    if call[1:4] == ["compute", "tpus", "queued-resources"]:
        return call[4]
    if call[1:5] == ["compute", "tpus", "tpu-vm", "scp"]:
        return "scp"
    command = next(a for a in call if a.startswith("--command="))
    for sub in ("setup", "start", "state", "stop", "finished", "tail"):
        if f"tpu_worker.sh {sub}" in command or command.startswith(f"--command={sub}"):
            return sub
    raise AssertionError(f"unexpected ssh command {command}")


def steps(cloud, *, skip=("describe", "state")) -> list[str]:
    return [s for s in map(step, cloud.calls("gcloud")) if s not in skip]


def trainings(cloud, worker: int) -> list[list[str]]:
    runs = sorted((cloud.state / "trainings").glob(f"worker-{worker}-run-*"), key=lambda p: int(p.name.split("-")[-1]))
    return [p.read_text().splitlines() for p in runs]


def finish_trainings(cloud):
    """Kill what a test left running on its simulated workers."""
    for pid_file in cloud.state.glob("slice-*/worker-*/crossjax-run/train.pid"):
        subprocess.run(["kill", "-KILL", "--", f"-{pid_file.read_text().strip()}"], capture_output=True)


@pytest.mark.parametrize("preempted_state", ["PREEMPTED", "SUSPENDED"])
def test_babysit_recovers_from_a_preemption_and_deletes_the_slice_when_finished(cloud, checkout, settings,
                                                                                 preempted_state):
    workdir = settings["CROSSJAX_WORKDIR"]
    # slice 1 is preempted once training started on it; on slice 2 the first run stops unfinished, the restart
    # finishes (the 3rd run); describe call 3 fails as a transient API error does (it must not re-create anything)
    fake = dict(FAKE_PREEMPT="1", FAKE_PREEMPTED_STATE=preempted_state, FAKE_TRAIN_FINISH_ON="3",
                FAKE_TRAIN_SECONDS="0.3", FAKE_FLAKY_DESCRIBE="3")
    try:
        r = tpu_vm(cloud, checkout, "babysit", "--config.train.lr=0.001", **settings, **fake)
    finally:
        finish_trainings(cloud)
    assert r.returncode == 0, r.stderr

    assert steps(cloud) == [
        "create", "stop", "scp", "setup", "start",            # slice 1: created, set up on all workers, run
        "delete", "create", "stop", "scp", "setup", "start",  # preempted: deleted, created again, set up, run
        "finished",                                           # training stopped, the summary says unfinished
        "stop", "scp", "setup", "start",                      # so it is started again on the same slice
        "finished", "delete"]                                 # finished: the slice is deleted
    creates = [c for c in cloud.calls("gcloud") if c[4] == "create"]
    for create in creates:
        assert create[5] == NAME and f"--zone={ZONE}" in create and f"--node-id={NAME}" in create
        assert "--accelerator-type=v5litepod-16" in create and "--runtime-version=v2-alpha-tpuv5-lite" in create
        assert "--spot" in create
    ssh = [c for c in cloud.calls("gcloud") if c[4] == "ssh" and step(c) in ("setup", "start", "stop")]
    assert all("--worker=all" in c for c in ssh)
    assert all(c[-1] == "--worker=all" for c in cloud.calls("gcloud") if c[4] == "scp")
    assert all("--worker=0" in c for c in cloud.calls("gcloud") if step(c) == "finished")
    assert f"{NAME} is {preempted_state}: deleting it and requesting it again" in r.stderr
    assert "the run in" in r.stderr and "is finished: deleting the slice" in r.stderr

    # the same command on every worker, each run with the same workdir, slice 1 then the re-created slice 2
    command = [f"--config={CONFIG}", f"--workdir={workdir}", "--distributed", "--config.train.lr=0.001"]
    for worker in (0, 1):
        runs = trainings(cloud, worker)
        assert [run[0] for run in runs] == ["slice=1", "slice=2", "slice=2"]
        for run in runs:
            assert run[1] == f"cwd={cloud.state}/{run[0].replace('=', '-')}/worker-{worker}/crossjax"
            assert run[2:] == command
    assert (checkout.parent / "shared/run/summary.json").exists()
    assert not (cloud.state / "slice").exists()  # nothing left running

    # setup is idempotent: a slice installs once per worker, however often it is set up
    installs = [c for c in cloud.calls("uv") if c[1] == "pip"]
    assert len(installs) == 4  # 2 slices x 2 workers
    assert all(c[-1].endswith("/crossjax[tpu,hf]") for c in installs)
    log = (cloud.state / "slice-2/worker-0/crossjax-run/train.log").read_text()
    assert log.count("python -m crossjax.train --config=") == 2
    assert "exit status 1" in log and "exit status 0" in log


def test_setup_twice_is_harmless_and_ships_the_working_tree(cloud, checkout, settings):
    try:
        assert tpu_vm(cloud, checkout, "create", **settings).returncode == 0
        first = tpu_vm(cloud, checkout, "setup", **settings)
        assert first.returncode == 0, first.stderr
        (checkout / "experiments" / "tiny.py").write_text("# edited, not committed\n")
        second = tpu_vm(cloud, checkout, "setup", **settings)
        assert second.returncode == 0, second.stderr
        assert "crossjax[tpu,hf] is installed already" in second.stderr
        for worker in (0, 1):
            home = cloud.state / f"slice-1/worker-{worker}"
            assert (home / "crossjax/experiments/tiny.py").read_text() == "# edited, not committed\n"
            assert not (home / "crossjax/.venv").exists()  # ignored files stay home
            assert (home / "crossjax-venv/bin/python").exists()
        assert len([c for c in cloud.calls("uv") if c[1] == "pip"]) == 2  # one install per worker

        r = tpu_vm(cloud, checkout, "run", **settings, FAKE_TRAIN_SECONDS="30")
        assert r.returncode == 0, r.stderr
        status = tpu_vm(cloud, checkout, "status", **settings)
        assert len(re.findall(r"^crossjax-worker \S+: running$", status.stdout, re.M)) == 2
        assert "is not finished" in status.stderr
        # a setup under a running training refuses, and says how to go on
        refused = tpu_vm(cloud, checkout, "setup", **settings)
        assert refused.returncode != 0
        assert "training runs on this worker" in refused.stderr and "launch/tpu_vm.sh stop" in refused.stderr
        assert tpu_vm(cloud, checkout, "stop", **settings).returncode == 0
        status = tpu_vm(cloud, checkout, "status", **settings)
        assert len(re.findall(r"^crossjax-worker \S+: stopped \(killed\)$", status.stdout, re.M)) == 2
        assert tpu_vm(cloud, checkout, "setup", **settings).returncode == 0
        assert tpu_vm(cloud, checkout, "delete", **settings).returncode == 0
    finally:
        finish_trainings(cloud)
    assert steps(cloud, skip=("describe",)) == [
        "create", "scp", "setup", "scp", "setup", "start", "state", "finished", "scp", "setup", "stop", "state",
        "finished", "scp", "setup", "delete"]


@pytest.mark.parametrize("provisioning,flags", [("spot", ["--spot"]), ("reserved", ["--reserved"]),
                                                ("on-demand", [])])
def test_create_asks_for_the_provisioning_model_and_waits_until_active(cloud, checkout, settings, provisioning,
                                                                        flags):
    settings.update(CROSSJAX_TPU_PROVISIONING=provisioning, CROSSJAX_TPU_TYPE="v6e-8")
    r = tpu_vm(cloud, checkout, "create", **settings)
    assert r.returncode == 0, r.stderr
    (create,) = [c for c in cloud.calls("gcloud") if c[4] == "create"]
    assert [a for a in create if a in ("--spot", "--reserved")] == flags
    assert "--runtime-version=v2-alpha-tpuv6e" in create
    assert "WAITING_FOR_RESOURCES: waiting" in r.stderr and f"{NAME} is ACTIVE" in r.stderr
    again = tpu_vm(cloud, checkout, "create", **settings)  # the slice exists: nothing is requested twice
    assert again.returncode == 0 and "exists already (ACTIVE)" in again.stderr
    assert len([c for c in cloud.calls("gcloud") if c[4] == "create"]) == 1


def test_babysit_gives_up_on_a_crash_loop_and_keeps_the_slice(cloud, checkout, settings):
    try:
        r = tpu_vm(cloud, checkout, "babysit", **settings, CROSSJAX_TPU_MAX_RESTARTS="1", FAKE_TRAIN_FINISH_ON="0")
    finally:
        finish_trainings(cloud)
    assert r.returncode == 2
    assert "stopped 2 times on this slice without a preemption" in r.stderr
    assert "launch/tpu_vm.sh logs WORKER" in r.stderr and "launch/tpu_vm.sh delete" in r.stderr
    assert "fake training run 2 on worker 0: crashed" in r.stderr  # the log's tail is shown
    assert "delete" not in steps(cloud) and (cloud.state / "slice").exists()


ALL_SETTINGS = {
    "CROSSJAX_TPU_NAME": "crossjax-p160m", "CROSSJAX_TPU_ZONE": "us-west4-a", "CROSSJAX_TPU_TYPE": "v5litepod-16",
    "CROSSJAX_TPU_PROVISIONING": "spot", "CROSSJAX_CONFIG": "experiments/pythia160m.py:x32",
    "CROSSJAX_WORKDIR": "/mnt/shared/p160m"}


@pytest.mark.parametrize("command,needed", [
    ("babysit", list(ALL_SETTINGS)),
    ("create", ["CROSSJAX_TPU_NAME", "CROSSJAX_TPU_ZONE", "CROSSJAX_TPU_TYPE", "CROSSJAX_TPU_PROVISIONING"]),
    ("run", ["CROSSJAX_TPU_NAME", "CROSSJAX_TPU_ZONE", "CROSSJAX_CONFIG", "CROSSJAX_WORKDIR"]),
    ("status", ["CROSSJAX_TPU_NAME", "CROSSJAX_TPU_ZONE", "CROSSJAX_WORKDIR"]),
    ("delete", ["CROSSJAX_TPU_NAME", "CROSSJAX_TPU_ZONE"])])
def test_unset_settings_fail_at_once_naming_each_with_an_example(cloud, checkout, command, needed):
    r = tpu_vm(cloud, checkout, command)
    assert r.returncode == 2
    assert f"launch/tpu_vm.sh {command} needs settings that are not set" in r.stderr
    for variable in ALL_SETTINGS:
        assert (f"export {variable}={ALL_SETTINGS[variable]}" in r.stderr) == (variable in needed), variable
    assert cloud.calls() == []  # nothing was started


@pytest.mark.parametrize("variable,value,message", [
    ("CROSSJAX_TPU_PROVISIONING", "preemptible", "is not spot, reserved or on-demand, e.g. export "
                                                 "CROSSJAX_TPU_PROVISIONING=spot"),
    ("CROSSJAX_CONFIG", "experiments/nope.py:x", "there is no experiments/nope.py in this checkout"),
    ("CROSSJAX_WORKDIR", "runs/p160m", "is relative: it would be on each worker's own disk and lost with the VMs"),
    ("CROSSJAX_TPU_TYPE", "tpu7x-8", "export CROSSJAX_TPU_RUNTIME="),
    ("CROSSJAX_TPU_POLL_SECONDS", "soon", "is not a number of seconds")])
def test_bad_settings_fail_at_once_with_the_fix(cloud, checkout, settings, variable, value, message):
    r = tpu_vm(cloud, checkout, "babysit", **{**settings, variable: value})
    assert r.returncode == 2 and message in r.stderr and f"{variable}={value}" in r.stderr
    assert cloud.calls() == []


def test_the_setup_hook_runs_on_every_worker_at_every_setup_and_a_failing_one_stops_setup(cloud, checkout,
                                                                                        settings):
    assert tpu_vm(cloud, checkout, "create", **settings).returncode == 0
    hook = "echo mounted >> hook.log"
    for _ in range(2):
        assert tpu_vm(cloud, checkout, "setup", **settings, CROSSJAX_TPU_SETUP_HOOK=hook).returncode == 0
    for worker in (0, 1):
        assert (cloud.state / f"slice-1/worker-{worker}/hook.log").read_text() == "mounted\nmounted\n"
    r = tpu_vm(cloud, checkout, "setup", **settings, CROSSJAX_TPU_SETUP_HOOK="test -d /nonexistent/share")
    assert r.returncode != 0
    assert "CROSSJAX_TPU_SETUP_HOOK failed on this worker: test -d /nonexistent/share" in r.stderr
    assert "it must be safe to repeat" in r.stderr
