"""Two processes joined by jax.distributed on localhost (4 CPU devices each) train the same crosscoder as one
process with 8 devices: `python -m crossjax.train --distributed ...`, same config, same numbers. About 15 s."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from _procs import child_env
from _trainer_util import ROOT, exported, summary, tiny_config, train_records
from crossjax import pipeline

STEPS, STREAMS = 6, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    store = str(tmp_path / "store")
    over = {"train.steps": STEPS, "train.log_every": 1, "train.checkpoint_every": 3, "data.streams": STREAMS}
    one = str(tmp_path / "one")
    pipeline.run(tiny_config(store, **over), one)  # also writes the store, so the two processes only read it

    two = str(tmp_path / "two")
    port = _free_port()
    env = child_env(4)
    cmd = [sys.executable, "-m", "crossjax.train", "--config=experiments/synthetic.py:tiny",
           f"--config.store.path={store}", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
           "--config.train.checkpoint_every=3", f"--config.data.streams={STREAMS}", f"--workdir={two}",
           "--distributed", f"--coordinator=127.0.0.1:{port}", "--num_processes=2"]
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=ROOT, env=env, stdout=logs[i], stderr=logs[i])
             for i in range(2)]
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    assert codes == [0, 0], "\n".join((tmp_path / f"p{i}.log").read_text()[-3000:] for i in range(2))

    np.testing.assert_allclose([r["loss"] for r in train_records(two)], [r["loss"] for r in train_records(one)],
                               rtol=2e-5)
    a, b = exported(one), exported(two)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert summary(two).heldout["ev"] == pytest.approx(summary(one).heldout["ev"], rel=1e-4)
    # both processes wrote their part of each checkpoint's data-iterator state
    names = sorted(n for n in os.listdir(os.path.join(two, "checkpoints", str(STEPS), "data")) if n.endswith(".json"))
    assert names == ["process_0-of-2.json", "process_1-of-2.json"]
