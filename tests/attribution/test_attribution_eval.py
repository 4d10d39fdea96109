"""The `attribution` evaluator (config.evals): at the end of a run over model snapshots it attributes
eval.attribution_task and writes what `python -m crossjax.analyze --task` writes, with the same summary line."""
import json

import numpy as np
import pytest

from crossjax import analyze, configs, evals
from crossjax.errors import CrossjaxError
from crossjax.summary import RunSummary


def run_context(workdir, task, **overrides) -> evals.RunContext:
    """The evaluator's view of the finished run of conftest.finished_run (only what it reads)."""
    recorded = json.loads((workdir / "config.json").read_text())["model"]
    c = configs.base_config()
    c.data.source = "snapshots"
    c.model.snapshots, c.model.path_template, c.model.hook = (recorded["snapshots"], recorded["path_template"],
                                                              recorded["hook"])
    c.eval.attribution_task = str(task)
    c.eval.attribution_ig_steps, c.eval.attribution_draws = 2, 2
    for key, value in overrides.items():
        c.eval[key] = value
    names = tuple(RunSummary.read(workdir).snapshots)
    return evals.RunContext(config=c, workdir=str(workdir), store=None, snapshots=names, snapshot_indices=None,
                            scales=np.ones(len(names)), heldout_blocks=(), crosscoder=None, shardings={},
                            export_dir=str(workdir / "export"))


def test_the_evaluator_writes_what_analyze_writes(finished_run):
    workdir, task = finished_run
    result = evals.run_all("attribution", run_context(workdir, task))
    by_evaluator = json.loads((workdir / "attribution" / "thou.json").read_text())
    npz = dict(np.load(workdir / "attribution" / "thou.npz"))
    # the command, on the same run with the same settings (seed 0 = the config's train.seed)
    assert analyze.main(["analyze", f"--workdir={workdir}", f"--task={task}", "--ig_steps=2", "--draws=2"]) == 0
    by_command = json.loads((workdir / "attribution" / "thou.json").read_text())
    assert by_evaluator == by_command
    for key, value in np.load(workdir / "attribution" / "thou.npz").items():
        np.testing.assert_array_equal(npz[key], value)
    assert result == {"attribution": {"thou": RunSummary.read(workdir).evals["attribution"]["thou"]}}
    assert list(by_evaluator["snapshots"]) == ["step0", "step1"]


def test_the_k_grid_and_methods_come_from_the_config(finished_run):
    workdir, task = finished_run
    out = evals.get("attribution")(run_context(workdir, task, attribution_methods="attribution",
                                               attribution_max_k=4))
    written = json.loads((workdir / "attribution" / "thou.json").read_text())
    curves = written["snapshots"]["step1"]["curves"]
    assert list(curves) == ["attribution"] and curves["attribution"]["k"] == [1, 2, 4]
    assert out["thou"]["snapshots"]["step1"]["k"] == 4


def test_it_skips_runs_without_a_task_or_snapshots_and_names_a_bad_method(finished_run):
    workdir, task = finished_run
    assert evals.get("attribution")(run_context(workdir, "")) is None             # not asked for
    planted = run_context(workdir, task)
    planted.config.data.source = "planted"
    assert evals.get("attribution")(planted) is None
    assert not (workdir / "attribution").exists()
    with pytest.raises(CrossjaxError, match=r"eval.attribution_methods='atribution' names \['atribution'\]"):
        evals.get("attribution")(run_context(workdir, task, attribution_methods="atribution"))


def test_bad_settings_fail_the_check_that_runs_before_any_stage(finished_run, tmp_path):
    workdir, task = finished_run
    evals.check("heldout,attribution", run_context(workdir, task).config)        # good settings pass
    for overrides, message in (({"attribution_methods": "attribution,ig"}, r"names \['ig'\]; choose among"),
                               ({"attribution_draws": 0}, "attribution_draws must be >= 1"),
                               ({"attribution_task": "kjv_agreemnt"}, "unknown task 'kjv_agreemnt'"),
                               ({"attribution_task": str(tmp_path / "none.jsonl")}, "none.jsonl")):
        with pytest.raises(CrossjaxError, match=message):
            evals.check("attribution", run_context(workdir, task, **overrides).config)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "he said thou"}\n')
    with pytest.raises(CrossjaxError, match=r"eval.attribution_task=.*bad.jsonl:1"):
        evals.check("attribution", run_context(workdir, bad).config)
