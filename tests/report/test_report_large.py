"""A report of 100,000 features (a synthetic finished run, no training): every file stays small and the browser
pages, sorts and filters the whole table and opens the last feature's page."""
import json
import os

import numpy as np
import pytest

from _report_browser import console_errors, open_index, renders, table_rows, wait_for_table
from crossjax import crosscoder_export
from crossjax.analysis import evolution
from crossjax.crosscoder_config import CrosscoderConfig
from crossjax.report import write_report
from crossjax.summary import RunSummary

F, D = 100_000, 4
NAMES = ["step0", "step1", "step4", "step16", "step64", "step256", "step1000", "step4000"]
MAX_FILE_BYTES = 5 * 2 ** 20


def synthetic_run(workdir: str, seed: int = 0) -> np.ndarray:
    """A finished run's files (summary.json, export/, config.json) for F features: emergent features forming at
    every snapshot, initialisation features that fade, a few dead. Returns the emergence snapshots [F]."""
    rng = np.random.default_rng(seed)
    s = len(NAMES)
    emerge = rng.integers(0, s, F)
    strength = np.where(np.arange(s)[:, None] >= emerge[None, :], 1.0, 0.05)                 # [S, F]
    fading = rng.random(F) < 0.2
    strength[:, fading] = np.linspace(1.0, 0.1, s)[:, None]
    strength[:, :100] = 0.0                                                                     # dead
    directions = rng.normal(size=(F, D))
    w_dec = (strength[:, :, None] * directions[None] / np.linalg.norm(directions, axis=1)[None, :, None])
    cfg = CrosscoderConfig(num_snapshots=s, d_model=D, num_features=F)
    params = {"W_enc": np.zeros((s, D, F), np.float32), "b_enc": np.zeros(F, np.float32),
              "W_dec": w_dec.astype(np.float32), "b_dec": np.zeros((s, D), np.float32),
              "log_threshold": np.full(F, np.log(0.1), np.float32)}
    export = os.path.join(workdir, "export")
    crosscoder_export.export_params(params, np.ones(s), cfg, export)
    sampled = sorted(rng.choice(np.arange(100, F), 20, replace=False).tolist())
    auc = [np.clip(0.5 + 0.4 * strength[:, f] + rng.normal(0, 0.02, s), 0, 1).round(4).tolist() for f in sampled]
    separability = {"features": sampled, "snapshots": NAMES, "rows": 4096, "auc": auc,
                    "norm": [strength[:, f].round(4).tolist() for f in sampled], "spearman": [0.9] * len(sampled),
                    "median_spearman": 0.9, "quartiles": [0.9, 0.9], "fraction_positive": 1.0}
    heldout = {"ev": np.linspace(0.8, 0.95, s).tolist(), "l0": np.linspace(30, 20, s).tolist(), "ev_mean": 0.9,
               "rows": 4096}
    RunSummary(workdir=workdir, store=os.path.join(workdir, "no-store"), steps=1000, tokens=1000 * 4096,
               snapshots=NAMES, num_features=F, init_norm=0.1, scales=[1.0] * s, export=export,
               evolution=evolution.summarise(params["W_dec"], NAMES, clusters=6, cluster_seed=0),
               evals={"heldout": heldout, "separability": separability}).write()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"train": {"seed": 0}}, f)
    return np.where(strength.max(0) > 0, emerge, -1)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("large"))
    synthetic_run(workdir)
    return os.path.dirname(write_report(workdir, contexts=False, progress=False))


def test_every_file_of_a_100k_feature_report_is_small(large):
    sizes = {os.path.relpath(os.path.join(d, f), large): os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(large) for f in files}
    biggest = max(sizes, key=sizes.get)
    assert sizes[biggest] < MAX_FILE_BYTES, (biggest, sizes[biggest])
    assert sum(1 for p in sizes if p.startswith("data/table/")) == 100
    assert sizes["index.html"] < 20_000 and sizes["data/meta.js"] < 20_000
    assert sum(sizes.values()) < 100 * 2 ** 20


def test_browser_pages_sorts_and_filters_100k_features(browser, large):
    console_errors(browser)
    open_index(browser, large)
    assert table_rows(browser)[0][0] == "0"
    before = renders(browser)
    browser.find_element("id", "last").click()
    wait_for_table(browser, before)
    assert [r[0] for r in table_rows(browser)] == [str(i) for i in range(F - 50, F)]
    assert browser.find_element("id", "status").text == f"features {F - 49}\u2013{F} of {F}"
    # sorting loads every table file, then sorts in memory
    for _ in range(2):
        before = renders(browser)
        browser.find_element("css selector", '#features th[data-key="id"]').click()
        wait_for_table(browser, before, timeout=120)
    assert [r[0] for r in table_rows(browser)][:2] == [str(F - 1), str(F - 2)]
    box = browser.find_element("id", "filter")
    before = renders(browser)
    box.send_keys("emerges:step1000 kind:emergent")
    wait_for_table(browser, before, timeout=120, filter_text="emerges:step1000 kind:emergent")
    status = browser.find_element("id", "status").text
    assert f"(filtered from {F})" in status
    keys = browser.execute_script("return Array.from(document.querySelectorAll('#features th')).map(t => t.dataset.key);")
    rows = table_rows(browser)
    assert rows and all(r[keys.index("emerges")] == "step1000" and r[keys.index("kind")] == "emergent" for r in rows)
    assert int(rows[0][0]) > int(rows[-1][0])                          # still sorted by id, descending
    assert console_errors(browser) == []


def test_browser_opens_the_last_features_page(browser, large):
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get("file://" + os.path.join(large, f"feature.html?id={F - 1}"))
    WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "feature").get_attribute("data-state") != "loading")
    assert browser.find_element("id", "title").text == f"Feature {F - 1}"
    points = browser.find_element("css selector", "svg.curve polyline.series-strength").get_attribute("points")
    assert len(points.split()) == len(NAMES)
    assert "Top contexts were" not in browser.page_source and "contexts=False" in browser.page_source
    assert console_errors(browser) == []
