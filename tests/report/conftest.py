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
