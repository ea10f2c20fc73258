"""End-to-end in a real headless Chromium: the run list with a chart per run, run pages at /run/<path> (a nested path
that needs quoting, bookmarked, and unknown ones), the sample runs' strip and heatmap (calm for a healthy run, the
collapse visible), a collapse run's alerts and the per-step toggle, and a live run whose new steps appear while the
page is open.

Needs Debian's `chromium` and `chromium-driver` (/usr/bin) and selenium. Set MOEWATCH_SCREENSHOTS=docs/img to save
the screenshots of docs/dashboard.md (run_aux-loss.png, run_collapse.png, run_list.png) there.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from moewatch.app import create_app
from moewatch.app.catalog import run_href, run_id_for

from moewatch.capture.watch import Watch, WatchConfig
from tests.test_app_data import synthetic_collapse
from tests.toy import ToyMoE, toy_specs

pytestmark = [pytest.mark.browser, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[1]
# Without these, Chromium in a closed network hangs on connection attempts (updates, sync, QUIC probes).
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1500")

webdriver = pytest.importorskip("selenium.webdriver")
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    if os.environ.get("MOEWATCH_REQUIRE_BROWSER"):  # CI installs the browser: missing it there is a failure
        raise RuntimeError("MOEWATCH_REQUIRE_BROWSER is set but /usr/bin/chromium or /usr/bin/chromedriver is missing")
    pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402


@contextmanager
def serve(root: Path, refresh: float = 1.0) -> Iterator[str]:
    """The real app on a free port of 127.0.0.1, in a thread of this process."""
    from werkzeug.serving import make_server

    app = create_app(root, refresh_seconds=refresh)
    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition: Callable, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = condition(driver)
            if value:
                return value
        except Exception as e:  # the page is still rendering (stale or missing elements)
            last_error = e
        time.sleep(0.2)
    page = driver.find_element(By.TAG_NAME, "body").text[:1500]
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error!r}); page text:\n{page}")


FIGURE_JS = """
const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
if (!gd || !gd.data || !gd.data.length) return null;
const t = gd.data[0];
const x = t.x ? Array.from(t.x)
  : (t.z && t.z.length ? Array.from(t.z[0], (_, i) => Math.round(t.x0 + i * t.dx)) : []);
return {type: t.type, traces: gd.data.length, x: x,
        shapes: (gd.layout.shapes || []).map(s => [s.name || '', s.x0])};
"""


def figure(driver, graph_id: str) -> dict | None:
    return driver.execute_script(FIGURE_JS, graph_id)


def choose(driver, dropdown_id: str, label: str) -> None:
    """Pick an option of a dash Dropdown the way a user does: open it, click the option."""
    driver.find_element(By.ID, dropdown_id).click()
    search = driver.find_elements(By.CSS_SELECTOR, ".dash-dropdown-search")
    if search:  # narrow a long list so the option is on screen
        search[0].send_keys(label)
    option = wait_for(driver, lambda d: next((o for o in d.find_elements(By.CSS_SELECTOR, "[role=option]")
                                              if o.text.strip() == label), None), f"option {label}")
    option.click()


def selected(driver, dropdown_id: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f"#{dropdown_id} .dash-dropdown-value").text.strip()


def runs_root(tmp_path: Path) -> tuple[Path, str]:
    """The committed sample runs when they hold a collapse run, else a generated folder; (root, collapse name)."""
    samples = REPO / "sample_runs"
    if samples.is_dir():
        names = sorted(p.parent.relative_to(samples).as_posix() for p in samples.rglob("run.json"))
        collapse = [n for n in names if "collapse" in n]
        if collapse:
            return samples, collapse[0]
    root = tmp_path / "runs"
    synthetic_collapse(root, 3000, "collapse", layers=4)
    synthetic_collapse(root, 3000, "healthy", shape="healthy", label="healthy", layers=4)
    return root, "collapse"


def nested_root(tmp_path: Path) -> Path:
    """A folder with a nested run path that needs quoting ("team/exp 1", a collapse) beside a healthy run."""
    root = tmp_path / "served"
    samples = REPO / "sample_runs"
    if (samples / "collapse" / "run.json").is_file() and (samples / "aux-loss" / "run.json").is_file():
        shutil.copytree(samples / "collapse", root / "team" / "exp 1")
        shutil.copytree(samples / "aux-loss", root / "aux-loss")
    else:
        synthetic_collapse(root / "team", 1200, "exp 1", layers=2)
        synthetic_collapse(root, 1200, "aux-loss", shape="healthy", label="healthy", layers=2)
    return root


ROW_CHARTS_JS = """
return Array.from(document.querySelectorAll('tr.run-row')).map(row => {
  const gd = row.querySelector('.run-chart .js-plotly-plot');
  return {name: row.querySelector('a.run-link').textContent,
          traces: gd && gd.data ? gd.data.length : 0,
          type: gd && gd.data && gd.data.length ? gd.data[0].type : null,
          bars: gd ? gd.querySelectorAll('.trace.bars .point path').length : 0};
});
"""


def test_run_list_draws_a_chart_per_run_and_run_paths_are_urls(browser, tmp_path):
    root = nested_root(tmp_path)
    with serve(root) as url:
        browser.get(url + "/")
        rows = wait_for(browser, lambda d: (r := d.execute_script(ROW_CHARTS_JS)) and len(r) == 2
                        and all(x["bars"] > 0 for x in r) and r, "a drawn chart in every row of the run list")
        assert [r["name"] for r in rows] == ["aux-loss", "team/exp 1"] and all(r["type"] == "bar" for r in rows)
        text = browser.find_element(By.ID, "run-list").text
        assert "HEALTHY: no warning on any of 2 layers." in text and "COLLAPSED: " in text

        link = next(a for a in browser.find_elements(By.CSS_SELECTOR, "a.run-link") if a.text == "team/exp 1")
        assert link.get_attribute("href") == url + "/run/team/exp%201"
        link.click()
        wait_for(browser, lambda d: d.current_url == url + "/run/team/exp%201", "the run's path in the URL")
        header = wait_for(browser, lambda d: (t := d.find_element(By.ID, "run-header").text) and "COLLAPSED" in t
                          and t, "the run page with its verdict")
        assert "team/exp 1" in header and "collapsed" in header
        wait_for(browser, lambda d: (f := figure(d, "heatmap")) and f["type"] == "heatmap", "the load heatmap")

        browser.get(url + "/run/team/exp%201")  # a bookmark: the URL alone opens the run
        wait_for(browser, lambda d: "team/exp 1" in d.find_element(By.ID, "run-header").text, "the bookmarked run")
        wait_for(browser, lambda d: (f := figure(d, "overview")) and f["type"] == "heatmap", "its health strip")
        for bad in ("/run/team/nope", "/run/..%2F..%2Fetc%2Fpasswd", "/run/team"):
            browser.get(url + bad)
            wait_for(browser, lambda d: "unknown run" in d.find_element(By.ID, "page-message").text,
                     f"'unknown run' for {bad}")
            assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text


STRIP_JS = """
const gd = document.querySelector('#overview .js-plotly-plot');
if (!gd || !gd.data || !gd.data.length) return null;
const t = gd.data[0];
return {z: t.z.map(r => Array.from(r)), first: t.customdata[0].map(c => c[0]),
        shapes: (gd.layout.shapes || []).map(s => s.name || '')};
"""


def test_sample_run_pages_calm_strip_and_heatmap_and_a_visible_collapse(browser, tmp_path):
    """aux-loss (healthy): green past the warm-up, a heatmap within ~2x fair; collapse: collapsed at the end. Set
    MOEWATCH_SCREENSHOTS=docs/img to save both pages there (docs/img/run_aux-loss.png, run_collapse.png)."""
    samples = REPO / "sample_runs"
    if not ((samples / "aux-loss" / "run.json").is_file() and (samples / "collapse" / "run.json").is_file()):
        pytest.skip("sample_runs/ is not in this checkout")
    shots = os.environ.get("MOEWATCH_SCREENSHOTS")
    with serve(samples) as url:
        for name in ("aux-loss", "collapse"):
            browser.get(f"{url}/run/{name}")
            strip = wait_for(browser, lambda d: d.execute_script(STRIP_JS), f"the health strip of {name}")
            heat = wait_for(browser, lambda d: (f := figure(d, "heatmap")) and f["type"] == "heatmap" and f,
                            f"the heatmap of {name}")
            assert len(heat["x"]) == 20  # 400 steps in the detector's windows of 20 steps
            assert "warm-up" in strip["shapes"]
            z = strip["z"]
            late = [c for c, first in enumerate(strip["first"]) if first >= 100]
            if name == "aux-loss":
                assert all(row[c] == 0 for row in z for c in late)  # healthy: green past the warm-up
                ratio = browser.execute_script("return document.querySelector('#heatmap .js-plotly-plot')"
                                               ".data[0].customdata.map(r => Array.from(r))")
                cells = [v for row in ratio for v in row[5:]]
                assert sum(0.5 <= v <= 2 for v in cells) >= 0.95 * len(cells)
            else:
                assert all(row[-1] == 3 for row in z)  # collapsed on every layer at the end
                wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "button.alert"), "the alerts")
            note = browser.execute_script("return document.querySelector('#heatmap .js-plotly-plot')"
                                          ".layout.annotations.map(a => a.text).join(' ')")
            assert "windows of 20 steps, as the detector judges" in note
            if shots:
                browser.set_window_size(1400, 1130)
                time.sleep(1.5)  # let plotly finish drawing at the new size
                browser.save_screenshot(str(Path(shots) / f"run_{name}.png"))
                browser.set_window_size(1400, 1500)
        if shots:
            browser.get(url + "/")
            wait_for(browser, lambda d: (r := d.execute_script(ROW_CHARTS_JS)) and all(x["bars"] for x in r),
                     "the run list's charts")
            browser.set_window_size(1400, 820)
            time.sleep(1.0)
            browser.save_screenshot(str(Path(shots) / "run_list.png"))


def test_open_the_collapse_run_see_heatmap_and_alert_click_it(browser, tmp_path):
    root, collapse = runs_root(tmp_path)
    with serve(root) as url:
        browser.get(url + "/")
        link = wait_for(browser, lambda d: next((a for a in d.find_elements(By.CSS_SELECTOR, "a.run-link")
                                                 if a.text == collapse), None), "the run list")
        row = link.find_element(By.XPATH, "./ancestor::tr")
        wait_for(browser, lambda d: "collapsed" in row.text, "the collapse run's verdict badge")
        assert "finished" in row.text or "crashed" in row.text or "running" in row.text
        link.click()

        heat = wait_for(browser, lambda d: (f := figure(d, "heatmap")) and f["type"] == "heatmap" and f,
                        "the load heatmap")
        windows = len(heat["x"])
        assert windows >= 10
        wait_for(browser, lambda d: (f := figure(d, "overview")) and f["type"] == "heatmap", "the health strip")
        alerts = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "button.alert"), "an alert")
        assert "critical" in alerts[0].text
        target = json.loads(json.loads(alerts[0].get_attribute("id"))["index"])
        layer, first = target[0], target[1]
        assert layer in alerts[0].text

        # Raw per-step counts are one click away, and the chart says which it shows.
        browser.find_element(By.CSS_SELECTOR, "#raw input").click()
        wait_for(browser, lambda d: len((figure(d, "heatmap") or {"x": []})["x"]) > windows, "per-step columns")
        note = browser.execute_script("return document.querySelector('#heatmap .js-plotly-plot')"
                                      ".layout.annotations.map(a => a.text).join(' ')")
        assert "raw per-step counts: sampling noise included" in note

        # Look at another layer first, so the click visibly selects the alert's layer.
        layers = browser.execute_script("return Array.from(document.querySelector('#overview .js-plotly-plot')"
                                        ".data[0].y)")
        others = [name for name in layers if name != layer]
        if others:
            choose(browser, "layer", others[-1])
            wait_for(browser, lambda d: selected(d, "layer") == others[-1], "another layer selected")

        browser.find_elements(By.CSS_SELECTOR, "button.alert")[0].click()
        wait_for(browser, lambda d: selected(d, "layer") == layer, "the alert's layer selected")
        wait_for(browser, lambda d: ["onset", first] in (figure(d, "heatmap") or {"shapes": []})["shapes"],
                 "the onset marked on the heatmap")
        wait_for(browser, lambda d: "selected" in d.find_elements(By.CSS_SELECTOR, "button.alert")[0]
                 .get_attribute("class"), "the clicked alert highlighted")
        assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text


def test_live_run_shows_new_steps_while_the_page_is_open(browser, tmp_path):
    root = tmp_path / "runs"
    torch.manual_seed(0)
    model = ToyMoE(d=8, num_experts=4, top_k=2, layers=2)
    watch = Watch(model, root / "live", toy_specs(model), WatchConfig(flush_steps=5, flush_seconds=60))

    def train(steps: int) -> None:
        for _ in range(steps):
            model(torch.randn(32, 8)).sum().backward()
            watch.step()

    try:
        train(10)
        deadline = time.monotonic() + 30
        while len(list((root / "live" / "layers").glob("*.parquet"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        with serve(root, refresh=0.5) as url:
            browser.get(url + run_href(run_id_for(root.resolve(), root / "live")))
            # 10 steps are one (partial) detector window of 20; per-step counts show each step.
            wait_for(browser, lambda d: (f := figure(d, "heatmap")) and len(f["x"]) == 1, "one window of steps")
            header = browser.find_element(By.ID, "run-header").text
            assert "running" in header and "live" in header
            browser.find_element(By.CSS_SELECTOR, "#raw input").click()
            wait_for(browser, lambda d: (f := figure(d, "heatmap")) and len(f["x"]) == 10, "the first 10 steps")
            train(10)  # two more flushes: new part files appear while the page is open
            wait_for(browser, lambda d: (f := figure(d, "heatmap")) and f["x"] == list(range(20)),
                     "steps 10-19 appended to the heatmap")
            wait_for(browser, lambda d: len(figure(d, "shares")["x"]) == 20, "steps appended to the share lines")
            wait_for(browser, lambda d: "20 steps" in d.find_element(By.ID, "run-header").text, "the step count")
            watch.close()
            wait_for(browser, lambda d: "finished" in d.find_element(By.ID, "run-header").text, "status finished")
    finally:
        watch.close()
