"""Driving the report in a headless chromium (selenium 4, Debian's chromium and chromedriver): the report tests'
helpers, and the command that takes the README's screenshot of a report's index page:

    python tests/report/_report_browser.py DIR/report docs/report_index.png
"""
import os
import sys

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def start_browser(width: int = 1280, height: int = 1600):
    """Headless chromium with its console log readable (driver.get_log('browser'))."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


def console_errors(driver) -> list[dict]:
    """The browser console's warnings and errors since the last call."""
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def table_rows(driver) -> list[list[str]]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#features tbody tr'))"
        ".map(tr => Array.from(tr.cells).map(td => td.textContent));")


def header_keys(driver) -> list[str]:
    return driver.execute_script("return Array.from(document.querySelectorAll('#features th')).map(t => t.dataset.key);")


def wait_for_table(driver, renders_before: int | None = None, timeout: float = 60, filter_text: str | None = None):
    """Until the table has rendered (again, when renders_before is given; for filter_text, when given) and is
    ready or shows an error."""
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        state, renders, shown = d.execute_script("const t = document.getElementById('features');"
                                                 "return [t.dataset.state, Number(t.dataset.renders || 0), "
                                                 "t.dataset.filter];")
        return (state in ("ready", "error") and (renders_before is None or renders > renders_before)
                and (filter_text is None or shown == filter_text))
    WebDriverWait(driver, timeout).until(ready)


def renders(driver) -> int:
    return driver.execute_script("return Number(document.getElementById('features').dataset.renders || 0);")


def open_index(driver, report_dir: str) -> None:
    driver.get("file://" + os.path.join(report_dir, "index.html"))
    wait_for_table(driver)


def screenshot(report_dir: str, out: str) -> None:
    """The index page of report_dir, its full height, as a PNG."""
    driver = start_browser()
    try:
        open_index(driver, os.path.abspath(report_dir))
        height = driver.execute_script("return document.body.scrollHeight;")
        driver.set_window_size(1280, min(int(height) + 200, 8000))     # the window's frame takes some height
        wait_for_table(driver)
        driver.save_screenshot(out)
    finally:
        driver.quit()
    from PIL import Image
    with Image.open(out) as im:                                         # 256 colours: a third of the bytes
        small = im.convert("RGB").quantize(256)
    small.save(out, optimize=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/report/_report_browser.py REPORT_DIR OUT.png")
    screenshot(sys.argv[1], sys.argv[2])
