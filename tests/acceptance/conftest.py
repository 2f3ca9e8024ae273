"""Fixtures shared by the acceptance tests: one ``hookchains demo`` run per test session (the embedded
MobileNetV2 with its real ImageNet weights, the bundled photos, the explorer page), so the demo's
minutes are spent once however many tests read its run folder."""
from __future__ import annotations

from pathlib import Path

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
