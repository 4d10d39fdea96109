"""The report and the run's feature index of a finished run whose workdir is on gs:// (the local GCS emulator):
both are written as objects beside the run (nothing local, no directory named "gs:"), the report's data agree
with a feature index built independently from a local copy of the export, and a second report (the command)
reuses the saved index instead of building it again and drops the previous report's stale objects."""
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from _gcs_util import objects_under
from _procs import child_env
from _trainer_util import ROOT
from crossjax import paths
from crossjax.analysis import lookup
from crossjax.errors import CrossjaxError
from crossjax.report import write_report


def _data(objects: dict, name: str, kind: str, n: int = 0):
    """The value a report data script (report/data/...) passes to crossjaxData."""
    text = objects[name].decode().strip()
    head = f'crossjaxData("{kind}",{n},'
    assert text.startswith(head) and text.endswith(");"), name
    return json.loads(text[len(head):-2])


@pytest.fixture
def nothing_local(tmp_path, monkeypatch):
    """The working directory and the temporary directory, both empty: anything written locally lands there."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield cwd, tmp
    assert os.listdir(cwd) == [] and os.listdir(tmp) == []


def test_report_and_feature_index_of_a_gcs_run(gcs_emulator, gcs_store, gcs_finished_run, nothing_local,
                                               tmp_path_factory, monkeypatch):
    workdir = gcs_finished_run
    index = write_report(workdir, contexts_per_snapshot=4, index_rows=2048, progress=False)
    assert index == workdir + "/report/index.html"

    report = objects_under(workdir + "/report")           # read back with an independent client
    assert "<html" in report["index.html"].decode().lower() and "feature.html" in report
    assert {"plots/strength.png", "plots/emergence.png"} <= set(report)
    assert report["plots/strength.png"][:8] == b"\x89PNG\r\n\x1a\n"
    meta = _data(report, "data/meta.js", "meta")
    assert meta["has_frequency"] and meta["rows_scanned"] == 2048
    assert f"run: <code>{workdir}</code>" in report["index.html"].decode()

    # the run's one index, saved beside the report, points at the run's gs:// places (not a staging dir)
    assert {"feature_index.npz", "feature_index.json"} <= set(objects_under(workdir + "/index"))
    saved = lookup.FeatureIndex.load(workdir + "/index")
    assert saved.info["export_dir"] == workdir + "/export" and saved.info["workdir"] == workdir
    assert saved.rows_scanned == 2048 and saved.top_k == 4

    # reference: an index built from a local copy of the export with the store named (no gs:// workdir involved)
    local_export = tmp_path_factory.mktemp("export_copy")
    for name, data in objects_under(workdir + "/export").items():
        (local_export / name).write_bytes(data)
    ref = lookup.FeatureIndex.build(str(local_export), store_url=gcs_store, max_rows=2048, top_k=4, window=8,
                                    progress=False)
    np.testing.assert_array_equal(saved.frequency, ref.frequency)
    for f in range(saved.num_features):
        assert [(e.row, e.value, list(e.tokens)) for e in saved.top_examples(f, 4)] == \
            [(e.row, e.value, list(e.tokens)) for e in ref.top_examples(f, 4)]
    keys = [c["key"] for c in meta["columns"]]
    rows = [r for p in range(meta["num_pages"]) for r in _data(report, f"data/table/table_{p:05d}.js", "table", p)]
    np.testing.assert_allclose([r[keys.index("frequency")] for r in rows], ref.frequency, rtol=1e-3, atol=1e-6)
    f = int(np.argmax(ref.frequency))
    record = _data(report, "data/feature/feature_00000.js", "feature")[f]
    assert [ex[0] for ex in record["ctx"]["ex"]] == [e.row for e in ref.top_examples(f, 4)]

    # the saved index fits the weights: reused (no build, its objects untouched), here and by the command
    generation = paths.read_versioned(workdir + "/index/feature_index.npz")[1]

    def no_build(*args, **kwargs):
        raise CrossjaxError("build called")
    with monkeypatch.context() as m:
        m.setattr(lookup.FeatureIndex, "build", classmethod(no_build))
        write_report(workdir, contexts_per_snapshot=4, index_rows=2048, progress=False)
    assert _data(objects_under(workdir + "/report"), "data/meta.js", "meta")["has_frequency"]

    paths.write_text(workdir + "/report/plots/stale.png", "from a previous report")
    r = subprocess.run([sys.executable, "-m", "crossjax.report", f"--workdir={workdir}", "--contexts_per_snapshot=4",
                        "--index_rows=2048"], cwd=nothing_local[0], env=child_env(8, PYTHONPATH=ROOT,
                                                                                    TMPDIR=str(nothing_local[1]),
                                                                                    **gcs_emulator["env"]),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"report: {workdir}/report/index.html" in r.stdout
    assert "feature index" not in r.stderr, r.stderr[-2000:]       # neither built nor rebuilt
    assert paths.read_versioned(workdir + "/index/feature_index.npz")[1] == generation
    after = objects_under(workdir + "/report")
    assert "plots/stale.png" not in after and set(after) == set(report)
    assert _data(after, "data/meta.js", "meta") == meta


def test_feature_index_save_and_load_on_gcs(gcs_url, nothing_local):
    """save/load on a gs:// prefix: the same arrays back; a damaged object is the clear error naming the fix."""
    index = lookup.FeatureIndex({"norms": np.ones((2, 3), np.float32), "count": np.arange(3),
                                 "window_keys": np.arange(4, dtype=np.int64),
                                 "window_tokens": np.arange(4, dtype=np.int32)},
                                {"snapshots": ["a", "b"], "num_features": 3, "rows_scanned": 10, "top_k": 1,
                                 "window": 0, "emergence_threshold": 0.5})
    url = gcs_url + "/index"
    assert index.save(url) == url
    objects = objects_under(url)
    assert json.loads(objects[lookup.INDEX_META])["rows_scanned"] == 10
    with np.load(io.BytesIO(objects[lookup.INDEX_ARRAYS])) as z:
        np.testing.assert_array_equal(z["count"], np.arange(3))
    paths.write_bytes(url + "/" + lookup.INDEX_ARRAYS, objects[lookup.INDEX_ARRAYS][:100])
    with pytest.raises(CrossjaxError, match="feature_index.npz is damaged.*rebuild the index"):
        lookup.FeatureIndex.load(url)
    with pytest.raises(CrossjaxError, match="not a saved FeatureIndex"):
        lookup.FeatureIndex.load(gcs_url + "/nothing-here")


def test_a_gcs_report_stopped_half_way_keeps_the_old_one(gcs_finished_run, nothing_local, monkeypatch):
    """A report stopped while its site is built uploads nothing: the previous report's objects stay as they were,
    and the local staging directory is gone (nothing_local)."""
    from crossjax.report import site
    workdir = gcs_finished_run
    write_report(workdir, contexts=False, progress=False)
    before = objects_under(workdir + "/report")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(site, "write_site", killed)
        with pytest.raises(KeyboardInterrupt):
            write_report(workdir, contexts=False, progress=False)
    assert objects_under(workdir + "/report") == before
    assert write_report(workdir, contexts=False, progress=False) == workdir + "/report/index.html"
