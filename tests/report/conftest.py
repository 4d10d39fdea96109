"""Fixtures of the report tests: a small finished planted run (trained once per session) and a headless browser
(Debian's chromium and chromedriver, driven by selenium)."""
import os
import shutil

import pytest

from _trainer_util import tiny_config

from _report_browser import CHROMEDRIVER, CHROMIUM, start_browser


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A planted run with held-out and separability evaluations: (workdir, store path). Tests copy the workdir
    (copy_run) before changing anything in it."""
    from crossjax import pipeline
    root = tmp_path_factory.mktemp("report_run")
    c = tiny_config(root / "store", **{"train.steps": 40, "train.checkpoint_every": 0,
                                      "eval.separability_features": 5, "eval.separability_rows": 400})
    c.evals = "heldout,separability"
    pipeline.run(c, str(root / "run"))
    return str(root / "run"), str(root / "store")


@pytest.fixture
def copy_run(finished_run, tmp_path):
    """A copy of the finished run's workdir (its store is shared: the report only reads it)."""
    dst = tmp_path / "run"
    shutil.copytree(finished_run[0], dst, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    return str(dst)


@pytest.fixture(scope="session")
def browser():
    """Headless chromium with its console log readable (driver.get_log('browser'))."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(f"no {CHROMIUM} / {CHROMEDRIVER}: the report is tested in a real browser; "
                    "apt-get install chromium chromium-driver (the README's test command does)")
    driver = start_browser()
    yield driver
    driver.quit()


def attribute_planted(workdir: str, task_name: str = "agreement", seed: int = 0) -> dict:
    """Attribution results of a made-up task written into a planted run by the attribution stage's own writer
    (attribution.run.write_results: the files `python -m crossjax.analyze --task` writes) and recorded in its
    summary. A planted run has no language model to attribute through, so the per-feature scores are seeded random
    numbers; the report must show exactly them. Returns write_results' output."""
    import numpy as np

    from crossjax import summary_sections
    from crossjax.attribution import attribute, curves, run, tasks
    from crossjax.summary import RunSummary

    summary = RunSummary.read(workdir)
    f, t = summary.num_features, 5
    rng = np.random.default_rng(seed)
    results = {}
    for s, name in enumerate(summary.snapshots):
        scores = {m: rng.normal(0, 0.1 * (s + 1), f) for m in attribute.METHODS}
        active = rng.random(f) < 0.6
        ks = curves.log_grid(int(active.sum()), 16)
        metric = 0.5 * s
        curve = dict(k=ks, ablate_top=[metric - 0.1 * np.log2(k + 1) for k in ks], retain_top=[0.1 * k for k in ks],
                     ablate_random=[metric - 0.01 * k for k in ks], retain_random=[0.0] * len(ks),
                     ablate_random_std=[0.01] * len(ks), retain_random_std=[0.02] * len(ks),
                     metric_spliced=metric, draws=3, active_features=int(active.sum()))
        results[name] = {"attribution": attribute.Attribution(
            metric_clean=metric, metric_corrupted=-metric, metric_spliced=metric, scores=scores,
            per_position={m: np.tile(v / t, (t, 1)) for m, v in scores.items()}, ig_steps=4, ig_error=0.0,
            ig_unspliced=0.0, ig_gap=0.0, active=active), "curves": {m: curve for m in attribute.METHODS}}
    p = 12
    ids = np.zeros((p, t), np.int32)
    task = tasks.TokenizedTask(task_name, ids, ids, ids > -1, ids > -1, np.full(p, t - 1, np.int32),
                               np.ones(p, np.int32), np.zeros(p, np.int32), tuple(f"made-up:{i}" for i in range(p)))
    out = run.write_results(workdir, task, "planted", results, export=os.path.join(workdir, "export"),
                            ig_steps=4, draws=3, seed=0)
    summary_sections.record(workdir, "attribution", task_name, run.summary_entry(out))
    return out


@pytest.fixture(scope="session")
def analysed_run(finished_run, tmp_path_factory):
    """A copy of the finished run on which attribution (attribute_planted) and the offline complexity scorer
    (python -m crossjax.analyze --complexity=offline) have run: the workdir. Tests copy it before changing it."""
    from crossjax import analyze
    dst = tmp_path_factory.mktemp("analysed") / "run"
    shutil.copytree(finished_run[0], dst, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    attribute_planted(str(dst))
    assert analyze.main(["analyze", f"--workdir={dst}", "--complexity=offline", "--complexity_features=20"]) == 0
    return str(dst)
