"""FeatureIndex on damaged or moved inputs: a truncated or corrupt saved index, a moved workdir, bad arguments.

Each fault is injected into files a real build wrote; each must give a CrossjaxError naming the file or the
argument and the fix, never a raw zip/numpy/attribute/KeyError.
"""
import json
import shutil

import numpy as np
import pytest

from crossjax import crosscoder, crosscoder_export, planted
from crossjax.analysis.lookup import INDEX_ARRAYS, INDEX_META, FeatureIndex
from crossjax.errors import CrossjaxError
from crossjax.summary import RunSummary

S, D, F = 3, 6, 8
PLANTED = dict(num_snapshots=S, d_model=D, num_features=4, num_rows=300, block_rows=100, firing_prob=0.3,
               noise_std=0.05, seed=5)
BUILD = dict(top_k=3, batch_rows=100, window=1, progress=False)


def make_run(root):
    """A workdir as training leaves it, the store inside it (store.path relative): store/, export/, summary.json."""
    store = planted.ensure_planted(PLANTED, str(root / "store"))
    cfg = crosscoder.CrosscoderConfig(num_snapshots=S, d_model=D, num_features=F, activation="relu")
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=shape).astype(np.float32) * 0.5 for k, shape in crosscoder.param_shapes(cfg).items()}
    crosscoder_export.export_params(params, store.estimate_scales(), cfg, str(root / "export"))
    RunSummary(workdir=str(root), store=store.url, steps=1, tokens=1, snapshots=list(store.meta.snapshots),
               num_features=F, init_norm=1.0, scales=[1.0] * S, export=str(root / "export"), evolution={},
               evals={}).write(str(root))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "work")


@pytest.fixture(scope="module")
def saved(run, tmp_path_factory):
    index = FeatureIndex.build(run, **BUILD)
    return index, index.save(tmp_path_factory.mktemp("index") / "index")


def damaged_copy(saved_dir, tmp_path, name, change):
    d = shutil.copytree(saved_dir, tmp_path / "copy")
    f = d / name
    f.write_bytes(change(f.read_bytes()))
    return d


# ------------------------------------------------------------------------------------------------ a saved index
@pytest.mark.parametrize("change,problem", [
    (lambda b: b[: len(b) // 2], "is damaged"),                       # truncated: no zip directory
    (lambda b: b"", "is damaged"),                                    # emptied
    (lambda b: b[:200] + bytes([b[200] ^ 0xFF]) + b[201:], "is damaged"),  # a byte of the first array flipped
    (lambda b: b"\x93NUMPY garbage" * 10, "is damaged"),             # not an npz at all
])
def test_a_damaged_arrays_file_is_named(saved, tmp_path, change, problem):
    d = damaged_copy(saved[1], tmp_path, INDEX_ARRAYS, change)
    with pytest.raises(CrossjaxError, match=problem) as e:
        FeatureIndex.load(d)
    assert str(d / INDEX_ARRAYS) in str(e.value) and "rebuild the index" in str(e.value)


@pytest.mark.parametrize("edit,problem", [
    (lambda info: [info], "not a version-1"),
    (lambda info: None, "not a version-1"),
    (lambda info: {k: v for k, v in info.items() if k != "top_k"}, r"\['top_k'\]"),
    (lambda info: dict(info, num_features="8"), r"\['num_features'\]"),
    (lambda info: dict(info, snapshots=[1, 2]), "malformed"),
    (lambda info: dict(info, store_columns=["x"]), r"store_columns=\['x'\]"),
    (lambda info: dict(info, top_k=5), r"top_value.*\(8, 5\)"),        # arrays of another shape than the settings
    (lambda info: dict(info, snapshots=["a", "b", "c", "d"]), r"norms.*\(4, 8\)"),
])
def test_settings_that_do_not_fit_the_arrays_are_named(saved, tmp_path, edit, problem):
    d = shutil.copytree(saved[1], tmp_path / "copy")
    info = json.loads((d / INDEX_META).read_text())
    (d / INDEX_META).write_text(json.dumps(edit(info)))
    with pytest.raises(CrossjaxError, match=problem) as e:
        FeatureIndex.load(d)
    assert str(d) in str(e.value) and "rebuild the index" in str(e.value)
    (d / INDEX_META).write_text('{"format": ')
    with pytest.raises(CrossjaxError, match="is not valid JSON"):
        FeatureIndex.load(d)


def test_arrays_missing_or_of_the_wrong_shape_are_named(saved, tmp_path):
    d = shutil.copytree(saved[1], tmp_path / "copy")
    with np.load(d / INDEX_ARRAYS) as z:
        arrays = {k: z[k] for k in z.files}
    for bad, problem in ((dict(arrays, count=arrays["count"][:3]), r"'count': \('int64 \(3,\)', \(8,\)\)"),
                         ({k: v for k, v in arrays.items() if k != "norms"}, r"'norms': \(None"),
                         (dict(arrays, window_tokens=arrays["window_tokens"][:-1]), "different lengths")):
        with open(d / INDEX_ARRAYS, "wb") as f:
            np.savez(f, **bad)
        with pytest.raises(CrossjaxError, match=problem):
            FeatureIndex.load(d)
    with open(d / INDEX_ARRAYS, "wb") as f:  # and the good arrays load again
        np.savez(f, **arrays)
    assert FeatureIndex.load(d).info == saved[0].info


# ------------------------------------------------------------------------------------------------ a moved workdir
def test_build_on_a_moved_workdir_finds_its_export_and_store(run, saved, tmp_path):
    copied = shutil.copytree(run, tmp_path / "copied")
    summary = RunSummary.read(copied)
    assert summary.workdir == str(run) and summary.store.startswith(str(run))  # absolute paths of the old place
    # a copy: its own export, and the recorded store, which still exists
    index = FeatureIndex.build(copied, **BUILD)
    assert index.info["export_dir"] == str((copied / "export").resolve()) and index.info["store_url"] == summary.store
    # moved: the recorded export and store are gone, so both are found inside the workdir as it is now
    moved = tmp_path / "moved"
    shutil.move(str(run), moved)
    try:
        index = FeatureIndex.build(moved, **BUILD)
    finally:
        shutil.move(str(moved), run)
    assert index.info["store_url"] == str(moved / "store")
    assert index.info["export_dir"] == str((moved / "export").resolve())
    np.testing.assert_array_equal(index.counts, saved[0].counts)  # the same numbers as before the move
    np.testing.assert_array_equal(index.top_examples(1)[0].tokens, saved[0].top_examples(1)[0].tokens)


def test_a_store_outside_a_moved_workdir_must_be_given(run, tmp_path):
    work = shutil.copytree(run, tmp_path / "work", ignore=shutil.ignore_patterns("store"))
    outside = shutil.copytree(run / "store", tmp_path / "data" / "store")
    summary = RunSummary.read(work)
    summary.store, summary.workdir = str(tmp_path / "old_data" / "store"), "/old/work"
    summary.export = "/old/work/export"
    summary.write(str(work))
    with pytest.raises(CrossjaxError, match=r"names the store .*old_data/store, which does not exist.*store_url"):
        FeatureIndex.build(work, **BUILD)
    assert FeatureIndex.build(work, str(outside), **BUILD).info["store_url"] == str(outside)


def test_another_exports_summary_is_not_this_ones(run, tmp_path):
    """An export dir whose parent holds the summary.json of another run's export, which still exists."""
    parent = tmp_path / "exports"
    mine = shutil.copytree(run / "export", parent / "mine")
    shutil.copy(run / "summary.json", parent / "summary.json")  # names <run>/export, which exists
    with pytest.raises(CrossjaxError, match="no store_url given"):
        FeatureIndex.build(mine, **BUILD)
    assert FeatureIndex.build(mine, str(run / "store"), **BUILD).info["store_url"] == str(run / "store")


def test_a_version_1_summary_gets_the_run_summary_error(run, tmp_path):
    work = shutil.copytree(run, tmp_path / "work")
    (work / "summary.json").write_text(json.dumps({"store": str(work / "store"), "export": str(work / "export")}))
    with pytest.raises(CrossjaxError, match="run summary of version 1.*Rerun the same training command"):
        FeatureIndex.build(work, **BUILD)
    (work / "summary.json").write_text(json.dumps(dict(json.loads((run / "summary.json").read_text()), store=5)))
    with pytest.raises(CrossjaxError, match="store is 5, not a path"):
        FeatureIndex.build(work, **BUILD)


# ------------------------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("kwargs,problem", [
    (dict(top_k=-1), r"top_k=-1 must be an integer >= 1"),
    (dict(top_k="3"), r"top_k='3' must be an integer"),
    (dict(batch_rows=2.5), r"batch_rows=2.5 must be an integer"),
    (dict(window=-2), r"window=-2 must be an integer >= 0"),
    (dict(max_rows=True), r"max_rows=True must be an integer >= 1 or None"),
    (dict(emergence_threshold="a"), r"emergence_threshold='a' must be a number in \[0, 1\]"),
    (dict(emergence_threshold=float("nan")), r"emergence_threshold=nan"),
    (dict(store_url=3), r"store_url=3 must be the store's path"),
])
def test_build_arguments_are_checked(run, kwargs, problem):
    with pytest.raises(CrossjaxError, match=problem):
        FeatureIndex.build(run, **{**BUILD, **kwargs})


def test_query_arguments_are_checked(saved):
    index = saved[0]
    for call, problem in [
        (lambda: index.search(min_frequency="a"), r"search: min_frequency='a' must be a number in \[0, 1\]"),
        (lambda: index.search(max_frequency=None), r"max_frequency=None"),
        (lambda: index.top_examples(0, k="2"), r"top_examples: k='2' must be an integer >= 1"),
        (lambda: index.top_examples(0, k=0), r"k=0 must be an integer >= 1"),
        (lambda: index.feature(0, window=1.5), r"window=1.5 must be an integer >= 0"),
        (lambda: index.top_examples(0, marks="[]"), r"marks='\[\]' must be two strings"),
        (lambda: index.top_examples(0, tokenizer=5), r"tokenizer=5 cannot decode"),
        (lambda: index.features_for_row(0, k=-1), r"features_for_row: k=-1"),
        (lambda: FeatureIndex.load(None), r"FeatureIndex.load: None is not a path"),
        (lambda: index.save(7), r"FeatureIndex.save: 7 is not a path"),
        (lambda: FeatureIndex.build(None), r"given as NoneType"),
    ]:
        with pytest.raises(CrossjaxError, match=problem):
            call()
    assert len(index.search(min_frequency=0, max_frequency=1)) == F  # the good path is unchanged


def test_activations_that_overflow_float32_are_named(run, tmp_path):
    params, scales, cfg = crosscoder_export.load_exported(str(run / "export"))
    params = dict(params, W_enc=np.asarray(params["W_enc"]) * np.float32(1e37))  # finite weights, infinite sums
    crosscoder_export.export_params(params, scales, cfg, str(tmp_path / "export"))
    with pytest.raises(CrossjaxError, match=r"the activations of features \[.*\] on rows \[0, 100\) overflow "
                       r"float32: .*index it over the store it was trained on"):
        FeatureIndex.build(tmp_path / "export", str(run / "store"), **BUILD)
