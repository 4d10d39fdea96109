"""Every command answers bad input and bad state with one short message naming the problem and its fix, exit code 2
and no traceback (crossjax.cli.run); a bug still shows its traceback. Cheap checks come before expensive stages.

Each case runs the real command (python -m crossjax.<command>) on experiments/synthetic.py:tiny, or on a copy of
one finished tiny run whose files the case damages first."""
import errno
import json
import shutil
import subprocess
import sys

import pytest

from _procs import child_env
from _trainer_util import ROOT, tiny_config
from crossjax import cli

TINY = "--config=experiments/synthetic.py:tiny"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of experiments/synthetic.py:tiny, its store under workdir/store."""
    from crossjax import pipeline
    workdir = tmp_path_factory.mktemp("finished") / "run"
    pipeline.run(tiny_config("store"), str(workdir))
    return workdir


def _command(command, *args, env=None, timeout=180):
    argv = [sys.executable, "-m", f"crossjax.{command}", *map(str, args)]
    return subprocess.run(argv, cwd=ROOT, env=env or child_env(1), capture_output=True, text=True, timeout=timeout)


def _last_line(text: str) -> str:
    """The last line that is not blank (a library's native thread may end stderr with a bare newline)."""
    return [line for line in text.splitlines() if line.strip()][-1]


def _truncated(finished, tmp, name: str):
    """A copy of the finished run, at tmp/run, whose file `name` is cut after 20 bytes."""
    workdir = shutil.copytree(finished, tmp / "run")
    path = workdir / name
    path.write_bytes(path.read_bytes()[:20])
    return workdir


def _written(path, text: str):
    path.write_text(text)
    return path


def _a_file(tmp):
    (tmp / "a_file").write_text("not a directory\n")
    return tmp / "a_file"


# case -> (command, setup(tmp, finished) -> (args, env or None), message fragment, check(tmp) after, or None)
CASES = {
    "missing config file": ("train", lambda t, f: ([f"--config={t}/nope.py", f"--workdir={t}/w"], None),
                            "nope.py' does not exist", None),
    "unparsable config file": ("train", lambda t, f: ([f"--config={_written(t / 'bad.py', 'def get_config(:')}",
                                                       f"--workdir={t}/w"], None),
                               "line 1 is not valid Python", None),
    "variant typo": ("train", lambda t, f: (["--config=experiments/synthetic.py:tinyy", f"--workdir={t}/w"], None),
                     "unknown variant 'tinyy' of synthetic.py: use quick, default or tiny", None),
    "workdir is a file": ("train", lambda t, f: ([TINY, f"--workdir={_a_file(t)}"], None),
                          "is a file, not a directory; choose another --workdir", None),
    "truncated workdir config.json": (
        "train", lambda t, f: ([TINY, f"--workdir={_truncated(f, t, 'config.json')}"], None),
        "config.json is not valid JSON", None),
    "truncated scales.json": (
        "train", lambda t, f: ([TINY, f"--workdir={_truncated(f, t, 'store/scales.json')}"], None),
        "scales.json is not valid JSON", None),
    "store path is a file": ("train", lambda t, f: ([TINY, f"--config.store.path={_a_file(t)}", f"--workdir={t}/w"],
                                                    None),
                             "is a file, not a directory: point store.path at a directory", None),
    "heldout blocks before the store": (
        "train", lambda t, f: ([TINY, "--config.train.heldout_blocks=8", f"--workdir={t}/w"], None),
        "train.heldout_blocks=8 leaves no training data: the store will have 8 blocks",
        lambda t: not (t / "w" / "store").exists()),
    "activation name before the store": (
        "train", lambda t, f: ([TINY, "--config.crosscoder.activation=jumprelU", f"--workdir={t}/w"], None),
        "activation='jumprelU' must be one of", lambda t: not (t / "w" / "store").exists()),
    "hook name before the suite": (
        "train", lambda t, f: (["--config=experiments/tiny.py:micro", "--config.model.hook=blocks.0.hook_resid_psot",
                                f"--workdir={t}/w"], child_env(1, CROSSJAX_CACHE=str(t / "cache"))),
        "model.hook='blocks.0.hook_resid_psot' is not a hook name", lambda t: not (t / "cache").exists()),
    "hook past the suite's depth": (
        "train", lambda t, f: (["--config=experiments/tiny.py:micro", "--config.model.hook=blocks.5.hook_resid_post",
                                f"--workdir={t}/w"], child_env(1, CROSSJAX_CACHE=str(t / "cache"))),
        "asks for layer 5 but the suite's model has 2 layers", lambda t: not (t / "cache").exists()),
    "activations: workdir is a file": ("activations", lambda t, f: ([TINY, f"--workdir={_a_file(t)}"], None),
                                       "is a file, not a directory", None),
    "activations: store path is a file": (
        "activations", lambda t, f: ([TINY, f"--config.store.path={_a_file(t)}", f"--workdir={t}/w"], None),
        "is a file, not a directory: point store.path at a directory", None),
    "activations: hook name before the suite": (
        "activations", lambda t, f: (["--config=experiments/tiny.py:micro", "--config.model.hook=block.1",
                                      f"--workdir={t}/w"], child_env(1, CROSSJAX_CACHE=str(t / "cache"))),
        "model.hook='block.1' is not a hook name", lambda t: not (t / "cache").exists()),
    "compare: workdir is a file": ("compare", lambda t, f: ([TINY, f"--workdir={_a_file(t)}"], None),
                                   "is a file, not a directory", None),
    "compare: truncated workdir config.json": (
        "compare", lambda t, f: ([TINY, f"--workdir={_truncated(f, t, 'config.json')}"], None),
        "config.json is not valid JSON", lambda t: not (t / "run" / "sae").exists()),
    "summary: no finished run": ("summary", lambda t, f: ([t / "nothing"], None),
                                 "does not exist: the run has not finished", None),
    "summary: truncated summary.json": (
        "summary", lambda t, f: ([_truncated(f, t, "summary.json")], None),
        "summary.json is not valid JSON", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_exit_code_2(case, finished, tmp_path):
    command, setup, fragment, check = CASES[case]
    args, env = setup(tmp_path, finished)
    proc = _command(command, *args, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert fragment in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and f"crossjax.{command}: " in proc.stderr
    if check is not None:
        assert check(tmp_path), "an expensive stage ran before the cheap check"


def test_a_bug_still_shows_its_traceback(tmp_path):
    code = ("import sys\nfrom crossjax import cli, pipeline, train\n"
            "def bug(*args, **kwargs):\n    raise KeyError('a bug in crossjax')\n"
            "pipeline.run = bug\n"
            f"sys.argv = ['crossjax.train', {TINY!r}, '--workdir={tmp_path}/w']\n"
            "cli.main('train', train.train)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(1), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError: 'a bug in crossjax'" in proc.stderr


def _fails_with(body, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.run("train", body)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def _raise(e):
    def body():
        raise e
    return body


def test_run_turns_the_expected_errors_into_messages(capsys):
    from safetensors import SafetensorError
    err = _fails_with(_raise(OSError(errno.ENOSPC, "No space left on device", "/data/x")), capsys)
    assert err.startswith("crossjax.train: error: no space left while writing /data/x") and "run the same" in err
    tensorstore_error = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/s/activations/c/0/0/0": '
                                   "Failed writing: No space left on device [os_error_code='28']")
    assert "no space left while writing /s/activations/c/0/0/0" in _fails_with(_raise(tensorstore_error), capsys)
    assert "read-only file system" in _fails_with(_raise(OSError(errno.EROFS, "Read-only file system", "/r")), capsys)
    assert "permission denied for /p" in _fails_with(_raise(PermissionError(errno.EACCES, "Permission denied", "/p")),
                                                     capsys)
    try:
        json.loads('{"a": ')
    except json.JSONDecodeError as e:
        assert "a JSON file that crossjax reads is damaged" in _fails_with(_raise(e), capsys)
    assert "safetensors file is damaged" in _fails_with(_raise(SafetensorError("header too large")), capsys)
    for bug in (ValueError("INVALID_ARGUMENT: a bad spec"), KeyError("k"), TypeError("t")):
        with pytest.raises(type(bug)):
            cli.run("train", _raise(bug))


# ---- file systems that refuse writes: a read-only and a full tmpfs (mount needs privileges; skipped without)


@pytest.fixture
def mount_tmpfs(tmp_path):
    mounted = []

    def mount(name: str, size: str, read_only: bool = False, make: str | None = None):
        point = tmp_path / name
        point.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(point)
        if make:
            (point / make).mkdir()
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)])


def test_an_unwritable_workdir_names_the_cause_not_the_store(mount_tmpfs):
    ro = mount_tmpfs("ro", "1m", read_only=True, make="w")
    proc = _command("train", TINY, f"--workdir={ro}/w")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"cannot create the lock file {ro}/w/.lock (Read-only file system)" in proc.stderr
    assert "another layout" not in proc.stderr and "delete" not in proc.stderr
    proc = _command("train", TINY, f"--workdir={ro}/new")
    assert proc.returncode == 2 and f"cannot create --workdir={ro}/new (Read-only file system" in proc.stderr


def test_a_full_disk_while_writing_the_store_then_room_finishes(mount_tmpfs):
    full = mount_tmpfs("full", "300k")
    proc = _command("train", TINY, f"--workdir={full}/w")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"no space left while writing {full}/w/store/" in proc.stderr and "run the same command again" in proc.stderr
    subprocess.run(["mount", "-o", "remount,size=8m", str(full)], check=True)
    proc = _command("train", TINY, f"--workdir={full}/w")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_full_disk_while_checkpointing_then_room_finishes(mount_tmpfs, finished):
    full = mount_tmpfs("full", "200k")
    store = f"--config.store.path={finished}/store"
    proc = _command("train", TINY, store, f"--workdir={full}/w")
    # orbax's background save threads may print their own failure (a traceback inside asyncio) while the
    # checkpoint is abandoned; no frame of crossjax's, and the message is the last line
    assert proc.returncode == 2 and f'File "{ROOT}/crossjax/' not in proc.stderr, proc.stderr[-3000:]
    assert "no space left while writing" in _last_line(proc.stderr), proc.stderr[-1500:]
    subprocess.run(["mount", "-o", "remount,size=8m", str(full)], check=True)
    proc = _command("train", TINY, store, f"--workdir={full}/w")
    assert proc.returncode == 0, proc.stderr[-3000:]  # from the last checkpoint written, if one was
    assert (full / "w" / "summary.json").exists()
