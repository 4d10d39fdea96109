"""python -m crossjax.analyze on a finished run laid out on disk: the table, the files, and one-line errors."""
import json

import numpy as np
import pytest

from _attribution_cases import RUN_HOOK as HOOK
from _attribution_cases import RUN_SNAPSHOTS as S
from _attribution_cases import write_lines
from crossjax import analyze, train
from crossjax.summary import RunSummary


def test_analyze_prints_the_table_and_writes_the_figures(finished_run, capsys):
    workdir, task = finished_run
    assert analyze.main(["analyze", f"--workdir={workdir}", f"--task={task}", "--ig_steps=2", "--draws=2"]) == 0
    out = capsys.readouterr().out
    assert "task thou: 3 pairs at blocks.0.hook_resid_post" in out and "k=1" in out
    lines = out.splitlines()
    assert lines[2].startswith("step0") and lines[3].startswith("step1")
    result = json.loads((workdir / "attribution" / "thou.json").read_text())
    assert list(result["snapshots"]) == ["step0", "step1"] and result["pairs"] == 3
    s1 = result["snapshots"]["step1"]
    assert s1["metric_spliced"] == pytest.approx(s1["metric_clean"], abs=1e-4)
    assert set(s1["curves"]) == {"attribution", "clean_minus_corrupted", "integrated_gradients"}
    assert f"{s1['metric_clean']:+6.3f}" in lines[3]
    arrays = np.load(workdir / "attribution" / "thou.npz")
    assert arrays["attribution"].shape == (S, 24) and arrays["integrated_gradients_per_position"].shape == (S, 4, 24)
    assert list(arrays["snapshots"]) == ["step0", "step1"]
    # its line in the run summary: the figures of the same file
    line = RunSummary.read(workdir).evals["attribution"]["thou"]
    assert line["file"] == "attribution/thou.json" and line["pairs"] == 3 and line["method"] == "attribution"
    c = s1["curves"]["attribution"]
    i = c["k"].index(max(k for k in c["k"] if k <= 16))          # the summary's k: 16, or the largest below
    assert line["snapshots"]["step1"] == {
        "metric_clean": s1["metric_clean"], "metric_corrupted": s1["metric_corrupted"], "k": c["k"][i],
        "ablate_top": c["ablate_top"][i], "ablate_random": c["ablate_random"][i]}
    assert line["top_features"] == [f for f, _ in s1["top"]["attribution"][:5]]
    # and the train command's headline of the run shows it
    headline = [x for x in train.report(RunSummary.read(workdir)).splitlines() if x.startswith("attribution thou")]
    assert headline == [f"attribution thou: metric {result['snapshots']['step0']['metric_clean']:+.2f} at step0 -> "
                        f"{s1['metric_clean']:+.2f} at step1; top-{c['k'][i]} features (attribution) ablated "
                        f"{c['ablate_top'][i]:+.2f}, {c['k'][i]} random {c['ablate_random'][i]:+.2f}"]
    # one snapshot, one method
    assert analyze.main(["analyze", f"--workdir={workdir}", f"--task={task}", "--snapshots=step1",
                         "--methods=attribution"]) == 0
    result = json.loads((workdir / "attribution" / "thou.json").read_text())
    assert list(result["snapshots"]) == ["step1"] and list(result["snapshots"]["step1"]["curves"]) == ["attribution"]


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        analyze.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_input_is_one_line_naming_the_fix(finished_run, tmp_path, capsys):
    workdir, task = finished_run
    bad = write_lines(tmp_path / "bad.jsonl", [json.loads(task.read_text().splitlines()[0]),
                                               {"clean": "he said thou", "corrupted": "he said ye",
                                                "right": " art now", "wrong": " are"}])
    err = _fails(["analyze", f"--workdir={workdir}", f"--task={bad}"], capsys)
    assert err.startswith(f"crossjax.analyze: error: {bad}:2: the right answer ' art now' is 2 tokens")
    assert len(err.strip().splitlines()) == 1
    assert analyze.main(["analyze", f"--workdir={workdir}", f"--task={bad}", "--skip_invalid_pairs",
                         "--methods=attribution"]) == 0
    assert "1 pairs" in capsys.readouterr().out
    err = _fails(["analyze", f"--workdir={workdir}", f"--task={task}", "--snapshots=step7"], capsys)
    assert "['step7'] to analyze are not among the crosscoder's ['step0', 'step1']" in err
    (workdir / "summary.json").unlink()
    err = _fails(["analyze", f"--workdir={workdir}", f"--task={task}"], capsys)
    assert "summary.json does not exist: the run has not finished" in err
    assert analyze.main(["analyze", f"--workdir={workdir}"]) == 2
    assert "--task or --complexity required" in capsys.readouterr().err


def test_a_run_without_model_snapshots_is_refused(finished_run, capsys):
    workdir, task = finished_run
    (workdir / "config.json").write_text(json.dumps({"model": {"snapshots": [], "path_template": "", "repo": "",
                                                               "hook": HOOK}}))
    err = _fails(["analyze", f"--workdir={workdir}", f"--task={task}"], capsys)
    assert "records no model snapshots" in err and "planted data" in err
