"""The FeatureIndex pass splits the features over the local devices (8 here): the same index as on one device."""
import numpy as np

from _trainer_util import tiny_config
from crossjax import pipeline
from crossjax.analysis import FeatureIndex, index_build


def test_the_index_split_over_devices_equals_the_one_device_index(tmp_path, monkeypatch):
    c = tiny_config(tmp_path / "store", **{"train.steps": 20, "train.checkpoint_every": 0})
    c.evals = "heldout"
    pipeline.run(c, str(tmp_path / "run"))                 # 64 features: split 8 ways
    assert index_build._feature_placement(64)(np.zeros((4, 64)), 1).sharding.num_devices == 8
    split = FeatureIndex.build(tmp_path / "run", top_k=5, batch_rows=512, progress=False)
    monkeypatch.setattr(index_build, "_feature_placement", lambda f: (lambda x, axis: x))
    whole = FeatureIndex.build(tmp_path / "run", top_k=5, batch_rows=512, progress=False)
    np.testing.assert_array_equal(split.counts, whole.counts)
    np.testing.assert_array_equal(split.counts_per_snapshot, whole.counts_per_snapshot)
    for f in range(64):
        a, b = split.top_examples(f, 5), whole.top_examples(f, 5)
        assert [e.row for e in a] == [e.row for e in b]
        np.testing.assert_allclose([e.value for e in a], [e.value for e in b], rtol=1e-5)
        np.testing.assert_array_equal(split.histogram(f).counts, whole.histogram(f).counts)
