"""The FeatureIndex pass splits the features over the local devices (8 here): the same index as on one device.
(Two processes of 4 devices each: tests/analysis/test_index_two_process.py.)"""
import numpy as np

from _index_runs import F, make_run, make_store
from crossjax.analysis import FeatureIndex, index_pass


def test_the_index_split_over_devices_equals_the_one_device_index(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", make_store(str(tmp_path / "store")), "jumprelu")  # 32 features: split 8 ways
    assert index_pass.feature_placement(F)(np.zeros((4, F)), 1).sharding.num_devices == 8
    split = FeatureIndex.build(run, top_k=5, batch_rows=120, progress=False)
    monkeypatch.setattr(index_pass, "feature_placement", lambda f: (lambda x, axis: x))
    whole = FeatureIndex.build(run, top_k=5, batch_rows=120, progress=False)
    np.testing.assert_array_equal(split.counts, whole.counts)
    np.testing.assert_array_equal(split.counts_per_snapshot, whole.counts_per_snapshot)
    for f in range(F):
        a, b = split.top_examples(f, 5), whole.top_examples(f, 5)
        assert [e.row for e in a] == [e.row for e in b]
        np.testing.assert_allclose([e.value for e in a], [e.value for e in b], rtol=1e-5)
        np.testing.assert_array_equal(split.histogram(f).counts, whole.histogram(f).counts)
