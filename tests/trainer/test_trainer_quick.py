"""experiments/synthetic.py:quick, the documented command's config, recovers the planted features (about 30 s)."""
import pytest

from _trainer_util import experiment
from crossjax import pipeline


@pytest.mark.slow   # about 20 s: the README's planted command (experiments/synthetic.py:quick) shows the same figures
def test_quick_variant_recovers_planted_features(tmp_path):
    c = experiment("synthetic", "quick")
    c.train.progress = False
    out = pipeline.run(c, str(tmp_path))
    r = out.evals["recovery"]
    assert r["mean_max_cos"] >= 0.9, r
    assert r["frac_above"] >= 0.8, r
    assert r["emergence_within_one"] >= 0.6, r       # the emergent features' birth snapshots, within one
    assert out.heldout["ev_mean"] >= 0.9, out.heldout
    assert 0.0 < out.heldout["l0_mean"] < 8.0          # sparse: ~1.9 true features fire per row
