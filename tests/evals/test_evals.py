"""Evaluators as plug-ins: config.evals names modules of crossjax/evals/, each a one-file change."""
import pytest

import crossjax.evals
from _trainer_util import tiny_config
from crossjax import pipeline
from crossjax.errors import CrossjaxError

PLUGIN = '''
def evaluate(run):
    """Rows of the held-out blocks and the number of parameters of the crosscoder."""
    rows = sum(hi - lo for lo, hi in map(run.store.block_range, run.heldout_blocks))
    return {"heldout_rows": rows, "features": int(run.host_params["b_enc"].shape[0]),
            "snapshots": list(run.snapshots), "export_exists": run.export_dir is not None}
'''


def test_a_new_evaluator_is_one_module_named_in_config_evals(tmp_path, monkeypatch):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "count_rows.py").write_text(PLUGIN)
    monkeypatch.setattr(crossjax.evals, "__path__", [*crossjax.evals.__path__, str(plugins)])
    c = tiny_config(tmp_path / "store", **{"train.steps": 2, "train.checkpoint_every": 0})
    c.evals = "count_rows,heldout"
    out = pipeline.run(c, str(tmp_path / "run"))
    assert list(out.evals) == ["count_rows", "heldout"]             # in the order named; recovery not asked for
    assert out.evals["count_rows"] == {"heldout_rows": 512, "features": 64, "export_exists": True,
                                       "snapshots": ["planted_0", "planted_1", "planted_2", "planted_3"]}
    assert out.evals["heldout"]["rows"] == 512


def test_an_unknown_evaluator_fails_before_any_stage(tmp_path):
    c = tiny_config(tmp_path / "store")
    c.evals = "heldout,recovry"
    with pytest.raises(CrossjaxError, match=r"unknown evaluator\(s\) \['recovry'\].*heldout, phases, recovery, separability, spliced"):
        pipeline.run(c, str(tmp_path / "run"))
    assert not (tmp_path / "store").exists()


def test_an_evaluator_setting_is_checked_before_any_stage_runs(tmp_path):
    """A bad eval.attribution_* setting stops pipeline.run before the suite, the store or the workdir exist."""
    from crossjax import configs
    c = configs.load_experiment("experiments/tiny.py:micro")
    c.evals = "heldout,attribution"
    c.eval.attribution_task = "kjv_agreement"
    c.eval.attribution_methods = "attribution,saliency"
    with pytest.raises(CrossjaxError, match="eval.attribution_methods=.*saliency"):
        pipeline.run(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
