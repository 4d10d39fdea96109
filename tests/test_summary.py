"""The run summary: non-finite numbers are written as null (valid JSON) and read back as NaN."""
import json
import math

import pytest

from crossjax.errors import CrossjaxError
from crossjax.summary import RunSummary


def _summary(workdir, **evals):
    return RunSummary(workdir=str(workdir), store="/s", steps=3, tokens=30, snapshots=["a", "b"], num_features=4,
                      init_norm=0.1, scales=[1.0, float("inf")], export="/e", evolution={"rotation": [[1.0, None]]},
                      evals=evals)


def test_non_finite_numbers_are_null_on_disk_and_nan_when_read(tmp_path):
    path = _summary(tmp_path, heldout={"ev": [0.5, float("nan")], "ev_mean": float("nan"), "rows": 7}).write()
    raw = open(path).read()
    assert "NaN" not in raw and "Infinity" not in raw
    on_disk = json.loads(raw)
    assert on_disk["evals"]["heldout"]["ev"] == [0.5, None] and on_disk["scales"] == [1.0, None]
    back = RunSummary.read(tmp_path)
    assert back.heldout["ev"][0] == 0.5 and math.isnan(back.heldout["ev"][1]) and math.isnan(back.scales[1])
    assert back.heldout["ev_mean"] is None and back.heldout["rows"] == 7      # a scalar null stays None
    assert math.isnan(back.evolution["rotation"][0][1])


def test_a_summary_of_another_version_or_shape_is_refused(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"store": "/s"}))
    with pytest.raises(CrossjaxError, match="version 1"):
        RunSummary.read(tmp_path)
    (tmp_path / "summary.json").write_text("[1]")
    with pytest.raises(CrossjaxError, match="holds list"):
        RunSummary.read(tmp_path)
