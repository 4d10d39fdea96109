"""The workdir's small files on gs:// (the local GCS emulator): written and read back through crossjax.paths,
checked with another client; a local-only operation on a URL is an error, never a local directory named "gs:";
a writer SIGKILLed in the middle of an upload leaves the old object or the new one, never a part."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _gcs_util import objects_under
from _procs import reaped, sigkill
from _trainer_util import experiment
from crossjax import paths, workdir as workdir_lib
from crossjax.errors import CrossjaxError
from crossjax.metrics_log import MetricsLog, read_records
from crossjax.summary import RunSummary


def _summary(workdir):
    return RunSummary(workdir=workdir, store="gs://b/store", steps=10, tokens=640, snapshots=["a", "b"],
                      num_features=8, init_norm=0.1, scales=[1.0, float("nan")], export=workdir + "/export",
                      evolution={"x": [1.0, float("inf")]}, evals={"heldout": {"ev_mean": 0.5}})


def test_paths_round_trip_on_gcs(gcs_url):
    assert not paths.exists(gcs_url) and not paths.isdir(gcs_url)
    paths.write_text(paths.join(gcs_url, "a.json"), "one")
    paths.write_bytes(paths.join(gcs_url, "sub", "b.bin"), b"\x00two")
    assert objects_under(gcs_url) == {"a.json": b"one", "sub/b.bin": b"\x00two"}  # another client sees them
    assert paths.isdir(gcs_url) and paths.isfile(paths.join(gcs_url, "a.json")) and not paths.isfile(gcs_url)
    assert paths.listdir(gcs_url) == ["a.json", "sub"]
    assert paths.list_files(gcs_url) == ["a.json", "sub/b.bin"]
    assert paths.read_text(paths.join(gcs_url, "a.json")) == "one"
    with pytest.raises(FileNotFoundError):
        paths.read_bytes(paths.join(gcs_url, "missing.json"))
    paths.move(paths.join(gcs_url, "sub"), paths.join(gcs_url, "moved"))
    assert objects_under(gcs_url) == {"a.json": b"one", "moved/b.bin": b"\x00two"}


def test_workdir_on_gcs_records_and_guards_the_config(gcs_url, tmp_path, monkeypatch):
    from crossjax import configs
    monkeypatch.chdir(tmp_path)
    config = experiment("synthetic", "tiny")
    workdir = workdir_lib.prepare(gcs_url + "/")
    assert workdir == gcs_url
    workdir_lib.record(config, workdir)
    assert json.loads(objects_under(gcs_url)["config.json"]) == workdir_lib.config_json(config)
    assert workdir_lib.check(config, workdir, configs.base_config())
    other = config.copy_and_resolve_references()
    other.train.steps = int(config.train.steps) + 1
    with pytest.raises(CrossjaxError, match="train.steps"):
        workdir_lib.check(other, workdir, configs.base_config())
    assert os.listdir(tmp_path) == []  # nothing local: no directory named "gs:"


def test_local_only_operations_on_urls_are_errors_and_make_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import pathlib
    mangled = str(pathlib.Path("gs://bucket/run"))  # pathlib collapses the "//": gs:/bucket/run
    with pytest.raises(CrossjaxError, match="'//' was lost"):
        workdir_lib.prepare(mangled)
    with pytest.raises(CrossjaxError, match="'//' was lost"):
        RunSummary.read(mangled)
    from crossjax.store import ActivationStore
    with pytest.raises(CrossjaxError, match="'//' was lost"):
        ActivationStore.open(mangled + "/store")
    with pytest.raises(CrossjaxError, match="s3:// is not supported"):
        workdir_lib.prepare("s3://bucket/run")
    with pytest.raises(CrossjaxError, match="needs a local path"):
        paths.require_local("gs://bucket/run/report", "the report's browser check")
    assert os.listdir(tmp_path) == []


def test_summary_written_and_read_back_on_gcs(gcs_url):
    summary = _summary(gcs_url)
    assert summary.write() == gcs_url + "/summary.json"
    raw = json.loads(objects_under(gcs_url)["summary.json"])
    assert raw["scales"] == [1.0, None] and raw["steps"] == 10
    back = RunSummary.read(gcs_url)
    assert back.steps == 10 and back.heldout == {"ev_mean": 0.5} and np.isnan(back.scales[1])
    assert RunSummary.read(gcs_url + "/summary.json").workdir == gcs_url
    with pytest.raises(CrossjaxError, match="does not exist: the run has not finished"):
        RunSummary.read(gcs_url + "/nothing-here")


def test_summary_command_reads_a_gcs_workdir(gcs_emulator, gcs_url):
    _summary(gcs_url).write()
    env = {**os.environ, **gcs_emulator["env"]}
    r = subprocess.run([sys.executable, "-m", "crossjax.summary", gcs_url], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0 and "finished: 10 steps, 640 tokens" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "crossjax.summary", gcs_url + "/none"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 2 and "has not finished" in r.stderr


def test_metrics_log_on_gcs_resumes_and_drops_later_records(gcs_url):
    log = MetricsLog(gcs_url, 0, 4, ("a", "b"))
    for step in (1, 2, 3):
        log.write(step, "train", {"loss": float(step), "ev": np.array([0.5, 0.25])})
    log.close()
    lines = objects_under(gcs_url)["metrics.jsonl"].decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert any(k.startswith("tb/events.out.tfevents") for k in objects_under(gcs_url))
    log = MetricsLog(gcs_url, 2, 4, ("a", "b"))  # resumed from the checkpoint of step 2
    log.write(3, "train", {"loss": 30.0})
    log.close()
    assert [(r["step"], r["loss"]) for r, _ in read_records(gcs_url + "/metrics.jsonl")] == [(1, 1.0), (2, 2.0),
                                                                                           (3, 30.0)]


_UPLOADER = textwrap.dedent("""
    import sys
    from crossjax import paths
    url = sys.argv[1]
    n = 0
    while True:
        n += 1
        paths.write_bytes(url, bytes([n % 251]) * (8 << 20))
        print(n, flush=True)
""")


def test_sigkill_mid_upload_leaves_a_whole_object(gcs_emulator, gcs_url):
    """The summary, config.json, metrics and exports are each one upload: a writer killed in the middle of
    one leaves the previous whole object, never part of the new one."""
    url = gcs_url + "/summary.json"
    env = {**os.environ, **gcs_emulator["env"]}
    proc = subprocess.Popen([sys.executable, "-c", _UPLOADER, url], stdout=subprocess.PIPE, text=True, env=env)
    with reaped(proc):
        assert proc.stdout.readline().strip() == "1"  # one whole object is there; the next upload is under way
        sigkill(proc)
    data = paths.read_bytes(url)
    assert len(data) == 8 << 20 and len(set(data)) == 1


def test_a_gcs_workdir_without_gcsfs_names_the_package(gcs_url, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
    with pytest.raises(CrossjaxError, match=r"gcsfs, which is not installed: pip install 'crossjax\[gcs\]'"):
        workdir_lib.prepare(gcs_url)
