"""The activation store on gs:// (the local GCS emulator): the same objects as the same store on disk, a writer
SIGKILLed mid-write (inside a unit, and from outside) resumes to those same bytes, damage is named."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from _files import tree_bytes
from _gcs_util import objects_under
from _procs import child_env, reaped, sigkill
from crossjax import paths
from crossjax.store import ActivationStore, DamagedStoreError, IncompleteStoreError

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
WRITER = os.path.join(DATA, "_store_writer_proc.py")
sys.path.insert(0, DATA)
import _store_writer_proc as writer  # noqa: E402


def _env(gcs_emulator):
    return child_env(1, PYTHONPATH=os.path.dirname(os.path.dirname(DATA)), **gcs_emulator["env"])


def run_writer(gcs_emulator, url, *args, check=True):
    return subprocess.run([sys.executable, WRITER, url, *map(str, args)], capture_output=True, text=True,
                          env=_env(gcs_emulator), timeout=120, check=check)


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, gcs_emulator):
    path = str(tmp_path_factory.mktemp("ref") / "store")
    run_writer(gcs_emulator, path, 0, 1)
    return tree_bytes(path)


def test_store_on_gcs_holds_the_same_bytes_and_reads_back(gcs_emulator, gcs_url, local_reference):
    run_writer(gcs_emulator, gcs_url, 0, 1)
    assert objects_under(gcs_url) == local_reference
    st = ActivationStore.open(gcs_url)
    assert st.url == gcs_url and st.is_complete()
    start, stop = st.block_range(2)
    np.testing.assert_array_equal(st.read_rows(start, stop)[:, 1],
                                  writer.unit_acts(2, 1, stop - start).astype(np.float16))


def test_sigkill_inside_a_unit_on_gcs_then_resume_gives_the_same_bytes(gcs_emulator, gcs_url, local_reference):
    res = run_writer(gcs_emulator, gcs_url, 0, 1, "--die-before-marker", 5, check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    st = ActivationStore.open(gcs_url)
    assert len(st.missing_units()) == writer.META.num_blocks * 4 - 5
    assert paths.isfile(gcs_url + "/activations/c/1/0/0")  # the killed unit's data is there, unmarked
    with pytest.raises(IncompleteStoreError, match="unfinished"):
        st.read_rows(8, 16)
    run_writer(gcs_emulator, gcs_url, 0, 1)
    assert objects_under(gcs_url) == local_reference


def test_sigkill_from_outside_mid_run_on_gcs_then_resume(gcs_emulator, gcs_url, local_reference):
    proc = subprocess.Popen([sys.executable, WRITER, gcs_url, "0", "1", "--sleep", "0.02"], stdout=subprocess.PIPE,
                            text=True, env=_env(gcs_emulator))
    with reaped(proc):
        for _ in range(7):
            assert proc.stdout.readline().startswith("unit ")
        sigkill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not ActivationStore.open(gcs_url).is_complete()
    run_writer(gcs_emulator, gcs_url, 0, 1)
    assert objects_under(gcs_url) == local_reference


def test_a_chunk_missing_under_its_marker_on_gcs_is_named(gcs_emulator, gcs_url):
    run_writer(gcs_emulator, gcs_url, 0, 1)
    paths.remove(gcs_url + "/activations/c/2/1/0")
    with pytest.raises(DamagedStoreError, match=r"block 2.*step1"):
        ActivationStore.open(gcs_url).read_rows(16, 24)
