"""One writer per unit of a store: a second activation writer whose groups overlap those of a live one stops
before writing, naming it (also as a command); the processes of one run write side by side; the claim of a
killed writer is removed with a message and its units are written again, to the bytes of an uninterrupted run."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import _activations_fixtures as fx
from _procs import child_env, free_port
from crossjax import activations, locks

REPO = Path(__file__).resolve().parents[2]
WRITER = REPO / "tests" / "data" / "_activation_writer_proc.py"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return fx.make_root(tmp_path_factory.mktemp("snaps"))


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    """The bytes of one uninterrupted generation by one writer."""
    store = tmp_path_factory.mktemp("ref") / "store"
    activations.ensure_activations(fx.make_config(root, store), None, progress=False)
    return fx.tree_bytes(store)


def _writer(root, store, index, count, seconds_per_block):
    """A slow writer in a child with this process's 8 devices (the store's bytes are those of 8 devices)."""
    proc = subprocess.Popen([sys.executable, str(WRITER), str(root), str(store), str(index), str(count),
                             str(seconds_per_block)], cwd=REPO, env=child_env(8), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the plan first
        if line.strip() == "claimed":
            return proc
    raise AssertionError(f"the writer ended before writing: {proc.stderr.read()[-3000:]}")


def _claims(store):
    return [n for n in os.listdir(store / locks.WRITERS_DIR)]


def test_an_overlapping_second_writer_stops_before_writing(root, reference, tmp_path):
    store = tmp_path / "store"
    first = _writer(root, store, 0, 1, seconds_per_block=1.0)
    try:
        second = subprocess.run([sys.executable, "-m", "crossjax.activations",
                                 f"--config={REPO / 'tests' / '_activations_config.py'}:{root}:{store}",
                                 f"--workdir={tmp_path}"], cwd=REPO, env=child_env(8), capture_output=True, text=True,
                                timeout=300)
        assert first.poll() is None, "the first writer ended before the second one started"
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"another writer is writing {store}: pid {first.pid}" in second.stderr
        assert "run the same command again" in second.stderr and "Traceback" not in second.stderr
        with pytest.raises(locks.LockHeldError, match=f"pid {first.pid}.*u % 2 == 1"):  # every group overlaps
            activations.ensure_activations(fx.make_config(root, store), None, process_index=1, process_count=2,
                                           progress=False)
        assert len(_claims(store)) == 1  # the refused writers left no claim
        assert first.poll() is None, "the first writer ended during the checks"
    finally:
        first.kill()  # no need to wait for it: what it wrote, and what it left, is finished below
        first.wait()
    activations.ensure_activations(fx.make_config(root, store), None, progress=False)
    assert fx.tree_bytes(store) == reference and _claims(store) == []  # nothing the refused writers did remains


def test_the_processes_of_one_run_write_side_by_side(root, reference, tmp_path):
    store = tmp_path / "store"
    other = _writer(root, store, 1, 2, seconds_per_block=0.3)  # odd groups
    try:
        activations.ensure_activations(fx.make_config(root, store), None, process_index=0, process_count=2,
                                       progress=False)  # even groups, at the same time
        assert other.poll() is None or other.returncode == 0
    finally:
        out, err = other.communicate(timeout=300)
    assert other.returncode == 0, err[-3000:]
    assert fx.tree_bytes(store) == reference


def test_two_processes_joined_by_jax_distributed_write_the_store_of_one(root, reference, tmp_path):
    """`python -m crossjax.activations` in two processes of 4 devices each, joined on loopback (gloo): each writes
    its own groups, and the store has the bytes of one process's."""
    store = tmp_path / "store"
    port = free_port()
    cmd = [sys.executable, "-m", "crossjax.activations",
           f"--config={REPO / 'tests' / '_activations_config.py'}:{root}:{store}", f"--workdir={tmp_path}",
           f"--coordinator=127.0.0.1:{port}", "--num_processes=2"]
    procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=REPO, env=child_env(4), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert "activations plan (process 0 of 2)" in logs[0] and "activations plan (process 1 of 2)" in logs[1]
    assert fx.tree_bytes(store) == reference and _claims(store) == []


def test_a_killed_writers_claim_is_removed_and_its_units_written_again(root, reference, tmp_path, capsys):
    store = tmp_path / "store"
    killed = _writer(root, store, 0, 1, seconds_per_block=0.3)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert len(_claims(store)) == 1  # SIGKILL leaves the claim's file, not its lock
    activations.ensure_activations(fx.make_config(root, store), None, progress=False)
    assert f"removed the claim of a writer of {store} that has ended: pid {killed.pid}" in capsys.readouterr().err
    assert fx.tree_bytes(store) == reference and _claims(store) == []


def test_a_unit_another_writer_finished_meanwhile_names_the_real_fix(root, tmp_path, monkeypatch):
    """Where no lock can be taken (a remote store), a unit finished by another writer after this one listed the
    missing units is refused with the fix, not with an option no command has."""
    from crossjax import store as store_lib
    from crossjax.errors import CrossjaxError

    config = fx.make_config(root, tmp_path / "store", **{"tokens.num_tokens": 40})
    activations.ensure_activations(config, None, progress=False)
    every_unit = [(b, s) for b in range(2) for s in (None, 0, 1, 2)]
    monkeypatch.setattr(store_lib.ActivationStore, "missing_units", lambda self: every_unit)  # an outdated listing
    with pytest.raises(CrossjaxError, match="block 0 tokens of .* was written by another writer while this one ran.*"
                                            "run the same command again") as e:
        activations.ensure_activations(config, None, progress=False)
    assert "overwrite" not in str(e.value)
