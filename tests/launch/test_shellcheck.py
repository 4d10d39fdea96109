"""The launch scripts (and the fakes the tests run them with) pass shellcheck with no finding at all."""
import shutil
import subprocess

import pytest

from _launch_fakes import FAKES, LAUNCH

SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))


def test_the_launch_scripts_are_all_checked():
    assert {p.name for p in SCRIPTS} >= {"tpu_vm.sh", "tpu_worker.sh", "gpu_slurm.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS + sorted(FAKES.iterdir()), ids=lambda p: p.name)
def test_shellcheck_finds_nothing(script):
    if shutil.which("shellcheck") is None:  # a missing checker must not pass as a clean script
        pytest.fail("shellcheck is not installed: apt-get install -y shellcheck (the CI install line has it)")
    r = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
