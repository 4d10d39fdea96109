"""`python -m crossjax.report` on two processes joined by jax.distributed (loopback, gloo, 4 simulated devices
each): they share the feature index's pass over the store and process 0 alone writes the report, the same
report as one process writes. The 2048 rows scanned are one batch of the pass, so process 1 reads none: its
statistics are the empty ones, which must still merge (they once paired the wrong arrays)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

from _procs import child_env, free_port, run_together

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _report_cmd(workdir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "crossjax.report", f"--workdir={workdir}", "--context_features=8",
            "--contexts_per_snapshot=3", "--index_rows=2048", *extra]


def test_two_processes_write_the_report_of_one(finished_run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for dst in (one, two):
        shutil.copytree(finished_run[0], dst, ignore=shutil.ignore_patterns("checkpoints", "tb", "index", "report"))
    single = subprocess.run(_report_cmd(str(one)), cwd=REPO, env=child_env(8), capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    port = free_port()
    run_together([_report_cmd(str(two), f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}")
                  for i in range(2)], tmp_path, "report", cwd=REPO,
                 env=child_env(4, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"))
    outs = [(tmp_path / f"report{i}.log").read_text() for i in range(2)]
    assert "report: " in outs[0] and "report: " not in outs[1]   # process 0 alone names the report

    def digest(workdir):   # the saved index (its settings and arrays) and every data file of the report
        info = json.loads((workdir / "index" / "feature_index.json").read_text())
        info = {k: v for k, v in info.items() if k not in ("workdir", "export_dir", "store_url")}
        with np.load(workdir / "index" / "feature_index.npz") as z:
            arrays = {k: z[k].tobytes() for k in z.files}
        data = {str(p.relative_to(workdir)): p.read_bytes() for p in sorted((workdir / "report" / "data").rglob("*"))
                if p.is_file()}
        return info, arrays, data
    assert (two / "report" / "index.html").is_file()
    assert digest(two) == digest(one)
    assert not list(two.glob("report.partial*"))
