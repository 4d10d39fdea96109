"""A saved FeatureIndex without the per-snapshot gates and histograms (as written before they existed, or with
those parts damaged) is refused by name, with the rebuild command; the saved parts round-trip."""
import json
import shutil

import numpy as np
import pytest

from crossjax import crosscoder, crosscoder_export, planted
from crossjax.analysis.lookup import INDEX_ARRAYS, INDEX_META, FeatureIndex
from crossjax.errors import CrossjaxError

S, D, F = 3, 6, 8
PLANTED = dict(num_snapshots=S, d_model=D, num_features=4, num_rows=300, block_rows=100, firing_prob=0.3,
               noise_std=0.05, seed=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    store = planted.ensure_planted(PLANTED, str(root / "store"))
    cfg = crosscoder.CrosscoderConfig(num_snapshots=S, d_model=D, num_features=F, activation="jumprelu")
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=shape).astype(np.float32) * 0.5 for k, shape in crosscoder.param_shapes(cfg).items()}
    params["log_threshold"] = np.full(F, np.log(0.2), np.float32)
    crosscoder_export.export_params(params, store.estimate_scales(), cfg, str(root / "export"))
    index = FeatureIndex.build(root / "export", store.url, top_k=3, batch_rows=100, histogram_bins=4, progress=False)
    return index, index.save(root / "index")


def rewrite(saved_dir, tmp_path, info_edit=None, arrays_edit=None):
    d = shutil.copytree(saved_dir, tmp_path / "copy")
    if info_edit:
        info = json.loads((d / INDEX_META).read_text())
        (d / INDEX_META).write_text(json.dumps(info_edit(info)))
    if arrays_edit:
        with np.load(d / INDEX_ARRAYS) as z:
            arrays = arrays_edit({k: z[k] for k in z.files})
        with open(d / INDEX_ARRAYS, "wb") as f:
            np.savez(f, **arrays)
    return d


NEW_ARRAYS = ("top_gate", "histogram_counts", "histogram_exponent")


@pytest.mark.parametrize("info_edit,arrays_edit,problem", [
    # an index saved before the per-snapshot gates and histograms
    (lambda i: {k: v for k, v in i.items() if k != "histogram_bins"},
     lambda a: {k: v for k, v in a.items() if k not in NEW_ARRAYS}, r"\['histogram_bins'\] are missing"),
    (lambda i: dict(i, histogram_bins=0), None, "histogram_bins.*are missing or malformed"),
    (None, lambda a: {k: v for k, v in a.items() if k != "top_gate"}, r"'top_gate': \(None, \(8, 3, 3\)\)"),
    (None, lambda a: dict(a, histogram_counts=a["histogram_counts"][:, :, :2]), r"'histogram_counts'.*\(3, 8, 4\)"),
    (lambda i: dict(i, histogram_bins=8), None, r"'histogram_counts'.*\(3, 8, 8\)"),
])
def test_missing_or_mismatched_gates_and_histograms_are_named(saved, tmp_path, info_edit, arrays_edit, problem):
    d = rewrite(saved[1], tmp_path, info_edit, arrays_edit)
    with pytest.raises(CrossjaxError, match=problem) as e:
        FeatureIndex.load(d)
    assert str(d) in str(e.value) and "rebuild the index: FeatureIndex.build(...).save(path)" in str(e.value)


def test_gates_and_histograms_round_trip(saved):
    index, path = saved
    loaded = FeatureIndex.load(path)
    assert loaded.info == index.info and loaded.info["histogram_bins"] == 4
    for f in range(F):
        for s in range(S):
            assert loaded.top_examples(f, snapshot=s) == index.top_examples(f, snapshot=s)
        a, b = loaded.histogram(f), index.histogram(f)
        np.testing.assert_array_equal(a.counts, b.counts)
        np.testing.assert_array_equal(a.edges, b.edges)
    assert sum(index.histogram(f).counts.sum() for f in range(F)) == index.counts_per_snapshot.sum() > 0
