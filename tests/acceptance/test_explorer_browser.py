"""The explorer page (``hookchains report``) driven in the system's Chromium with Selenium and Debian's
``chromium-driver``, on the page ``hookchains demo`` writes (the embedded MobileNetV2 with its real
ImageNet weights, the session's ``demo_run``), as a user opens it.

Screenshots go to ``$HOOKCHAINS_SCREENSHOTS`` when set (else the test's temporary folder)."""
from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Dict, Set

import pytest
from click.testing import CliRunner
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from hookchains.cli.main import main
from hookchains.workflow.runs import load_run

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def screens(tmp_path) -> Path:
    folder = Path(os.environ.get("HOOKCHAINS_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,800",
                "--disable-background-networking", "--disable-component-update", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _data(run_dir: Path) -> Dict:
    page = (run_dir / "report.html").read_text()
    start = page.index('<script type="application/json" id="explorer-data">')
    return json.loads(page[page.index(">", start) + 1:page.index("</script>", start)])


def _highlighted(driver) -> Set[str]:
    return {e.get_attribute("data-id") for e in driver.find_elements(By.CSS_SELECTOR, "#graph .node.hl")}


def _requests(driver) -> list:
    entries = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    return [e["params"]["request"]["url"] for e in entries if e["method"] == "Network.requestWillBeSent"]


def _open(browser, run_dir: Path) -> Dict:
    """Load ``run_dir``'s page; check it is interactive, silent, offline and fitted; return its data."""
    path = run_dir / "report.html"
    page = path.resolve().as_uri()
    browser.get(page)
    ready = WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.ready"))
    print(f"{run_dir.name}: page {path.stat().st_size / 1e6:.2f} MB, time to interactive {float(ready):.0f} ms "
          "(performance.now() when the graph was drawn)")
    assert browser.get_log("browser") == []  # no console errors or warnings
    requests = _requests(browser)
    assert [u for u in requests if not u.startswith("data:")] == [page]  # the page itself, nothing else
    layout = browser.execute_script(
        "const s = document.getElementById('graph').getBoundingClientRect(), "
        "n = document.querySelector('#graph .nodes').getBoundingClientRect(), "
        "l = document.querySelector('.legend').getBoundingClientRect();"
        "return [document.documentElement.scrollWidth, innerWidth, n.left - s.left, s.right - n.right, "
        "n.top - s.top, s.bottom - n.bottom, l.top, l.bottom, innerHeight]")
    width, inner, *margins, legend_top, legend_bottom, inner_height = layout
    assert width <= inner  # no horizontal scrolling at 1280 x 800
    assert min(margins) >= -1  # the whole graph is fitted into its box on load
    assert 0 <= legend_top < legend_bottom <= inner_height
    return _data(run_dir)


def _tab_to_graph(browser):
    """Tab from the top of the page to the graph's one Tab stop; return the focused node."""
    browser.find_element(By.TAG_NAME, "body").click()
    for _ in range(30):  # through the controls to the graph
        browser.switch_to.active_element.send_keys(Keys.TAB)
        if browser.switch_to.active_element.get_attribute("data-id"):
            break
    return browser.switch_to.active_element


def test_demo_explorer_in_chromium(demo_run, browser, screens):
    data = _open(browser, demo_run)
    assert (demo_run / "report.html").stat().st_size <= 15e6
    browser.save_screenshot(str(screens / "demo_overview.png"))

    chain = data["chains"][0]
    node_id = chain["nodes"][1]
    node = next(n for n in data["nodes"] if n["id"] == node_id)
    browser.find_element(By.CSS_SELECTOR, f'#graph .node[data-id="{node_id}"]').click()
    panel = browser.find_element(By.ID, "panel")
    assert panel.find_element(By.TAG_NAME, "h2").text == node["label"]
    maps = panel.find_elements(By.CSS_SELECTOR, "figure.map")
    assert len(maps) == len(data["images"])  # one heatmap per task image
    peaks = [float(f.text.rsplit("peak ", 1)[1]) for f in maps]
    assert peaks == sorted(peaks, reverse=True)  # sorted by activation
    assert all(img.get_attribute("alt") for img in panel.find_elements(By.TAG_NAME, "img"))
    through = {i for c in data["chains"] if node_id in c["nodes"] for i in c["nodes"]}
    assert _highlighted(browser) == through
    browser.save_screenshot(str(screens / "demo_filter.png"))

    image = data["chains"][-1]["image"]
    Select(browser.find_element(By.ID, "pick-image")).select_by_value(str(image))
    assert _highlighted(browser) == {i for c in data["chains"] if c["image"] == image for i in c["nodes"]}
    assert browser.find_elements(By.CSS_SELECTOR, "#graph .chainline")
    assert panel.find_element(By.TAG_NAME, "h2").text == f"Image {image + 1}"

    Select(browser.find_element(By.ID, "pick-class")).select_by_value("0")
    members = set(data["groups"][0]["images"])
    assert _highlighted(browser) == {i for c in data["chains"] if c["image"] in members for i in c["nodes"]}
    assert panel.get_attribute("data-view") == "class" and panel.find_elements(By.CSS_SELECTOR, ".classnet figure")
    browser.save_screenshot(str(screens / "demo_class.png"))
    browser.find_element(By.ID, "cmp-go").click()
    assert panel.get_attribute("data-view") == "compare" and "Shared (" in panel.text
    browser.save_screenshot(str(screens / "demo_compare.png"))

    focused = _tab_to_graph(browser)  # the graph's one Tab stop: the node last clicked
    assert focused.get_attribute("data-id") == node_id and focused.get_attribute("aria-label")  # the last clicked
    focused.send_keys(Keys.ENTER)
    assert panel.find_element(By.TAG_NAME, "h2").text == node["label"]
    column = data["columns"][node["column"]]["nodes"]
    k = column.index(node_id)
    focused.send_keys(Keys.ARROW_DOWN if k + 1 < len(column) else Keys.ARROW_UP)
    k = k + 1 if k + 1 < len(column) else k - 1
    assert browser.switch_to.active_element.get_attribute("data-id") == column[k]
    browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    right = next(c["nodes"] for c in data["columns"][node["column"] + 1:] if c["nodes"])
    assert browser.switch_to.active_element.get_attribute("data-id") == right[min(k, len(right) - 1)]
    assert len(browser.find_elements(By.CSS_SELECTOR, '#graph .node[tabindex="0"]')) == 1  # the graph: one Tab stop
    browser.save_screenshot(str(screens / "demo_keyboard.png"))
    drawn = {e.get_attribute("data-id") for e in browser.find_elements(By.CSS_SELECTOR, "#graph .node")}
    browser.find_element(By.ID, "compact").click()  # only the filters the chains use
    compact = {e.get_attribute("data-id") for e in browser.find_elements(By.CSS_SELECTOR, "#graph .node")}
    assert compact == {i for c in data["chains"] for i in c["nodes"]} and compact < drawn
    browser.find_element(By.ID, "compact").click()
    assert {e.get_attribute("data-id") for e in browser.find_elements(By.CSS_SELECTOR, "#graph .node")} == drawn
    assert (screens / "demo_keyboard.png").stat().st_size > 10_000
    assert browser.get_log("browser") == []


def test_a_loaded_run_shows_the_explorer_inline_in_a_notebook(demo_run, browser, tmp_path):
    run_dir = demo_run
    shown = load_run(run_dir)._repr_html_()
    assert load_run(run_dir).sub.summary() in html.unescape(shown)
    notebook = tmp_path / "cell.html"  # what Jupyter does with the HTML: put it in its page
    notebook.write_text(f"<!DOCTYPE html><html><body>{shown}</body></html>")
    browser.get(notebook.as_uri())
    browser.switch_to.frame(browser.find_element(By.TAG_NAME, "iframe"))
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.ready"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#graph .node")) == len(_data(run_dir)["nodes"])
    browser.switch_to.default_content()
    assert browser.get_log("browser") == []


def test_view_serves_the_page_on_localhost_when_asked(demo_run, tmp_path):
    run_dir = demo_run
    command = [sys.executable, "-m", "hookchains.cli.main", "view", str(run_dir), "--serve"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("http://127.0.0.1:"), line + server.stderr.read()
        url = line.split()[0]
        assert urllib.request.urlopen(url).read() == (run_dir / "report.html").read_bytes()
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(url + "other")
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = CliRunner().invoke(main, ["view", str(tmp_path)])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "hookchains report" in result.output
