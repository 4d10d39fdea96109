"""The report in a real headless browser (chromium via selenium), opened from file://: no console errors, the
table pages, sorts and filters, a feature page draws its curve and lists its contexts."""
import os
import shutil

import pytest

from _report_browser import console_errors, open_index, renders, table_rows, wait_for_table
from crossjax.report import write_report
from test_report import all_rows, read_data


@pytest.fixture(scope="module")
def report(finished_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("browser") / "run"
    shutil.copytree(finished_run[0], run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    return os.path.dirname(write_report(str(run), progress=False))


def click_header(driver, key: str) -> None:
    before = renders(driver)
    driver.find_element("css selector", f'#features th[data-key="{key}"]').click()
    wait_for_table(driver, before)


def type_filter(driver, text: str) -> None:
    from selenium.webdriver.common.keys import Keys
    box = driver.find_element("id", "filter")
    before = renders(driver)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE + text)          # keystrokes, as a person types (clear() sends no input event)
    wait_for_table(driver, before, filter_text=text)


def status(driver) -> str:
    return driver.find_element("id", "status").text


def test_index_loads_without_console_errors_and_pages(browser, report):
    console_errors(browser)
    open_index(browser, report)
    assert console_errors(browser) == []
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]);")
    assert len(images) == 6 and all(ok for _, ok in images), images
    rows = table_rows(browser)
    assert [r[0] for r in rows] == [str(i) for i in range(50)]
    before = renders(browser)
    browser.find_element("id", "last").click()
    wait_for_table(browser, before)
    assert [r[0] for r in table_rows(browser)] == [str(i) for i in range(50, 64)]
    assert status(browser) == "features 51\u201364 of 64"
    assert console_errors(browser) == []


def test_table_sorts_by_a_clicked_column(browser, report):
    open_index(browser, report)
    click_header(browser, "id")
    click_header(browser, "id")                                # again: descending
    assert [r[0] for r in table_rows(browser)][:3] == ["63", "62", "61"]
    click_header(browser, "frequency")
    keys = [c["key"] for c in read_data(report, "meta")["columns"]]
    shown = [float(r[keys.index("frequency")]) for r in table_rows(browser)]
    ordered = sorted(all_rows(report), key=lambda r: (r[keys.index("frequency")], r[0]))
    assert [r[0] for r in table_rows(browser)] == [str(r[0]) for r in ordered[:50]]
    assert shown == sorted(shown)
    click_header(browser, "separability")                     # missing values (not sampled) sort last
    rho = [r[keys.index("separability")] for r in table_rows(browser)]
    sampled = sum(v is not None for v in (r[keys.index("separability")] for r in all_rows(report)))
    assert all(v != "" for v in rho[:sampled]) and all(v == "" for v in rho[sampled:])
    assert console_errors(browser) == []


def test_table_filters_by_typed_terms(browser, report):
    open_index(browser, report)
    keys = [c["key"] for c in read_data(report, "meta")["columns"]]
    rows = all_rows(report)
    cluster = rows[0][keys.index("cluster")]
    type_filter(browser, f"cluster={cluster}")
    want = [str(r[0]) for r in rows if r[keys.index("cluster")] == cluster]
    assert [r[0] for r in table_rows(browser)] == want[:50]
    assert f"of {len(want)} (filtered from 64)" in status(browser)
    kind = rows[0][keys.index("kind")]
    high = sorted(r[keys.index("frequency")] for r in rows)[40]
    type_filter(browser, f"{kind[:4]} freq>{high}")
    want = [str(r[0]) for r in rows if r[keys.index("kind")] == kind and r[keys.index("frequency")] > high]
    assert [r[0] for r in table_rows(browser)] == want and 0 < len(want) < 64
    type_filter(browser, "colour:red")                           # a mistake is said on the page, not thrown
    assert "unknown column 'colour'" in status(browser)
    type_filter(browser, "")
    assert len(table_rows(browser)) == 50
    assert console_errors(browser) == []


def test_feature_page_shows_its_curve_and_contexts(browser, report):
    from selenium.webdriver.support.ui import WebDriverWait
    open_index(browser, report)
    feature = next(i for i, r in enumerate(read_data(report, "feature", 0)) if r["auc"] is not None and r["ctx"])
    type_filter(browser, f"id={feature}")
    browser.find_element("link text", str(feature)).click()         # the table's link opens the page
    WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "feature").get_attribute("data-state") != "loading")
    assert browser.find_element("id", "feature").get_attribute("data-state") == "ready"
    assert browser.current_url.endswith(f"feature.html?id={feature}")
    assert browser.find_element("id", "title").text == f"Feature {feature}"
    points = browser.find_element("css selector", "svg.curve polyline.series-strength").get_attribute("points")
    assert len(points.split()) == 4                                  # one point per snapshot
    assert browser.find_elements("css selector", "svg.curve polyline.series-auc")
    record = read_data(report, "feature", 0)[feature]
    opened = browser.find_elements("css selector", "details.snapshot[open] .ctx")
    peak = record["s"].index(max(record["s"]))
    assert len(opened) == record["ctx"]["fires"][peak] > 0
    marks = [m.text for m in browser.find_elements("css selector", "details.snapshot[open] .ctx mark")]
    assert marks == [e[3] for e in record["ctx"]["ex"][:len(opened)]]
    assert len(browser.find_elements("css selector", "details.snapshot")) == 4
    assert console_errors(browser) == []


def test_feature_page_of_a_missing_feature_says_so(browser, report):
    browser.get("file://" + os.path.join(report, "feature.html?id=64"))
    message = browser.find_element("id", "message").text
    assert "no feature '64'" in message and "0\u201363" in message
    assert console_errors(browser) == []


def test_index_screenshot(report, tmp_path):
    """The command that takes the README's screenshot (tests/report/_report_browser.py) gives a full-page PNG."""
    from PIL import Image

    from _report_browser import CHROMIUM, screenshot
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no {CHROMIUM}: apt-get install chromium chromium-driver (the README's test command does)")
    out = str(tmp_path / "index.png")
    screenshot(report, out)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] == 1280 and im.size[1] > 2000


@pytest.fixture(scope="module")
def analysed_report(analysed_run, tmp_path_factory):
    """The report of a run on which attribution and complexity scoring have run (conftest.analysed_run)."""
    run = tmp_path_factory.mktemp("browser_analysed") / "run"
    shutil.copytree(analysed_run, run)
    return os.path.dirname(write_report(str(run), progress=False))


def test_attribution_and_complexity_sections_load_and_their_columns_sort(browser, analysed_report):
    report = analysed_report
    console_errors(browser)
    open_index(browser, report)
    assert console_errors(browser) == []
    images = browser.execute_script(
        "return Array.from(document.querySelectorAll('section.analysis img'))"
        ".map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]);")
    assert sorted(src for src, _ in images) == ["plots/attribution_agreement_curves.png",
                                               "plots/attribution_agreement_metric.png",
                                               "plots/complexity_offline.png"] and all(ok for _, ok in images)
    keys = [c["key"] for c in read_data(report, "meta")["columns"]]
    rows = all_rows(report)
    cx = keys.index("cx_offline")
    type_filter(browser, "cx_offline>=2")                      # the new columns filter like the others
    want = [str(r[0]) for r in rows if r[cx] is not None and r[cx] >= 2]
    assert [r[0] for r in table_rows(browser)] == want[:50] and want
    type_filter(browser, "")
    for key, direction in (("attr_agreement", -1), ("cx_offline", 1)):
        click_header(browser, key)                             # ascending
        if direction < 0:
            click_header(browser, key)                         # again: largest first
        i = keys.index(key)
        given = sorted((r for r in rows if r[i] is not None), key=lambda r: (direction * r[i], r[0]))
        missing = [r for r in rows if r[i] is None]             # features not scored: last, in id order
        assert [r[0] for r in table_rows(browser)] == [str(r[0]) for r in (given + missing)[:50]]
    # a top attributed feature's link opens its page, which shows its attribution per snapshot and its score
    from selenium.webdriver.support.ui import WebDriverWait
    link = browser.find_element("css selector", "section.analysis table.analysis td.str a")
    feature = int(link.text)
    link.click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "feature").get_attribute("data-state") != "loading")
    assert browser.find_element("id", "feature").get_attribute("data-state") == "ready"
    cells = browser.find_elements("css selector", "table.attribution tr")
    meta = read_data(report, "meta")["attribution"][0]
    assert len(cells) == 1 + len(meta["snapshots"])
    record = read_data(report, "feature", 0)[feature]
    first = [td.text for td in cells[1].find_elements("tag name", "td")]
    assert first[0] == meta["snapshots"][0] and len(first) == 1 + len(meta["methods"])
    facts = browser.find_element("id", "facts").text
    assert "complexity (offline)" in facts
    if record["cx"][0] is not None:
        assert record["cx"][0][1] in facts
    assert console_errors(browser) == []

