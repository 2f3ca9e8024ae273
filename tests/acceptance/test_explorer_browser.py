"""The explorer page (``hookchains report``) driven in the system's Chromium with Selenium and Debian's
``chromium-driver``, on the page ``hookchains demo`` writes (the embedded MobileNetV2 with its real
ImageNet weights, the session's ``demo_run``), as a user opens it; then on the pages of the other kinds
of run: a ViT token run (timm's test_vit), the text demo (real all-MiniLM-L6-v2: kept heads and
neurons) and a text token run.

Screenshots go to ``$HOOKCHAINS_SCREENSHOTS`` when set (else the test's temporary folder)."""
from __future__ import annotations

import html
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Dict, Set

import pytest
import timm
import torch
from click.testing import CliRunner
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from hookchains.assets import demo_photos
from hookchains.cli.main import main
from hookchains.core.io import write_tensors
from hookchains.core.subnetwork import Subnetwork
from hookchains.inputs.data import augmented_views
from hookchains.inputs.models import preprocessing
from hookchains.tokens.result import TokenSubnetwork
from hookchains.workflow.runs import load_run

TEXT_DEMO = Path(__file__).resolve().parents[2] / "hookchains" / "assets" / "text_demo.jsonl"


@pytest.fixture
def screens(tmp_path) -> Path:
    folder = Path(os.environ.get("HOOKCHAINS_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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
    browser.get_log("performance")  # what earlier tests left in the log is theirs
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
    browser.execute_script("const h = document.querySelector('h1'); h.tabIndex = -1; h.focus()")  # the page's top
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


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, one_thread) -> Path:
    """A token run of timm's test_vit (6 blocks, 100 patches at 160 px) through the CLI, as a user runs it:
    seeded random weights with the head (x30) and qkv (x5) scaled so the output depends on the tokens (see
    test_vit_pipeline), 3 augmented views of each demo photo, 8 steps; then ``hookchains report``."""
    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    model = timm.create_model("test_vit").eval()
    with torch.no_grad():
        model.head.weight.mul_(30.0)
        for block in model.blocks:
            block.attn.qkv.weight.mul_(5.0)
    write_tensors(root / "vit.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()})
    views = augmented_views({name: demo_photos()[name] for name in ("Egyptian cat", "espresso")}, 3,
                            preprocessing(model))
    for i, (picture, label) in enumerate(zip(views.raw, views.labels.tolist())):
        folder = root / "data" / ("cat", "espresso")[label]
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"{i}.png")
    runner = CliRunner()
    result = runner.invoke(main, ["extract", "--model", "timm:test_vit", "--checkpoint", str(root / "vit.safetensors"),
                                  "--data", str(root / "data"), "--classes", "cat,espresso", "--per-class", "3",
                                  "--steps", "8", "--lr", "0.15", "--quiet", "--out", str(root / "run")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["report", str(root / "run"), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0 and result.output.strip() == str(root / "run" / "report.html")
    return root / "run"


def test_vit_token_run_explorer_in_chromium(vit_run, browser, screens):
    data = _open(browser, vit_run)
    run = load_run(vit_run)
    masks, n_images = run.sub.masks, len(run.task)
    assert [len(c["nodes"]) for c in data["columns"]] == [n_images] * masks.shape[1]  # a cell per image and block
    browser.save_screenshot(str(screens / "vit_overview.png"))
    panel = browser.find_element(By.ID, "panel")
    for i, b in ((1, 2), (4, 0)):
        browser.find_element(By.CSS_SELECTOR, f'#graph .node[data-id="t{i}:{b}"]').click()
        assert panel.find_element(By.TAG_NAME, "h2").text == f"Image {i + 1}, B{b + 1}"
        facts = dict(zip([e.text for e in panel.find_elements(By.CSS_SELECTOR, ".facts th")],
                         [e.text for e in panel.find_elements(By.CSS_SELECTOR, ".facts td")]))
        assert facts["Tokens kept"] == f"{int(masks[i, b, 1:].sum())}/{masks.shape[2] - 1}"  # the run's own masks
        titles = [e.text for e in panel.find_elements(By.TAG_NAME, "h3")]
        assert titles[:2] == ["Kept patches per block (Fig. 7, top)", f"Class-token attribution, B{b + 1} (Eq. 10)"]
        assert titles[2].startswith("Attribution of patch token B")
        assert len(panel.find_elements(By.TAG_NAME, "img")) == 2 + int(panel.find_elements(By.CSS_SELECTOR, "p.muted")
                                                                      == [])  # the patch token's map, unless pruned
    browser.save_screenshot(str(screens / "vit_cell.png"))
    Select(browser.find_element(By.ID, "pick-image")).select_by_value("4")
    assert _highlighted(browser) == {f"t4:{b}" for b in range(masks.shape[1])}  # its row
    assert panel.find_element(By.TAG_NAME, "h2").text == "Image 5"
    strips = panel.find_elements(By.CSS_SELECTOR, ".maps")
    assert [len(s.find_elements(By.CSS_SELECTOR, "figure")) for s in strips] == [masks.shape[1]] * 2
    pruned = [f.text for f in strips[1].find_elements(By.CSS_SELECTOR, "figure") if "pruned" in f.text]
    token = int(strips[1].find_elements(By.TAG_NAME, "figcaption")[0].text.split("_T")[1])
    assert len(pruned) == int((~masks[4, :, token]).sum())  # the patch token's maps end where it is pruned
    browser.save_screenshot(str(screens / "vit_image.png"))
    Select(browser.find_element(By.ID, "pick-class")).select_by_value("1")
    members = set(data["groups"][1]["images"])
    assert _highlighted(browser) == {f"t{i}:{b}" for i in members for b in range(masks.shape[1])}
    assert not browser.find_element(By.ID, "cmp-go").is_displayed()  # no chains to compare
    focused = _tab_to_graph(browser)
    assert focused.get_attribute("data-id") == "t4:0"  # the last clicked cell
    focused.send_keys(Keys.ARROW_RIGHT)
    assert browser.switch_to.active_element.get_attribute("data-id") == "t4:1"
    assert browser.get_log("browser") == []


@pytest.fixture(scope="module")
def text_token_run(text_demo_run) -> Path:
    """A token run (``--sites tokens``, 40 steps: a mix of kept and pruned word pieces) of the real
    all-MiniLM-L6-v2 on the bundled sentences."""
    out = text_demo_run[0].parent / "tokens"
    result = subprocess.run([sys.executable, "-m", "hookchains.cli.main", "extract", "--model", "hf:all-MiniLM-L6-v2",
                             "--text-data", str(TEXT_DEMO), "--sites", "tokens", "--steps", "40", "--quiet", "--out",
                             str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return out


def test_text_filter_run_explorer_in_chromium(text_demo_run, browser, screens):
    folder = text_demo_run[0]
    data = _open(browser, folder)
    sub = Subnetwork.load(folder)
    kept = sub.kept_filters()
    heads = [c for c in data["columns"] if c["label"].endswith(" heads")]
    head_sites = [next(s.name for s in sub.sites.filters if s.kind == "head" and s.name in g.filter_sites)
                  for g in sub.sites.gates]
    assert [c["kept"] for c in heads] == [0 if g.name in sub.removed_gates else len(kept.get(site, []))
                                          for g, site in zip(sub.sites.gates, head_sites)]
    browser.save_screenshot(str(screens / "text_overview.png"))
    panel = browser.find_element(By.ID, "panel")
    neuron = next(n for n in data["nodes"] if ".N" in n["label"])
    browser.find_element(By.CSS_SELECTOR, f'#graph .node[data-id="{neuron["id"]}"]').click()
    assert panel.find_element(By.TAG_NAME, "h2").text == neuron["label"]
    words = [li.text for li in panel.find_elements(By.CSS_SELECTOR, ".words li")]
    activations = [float(w.rsplit("(", 1)[1].rstrip(")")) for w in words]
    assert len(words) == 5 and activations == sorted(activations, reverse=True)
    sentences = " ".join(json.loads(line)["text"].lower() for line in TEXT_DEMO.read_text().splitlines())
    assert all(w.rsplit(" (", 1)[0].lstrip("#") in sentences for w in words)  # words of the task
    browser.save_screenshot(str(screens / "text_neuron.png"))
    head = next(n for n in data["nodes"] if ".H" in n["label"])
    browser.find_element(By.CSS_SELECTOR, f'#graph .node[data-id="{head["id"]}"]').click()
    site, j = head["id"].rsplit(":", 1)
    assert f"Score {float(sub.scores[site][int(j)]):.4g}" in panel.text and not panel.find_elements(By.CLASS_NAME, "words")
    assert _tab_to_graph(browser).get_attribute("data-id") == head["id"]
    assert browser.get_log("browser") == []


def test_text_token_run_explorer_in_chromium(text_token_run, browser, screens):
    data = _open(browser, text_token_run)
    tsub = TokenSubnetwork.load(text_token_run)
    panel = browser.find_element(By.ID, "panel")
    n = 3
    browser.find_element(By.CSS_SELECTOR, f'[data-image="{n}"]').click()
    assert panel.find_element(By.TAG_NAME, "h2").text == f"Sentence {n + 1}"
    assert _highlighted(browser) == {f"t{n}:{b}" for b in range(len(data["columns"]))}
    pruned = int((~tsub.masks[n][:, tsub.valid[n]]).sum())
    assert 0 < pruned < tsub.masks[n][:, tsub.valid[n]].numel()  # a mix, so the count below can fail
    assert len(panel.find_elements(By.CSS_SELECTOR, ".wordgrid td.pruned s")) == pruned  # struck through, exactly
    shares = [float(td.text) for td in panel.find_elements(By.CSS_SELECTOR, ".wordgrid tr.attribution td")]
    assert len(shares) == int(tsub.valid[n].sum()) and abs(sum(shares) - 1) < 0.05  # Eq. 10: a distribution
    browser.execute_script("window.scrollTo(0, 0)")  # the button scrolled the page
    browser.save_screenshot(str(screens / "text_tokens.png"))
    assert browser.get_log("browser") == []
