"""Two processes joined by jax.distributed on localhost (gloo, 4 CPU devices each) build the FeatureIndex of a
small store, each reading its own rows: the saved index equals the one one process with 8 devices builds, array
for array and bit for bit; only process 0 writes it; a damaged block read by process 1 stops both processes with
the store's error; different arguments on the two processes are refused. About 20 s."""
import json
import os
import shutil
import sys

import numpy as np

from _index_runs import index_digest, make_run, make_store
from _procs import child_env, free_port, run_together
from crossjax.analysis import FeatureIndex
from crossjax.analysis.lookup import INDEX_ARRAYS, INDEX_META

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_index_two_process.py")


def _saved(path):
    with np.load(os.path.join(path, INDEX_ARRAYS)) as z:
        arrays = {k: z[k] for k in z.files}
    with open(os.path.join(path, INDEX_META)) as f:
        return arrays, json.load(f)


def test_two_processes_build_the_one_process_index(tmp_path):
    store = make_store(str(tmp_path / "store"))
    damaged = shutil.copytree(tmp_path / "store", tmp_path / "damaged")
    os.remove(damaged / "activations" / "c" / "4" / "1" / "0")  # block 4: rows 512..600, process 1's
    jumprelu = make_run(tmp_path / "jumprelu", store, "jumprelu")
    batchtopk = make_run(tmp_path / "batchtopk", store, "batchtopk", seed=1)
    build = {"top_k": 5, "batch_rows": 60, "window": 2, "histogram_bins": 8}  # odd k: the cut splits a tie
    spec = {  # whole batches only (one compiled shape): 10 batches of 60 split 5 + 5; 3 batches of 120 split 1 + 2
        "jumprelu": {"workdir": str(jumprelu), "store_url": None, "build": build, "split": 300},
        "batchtopk": {"workdir": str(batchtopk), "store_url": None, "split": 120,
                      "build": {"top_k": 5, "batch_rows": 120, "window": 1, "max_rows": 360}},
        "damaged": {"workdir": str(jumprelu), "store_url": str(damaged), "build": build},
        "mismatch": {"workdir": str(jumprelu), "store_url": None, "build": build, "process": {"1": {"top_k": 7}}},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out, port = tmp_path / "out", free_port()
    run_together([[sys.executable, SCRIPT, str(port), str(i), str(tmp_path / "spec.json"), str(out)] for i in range(2)],
                 tmp_path, "p", env=child_env(None))

    for name in ("jumprelu", "batchtopk"):
        one = FeatureIndex.build(spec[name]["workdir"], progress=False, **spec[name]["build"])  # 8 devices here
        one_arrays, one_info = _saved(one.save(tmp_path / "one" / name))
        two_arrays, two_info = _saved(out / "p0" / name)
        assert two_info == one_info
        assert sorted(two_arrays) == sorted(one_arrays)
        for k, v in one_arrays.items():
            assert two_arrays[k].dtype == v.dtype, k
            np.testing.assert_array_equal(two_arrays[k], v, err_msg=f"{name}: {k}")
        split = spec[name]["split"]  # top rows of both processes' rows made it
        rows = one_arrays["top_row"][one_arrays["top_row"] >= 0]
        assert (rows >= split).any() and (rows < split).any()
        assert not (out / "p1" / name).exists()  # written once, by process 0
        # each process's own copy of the index answers as the one-process index does
        want = index_digest(one)
        assert [(out / f"p{i}" / f"{name}.digest").read_text() for i in range(2)] == [want, want]

    own = (out / "p1" / "damaged.error").read_text()
    other = (out / "p0" / "damaged.error").read_text()
    assert own.startswith("DamagedStoreError: ") and "(block 4 snapshot s1: chunk " in own and "is missing" in own, own
    assert other == "CrossjaxError: process 1 of 2 stopped building the FeatureIndex: " + own.split(": ", 1)[1]
    assert "delete the done marker(s) " + str(damaged / "done" / "b000004_s001") in other, other
    assert not (out / "p0" / "damaged").exists()
    # processes given different arguments are told so before any row is read
    for i in range(2):
        assert (out / f"p{i}" / "mismatch.error").read_text() == (
            "CrossjaxError: the 2 processes of this jax.distributed job build the FeatureIndex with different "
            "settings (top_k; process 0: {'top_k': 5}): call FeatureIndex.build with the same arguments on every "
            "process.")
