"""The HTML report in a real headless Chromium: the folder report of sample_runs/ opens with its summary (worst first,
each row linking to its run's section) and draws every chart, without scrolling and without a WebGL context or any
console warning.

Needs Debian's `chromium` and `chromium-driver` and selenium, as tests/test_app_browser.py (which skips this module
too when they are missing, or fails it under MOEWATCH_REQUIRE_BROWSER=1). Set MOEWATCH_SCREENSHOTS=docs/img to save
the top of the page as docs/img/report_folder.png.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import moewatch
from moewatch.detect import STATUS_RANK
from moewatch.report import report_paths
from tests.test_app_browser import CHROME_FLAGS, CHROMEDRIVER, CHROMIUM, REPO, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

from selenium import webdriver  # noqa: E402  (after the skip above: selenium is there)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

SAMPLES = REPO / "sample_runs"

# Per chart: its trace types, how many line paths the plot area drew with a non-empty `d`, how many heatmap images
# it holds and whether it made a canvas (a WebGL trace would).
CHARTS_JS = """
return Array.from(document.querySelectorAll('div.mw-chart')).map(g => ({
  types: g.data ? g.data.map(t => t.type) : [],
  lines: Array.from(g.querySelectorAll('.cartesianlayer .scatterlayer path.js-line'))
           .filter(p => (p.getAttribute('d') || '').length > 2).length,
  images: Array.from(g.querySelectorAll('.cartesianlayer image'))
            .filter(i => (i.getAttribute('href') || i.getAttribute('xlink:href') || '').startsWith('data:')).length,
  canvases: g.querySelectorAll('canvas').length,
}));
"""


def drawn(chart: dict) -> bool:
    if not chart["types"]:
        return False
    if chart["types"] == ["heatmap"]:
        return chart["images"] >= 1
    return chart["lines"] == len(chart["types"])  # every layer's line


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, to catch WebGL and script warnings
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_folder_report_opens_with_a_summary_and_draws_every_chart(browser, tmp_path):
    if not any(SAMPLES.glob("*/run.json")):
        pytest.skip("sample_runs/ is not in this checkout")
    out = tmp_path / "report.html"
    source = Path(os.path.relpath(SAMPLES))  # as a user types it (from the repo root: "sample_runs")
    assert report_paths([source], "html", out=out) == 1  # the collapse run fails the gate
    runs = sorted(p.parent.name for p in SAMPLES.glob("*/run.json"))

    browser.get(out.as_uri())
    # Nothing is scrolled: the charts below the fold are drawn in the background.
    charts = wait_for(browser, lambda d: (c := d.execute_script(CHARTS_JS)) and all(map(drawn, c)) and c,
                      "every chart drawn")
    assert len(charts) >= 4 * len(runs)  # two line charts and a heatmap per layer (2 layers) per run
    assert all(t in ("scatter", "heatmap") for c in charts for t in c["types"])
    assert not any(c["canvases"] for c in charts)  # SVG only: no WebGL context anywhere
    assert sum(c["types"] == ["heatmap"] for c in charts) == 2 * len(runs)

    logs = browser.get_log("browser")
    noisy = [entry["message"][:300] for entry in logs
             if entry["level"] in ("WARNING", "SEVERE") or "webgl" in entry["message"].lower()]
    assert noisy == []

    meta = browser.find_element(By.CSS_SELECTOR, "p.meta").text
    assert f"UTC from {source} by moewatch {moewatch.__version__}" in meta and f"{len(runs)} runs:" in meta
    rows = browser.execute_script("""
        return Array.from(document.querySelectorAll('table.summary tr')).slice(1).map(r => ({
          cells: Array.from(r.cells).map(c => c.textContent.trim()),
          href: r.querySelector('a').getAttribute('href')}));""")
    assert sorted(r["cells"][0] for r in rows) == runs
    statuses = [r["cells"][1] for r in rows]
    assert statuses == sorted(statuses, key=lambda s: -STATUS_RANK[s]) and statuses[0] == "collapsed"
    first = rows[0]["cells"]
    assert first[4].isdigit() and first[5] == "400" and first[6] == "MoEGPT"  # first critical step, steps, model
    assert "collapse" in [r["cells"][0] for r in rows if r["cells"][1] == "collapsed"]
    for row in rows:  # each row links to its run's section, and the sections follow the summary's order
        heading = browser.find_element(By.CSS_SELECTOR, row["href"]).text
        assert heading.startswith(row["cells"][0] + ": " + row["cells"][1])

    shots = os.environ.get("MOEWATCH_SCREENSHOTS")
    if shots:
        browser.set_window_size(1400, 1400)
        browser.execute_script("window.scrollTo(0, 0)")
        time.sleep(1.5)  # let plotly redraw at the new width
        browser.save_screenshot(str(Path(shots) / "report_folder.png"))
