"""The fake cloud the launch scripts run against: fake gcloud, srun, sbatch and scontrol (and the python3, uv and
python a TPU worker would have) first on PATH, each recording its argv in one log, and a scratch checkout the TPU
script ships to its simulated workers."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
FAKES = Path(__file__).resolve().parent / "fakes"


class FakeCloud:
    """The fakes in `bin`, their shared state in `state` (calls, simulated slices, trainings), and `env`: the
    environment that puts them first on PATH, without any CROSSJAX_ or SLURM_ variable of the caller's."""

    def __init__(self, root: Path):
        self.bin = root / "bin"
        self.state = root / "state"
        self.bin.mkdir()
        self.state.mkdir()
        for fake in FAKES.iterdir():  # copied and made executable: no reliance on the checkout's file modes
            shutil.copy(fake, self.bin / fake.name)
            (self.bin / fake.name).chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("CROSSJAX_", "SLURM_", "FAKE_"))}
        self.env.update(PATH=f"{self.bin}:{os.environ['PATH']}", FAKE_STATE=str(self.state))

    def calls(self, program: str | None = None) -> list[list[str]]:
        """Every recorded call's argv (program first), in order; only `program`'s when given."""
        log = self.state / "calls"
        records = log.read_bytes().split(b"\x1e") if log.exists() else []
        calls = [[a.decode() for a in r.split(b"\0")[:-1]] for r in records if r]
        return [c for c in calls if program is None or c[0] == program]

    def venv(self, where: Path) -> Path:
        """A crossjax environment whose python is the fake one (as a TPU worker's after setup)."""
        (where / "bin").mkdir(parents=True)
        (where / "bin" / "python").symlink_to(self.bin / "python")
        return where


def scratch_checkout(root: Path) -> Path:
    """A small git checkout holding the TPU launch scripts and an experiment file, as the user's clone would."""
    (root / "launch").mkdir(parents=True)
    for script in ("tpu_vm.sh", "tpu_worker.sh"):
        shutil.copy(LAUNCH / script, root / "launch" / script)
        (root / "launch" / script).chmod(stat.S_IRWXU)
    (root / "experiments").mkdir()
    (root / "experiments" / "tiny.py").write_text("def get_config(arg=None):\n    pass\n")
    (root / "crossjax").mkdir()
    (root / "crossjax" / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text('[project]\nname = "crossjax"\n')
    (root / ".gitignore").write_text(".venv/\n")
    (root / ".venv").mkdir()  # ignored: never shipped
    (root / ".venv" / "big").write_text("x")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root
