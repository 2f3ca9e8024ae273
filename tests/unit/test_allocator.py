"""keep_freed_memory(): freed featuremaps are reused instead of faulted in again (counted page faults,
in fresh processes: the setting is process-wide)."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
if sys.argv[1] == "tuned":
    from hookchains.core.allocator import keep_freed_memory
    assert keep_freed_memory()
x, conv = torch.randn(20, 32, 40, 40), torch.nn.Conv2d(32, 96, 1)
def step():  # featuremaps of a few MiB to 20 MiB, allocated and freed as in a fit step
    with torch.no_grad():
        y = conv(x)
        return float((torch.relu(y) * 2 + y).sum())
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_reused_memory_takes_a_fraction_of_the_page_faults():
    default, tuned = _faults("default"), _faults("tuned")
    assert tuned * 5 < default, f"page faults over 20 steps: default malloc {default}, tuned {tuned}"


def test_elsewhere_it_changes_nothing_and_says_so(monkeypatch):
    from hookchains.core import allocator
    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    assert allocator.keep_freed_memory() is False
