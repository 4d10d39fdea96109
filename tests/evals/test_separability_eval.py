"""The separability evaluator in a run: config.evals="...,separability" adds it to summary.json."""
import numpy as np

from _trainer_util import summary, tiny_config
from crossjax import pipeline


def test_separability_evaluator_in_a_planted_run(tmp_path):
    c = tiny_config(tmp_path / "store", **{"train.steps": 40, "train.checkpoint_every": 0,
                                          "eval.separability_features": 5, "eval.separability_rows": 400})
    c.evals = "heldout,separability"
    out = pipeline.run(c, str(tmp_path / "run"))
    sep = out.evals["separability"]
    np.testing.assert_equal(summary(tmp_path / "run").evals["separability"], sep)    # NaN read back as NaN
    assert sep["rows"] == 400 and sep["snapshots"] == ["planted_0", "planted_1", "planted_2", "planted_3"]
    assert 1 <= len(sep["features"]) <= 5 and np.shape(sep["auc"]) == (len(sep["features"]), 4)
    assert np.all((np.asarray(sep["auc"]) >= 0) & (np.asarray(sep["auc"]) <= 1))
    assert len(out.evolution["clusters"]["sizes"]) == 6
    # planted data: each probed feature's AUC against the planted strength of its true match
    assert len(sep["spearman_planted_strength"]) == len(sep["features"]) == len(sep["matched_true_features"])
    assert all(0 <= t < 16 for t in sep["matched_true_features"])
